"""Prediction: tiles equal the whole region, per-pixel masks, nodata where no sensor exists."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from cropmap import predict
from cropmap.availability import presence_stack
from cropmap.datasets import to_time_series
from cropmap.device import resolve_device
from cropmap.errors import ConfigError
from cropmap.grid import Grid, tile_window, tiles
from cropmap.modalities import MODALITIES, band_descriptions, n_channels
from cropmap.models import build_model, methods_for
from cropmap.normalize import Normalizer
from cropmap.predict import Predictor, load_bundle, reading, save_bundle
from cropmap.predict import predictor as predictor_module
from cropmap.predict.chips import hann
from cropmap.predict.predictor import compute_dtype
from cropmap.predict.prefetch import prefetch
from cropmap.predict.rewrites import TempCNNInference, optimize_for_inference

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


def bundle(tmp_path: Path, task: str, method: str = "comiss") -> Path:
    torch.manual_seed(0)
    kwargs = {"method": method, "task": task, "modalities": list(MODALITIES), "in_channels": {m: n_channels(m) for m in MODALITIES},
              "n_steps": len(MONTHS), "n_classes": len(CLASSES), "hidden": 8}
    stats = {m: ([0.0] * n_channels(m), [1.0] * n_channels(m)) for m in MODALITIES}
    out = tmp_path / f"{task}_{method}.ckpt"
    save_bundle(out, build_model(**kwargs), Normalizer(stats), model_kwargs=kwargs, classes=CLASSES, modalities=MODALITIES,  # type: ignore[arg-type]
                months=MONTHS, task=task, min_valid_fraction=0.5, class_weights=None, summary={})
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


@pytest.mark.parametrize(("task", "unit", "threads", "precision"), [
    ("classification", 256, 1, "fp32"), ("segmentation", 256, 1, "fp32"), ("classification", 16, 2, "fp32"),
    ("segmentation", 16, 2, "fp32"), ("classification", 16, 2, "bf16"), ("segmentation", 16, 2, "bf16")])
def test_tiles_equal_whole_region(tmp_path: Path, stacks: Path, grid: Grid, task: str, unit: int, threads: int,
                                  precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "UNIT", unit)  # 16: read units of one 32 px block, chips across them
    p = Predictor(bundle(tmp_path, task), "cpu", batch_size=1024, threads=threads, precision=precision)
    whole = predict_map(p, stacks, grid, size=max(grid.shape))
    tiled = predict_map(p, stacks, grid, size=20)
    # bf16: chips batched with other neighbours may round differently (observed <= 3e-4)
    np.testing.assert_allclose(tiled[2], whole[2], atol=1e-5 if precision == "fp32" else 2e-3)
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
    elsewhere = np.ones(grid.shape, bool)
    elsewhere[36:, 44:] = False
    assert (bits[elsewhere] & weather).all() and (bits[elsewhere] & dem).all()
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


def test_tile_equals_one_big_batch_and_probabilities_sum_to_100(tmp_path: Path, stacks: Path, grid: Grid) -> None:
    """A tile streamed in small batches and chunks equals the plain model on all its pixels at once."""
    ckpt = bundle(tmp_path, "classification")
    p = Predictor(ckpt, "cpu", batch_size=100, threads=2, precision="fp32")
    name = "r000024_c000024"  # rows 24-44, cols 24-48: S1 gap and the corner without any sensor
    out = tmp_path / f"{name}.tif"
    res = predict.run(ckpt, stacks, grid, name, out, tile_size=24, modalities=MODALITIES, probabilities=True, predictor=p)
    w = tile_window(grid, name, 24)
    h, wd = int(w.height), int(w.width)
    with rasterio.open(out) as src:
        assert src.count == 3 + 3 and src.descriptions[3:] == ("proba_0", "proba_1", "proba_2")
        tile = src.read().astype(int)
    valid = tile[0] != 255
    assert (~valid).any() and valid.any()
    assert (np.abs(tile[3:].sum(axis=0)[valid] - 100) <= 2).all() and (tile[3:, ~valid] == 0).all()

    model, norm, _ = load_bundle(ckpt)
    arrays = {}
    for m in MODALITIES:
        with rasterio.open(stacks / f"{m}.tif") as src:
            arrays[m] = src.read(window=w, out_dtype="float32")
    pres = presence_stack(arrays, MODALITIES, 0.5, (h, wd)).reshape(len(MODALITIES), -1)
    sel = np.flatnonzero(pres.any(axis=0))
    batch = {m: torch.from_numpy(np.ascontiguousarray(to_time_series(a, m).reshape(h * wd, *to_time_series(a, m).shape[2:])[sel]))
             for m, a in arrays.items()}
    batch["mask"] = torch.from_numpy(pres[:, sel].T.copy())
    with torch.no_grad():
        big = torch.softmax(model(norm(batch))["logits"], 1).numpy().T
    np.testing.assert_allclose(res.proba.reshape(3, -1)[:, sel], big, atol=1e-5)
    assert (np.abs(tile[3:].reshape(3, -1)[:, sel] - np.round(big * 100)) <= 1).all()
    assert (res.cls.ravel()[sel] == big.argmax(0)).mean() > 0.999


@pytest.mark.parametrize(("task", "method"), [(t, m) for t in ("classification", "segmentation") for m in methods_for(t, gradient=True)])  # type: ignore[arg-type]
def test_inference_rewrites_keep_the_function(tmp_path: Path, task: str, method: str) -> None:
    """Every method: BatchNorm folded, channels-last layouts where they keep the logits."""
    model, norm, b = load_bundle(bundle(tmp_path, task, method))
    gen = torch.Generator().manual_seed(1)
    for mod in model.modules():  # non-trivial BatchNorm statistics, so folding has something to fold
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen))
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.weight.shape, generator=gen))
    n, t = 64, len(MONTHS)
    if task == "classification":
        batch = {m: torch.randn(n, t, c) if b["temporal"][m] else torch.randn(n, c) for m, c in b["model_kwargs"]["in_channels"].items()}
        batch["mask"] = torch.rand(n, len(MODALITIES)) > 0.3
    else:
        batch = {m: torch.randn(4, c * (t if b["temporal"][m] else 1), 16, 16) for m, c in b["model_kwargs"]["in_channels"].items()}
        batch["mask"] = torch.rand(4, len(MODALITIES), 16, 16) > 0.3
    with torch.no_grad():
        ref = model(norm(batch))["logits"]
        example = {k: v[:2] for k, v in batch.items()}
        fast = optimize_for_inference(copy.deepcopy(model), example)
        assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in fast.modules())
        np.testing.assert_allclose(fast(norm(batch))["logits"].numpy(), ref.numpy(), atol=1e-4, rtol=1e-4)
    if task == "classification" and method != "input_fusion":  # TempCNN encoders run fused
        assert any(isinstance(x, TempCNNInference) for x in fast.modules())


def test_precision_setting_picks_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert compute_dtype("fp32", cpu) is None and compute_dtype("bf16", cpu) == torch.bfloat16
    for native in (True, False):  # auto: bf16 only where the CPU multiplies bf16 in hardware, and not for chips
        monkeypatch.setattr(predictor_module, "native_bf16", lambda device, native=native: native)
        assert compute_dtype("auto", cpu) == (torch.bfloat16 if native else None)
        assert compute_dtype("auto", cpu, "segmentation") is None
    with pytest.raises(ConfigError, match=r"prediction\.precision: 'fp16'.*auto, fp32, bf16"):
        compute_dtype("fp16", cpu)


def test_bf16_model_step_stays_close_to_fp32(tmp_path: Path) -> None:
    """Same batch, fp32 and forced bf16 Predictors: probabilities within bf16 rounding, for every pixel
    whatever sensors it has (the honesty check on a trained model is in tests/test_workflow.py)."""
    ckpt = bundle(tmp_path, "classification")
    gen = torch.Generator().manual_seed(3)
    p32, p16 = Predictor(ckpt, "cpu", precision="fp32"), Predictor(ckpt, "cpu", precision="bf16")
    batch = {m: torch.randn((500, *p32.input_shape(m)), generator=gen) for m in MODALITIES}
    batch["mask"] = torch.rand((500, len(MODALITIES)), generator=gen) > 0.4
    ref, low = p32.proba(batch), p16.proba(batch)
    assert p16.dtype == torch.bfloat16 and low.dtype == torch.float32
    diff = float((ref - low).abs().max())
    assert 0 < diff < 0.06, diff  # bf16 did run (not fp32), within its rounding (a random model: small margins)
    np.testing.assert_allclose(low.sum(1).numpy(), 1.0, atol=1e-5)


def test_prefetch_keeps_order_raises_producer_errors_and_stops_early() -> None:
    def produce(unit: int, put) -> None:  # type: ignore[no-untyped-def]
        if unit == 3:
            raise ValueError("bad unit")
        for k in range(5):
            put((unit, k))

    assert list(prefetch(range(3), produce, readers=2)) == [(u, k) for u in range(3) for k in range(5)]
    with pytest.raises(ValueError, match="bad unit"):
        list(prefetch(range(6), produce, readers=2))
    it = prefetch(range(1000), produce, readers=2, depth=1)
    assert next(it) == (0, 0)
    it.close()  # producers blocked on full queues stop; nothing hangs


def test_prediction_loads_a_model_without_lightning_or_the_train_stage() -> None:
    code = ("import sys, cropmap.predict, cropmap.metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') or m == 'cropmap.train'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_device_choice_names_the_config_key_when_cuda_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "prediction.device") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"config key training\.device is 'cuda'.*set it to auto or cpu"):
        resolve_device("cuda", "training.device")
    with pytest.raises(ConfigError, match=r"prediction\.device"):
        resolve_device("tpu", "prediction.device")
