"""Prediction time and peak memory against region size (1x, 4x, 16x area).

    python benchmarks/predict_scaling.py [--device cpu] [--base 256] [--task classification]

The regions are the ``--base`` px synthetic region repeated 1x1, 2x2 and 4x4 times (256, 512 and
1024 px sides by default), so they hold the same content per unit area and the model's work per
pixel is the same (it depends on which sensors each pixel has). Each size is predicted from its stack files to the map COG (every tile of
``prediction.tile_size`` with one loaded model, then the mosaic), in a fresh Python process
whose peak RSS (``VmHWM``, imports and model included) is reported with the wall time of the
prediction. Targets: 16x area within 20x time, peak RSS at 16x at most 1.3x that at 1x.
Regions and the (untrained, default-size) model are cached under ``.bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def child(factor: int, args: argparse.Namespace) -> None:
    """Predict one region and print ``{"seconds", "maxrss_mb"}`` as JSON (run in a fresh process)."""
    import torch

    from cropmap import mosaic, predict
    from cropmap.grid import tiles

    torch.set_num_threads(args.threads)
    cfg = C.config()
    grid, stack_dir = C.tiled_region(args.base, factor, cfg)
    ckpt = C.BENCH / f"model_{args.task}.ckpt"
    pr = cfg["prediction"]
    t0 = time.perf_counter()
    pred = predict.Predictor(ckpt, args.device, args.batch_size, threads=args.threads)
    with tempfile.TemporaryDirectory(dir=C.BENCH, prefix="scale.") as tmp:
        outs = []
        for name in tiles(grid, pr["tile_size"]):
            out = Path(tmp) / "tiles" / f"{name}.tif"
            out.parent.mkdir(parents=True, exist_ok=True)
            predict.run(ckpt, stack_dir, grid, name, out, tile_size=pr["tile_size"], modalities=cfg["modalities"],
                        chip_size=cfg["chips"]["size"], overlap=pr["overlap"], batch_size=args.batch_size,
                        device=args.device, probabilities=pr["probabilities"], predictor=pred)
            outs.append(out)
        mosaic.mosaic_to_cog(outs, Path(tmp) / "map.tif", grid, cfg["classes"], tags={"cropmap_region": "bench"})
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    print(json.dumps({"size": grid.width, "tiles": len(outs), "seconds": seconds, "maxrss_mb": C.peak_rss_mb()}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--base", type=int, default=256, help="side of the 1x region (pixels)")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4], help="side multiples (area = factor^2)")
    ap.add_argument("--task", choices=["classification", "segmentation"], default="classification")
    ap.add_argument("--batch-size", type=int, default=None, help="default prediction.batch_size (CPU), 65536 (CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the predict rule)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = C.config()
    args.batch_size = args.batch_size or (65536 if args.device == "cuda" else cfg["prediction"]["batch_size"])
    if args.child is not None:
        child(args.child, args)
        return
    rows = []
    for factor in args.factors:  # build the regions and the model first, outside the measured processes
        C.tiled_region(args.base, factor, cfg)
    C.bundle(args.task, cfg, C.region(args.base, cfg)[1], C.BENCH / f"model_{args.task}.ckpt")
    print(f"device={args.device} task={args.task} tile={cfg['prediction']['tile_size']} batch_size={args.batch_size} "
          f"threads={args.threads}", flush=True)
    for factor in args.factors:
        cmd = [sys.executable, __file__, "--child", str(factor), "--base", str(args.base), "--device", args.device,
               "--task", args.task, "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["area"] = (factor / args.factors[0]) ** 2
        size = r["size"]
        rows.append(r)
        print(f"size={size}x{size} area={r['area']:.0f}x tiles={r['tiles']} time={r['seconds']:.1f}s "
              f"peak_rss={r['maxrss_mb']:.0f}MB", flush=True)
    lo, hi = rows[0], rows[-1]
    print(f"time_{hi['area']:.0f}x_vs_1x={hi['seconds'] / lo['seconds']:.2f} "
          f"rss_{hi['area']:.0f}x_vs_1x={hi['maxrss_mb'] / lo['maxrss_mb']:.2f}")


if __name__ == "__main__":
    main()
