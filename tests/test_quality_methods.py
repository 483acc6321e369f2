"""Tree references and calibrated bundles through the real train / bundle / Predictor / metrics path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cropmap.calibration import Calibrated, ece
from cropmap.compare import summarise
from cropmap.datasets import PixelSamples
from cropmap.errors import InputDataError
from cropmap.metrics import evaluate_samples
from cropmap.predict import Predictor
from cropmap.predict.bundle import load_bundle
from cropmap.train import TrainSettings, fit_pixels

MODS = ["s2", "s1", "weather", "dem"]
T = 4
CH = {"s2": 10, "s1": 2, "weather": 2, "dem": 2}
CLASSES = [{"id": i, "name": f"c{i}", "colour": "#101010"} for i in range(3)]


def samples(n: int, seed: int, split: int) -> PixelSamples:
    """Learnable pixels with clouds and S1 gaps (class signal in every sensor, plus noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = {m: (rng.normal(size=(n, T, c)) * 1.5 + y[:, None, None]).astype(np.float32) for m, c in CH.items() if m != "dem"}
    x["dem"] = (rng.normal(size=(n, 2)) * 1.5 + y[:, None]).astype(np.float32)
    x["s2"][rng.random((n, T)) < 0.2] = np.nan
    mask = np.ones((n, 4), bool)
    gap = rng.random(n) < 0.2
    mask[gap, 1] = False
    x["s1"][gap] = np.nan
    return PixelSamples(x, mask, y.astype(np.int64), np.full(n, split, np.uint8), list(MODS))


def settings(method: str, **kw: object) -> TrainSettings:
    base = {"epochs": 2, "patience": 2, "batch_size": 64, "device": "cpu", "hidden": 8}
    opts = {"min_samples_leaf": 5, "max_iter": 20} if method.startswith("trees") else {}
    return TrainSettings(task="classification", method=method, modalities=list(MODS), months=[f"2020-0{i + 1}" for i in range(T)],
                         classes=CLASSES, method_options=opts, **(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["trees_dedicated", "trees_nan"])
def test_trees_train_save_and_predict_through_the_pipeline(tmp_path: Path, method: str) -> None:
    train, val, test = samples(300, 0, 0), samples(90, 1, 1), samples(90, 2, 2)
    ckpt = tmp_path / method / "model.ckpt"
    summary = fit_pixels(settings(method), train, val, ckpt, tmp_path / method / "work")
    assert summary["epochs"] == 0 and len(summary["temperatures"]) == 16
    assert set(summary["fitted_subsets"]) == ({"s2+s1+weather+dem"} if method == "trees_nan" else set(summary["fitted_subsets"]))
    assert json.loads((ckpt.parent / "train_summary.json").read_text())["method"] == method
    model, norm, bundle = load_bundle(ckpt)
    assert isinstance(model, Calibrated) and bundle["calibration"]["per"] == "subset"
    assert model.modalities == MODS  # the wrapper shows the model's attributes
    p = Predictor(ckpt, "cpu", threads=1)
    rows = evaluate_samples(p, test)
    assert len(rows) == 15 and rows["ece"].between(0, 1).all()
    # the scored probabilities ride along (pooled over folds by benchmarks/real_quality.py)
    proba, y = rows.attrs["proba"]["s2+s1"]
    assert proba.shape == (rows["n"].iloc[0], 3) and ece(proba, y) == pytest.approx(rows.set_index("subset")["ece"]["s2+s1"])
    assert rows.set_index("subset")["f1_weighted"]["s2+s1+weather+dem"] > 60  # the classes are learnable
    # the same probabilities as the calibrated model applied by hand
    batch = {m: torch.from_numpy(test.x[m]) for m in MODS} | {"mask": torch.from_numpy(test.mask)}
    with torch.no_grad():
        want = torch.softmax(model(norm(batch))["logits"], 1)
    torch.testing.assert_close(p.proba(batch), want)


def test_calibration_is_stored_applied_and_checksummed(tmp_path: Path) -> None:
    train, val, test = samples(300, 0, 0), samples(120, 1, 1), samples(120, 2, 2)
    raw, cal = tmp_path / "raw" / "model.ckpt", tmp_path / "cal" / "model.ckpt"
    fit_pixels(settings("trees_nan", calibration="none"), train, val, raw, tmp_path / "raw" / "work")
    fit_pixels(settings("trees_nan", calibration="global"), train, val, cal, tmp_path / "cal" / "work")
    m_raw, norm, b_raw = load_bundle(raw)
    m_cal, _, b_cal = load_bundle(cal)
    assert b_raw["calibration"] is None and not isinstance(m_raw, Calibrated)
    temps = b_cal["calibration"]["temperatures"]
    assert len(set(temps[1:])) == 1 and temps[1] != 1.0  # one pooled temperature, fitted
    batch = norm({m: torch.from_numpy(test.x[m]) for m in MODS}) | {"mask": torch.from_numpy(test.mask)}
    with torch.no_grad():
        lr, lc = m_raw(batch)["logits"], m_cal(batch)["logits"]
    torch.testing.assert_close(lc, lr / temps[15])  # every test sample has s2, weather and dem
    assert torch.equal(lr.argmax(1), lc.argmax(1))  # the map's classes do not change
    # the temperatures are part of the checksum: a damaged one is refused
    b = torch.load(cal, weights_only=False)
    b["calibration"]["temperatures"][15] *= 3
    torch.save(b, cal)
    with pytest.raises(InputDataError, match="checksum"):
        load_bundle(cal)


def test_gradient_method_with_recipe_trains_monitors_val_f1_and_calibrates(tmp_path: Path) -> None:
    train, val, test = samples(300, 0, 0), samples(90, 1, 1), samples(90, 2, 2)
    ckpt = tmp_path / "model.ckpt"
    s = settings("comiss", monitor="val_f1", weight_decay=0.01, schedule="cosine", balance="sampler",
                 augment={"month_mask": 0.2, "modality_drop": 0.2, "shift": 0.2, "noise": 0.05})
    summary = fit_pixels(s, train, val, ckpt, tmp_path / "work")
    assert 0 <= summary["best_val_f1"] <= 100 and "best_val_loss" not in summary
    assert 0 <= summary["final_val_f1"] <= 100  # the final (calibrated) model on validation
    assert all("val_f1" in row for row in summary["history"])
    _, _, bundle = load_bundle(ckpt)
    assert bundle["class_weights"] is None  # balance: sampler, an unweighted loss
    rows = evaluate_samples(Predictor(ckpt, "cpu", threads=1), test)
    table = rows.assign(method="comiss")
    assert 0 <= summarise(table)["ece"].iloc[0] <= 1


def test_ece_of_a_perfectly_calibrated_predictor_is_small() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.34, 1.0, 20000)
    correct = rng.random(20000) < conf
    proba = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    y = np.where(correct, 0, 1)
    assert ece(proba, y) < 0.02
    assert ece(np.stack([np.ones(100), np.zeros(100), np.zeros(100)], 1), np.r_[np.zeros(70), np.ones(30)].astype(int)) == pytest.approx(0.3)
