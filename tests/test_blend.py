"""``training.blend``: a co-learning network pooled with per-subset trees, weights chosen on validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cropmap.blend import GRID, Blended, best_weight, fit_weights, pooled, trees_kwargs
from cropmap.calibration import Calibrated
from cropmap.config import stage_params, validate
from cropmap.errors import InputDataError
from cropmap.metrics import evaluate_samples
from cropmap.predict import Predictor
from cropmap.predict.bundle import load_bundle
from cropmap.train import TrainSettings, fit_pixels
from tests.conftest import tiny_config
from tests.test_quality_methods import MODS, samples, settings


def test_pooled_matches_a_hand_computation() -> None:
    net, trees = np.array([[2.0, 0.0]]), np.log(np.array([[0.2, 0.8]]))
    # log_softmax([2, 0]) = [2 - log(e^2 + 1), -log(e^2 + 1)]
    lse = math.log(math.exp(2) + 1)
    want = [0.3 * (2 - lse) + 0.7 * math.log(0.2), 0.3 * -lse + 0.7 * math.log(0.8)]
    np.testing.assert_allclose(pooled(net, trees, 0.3)[0], want, rtol=1e-12)


def test_best_weight_picks_the_informative_part_and_fit_weights_falls_back_to_the_pool() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    good = np.eye(3)[y] * 2 + rng.normal(size=(200, 3))  # knows the class, not perfectly
    noise = rng.normal(size=(200, 3)) * 2  # knows nothing
    assert best_weight(good, noise, y) == 1.0
    assert best_weight(noise, good, y) == 0.0
    assert set(GRID) == {round(0.1 * i, 1) for i in range(11)}
    # codes 1 (s2): network is right; 2 (s1): trees are right; 3: too few samples for its own weight
    net = {1: (good, y), 2: (noise, y), 3: (good[:10], y[:10])}
    trees = {1: (noise, y), 2: (good, y), 3: (noise[:10], y[:10])}
    w = fit_weights(net, trees, 2)
    assert w[0] == 1.0 and w[1] == 1.0 and w[2] == 0.0
    pool = best_weight(np.concatenate([good, noise, good[:10]]), np.concatenate([noise, good, noise[:10]]),
                       np.concatenate([y, y, y[:10]]))
    assert w[3] == pool
    with pytest.raises(ValueError, match="samples differ"):
        fit_weights({1: (good, y)}, {1: (good, y[::-1])}, 1)


def test_blend_trains_stores_checksums_and_ignores_missing_sensors(tmp_path: Path) -> None:
    train, val, test = samples(300, 0, 0), samples(120, 1, 1), samples(90, 2, 2)
    ckpt = tmp_path / "model.ckpt"
    summary = fit_pixels(settings("comiss", blend="trees_dedicated"), train, val, ckpt, tmp_path / "work")
    assert len(summary["blend_weights"]) == 16 and all(0 <= w <= 1 for w in summary["blend_weights"])
    assert 0 <= summary["final_val_f1"] <= 100 and 0 <= summary["final_val_f1_full"] <= 100
    model, norm, bundle = load_bundle(ckpt)
    assert isinstance(model, Calibrated) and isinstance(model.model, Blended)
    assert bundle["blend_kwargs"]["method"] == "trees_dedicated" and model.modalities == MODS
    torch.testing.assert_close(model.model.blend_weights, torch.tensor(summary["blend_weights"]), atol=0.006, rtol=0)
    batch = norm({m: torch.from_numpy(test.x[m]) for m in MODS}) | {"mask": torch.from_numpy(test.mask)}
    with torch.no_grad():
        out = model.model(batch)
        net = torch.log_softmax(model.model.model(batch)["logits"], 1)
        trees = model.model.trees(batch)["logits"]
    w = model.model.blend_weights[15]  # the test rows with every sensor
    full = torch.from_numpy(test.mask.all(1))
    torch.testing.assert_close(out["logits"][full], (w * net + (1 - w) * trees)[full])
    # a missing sensor's values cannot change the output
    gap = batch | {"mask": batch["mask"].clone()}
    gap["mask"][:, 1] = False
    changed = gap | {"s1": torch.randn_like(batch["s1"]) * 100}
    with torch.no_grad():
        torch.testing.assert_close(model(gap)["logits"], model(changed)["logits"])
    rows = evaluate_samples(Predictor(ckpt, "cpu", threads=1), test)
    assert len(rows) == 15 and rows.set_index("subset")["f1_weighted"]["s2+s1+weather+dem"] > 60
    # the trees and weights are part of the checksum
    b = torch.load(ckpt, weights_only=False)
    b["state_dict"]["blend.blend_weights"][15] = 0.5 if b["state_dict"]["blend.blend_weights"][15] != 0.5 else 0.4
    torch.save(b, ckpt)
    with pytest.raises(InputDataError, match="checksum"):
        load_bundle(ckpt)


def test_blends_of_one_comparison_fold_fit_their_trees_once(tmp_path: Path) -> None:
    cfg = validate(tiny_config(tmp_path) | {"compare": {"folds": 3}})
    p = stage_params(cfg, "train", "tiny", method="fullco", fold="2")
    want = f"{cfg['models_dir']}/tiny/compare/fold2/trees_cache"
    assert TrainSettings.from_config(p, "classification", p["months"]).trees_cache == want
    assert "trees_cache" not in stage_params(cfg, "train", "tiny")  # the map's model: nothing to share
    train, val, test = samples(300, 0, 0), samples(120, 1, 1), samples(90, 2, 2)
    cache = tmp_path / "cache"
    fit_pixels(settings("comiss", blend="trees_dedicated", trees_cache=str(cache)), train, val,
               tmp_path / "a" / "model.ckpt", tmp_path / "a" / "work")
    (path,) = cache.iterdir()
    stamp = path.stat().st_mtime_ns
    fit_pixels(settings("fullco", blend="trees_dedicated", epochs=1, trees_cache=str(cache)), train, val,
               tmp_path / "b" / "model.ckpt", tmp_path / "b" / "work")
    assert list(cache.iterdir()) == [path] and path.stat().st_mtime_ns == stamp  # reused, not refitted
    (a, norm, _), (b, _, _) = load_bundle(tmp_path / "a" / "model.ckpt"), load_bundle(tmp_path / "b" / "model.ckpt")
    batch = norm({m: torch.from_numpy(test.x[m]) for m in MODS}) | {"mask": torch.from_numpy(test.mask)}
    with torch.no_grad():
        torch.testing.assert_close(a.model.trees(batch)["logits"], b.model.trees(batch)["logits"], rtol=0, atol=0)


def test_blend_trees_fit_on_at_most_blend_pixels(tmp_path: Path) -> None:
    from cropmap.loop import PixelDataset
    from cropmap.models import build_model
    from cropmap.normalize import Normalizer, fit_stats
    from cropmap.train import fit_trees

    train = samples(300, 0, 0)
    norm = Normalizer(fit_stats(train.x, "pixels"))
    kw = settings("comiss").model_kwargs()
    sizes = {}
    for cap in (None, 120, 1000):
        trees = build_model(**trees_kwargs(kw))
        sizes[cap] = fit_trees(trees, norm, PixelDataset(train), max_pixels=cap, seed=1)["fitted_subsets"]
    full = "+".join(MODS)
    assert sizes[None] == sizes[1000] and sizes[None]["s2"] > 120  # fewer pixels than the cap: all of them
    assert sizes[120]["s2"] <= 120 and 0 < sizes[120][full] < sizes[None][full]
