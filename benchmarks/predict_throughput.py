"""Prediction throughput on one synthetic region: model alone, the pipeline, a naive TorchGeo loop.

    python benchmarks/predict_throughput.py --device cpu|cuda [--size 512] [--task classification]

Prints megapixels per second (map pixels) for

(a) the model alone: the pipeline's model step (``Predictor.apply``: inference rewrites,
    ``inference_mode``, bf16 autocast where the device has bf16 arithmetic: ``prediction.precision``
    ``auto``) on batches already in memory (on the device for CUDA), of the same batch size;
(b) the full predict path from the stack files to the map COG: every tile of
    ``prediction.tile_size`` through :func:`cropmap.predict.run` (one loaded model, as a
    warm worker) then :func:`cropmap.mosaic.mosaic_to_cog`;
(c) a naive loop: TorchGeo ``IntersectionDataset`` of the :mod:`cropmap.datasets` stack datasets,
    ``GridGeoSampler`` (chip size windows; segmentation: the blending stride) and a
    ``DataLoader``, the same weights through :func:`cropmap.predict.load_bundle`, the same batch
    size and CPU threads (``--threads``, default all cores: torch intra-op threads here, model
    threads in the pipeline), outputs kept in memory (no file written).

The last line is ``pipeline_vs_model=<b/a> pipeline_vs_naive=<b/c>``, then the ratio of the CPU
seconds (all threads) of (c) and (b): on a machine that others share, wall-clock ratios swing
with their load while CPU time moves much less. The region and the model (the default config's
method and size, untrained) are cached under ``.bench/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from cropmap import mosaic, predict
from cropmap.availability import presence_stack
from cropmap.datasets import open_stacks, to_time_series
from cropmap.grid import Grid, tile_window, tiles
from cropmap.predict import load_bundle
from cropmap.predict.chips import hann, windows


class _Collector(predict.Predictor):
    """A Predictor whose model step only keeps the batches (up to ``limit`` map pixels)."""

    limit = 0
    collected: list

    def apply(self, items, scatter):  # type: ignore[no-untyped-def, override]
        self.collected = []
        n = 0
        for meta, batch in items:
            self.collected.append((meta, batch))
            n += len(meta)
            if n >= self.limit:
                break
        if hasattr(items, "close"):
            items.close()


def model_alone(ckpt: Path, stacks: dict[str, Path], grid: Grid, args: argparse.Namespace, cfg: dict) -> float:
    """(a): map pixels per second of the model step on in-memory batches."""
    p = _Collector(ckpt, args.device, args.batch_size, threads=args.threads)
    chip, overlap, tile_size = cfg["chips"]["size"], cfg["prediction"]["overlap"], cfg["prediction"]["tile_size"]
    seg = p.task == "segmentation"
    p.limit = args.model_pixels // (chip * chip) if seg else args.model_pixels
    p.predict_tile(stacks, tile_window(grid, tiles(grid, tile_size)[0], tile_size), chip, overlap)
    batches = [({k: v.to(p.device) for k, v in b.items()}, len(meta)) for meta, b in p.collected]
    if seg:  # map pixels per window: the pipeline computes every lattice window of every tile
        stride = max(1, round(chip * (1 - overlap)))
        n_win = sum(len(list(windows(tile_window(grid, t, tile_size), chip, stride))) for t in tiles(grid, tile_size))
        px_per_item = grid.width * grid.height / n_win
    else:
        px_per_item = 1.0
    items = [(None, b) for b, _ in batches]
    per_rep = sum(n for _, n in batches) * px_per_item
    run = predict.Predictor.apply  # the real model step, not the collector's
    run(p, items[:1], lambda meta, proba: None)  # warm-up (cuDNN autotuning, allocator)
    C.sync(args.device)
    reps, t0 = 0, time.perf_counter()
    while True:  # the pipeline's model step (CPU: its model threads and chunks; CUDA: one stream)
        run(p, items, lambda meta, proba: None)
        reps += 1
        C.sync(args.device)
        if time.perf_counter() - t0 >= args.min_seconds or reps >= 50:
            break
    return C.mpx(reps * per_rep, time.perf_counter() - t0)


def pipeline(ckpt: Path, stack_dir: Path, grid: Grid, args: argparse.Namespace, cfg: dict, work: Path) -> float:
    """(b): stack files -> tile files -> COG, map pixels per second."""
    pr = cfg["prediction"]
    t0 = time.perf_counter()
    pred = predict.Predictor(ckpt, args.device, args.batch_size, threads=args.threads)
    outs = []
    for name in tiles(grid, pr["tile_size"]):
        out = work / "tiles" / f"{name}.tif"
        out.parent.mkdir(parents=True, exist_ok=True)
        predict.run(ckpt, stack_dir, grid, name, out, tile_size=pr["tile_size"], modalities=cfg["modalities"],
                    chip_size=cfg["chips"]["size"], overlap=pr["overlap"], batch_size=args.batch_size, device=args.device,
                    probabilities=pr["probabilities"], predictor=pred)
        outs.append(out)
    mosaic.mosaic_to_cog(outs, work / "map.tif", grid, cfg["classes"], tags={"cropmap_region": "bench"})
    return C.mpx(grid.width * grid.height, time.perf_counter() - t0)


def _intersection(datasets: list) -> object:
    """``IntersectionDataset`` of several datasets (TorchGeo 0.8 cannot chain more than two as is)."""
    from torchgeo.datasets import IntersectionDataset

    ds = datasets[0]
    for other in datasets[1:]:
        ds = IntersectionDataset(ds, other)
        # the overlay names both file columns filepath_1/_2: drop them so a third dataset can join
        ds.index = ds.index.drop(columns=[c for c in ds.index.columns if str(c).startswith("filepath")])
    return ds


@torch.no_grad()
def naive(ckpt: Path, stack_dir: Path, grid: Grid, args: argparse.Namespace, cfg: dict) -> float:
    """(c): TorchGeo IntersectionDataset + GridGeoSampler + DataLoader, map pixels per second."""
    from torch.utils.data import DataLoader
    from torchgeo.datasets.utils import stack_samples
    from torchgeo.samplers import GridGeoSampler

    t0 = time.perf_counter()
    device = torch.device(args.device)
    model, norm, bundle = load_bundle(ckpt, device)
    mods = bundle["modalities"]
    dss = open_stacks(stack_dir, C.months(cfg), mods)
    order = list(dss)
    counts = [len(dss[m].all_bands) for m in order]
    ds = _intersection([dss[m] for m in order])
    chip, overlap = cfg["chips"]["size"], cfg["prediction"]["overlap"]
    seg = bundle["task"] == "segmentation"
    stride = max(1, round(chip * (1 - overlap))) if seg else chip
    sampler = GridGeoSampler(ds, size=chip, stride=stride)
    loader = DataLoader(ds, sampler=sampler, batch_size=max(1, args.batch_size // (chip * chip)), collate_fn=stack_samples)
    k = bundle["model_kwargs"]["n_classes"]
    cls = np.full(grid.shape, 255, np.uint8)
    acc = np.zeros((k, *grid.shape), np.float32) if seg else None
    wsum = np.zeros(grid.shape, np.float32)
    weight = hann(chip)
    xmin, ymax, res = grid.xmin, grid.ymax, grid.res
    mvf = bundle["min_valid_fraction"]
    for b in loader:
        img = b["image"].numpy()
        parts = np.split(img, np.cumsum(counts)[:-1], axis=1)
        arrays = {m: np.moveaxis(a, 0, 1) for m, a in zip(order, parts, strict=True)}  # [bands, B, h, w]
        n, h, w = img.shape[0], img.shape[2], img.shape[3]
        pres = presence_stack(arrays, mods, mvf, (n, h, w))
        offs = [(round((ymax - q[1].stop) / res), round((q[0].start - xmin) / res)) for q in b["bounds"]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if seg:
                batch = {m: torch.from_numpy(np.ascontiguousarray(p)).to(device) for m, p in zip(order, parts, strict=True)}
                batch["mask"] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pres, 0, 1))).to(device)
                probs = torch.softmax(model(norm(batch))["logits"].float(), 1).cpu().numpy()
                for p, (r, c) in zip(probs, offs, strict=True):
                    acc[:, r : r + h, c : c + w] += p * weight  # type: ignore[index]
                    wsum[r : r + h, c : c + w] += weight
                continue
            flat = pres.reshape(len(mods), -1)
            sel = np.flatnonzero(flat.any(0))
            batch = {m: torch.from_numpy(to_time_series(a, m).reshape(n * h * w, *to_time_series(a, m).shape[3:])[sel]).to(device)
                     for m, a in arrays.items()}
            batch["mask"] = torch.from_numpy(flat[:, sel].T.copy()).to(device)
            probs = torch.softmax(model(norm(batch))["logits"].float(), 1).cpu().numpy()
        out = np.full(n * h * w, 255, np.uint8)
        out[sel] = probs.argmax(1)
        for i, (r, c) in enumerate(offs):
            cls[r : r + h, c : c + w] = out[i * h * w : (i + 1) * h * w].reshape(h, w)
    if seg:
        cls = (acc / np.maximum(wsum, 1e-12)).argmax(0).astype(np.uint8)  # type: ignore[operator]
    C.sync(args.device)
    return C.mpx(grid.width * grid.height, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", type=int, default=None,
                    help="region side in pixels (default 512 on CPU, 1024 on CUDA: enough read units for every reader)")
    ap.add_argument("--task", choices=["classification", "segmentation"], default="classification")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="pixels per forward pass (default prediction.batch_size on CPU, 65536 on CUDA)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads for (a), (b) and (c) (default: all cores); the pipeline runs that many "
                         "model threads, the naive loop that many torch intra-op threads")
    ap.add_argument("--model-pixels", type=int, default=None,
                    help="map pixels of in-memory batches timed in (a) (default 65536 on CPU, 262144 on CUDA)")
    ap.add_argument("--min-seconds", type=float, default=None, help="repeat (a) at least this long (default 0 CPU, 3 CUDA)")
    ap.add_argument("--skip-naive", action="store_true", help="skip (c)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    cfg = C.config()
    args.size = args.size or (1024 if cuda else 512)
    args.batch_size = args.batch_size or (65536 if cuda else cfg["prediction"]["batch_size"])
    args.model_pixels = args.model_pixels or (262144 if cuda else 65536)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (3.0 if cuda else 0.0)
    torch.set_num_threads(args.threads)
    grid, stack_dir = C.region(args.size, cfg)
    stacks = {m: stack_dir / f"{m}.tif" for m in cfg["modalities"] if (stack_dir / f"{m}.tif").exists()}
    ckpt = C.bundle(args.task, cfg, stack_dir, C.BENCH / f"model_{args.task}.ckpt")
    name = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} cores, {args.threads} thread(s)"
    p = predict.Predictor(ckpt, args.device, args.batch_size, threads=args.threads)
    print(f"device={args.device} ({name}) task={args.task} method={cfg['model']['method']} hidden={cfg['model']['hidden']} "
          f"size={args.size}x{args.size} tile={cfg['prediction']['tile_size']} batch_size={args.batch_size} "
          f"readers={p.readers} precision={'fp32' if p.dtype is None else 'bf16'} (naive loop: fp32 on CPU)", flush=True)
    a = model_alone(ckpt, stacks, grid, args, cfg)
    print(f"(a) model alone, in-memory batches:       {a:8.4f} Mpx/s", flush=True)
    cpu0 = time.process_time()  # CPU seconds of every thread: what a busy shared machine distorts least
    with tempfile.TemporaryDirectory(dir=C.BENCH, prefix="run.") as tmp:
        b = pipeline(ckpt, stack_dir, grid, args, cfg, Path(tmp))
    cpu_b, cpu0 = time.process_time() - cpu0, time.process_time()
    print(f"(b) pipeline, stack files -> map COG:      {b:8.4f} Mpx/s  ({cpu_b:.1f} CPU s)", flush=True)
    c = float("nan") if args.skip_naive else naive(ckpt, stack_dir, grid, args, cfg)
    cpu_c = time.process_time() - cpu0
    print(f"(c) naive TorchGeo IntersectionDataset loop: {c:8.4f} Mpx/s  ({cpu_c:.1f} CPU s)", flush=True)
    print(f"pipeline_vs_model={b / a:.2f} pipeline_vs_naive={b / c:.2f} (CPU time: naive/pipeline={cpu_c / cpu_b:.2f})")


if __name__ == "__main__":
    main()
