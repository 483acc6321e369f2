"""A missing modality's values never influence the fused output (eval and train mode)."""

from __future__ import annotations

import pytest
import torch

from cropmap.models import methods_for

TASKS = ("classification", "segmentation")


def _fills(x: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(x.shape, generator=g) * 5,
        torch.full_like(x, 1e30),
        torch.full_like(x, float("nan")),
    ]


def _run(model, batch, train: bool, seed: int = 7):
    model.train(train)
    torch.manual_seed(seed)
    out = model(batch)
    loss = model.loss(out, batch)["total"] if train else None
    return out["logits"].detach(), loss


@pytest.mark.parametrize(("method", "task"), [(m, t) for t in TASKS for m in methods_for(t)])
def test_missing_modality_values_do_not_matter(method, task, batch_fn, build_fn):
    torch.manual_seed(0)
    model = build_fn(method, task)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[0] = False  # nothing available
    mask[1:4, 1] = False  # s1 missing
    mask[2, 3] = False  # dem missing
    mask[5, 0] = False  # s2 missing
    base = batch_fn(task, mask=mask)
    for train in (False, True):
        ref, ref_loss = _run(model, base, train)
        assert torch.isfinite(ref).all()
        assert (ref[0] == 0).all()  # no modality -> uniform logits
        for i, m in enumerate(("s2", "s1", "weather", "dem")):
            rows = ~mask[:, i]
            for fill in _fills(base[m]):
                x = base[m].clone()
                x[rows] = fill[rows]
                got, got_loss = _run(model, {**base, m: x}, train)
                assert torch.equal(got, ref), (method, task, m, train)
                if train:
                    assert torch.equal(got_loss, ref_loss)


@pytest.mark.parametrize("method", methods_for("segmentation"))
def test_per_pixel_mask(method, batch_fn, build_fn):
    torch.manual_seed(0)
    model = build_fn(method, "segmentation")
    mask = torch.ones(4, 4, 8, 8, dtype=torch.bool)
    mask[:, 0, :, :4] = False  # left half of every chip has no s2
    mask[1, 1] = False  # chip 1 has no s1 at all
    mask[2, :, :2, :2] = False  # corner of chip 2 has nothing
    base = batch_fn("segmentation", b=4, mask=mask)
    for train in (False, True):
        ref, _ = _run(model, base, train)
        assert torch.isfinite(ref).all()
        assert (ref[2, :, :2, :2] == 0).all()
        x = base["s2"].clone()
        x[:, :, :, :4] = float("nan")
        s1 = base["s1"].clone()
        s1[1] = 1e30
        got, _ = _run(model, {**base, "s2": x, "s1": s1}, train)
        assert torch.equal(got, ref), (method, train)


@pytest.mark.parametrize("method", methods_for("classification", gradient=True))
def test_nan_in_available_modality_is_zero(method, batch_fn, build_fn):
    model = build_fn(method, "classification").eval()
    base = batch_fn("classification")
    x = base["s2"].clone()
    x[:, 1] = float("nan")  # a missing month
    z = base["s2"].clone()
    z[:, 1] = 0.0
    assert torch.equal(model({**base, "s2": x})["logits"], model({**base, "s2": z})["logits"])


@pytest.mark.parametrize(("method", "task"), [(m, t) for t in TASKS for m in methods_for(t, gradient=True)])
def test_missing_samples_stay_out_of_batch_statistics(method, task, batch_fn):
    """Train mode, one modality: rows where it is missing change nothing for the others, not
    even through batch-norm statistics (they are as if absent from the batch)."""
    from cropmap.models import build_model

    torch.manual_seed(0)
    model = build_model(
        method,
        task=task,
        modalities=["s2"],
        in_channels={"s2": 10},
        n_steps=4,
        n_classes=3,
        hidden=8,
    ).train()
    mask = torch.tensor([[True], [False], [True], [True], [False], [True]])
    full = batch_fn(task, mask=mask)
    keep = mask[:, 0]
    sub = {"s2": full["s2"][keep], "mask": mask[keep]}
    torch.manual_seed(5)
    a = model({"s2": full["s2"], "mask": mask})["logits"]
    torch.manual_seed(5)
    b = model(sub)["logits"]
    assert torch.allclose(a[keep], b, atol=1e-6)
    assert (a[~keep] == 0).all()
