"""Tree references: fit per sensor subset, predict per subset, and a missing sensor cannot matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cropmap.errors import ConfigError
from cropmap.models import methods_for
from cropmap.models.trees import PROBA_FLOOR, subset_code

from .conftest import MODS, K, make_batch


def test_tree_methods_are_listed_for_classification_only() -> None:
    assert {"trees_dedicated", "trees_nan"} <= set(methods_for("classification"))
    assert not {"trees_dedicated", "trees_nan"} & set(methods_for("segmentation"))
    assert not {"trees_dedicated", "trees_nan"} & set(methods_for("classification", gradient=True))
    assert set(methods_for("classification", gradient=False)) == {"trees_dedicated", "trees_nan"}


def test_segmentation_is_refused(build_fn) -> None:
    with pytest.raises(ConfigError, match=r"model\.task: classification"):
        build_fn("trees_dedicated", "segmentation")


def test_dedicated_fits_one_model_per_subset_and_uses_it(build_fn) -> None:
    model = build_fn("trees_dedicated", "classification")
    assert sorted(model.models) == list(range(1, 16))  # every non-empty subset of 4 sensors
    mask = torch.tensor([[True, True, True, True], [False, True, False, False], [True, False, False, True],
                         [False, False, False, False]] * 3)
    b = make_batch("classification", b=12, seed=5, separable=True, mask=mask)
    out = model.eval()(b)
    assert out["per_modality"] == {} and torch.equal(out["avail"], mask)
    assert (out["logits"][3::4] == 0).all()  # no sensor: uniform, never a guess
    p = out["logits"].exp()
    assert torch.allclose(p[mask.any(1)].sum(1), torch.ones(9), atol=1e-5)
    # each row is exactly the prediction of its own subset's classifier on that subset's features
    for r in range(3):
        code = int(subset_code(mask[r : r + 1].numpy())[0])
        feats = np.concatenate([b[m][r : r + 1].reshape(1, -1).numpy() for i, m in enumerate(MODS) if code >> i & 1], 1)
        clf = model.models[code]
        want = np.full((1, K), PROBA_FLOOR)
        want[:, clf.classes_] = np.maximum(clf.predict_proba(feats), PROBA_FLOOR)
        want /= want.sum()
        np.testing.assert_allclose(p[r : r + 1].numpy(), want, rtol=1e-5)
    # separable data: the subset models are right on fresh samples of every subset
    test = make_batch("classification", b=30, seed=8, separable=True)
    for code in (1, 2, 4, 8, 15):
        keep = torch.tensor([(code >> i) & 1 for i in range(4)], dtype=torch.bool)
        pred = model({**test, "mask": test["mask"] & keep})["logits"].argmax(1)
        assert (pred == test["y"]).float().mean() > 0.8, code


def test_dedicated_subset_model_trained_on_samples_with_that_subset(build_fn) -> None:
    model = build_fn("trees_dedicated", "classification")
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(120, len(MODS), generator=g) > 0.25  # the conftest fitting batch
    for code, clf in model.models.items():
        sel = np.array([(code >> i) & 1 for i in range(4)], bool)
        assert clf.n_features_in_ == sum((10 * 4, 2 * 4, 2 * 4, 2)[i] for i in range(4) if sel[i])
        assert clf.classes_.tolist() == list(range(K))
        assert int(mask.numpy()[:, sel].all(1).sum()) > 0


def test_dedicated_falls_back_to_a_sub_subset_when_a_subset_had_no_data(build_fn) -> None:
    model = build_fn("trees_dedicated", "classification")
    full = model.models.pop(15)
    b = make_batch("classification", b=6, seed=2, separable=True)
    used, clf = model._model_for(15)
    assert used != 15 and bin(used).count("1") == 3 and clf is model.models[used]
    assert torch.isfinite(model(b)["logits"]).all()
    model.models[15] = full


@pytest.mark.parametrize("method", ["trees_dedicated", "trees_nan"])
def test_missing_sensor_values_cannot_change_the_output(method: str, build_fn) -> None:
    model = build_fn(method, "classification").eval()
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[1:4, 1] = False
    mask[2, 3] = False
    mask[5, 0] = False
    mask[6, :3] = False
    mask[7] = False
    base = make_batch("classification", b=8, seed=3, separable=True, mask=mask)
    kept = {k: v.clone() for k, v in base.items()}
    ref = model(base)["logits"]
    assert all(torch.equal(kept[k], base[k]) for k in base)  # the batch is not modified
    assert torch.isfinite(ref).all() and (ref[7] == 0).all()
    g = torch.Generator().manual_seed(1)
    for i, m in enumerate(MODS):
        rows = ~mask[:, i]
        for fill in (torch.randn(base[m].shape, generator=g) * 50, torch.full_like(base[m], 1e30),
                     torch.full_like(base[m], float("nan"))):
            x = base[m].clone()
            x[rows] = fill[rows]
            assert torch.equal(model({**base, m: x})["logits"], ref), (method, m)
    # a sensor absent from the batch is the same as a masked one
    no_s1 = {k: v for k, v in base.items() if k != "s1"}
    masked = {**base, "mask": mask & torch.tensor([True, False, True, True])}
    assert torch.equal(model(no_s1)["logits"], model(masked)["logits"])
    # ... and a present sensor's values do matter
    x = base["s2"].clone()
    x[~mask[:, 0]] = 0
    x[mask[:, 0]] = x[mask[:, 0]] + 10
    assert not torch.equal(model({**base, "s2": x})["logits"], ref)


def test_trees_nan_is_one_model(build_fn) -> None:
    model = build_fn("trees_nan", "classification")
    assert list(model.models) == [15]
    assert model.models[15].n_features_in_ == 10 * 4 + 2 * 4 + 2 * 4 + 2


def test_state_round_trip(build_fn) -> None:
    from cropmap.models import build_model

    model = build_fn("trees_dedicated", "classification")
    other = build_model("trees_dedicated", task="classification", modalities=MODS,
                        in_channels={"s2": 10, "s1": 2, "weather": 2, "dem": 2}, n_steps=4, n_classes=K, hidden=8)
    assert other.models == {}
    other.load_state_dict(model.state_dict())
    b = make_batch("classification", b=6, seed=4)
    assert torch.equal(other(b)["logits"], model(b)["logits"])


def test_fit_cached_reuses_only_an_identical_fit(build_fn, tmp_path, caplog) -> None:
    model = build_fn("trees_dedicated", "classification")  # fitted by the conftest, no cache
    fit = make_batch("classification", b=80, seed=3, separable=True)
    x, mask, y = {m: fit[m].numpy() for m in MODS}, fit["mask"].numpy(), fit["y"].numpy()
    test = make_batch("classification", b=20, seed=4, separable=True)
    assert model.fit_cached(x, mask, y, tmp_path)["trees_cache"] == "miss"
    (path,) = tmp_path.iterdir()
    want, stamp = model(test)["logits"], path.stat().st_mtime_ns
    other = build_fn("trees_dedicated", "classification")  # fitted on other pixels
    assert not torch.equal(other(test)["logits"], want)
    assert other.fit_cached(x, mask, y, tmp_path)["trees_cache"] == "hit"
    assert torch.equal(other(test)["logits"], want) and path.stat().st_mtime_ns == stamp
    # one changed label, other hyper-parameters, or the other tree method: a new fit, a new file
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % K
    assert other.fit_cached(x, mask, y2, tmp_path)["trees_cache"] == "miss"
    assert build_fn("trees_dedicated", "classification", max_iter=5).fit_cached(x, mask, y, tmp_path)["trees_cache"] == "miss"
    assert build_fn("trees_nan", "classification").fit_cached(x, mask, y, tmp_path)["trees_cache"] == "miss"
    assert len(list(tmp_path.glob("*.pkl"))) == 4 and not list(tmp_path.glob(".*"))  # no temporary file left
    # an unreadable file is refitted and replaced, with a warning
    path.write_bytes(b"truncated")
    with caplog.at_level("WARNING", logger="cropmap.models.trees"):
        assert other.fit_cached(x, mask, y, tmp_path)["trees_cache"] == "miss"
    assert "unreadable" in caplog.text and torch.equal(other(test)["logits"], want)
    assert other.fit_cached(x, mask, y, tmp_path)["trees_cache"] == "hit"


def test_parallel_fits_equal_serial_fits(build_fn) -> None:
    fit = make_batch("classification", b=80, seed=3, separable=True)
    x, mask, y = {m: fit[m].numpy() for m in MODS}, fit["mask"].numpy(), fit["y"].numpy()
    test = make_batch("classification", b=20, seed=4, separable=True)
    serial, parallel = build_fn("trees_dedicated", "classification"), build_fn("trees_dedicated", "classification")
    assert serial.fit_samples(x, mask, y, workers=1) == parallel.fit_samples(x, mask, y, workers=3)
    assert sorted(serial.models) == sorted(parallel.models)
    assert torch.equal(serial(test)["logits"], parallel(test)["logits"])
