"""Every method trains end to end; the factory validates names."""

from __future__ import annotations

import pytest
import torch

from cropmap.errors import UnknownNameError
from cropmap.models import METHODS, CoLearningModel, build_model, methods_for

TASKS = ("classification", "segmentation")


def _total(model, batch) -> torch.Tensor:
    torch.manual_seed(3)  # same dropout / ModDrop draws before and after training
    out = model(batch)
    return model.loss(out, batch)["total"]


@pytest.mark.parametrize(("method", "task"), [(m, t) for t in TASKS for m in methods_for(t, gradient=True)])
def test_trains_end_to_end(method, task, batch_fn, build_fn):
    torch.manual_seed(0)
    model = build_fn(method, task).train()
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[1, 1] = mask[4, 0] = False
    batch = batch_fn(task, separable=True, mask=mask)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = _total(model, batch)
    assert torch.isfinite(before)
    for _ in range(8):
        opt.zero_grad()
        loss = model.loss(model(batch), batch)
        assert set(loss) >= {"total"} and all(v.dim() == 0 for v in loss.values())
        assert torch.isfinite(loss["total"])
        loss["total"].backward()
        opt.step()
    with torch.no_grad():
        after = _total(model, batch)
    assert after < before, (method, task, float(before), float(after))
    probs = model.predict_proba(batch)
    assert model.training  # mode restored
    assert torch.allclose(probs.sum(1), torch.ones(()))


@pytest.mark.parametrize("method", methods_for("classification"))
def test_total_is_unweighted_sum(method, batch_fn, build_fn):
    model = build_fn(method, "classification").train()
    batch = batch_fn("classification")
    loss = model.loss(model(batch), batch)
    terms = [v for k, v in loss.items() if k != "total"]
    assert torch.allclose(loss["total"], torch.stack(terms).sum())


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_model(
            "comis",
            task="classification",
            modalities=["s2"],
            in_channels={"s2": 10},
            n_steps=12,
            n_classes=3,
        )
    msg = str(err.value)
    assert "comis" in msg and all(m in msg for m in METHODS)
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"task": "detection"}, "classification"),
        ({"head": "softmax"}, "multilabel"),
        ({"modalities": ["s2", "landsat"]}, "weather"),
        ({"encoders": {"s2": "transformer"}}, "ltae"),
        ({"encoders": {"dem": "tempcnn"}}, "mlp"),
    ],
)
def test_unknown_names(kw, word):
    args = dict(
        task="classification",
        modalities=["s2", "dem"],
        in_channels={"s2": 10, "dem": 2},
        n_steps=4,
        n_classes=3,
    )
    args.update(kw)
    with pytest.raises(UnknownNameError, match=word):
        build_model("comiss", **args)


@pytest.mark.parametrize("method", methods_for("classification"))
def test_factory_returns_method(method):
    m = build_model(
        method,
        task="classification",
        modalities=("s2", "s1"),
        in_channels={"s2": 10, "s1": 2},
        n_steps=4,
        n_classes=3,
        hidden=8,
    )
    assert isinstance(m, CoLearningModel) and m.method == method


def test_default_width_matches_authors():
    m = build_model(
        "comiss",
        task="classification",
        modalities=("s2", "dem"),
        in_channels={"s2": 10, "dem": 2},
        n_steps=12,
        n_classes=5,
    )
    enc = m.encoders["s2"]
    convs = [c for c in enc.modules() if isinstance(c, torch.nn.Conv1d)]
    lins = [c for c in enc.modules() if isinstance(c, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(128, (5,), (2,))] * 2
    assert [(c.in_features, c.out_features) for c in lins] == [(128 * 12, 512), (512, 128)]
    head = list(m.heads["s2"].modules())
    assert isinstance(head[-1], torch.nn.LayerNorm) and head[-1].normalized_shape == (5,)


def test_modality_subset_and_absent_key(batch_fn):
    m = build_model(
        "comiss",
        task="classification",
        modalities=("s2", "dem"),
        in_channels={"s2": 10, "dem": 2},
        n_steps=4,
        n_classes=3,
        hidden=8,
    ).eval()
    b = batch_fn("classification")
    batch = {"s2": b["s2"], "mask": torch.tensor([[True, True]] * 6)}  # dem key absent
    out = m(batch)
    assert bool(out["avail"][:, 1].any()) is False
    assert torch.allclose(out["logits"], out["per_modality"]["s2"])


@pytest.mark.parametrize("method", methods_for("classification"))
def test_eval_mode_loss_is_deterministic(method, batch_fn, build_fn):
    model = build_fn(method, "classification")
    batch = batch_fn("classification")
    train_keys = set(model.train().loss(model(batch), batch))
    model.eval()
    with torch.no_grad():
        a = model.loss(model(batch), batch)
        b = model.loss(model(batch), batch)
    assert set(a) == train_keys
    assert torch.equal(a["total"], b["total"]) and torch.isfinite(a["total"])


def test_class_weights_are_used_and_not_saved(batch_fn, build_fn):
    w = torch.tensor([1.0, 5.0, 0.2])
    model = build_fn("unimodal", "classification", class_weights=w).eval()
    plain = build_fn("unimodal", "classification")
    plain.load_state_dict(model.state_dict())  # weights are config, not state
    plain.eval()
    batch = batch_fn("classification")
    with torch.no_grad():
        lw = model.loss(model(batch), batch)["ce_s2"]
        lp = plain.loss(plain(batch), batch)["ce_s2"]
        logits = model(batch)["per_modality"]["s2"]
    assert torch.allclose(lp, torch.nn.functional.cross_entropy(logits, batch["y"]))
    assert torch.allclose(lw, torch.nn.functional.cross_entropy(logits, batch["y"], weight=w))


def test_encoders_for_unselected_modality_are_ignored():
    m = build_model(
        "unimodal",
        task="classification",
        modalities=("s2",),
        in_channels={"s2": 10},
        n_steps=4,
        n_classes=3,
        hidden=8,
        encoders={"s2": "gru", "dem": "mlp"},
    )
    assert list(m.encoders) == ["s2"]
    with pytest.raises(UnknownNameError, match="landsat"):
        build_model(
            "unimodal",
            task="classification",
            modalities=("s2",),
            in_channels={"s2": 10},
            n_steps=4,
            n_classes=3,
            encoders={"landsat": "gru"},
        )
