"""Every segmentation method learns through the real training path (``train.fit_chips``) in seconds.

A tiny georeferenced region (real GeoTIFFs) whose Sentinel-2 and Sentinel-1 time series carry
the class of their field, with clouds and an orbit gap; weather and DEM are noise. Each method is
trained for a few dozen steps and must reach a validation loss well below chance (ln K) and a
held-out weighted F1 far above chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from sklearn.metrics import f1_score

from cropmap.chips import chip_table
from cropmap.datasets import IGNORE_INDEX
from cropmap.grid import Grid
from cropmap.modalities import band_descriptions
from cropmap.models import methods_for
from cropmap.predict.bundle import load_bundle
from cropmap.segdata import CachedChips, read_chips
from cropmap.train import TrainSettings, fit_chips

MONTHS = ["2023-04", "2023-06", "2023-08"]
MODS = ["s2", "s1", "weather", "dem"]
CLASSES = [{"id": k, "name": n} for k, n in enumerate(["wheat", "maize", "soybean"])]
K = len(CLASSES)
SIZE, CHIP, FIELD = 64, 16, 8


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("segtrain")
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=SIZE, height=SIZE)
    rng = np.random.default_rng(0)
    n_f = SIZE // FIELD
    fields = rng.integers(0, K, (n_f, n_f))
    cls = fields.repeat(FIELD, 0).repeat(FIELD, 1).astype(np.uint8)
    cls[::FIELD, :] = 255  # unlabelled field edges
    stack = root / "stack"
    stack.mkdir()
    for m in MODS:
        n = len(band_descriptions(m, MONTHS))
        if m in ("s2", "s1"):
            signature = rng.normal(size=(K, n)).astype(np.float32)  # class time series
            a = signature[fields].transpose(2, 0, 1).repeat(FIELD, 1).repeat(FIELD, 2)
            a = a + rng.normal(scale=0.6 if m == "s2" else 1.0, size=a.shape).astype(np.float32)
        else:
            a = rng.normal(size=(n, SIZE, SIZE)).astype(np.float32)
        if m == "s2":
            a[:, rng.random((SIZE, SIZE)) < 0.1] = np.nan  # clouds
        if m == "s1":
            a[:, :, 40:46] = np.nan  # orbit gap
        with rasterio.open(stack / f"{m}.tif", "w", **grid.profile(n)) as dst:
            dst.write(a)
            dst.descriptions = tuple(band_descriptions(m, MONTHS))
    split = np.zeros((SIZE // CHIP, SIZE // CHIP), np.uint8)
    split[0, 1] = split[2, 3] = split[3, 0] = 1  # val
    split[1, 2] = 2  # test
    labels = root / "labels.tif"
    with rasterio.open(labels, "w", **grid.profile(2, "uint8", 255)) as dst:
        dst.write(np.stack([cls, split.repeat(CHIP, 0).repeat(CHIP, 1)]))
    chips = root / "chips.parquet"
    chip_table(stack, labels, grid, MONTHS, MODS, CHIP, 0.5).to_parquet(chips)
    return stack, labels, chips


@pytest.mark.parametrize("method", methods_for("segmentation"))
def test_segmentation_method_learns(region: tuple[Path, Path, Path], tmp_path: Path, method: str) -> None:
    stack, labels, chips_path = region
    chips = pd.read_parquet(chips_path)
    torch.set_num_threads(1)
    # FullCo/Co-Miss align half of each modality's features across modalities (12 InfoNCE terms
    # at gamma 0.07): with 8 shared dimensions that term holds the classifier back for dozens of
    # steps, with 16 it does not
    hidden = 32 if method in ("fullco", "comiss") else 16
    settings = TrainSettings(task="segmentation", method=method, modalities=MODS, months=MONTHS, classes=CLASSES,
                             hidden=hidden, epochs=8, patience=8, batch_size=8, lr=3e-3, windows_per_epoch=48,
                             device="cpu", seed=0)
    out = tmp_path / "model.ckpt"
    summary = fit_chips(settings, stack, labels, chips, out, tmp_path / "work")
    assert summary["n_train"] == 12 and summary["n_val"] == 3
    # chance is ln K; decision-level fusion averages in the logits of the two noise modalities
    assert summary["best_val_loss"] < 0.6 * math.log(K), summary
    metrics = pd.read_csv(tmp_path / "work" / "logs" / "version_0" / "metrics.csv")
    assert metrics["val_loss"].dropna().iloc[0] > metrics["val_loss"].dropna().min(), "validation loss never fell"
    model, norm, bundle = load_bundle(out)
    assert bundle["task"] == "segmentation" and json.dumps(bundle["summary"])
    val = CachedChips(read_chips(stack, labels, chips[chips.split == "val"], MONTHS, MODS, 0.5, progress=False))
    batch = {k: torch.stack([val[i][k] for i in range(len(val))]) for k in (*MODS, "mask", "y")}
    with torch.no_grad():
        pred = model(norm(batch))["logits"].argmax(1)
    y = batch["y"]
    keep = y != IGNORE_INDEX
    f1 = f1_score(y[keep].numpy(), pred[keep].numpy(), average="weighted")
    assert f1 > 0.8, (method, f1)
