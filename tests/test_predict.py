"""Prediction: tiles equal the whole region, per-pixel masks, nodata where no sensor exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from cropmap.grid import Grid, tile_window, tiles
from cropmap.modalities import MODALITIES, band_descriptions
from cropmap.predict import Predictor, hann
from cropmap.train import CoLearningModule, TrainSettings, save_bundle

MONTHS = ["2023-04", "2023-05", "2023-06", "2023-07"]
CLASSES = [{"id": i, "name": f"c{i}", "colour": "#101010"} for i in range(3)]


@pytest.fixture
def grid() -> Grid:
    return Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=52, height=44)


@pytest.fixture
def stacks(tmp_path: Path, grid: Grid) -> Path:
    """Random stacks with gaps: S2 cloudy in the top rows, S1 strip missing, a corner with nothing."""
    rng = np.random.default_rng(0)
    d = tmp_path / "stack"
    d.mkdir()
    for m in MODALITIES:
        n = len(band_descriptions(m, MONTHS))
        a = rng.normal(size=(n, grid.height, grid.width)).astype(np.float32)
        if m == "s2":
            a[:, :10, :] = np.nan  # all months cloudy
        if m == "s1":
            a[:, :, 30:38] = np.nan  # orbit gap
        a[:, 36:, 44:] = np.nan  # nothing at all here
        with rasterio.open(d / f"{m}.tif", "w", **grid.profile(n)) as dst:
            dst.write(a)
            dst.descriptions = tuple(band_descriptions(m, MONTHS))
    return d


def bundle(tmp_path: Path, task: str) -> Path:
    torch.manual_seed(0)
    s = TrainSettings(task=task, method="comiss", modalities=list(MODALITIES), months=MONTHS, classes=CLASSES, hidden=8)  # type: ignore[arg-type]
    stats = {m: ([0.0] * len(band_descriptions(m, ["x"])), [1.0] * len(band_descriptions(m, ["x"]))) for m in MODALITIES}
    module = CoLearningModule(s.model_kwargs(), stats, 1e-3, None)
    out = tmp_path / f"{task}.ckpt"
    save_bundle(module, s, out, {})
    return out


def predict_map(p: Predictor, stacks: Path, grid: Grid, size: int, chip: int = 16) -> tuple[np.ndarray, ...]:
    files = {m: stacks / f"{m}.tif" for m in MODALITIES}
    cls = np.zeros(grid.shape, np.uint8)
    bits = np.zeros(grid.shape, np.uint8)
    proba = np.zeros((3, *grid.shape), np.float32)
    for name in tiles(grid, size):
        w = tile_window(grid, name, size)
        r = p.predict_tile(files, w, chip, 0.5)
        sl = (slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width))
        cls[sl], bits[sl], proba[(slice(None), *sl)] = r.cls, r.bits, r.proba
    return cls, bits, proba


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_tiles_equal_whole_region(tmp_path: Path, stacks: Path, grid: Grid, task: str) -> None:
    p = Predictor(bundle(tmp_path, task), "cpu", batch_size=1024)
    whole = predict_map(p, stacks, grid, size=max(grid.shape))
    tiled = predict_map(p, stacks, grid, size=20)
    np.testing.assert_allclose(tiled[2], whole[2], atol=1e-5)
    assert (tiled[0] == whole[0]).mean() > 0.999  # argmax ties may flip at float noise
    assert (tiled[1] == whole[1]).all()


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_bitmask_matches_valid_inputs_and_no_sensor_is_nodata(tmp_path: Path, stacks: Path, grid: Grid, task: str) -> None:
    p = Predictor(bundle(tmp_path, task), "cpu")
    cls, bits, _ = predict_map(p, stacks, grid, size=24)
    s2, s1, weather, dem = (1 << MODALITIES.index(m) for m in MODALITIES)
    assert (bits[:10, :44] & s2 == 0).all() and (bits[10:36, :30] & s2).all()
    assert (bits[10:36, 30:38] & s1 == 0).all() and (bits[:36, :30] & s1).all()
    assert (bits[36:, 44:] == 0).all() and (cls[36:, 44:] == 255).all()
    assert (cls[:36] != 255).all()


def test_tile_with_no_modality_anywhere_is_all_nodata(tmp_path: Path, stacks: Path, grid: Grid) -> None:
    p = Predictor(bundle(tmp_path, "classification"), "cpu")
    w = rasterio.windows.Window(44, 36, 8, 8)
    r = p.predict_tile({m: stacks / f"{m}.tif" for m in MODALITIES}, w)
    assert (r.cls == 255).all() and (r.confidence == 0).all() and (r.bits == 0).all()


def test_hann_weights_sum_to_one_at_half_overlap() -> None:
    w = hann(16)[0] / hann(16)[0].max()  # 1-D profile
    prof = np.sin(np.pi * (np.arange(16) + 0.5) / 16) ** 2
    assert np.allclose(w * prof.max(), prof)
    assert np.allclose(prof[:8] + prof[8:], 1.0)
