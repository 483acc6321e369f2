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
    # large validation sets: the weight is chosen on a fixed random subset of max_samples rows
    big = [np.tile(a, (30,) + (1,) * (a.ndim - 1)) for a in (good, noise, y)]
    rows = np.sort(np.random.default_rng(0).choice(len(big[2]), 500, replace=False))
    assert best_weight(*big, max_samples=500) == best_weight(*(a[rows] for a in big)) == 1.0
    assert best_weight(big[1], big[0], big[2], max_samples=500) == 0.0
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


def test_blended_asks_the_trees_only_for_subsets_that_use_them() -> None:
    from cropmap.models import build_model

    kw = settings("comiss").model_kwargs()
    net = build_model(**kw).eval()
    trees = build_model(**trees_kwargs(kw))
    test = samples(120, 2, 2)
    trees.fit_samples(test.x, test.mask, test.y)
    seen: list[int] = []
    forward = trees.forward
    trees.forward = lambda b: seen.append(len(b["mask"])) or forward(b)  # type: ignore[method-assign]
    batch = {m: torch.from_numpy(test.x[m]) for m in MODS} | {"mask": torch.from_numpy(test.mask)}
    codes = (batch["mask"].long() * 2 ** torch.arange(len(MODS))).sum(1)
    weights = torch.ones(16)
    weights[15] = 0.3  # only the rows with every sensor pool the trees
    with torch.no_grad():
        out = Blended(net, trees, weights)(batch)["logits"]
        want = 0.3 * torch.log_softmax(net(batch)["logits"], 1) + 0.7 * forward(batch)["logits"]
    full = codes == 15
    assert 0 < full.sum() < len(codes) and seen[0] == int(full.sum())
    torch.testing.assert_close(out[full], want[full])
    torch.testing.assert_close(out[~full], torch.log_softmax(net(batch)["logits"], 1)[~full])
    seen.clear()
    with torch.no_grad():
        Blended(net, trees, torch.ones(16))(batch)
    assert seen == []  # the network alone everywhere: no tree is evaluated
    # the blend's validation logits come from its parts' without a second pass, exactly as forward gives them
    from cropmap.calibration import subset_logits

    trees.forward = forward  # type: ignore[method-assign]
    weights[[1, 6]] = torch.tensor([0.0, 0.4])
    blended = Blended(net, trees, weights)
    batches = [batch | {"y": torch.from_numpy(test.y)}]
    got = blended.pool_subset_logits(subset_logits(net, batches, MODS), subset_logits(trees, batches, MODS))
    want_all = subset_logits(blended, batches, MODS)
    assert set(got) == set(want_all) and len(got) == 15
    for c, (z, y) in want_all.items():
        np.testing.assert_array_equal(got[c][0], z)
        np.testing.assert_array_equal(got[c][1], y)


def test_blend_options_reach_the_trees_and_are_checked(tmp_path: Path) -> None:
    from cropmap.errors import ConfigError

    train, val = samples(300, 0, 0), samples(120, 1, 1)
    opts = {"max_iter": 7, "max_bins": 31, "learning_rate": 0.3}
    fit_pixels(settings("comiss", blend="trees_dedicated", blend_options=opts), train, val,
               tmp_path / "model.ckpt", tmp_path / "work")
    model, _, _ = load_bundle(tmp_path / "model.ckpt")
    fitted = next(iter(model.model.trees.models.values()))
    assert (fitted.max_iter, fitted.max_bins, fitted.learning_rate) == (7, 31, 0.3) and fitted.n_iter_ <= 7
    cfg = tiny_config(tmp_path)
    cfg["training"]["blend_options"] = opts
    p = stage_params(validate(cfg), "train", "tiny")
    assert TrainSettings.from_config(p, "classification", p["months"]).blend_options == opts
    for bad, msg in [({"max_depth": 3}, "max_depth: method trees_dedicated takes no option 'max_depth'; valid: .*max_bins"),
                     ({"max_bins": 300}, r"max_bins: 300 should be in \[2, 255\]")]:
        cfg["training"]["blend_options"] = bad
        with pytest.raises(ConfigError, match=f"training.blend_options.{msg}"):
            validate(cfg)
