"""One-command check of the accelerated paths: training, prediction and the demo workflow on one device.

    python benchmarks/gpu_check.py                     # on a GPU: the full check, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # smoke test of the same code paths (CI)

Prints, for the default config's model (``model.method``, ``model.hidden``):

1. training throughput, samples per second (pixels; chips for segmentation) of the ``train``
   stage's step (:class:`cropmap.loop.CoLearningModule.training_step`, backward, Adam) on
   in-memory random batches of ``training.batch_size`` at the precision ``train`` uses
   (bf16 autocast on a GPU, fp32 on a CPU), for the pixel and the segmentation default;
2. prediction throughput of both tasks, megapixels per second of the model alone and through
   the pipeline (stack files -> tiles -> map COG), and ``pipeline_vs_model``, with the functions
   of ``benchmarks/predict_throughput.py`` (its (a) and (b)) on a synthetic region;
3. the wall time of the demo's ``snakemake --cores all maps`` from scratch (fetch to map) in a
   temporary directory with ``training.device`` and ``prediction.device`` set to ``--device``.

Every timed section waits for queued CUDA work (``torch.cuda.synchronize``) before reading the
clock; peak GPU memory (``torch.cuda.max_memory_allocated``, reset per section) is printed per
training and prediction section (on a CPU: the process's peak RSS). ``--quick`` shrinks every
section (a few steps, a 128 px region, a ~100 px region for the workflow, 1 epoch) so that the
same code runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import predict_throughput as PT

from cropmap.loop import CoLearningModule
from cropmap.predict import Predictor, load_bundle
from cropmap.train import TrainSettings, precision

#: A ~100 x 105 px region of the demo's area for ``--quick`` workflow runs.
QUICK_BBOX = [4.80, 45.70, 4.8125, 45.7095]


def peak_memory(device: str) -> str:
    """Peak GPU memory allocated since the last reset (CUDA) or the process's peak RSS (CPU)."""
    if device == "cuda":
        return f"peak_gpu_mem={torch.cuda.max_memory_allocated() / 2**20:.0f}MiB"
    return f"peak_rss={C.peak_rss_mb():.0f}MB"


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def train_throughput(task: str, cfg: dict, ckpt: Path, args: argparse.Namespace) -> str:
    """Samples per second of the training step (forward with the method's losses, backward, Adam)."""
    settings = TrainSettings.from_config(cfg, task, C.months(cfg))  # type: ignore[arg-type]
    dev = torch.device(args.device)
    prec = precision(settings.precision, "gpu" if args.device == "cuda" else "cpu")
    bf16 = prec.startswith("bf16")
    stats = load_bundle(ckpt)[2]["stats"]
    module = CoLearningModule(settings.model_kwargs(), stats, settings.lr, None).to(dev).train()
    opt = module.configure_optimizers()
    chip = cfg["chips"]["size"]
    n = settings.batch_size if not args.quick else min(settings.batch_size, 64 if task == "classification" else 4)
    batch = Predictor(ckpt, args.device, threads=args.threads, precision="fp32").example(n, chip)
    k = module.model.n_classes
    shape = (n, chip, chip) if task == "segmentation" else (n,)
    batch["y"] = torch.randint(0, k, shape, generator=torch.Generator().manual_seed(0)).to(dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm, most, min_s = (1, 3, 0.0) if args.quick else (3, 200, 5.0)
    with warnings.catch_warnings():  # training_step logs; there is no Trainer to log to here
        warnings.filterwarnings("ignore", message=".*self.log.*")
        for _ in range(warm):
            step()
        C.sync(args.device)
        reset_peak(args.device)
        steps, t0 = 0, time.perf_counter()
        while steps < most and (steps < 2 or time.perf_counter() - t0 < min_s):
            step()
            steps += 1
        C.sync(args.device)
        dt = time.perf_counter() - t0
    unit = f"chips of {chip} px, {steps * n * chip * chip / dt / 1e6:.3f} Mpx/s" if task == "segmentation" else "pixels"
    return (f"train   task={task} batch={n} precision={prec}: {steps * n / dt:10.1f} samples/s ({unit}; "
            f"{steps} steps) {peak_memory(args.device)}")


def predict_throughput(task: str, cfg: dict, ckpt: Path, grid: object, stack_dir: Path, args: argparse.Namespace) -> str:
    """Model-alone and pipeline Mpx/s of ``benchmarks/predict_throughput.py`` for one task."""
    ns = argparse.Namespace(device=args.device, threads=args.threads,
                            batch_size=65536 if args.device == "cuda" else cfg["prediction"]["batch_size"],
                            model_pixels=4096 if args.quick else (262144 if args.device == "cuda" else 65536),
                            min_seconds=0.0 if args.quick or args.device == "cpu" else 3.0)
    stacks = {m: stack_dir / f"{m}.tif" for m in cfg["modalities"] if (stack_dir / f"{m}.tif").exists()}
    reset_peak(args.device)
    a = PT.model_alone(ckpt, stacks, grid, ns, cfg)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(dir=C.BENCH, prefix="gpucheck.") as tmp:
        b = PT.pipeline(ckpt, stack_dir, grid, ns, cfg, Path(tmp))  # type: ignore[arg-type]
    dtype = Predictor(ckpt, args.device, threads=args.threads).dtype
    return (f"predict task={task} precision={'fp32' if dtype is None else 'bf16'}: "
            f"model {a:8.4f} Mpx/s  pipeline {b:8.4f} Mpx/s  pipeline_vs_model={b / a:.2f} {peak_memory(args.device)}")


def demo_maps(args: argparse.Namespace) -> str:
    """Wall time of ``snakemake --cores all maps`` for the demo config from scratch on ``--device``."""
    cfg = yaml.safe_load((C.ROOT / "config.yaml").read_text())
    for block in ("training", "prediction"):
        cfg.setdefault(block, {})["device"] = args.device
    if args.quick:  # a ~100 px corner of the demo region, one epoch
        region = next(iter(cfg["regions"].values()))
        cfg["regions"] = {"quick": dict(region, bbox=QUICK_BBOX)}
        cfg["split"] = {"block_size": 32}
        cfg["training"].update(epochs=1, pixels_per_class=150, batch_size=128)
        cfg["prediction"]["tile_size"] = 128  # one tile: one predict job
    with tempfile.TemporaryDirectory(dir=C.BENCH, prefix="gpucheck-maps.") as tmp:
        wd = Path(tmp)
        for key, sub in (("data_dir", "data"), ("results_dir", "results"), ("models_dir", "models")):
            cfg[key] = str(wd / sub)
        (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(C.ROOT / "Snakefile"), "--directory", str(wd),
               "--cores", "all", "maps"]
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((wd / "logs").rglob("*.log")))
            sys.exit(f"snakemake maps failed ({dt:.0f} s):\n{res.stderr[-3000:]}\n{logs}")
        regions = ", ".join(cfg["regions"])
    return f"maps    snakemake --cores all maps (region {regions}, device {args.device}, from scratch): {dt:.1f} s wall"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="a few steps and tiny regions: a smoke test of the same paths")
    ap.add_argument("--size", type=int, default=None, help="prediction region side (default 1024 on CUDA, 512 on CPU, 128 quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    ap.add_argument("--skip-maps", action="store_true", help="skip the snakemake run (section 3)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible (use --device cpu --quick for the smoke test)")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = C.config()
    size = args.size or (128 if args.quick else 1024 if args.device == "cuda" else 512)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device={args.device} ({name}) torch={torch.__version__} method={cfg['model']['method']} "
          f"hidden={cfg['model']['hidden']} quick={args.quick} region={size}x{size}", flush=True)
    grid, stack_dir = C.region(size, cfg)
    for task in ("classification", "segmentation"):
        ckpt = C.bundle(task, cfg, stack_dir, C.BENCH / f"model_{task}.ckpt")
        print(train_throughput(task, cfg, ckpt, args), flush=True)
        print(predict_throughput(task, cfg, ckpt, grid, stack_dir, args), flush=True)
    if not args.skip_maps:
        print(demo_maps(args), flush=True)
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
