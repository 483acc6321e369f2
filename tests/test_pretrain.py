"""``pretrain.run`` on a tiny georeferenced region writes an encoder that ``imt`` fine-tuning loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import torch

from cropmap.grid import Grid
from cropmap.modalities import band_descriptions, n_channels
from cropmap.models import build_model
from cropmap.pretrain import run

MONTHS = ["2023-05", "2023-06"]
MODS = ["s2", "s1", "weather", "dem"]  # no weather stack: read as missing


def _region(root: Path) -> tuple[Grid, Path, Path]:
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=32, height=32)
    rng = np.random.default_rng(0)
    stack = root / "stack"
    stack.mkdir()
    for m in ("s2", "s1", "dem"):
        n = len(band_descriptions(m, MONTHS))
        a = rng.normal(size=(n, grid.height, grid.width)).astype(np.float32)
        if m == "s1":
            a[:, :16, :16] = np.nan  # one chip without S1
        with rasterio.open(stack / f"{m}.tif", "w", **grid.profile(n)) as dst:
            dst.write(a)
            dst.descriptions = tuple(band_descriptions(m, MONTHS))
    labels = np.stack([np.full(grid.shape, 255, np.uint8), np.zeros(grid.shape, np.uint8)])
    labels[1, 16:, 16:] = 2  # test block
    with rasterio.open(root / "labels.tif", "w", **grid.profile(2, "uint8", 255)) as dst:
        dst.write(labels)
    rows = []
    for r in (0, 16):
        for c in (0, 16):
            x0, y1 = grid.xmin + c * grid.res, grid.ymax - r * grid.res
            rows.append(
                {
                    "row": r,
                    "col": c,
                    "size": 16,
                    "xmin": x0,
                    "xmax": x0 + 160.0,
                    "ymin": y1 - 160.0,
                    "ymax": y1,
                    "split": "test" if (r, c) == (16, 16) else "train",
                    "n_labelled": 0,
                    "present_s2": 1.0,
                    "present_s1": 0.0 if (r, c) == (0, 0) else 1.0,
                    "present_weather": 0.0,
                    "present_dem": 1.0,
                }
            )
    chips = root / "chips.parquet"
    pd.DataFrame(rows).to_parquet(chips, index=False)
    return grid, stack, chips


def test_pretrain_writes_an_encoder_that_finetuning_loads(tmp_path: Path) -> None:
    grid, stack, chips = _region(tmp_path)
    out = tmp_path / "models" / "imt_pretrained.pt"
    summary = run(
        stack, chips, grid, MONTHS, MODS, out, epochs=2, batch_size=2, lr=1e-3, seed=0, device="cpu"
    )
    assert out.exists() and not list(out.parent.glob(".*part*"))
    assert (
        summary["n_chips"] == 3 and summary["steps"] == 2
    )  # the test chip is left out; 1 full batch per epoch
    assert all(np.isfinite(summary["loss"]))
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    model = build_model(
        "imt",
        task="segmentation",
        modalities=MODS,
        in_channels={m: n_channels(m) for m in MODS},
        n_steps=len(MONTHS),
        n_classes=3,
        pretrained=str(out),
    )
    assert model.pretrained_from == str(out)
    state = model.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["encoder"].items())
    with torch.no_grad():
        x = {m: torch.randn(1, len(band_descriptions(m, MONTHS)), 16, 16) for m in MODS}
        logits = model.eval()({**x, "mask": torch.tensor([[True, True, False, True]])})["logits"]
    assert logits.shape == (1, 3, 16, 16) and torch.isfinite(logits).all()
