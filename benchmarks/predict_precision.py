"""Does the reduced-precision model step draw the fp32 model's map? Class agreement and held-out F1.

    python benchmarks/predict_precision.py [--workdir .] [--region demo] [--precision bf16]

For a region the workflow has trained (run ``snakemake maps`` in ``--workdir`` first: the
model ``models_dir/<region>/<task>/model.ckpt``, the stacks, labels and chips under
``data_dir``), every pixel of the region is predicted twice, with the fp32 model step and with
``--precision``, and the map classes are compared; then the ``metrics`` stage's held-out scores
(test split, every sensor subset) are computed with both. Prints one line per subset with both
weighted F1s, then ``agreement=<% of mapped pixels with the same class> dF1_all=<|difference| of
the all-sensor weighted F1, points> max_abs_dF1=<the largest over the subsets> (subset <which>)``.
Targets (issue 17): agreement >= 99.5 %, held-out weighted F1 within 0.5 points. Subsets whose
model is near chance (weather alone: ERA5 is nearly constant over a region, so its logits are
nearly tied for every pixel at once) can move more than that; the script names the subset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from cropmap import metrics
from cropmap.config import load, region_grid
from cropmap.grid import Grid, tile_window, tiles
from cropmap.labels import NODATA
from cropmap.predict import Predictor


def region_map(p: Predictor, stack_dir: Path, cfg: dict, grid: Grid) -> np.ndarray:
    """Classes of every pixel of the region (``NODATA`` where no sensor), tile by tile as ``predict`` does."""
    pr = cfg["prediction"]
    stacks = {m: stack_dir / f"{m}.tif" for m in cfg["modalities"] if (stack_dir / f"{m}.tif").exists()}
    cls = np.full(grid.shape, NODATA, np.uint8)
    for name in tiles(grid, pr["tile_size"]):
        w = tile_window(grid, name, pr["tile_size"])
        res = p.predict_tile(stacks, w, cfg["chips"]["size"], pr["overlap"])
        cls[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] = res.cls
    return cls


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--workdir", type=Path, default=Path("."), help="the workflow's directory (holds config.yaml)")
    ap.add_argument("--config", type=Path, default=None, help="config file (default <workdir>/config.yaml)")
    ap.add_argument("--region", default=None, help="region (default: the config's first)")
    ap.add_argument("--precision", default="bf16", help="the precision compared with fp32 (default bf16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU model threads")
    args = ap.parse_args(argv)
    wd = args.workdir.resolve()
    cfg = load(args.config or wd / "config.yaml")
    region = args.region or next(iter(cfg["regions"]))
    grid = region_grid(cfg["regions"][region])
    data = wd / cfg["data_dir"] / region
    ckpt = wd / cfg["models_dir"] / region / cfg["model"]["task"] / "model.ckpt"
    if not ckpt.exists():
        sys.exit(f"{ckpt} is missing: run `snakemake maps` in {wd} first")
    torch.set_num_threads(args.threads)
    batch = cfg["prediction"]["batch_size"]
    preds = {q: Predictor(ckpt, "cpu", batch, threads=args.threads, precision=q) for q in ("fp32", args.precision)}
    print(f"region={region} task={cfg['model']['task']} method={cfg['model']['method']} size={grid.width}x{grid.height} "
          f"precision={args.precision} (autocast dtype {preds[args.precision].dtype})", flush=True)
    maps, seconds = {}, {}
    for q, p in preds.items():
        t0 = time.perf_counter()
        maps[q] = region_map(p, data / "stack", cfg, grid)
        seconds[q] = time.perf_counter() - t0
    mapped = (maps["fp32"] != NODATA) | (maps[args.precision] != NODATA)
    agree = 100 * float((maps["fp32"] == maps[args.precision])[mapped].mean())
    print(f"map: {int(mapped.sum())} mapped pixels, fp32 {seconds['fp32']:.1f}s, {args.precision} "
          f"{seconds[args.precision]:.1f}s", flush=True)
    ev = cfg["evaluation"]
    tables = {q: metrics.evaluate(ckpt, data / "stack", data / "labels.tif", data / "chips.parquet", grid,
                                  max_pixels_per_class=ev["max_pixels_per_class"], seed=cfg["seed"], device="cpu",
                                  batch_size=batch, precision=q).set_index("subset") for q in preds}
    ref, low = tables["fp32"], tables[args.precision]
    delta = (low["f1_weighted"] - ref["f1_weighted"]).abs()
    for sub in ref.index:
        print(f"{sub:24s} n={int(ref.loc[sub, 'n']):6d} wF1 fp32={ref.loc[sub, 'f1_weighted']:6.2f} "
              f"{args.precision}={low.loc[sub, 'f1_weighted']:6.2f}")
    print(f"agreement={agree:.3f} dF1_all={float(delta.iloc[0]):.3f} max_abs_dF1={float(delta.max()):.3f} "
          f"(subset {delta.idxmax()})")


if __name__ == "__main__":
    main()
