"""``gemmnet``: CoLoss terms, reconstruction gradients, imputation at inference, training."""

from __future__ import annotations

import pytest
import torch

from cropmap.errors import ConfigError, UnknownNameError
from cropmap.models import build_model
from cropmap.models.gemmnet import GEMMNet
from cropmap.models.losses import dice_loss
from tests.models.conftest import checker_chips

MODS = ("s2", "s1", "weather", "dem")
CH = {"s2": 10, "s1": 2, "weather": 2, "dem": 2}
T, K = 3, 3
TERMS = {"fused", "scales", "modal", "rec", "disc", "total"}


def chips(b: int = 2, hw: int = 32, *, seed: int = 0, separable: bool = False, mask=None) -> dict:
    return checker_chips(b, hw, seed=seed, separable=separable, mask=mask, steps=T, n_classes=K)


def build(**kw) -> GEMMNet:
    torch.manual_seed(0)
    return build_model(
        "gemmnet",
        task="segmentation",
        modalities=MODS,
        in_channels=CH,
        n_steps=T,
        n_classes=K,
        **kw,
    )


def _grads(loss: torch.Tensor, params) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True))


def _zero(gs) -> bool:
    return all(g is None or not g.abs().any() for g in gs)


@pytest.mark.parametrize("kind", ["ae", "cgan"])
def test_coloss_has_each_term(kind):
    model = build(generator=kind).train()
    model.fixed_scenario = ("s2", "dem")  # s1 and weather are imputed and reconstructed
    batch = chips()
    loss = model.loss(model(batch), batch)
    assert set(loss) == TERMS
    assert all(v.dim() == 0 and torch.isfinite(v) for v in loss.values())
    assert all(loss[k] > 0 for k in ("fused", "scales", "modal", "rec"))
    assert (loss["disc"] > 0) == (kind == "cgan")
    assert torch.allclose(
        loss["total"], torch.stack([v for k, v in loss.items() if k != "total"]).sum()
    )
    model.eval()  # no scenario: nothing to reconstruct, same keys, deterministic
    with torch.no_grad():
        a, b = model.loss(model(batch), batch), model.loss(model(batch), batch)
    assert set(a) == TERMS and a["rec"] == 0 and torch.equal(a["total"], b["total"])


@pytest.mark.parametrize("kind", ["ae", "cgan"])
def test_reconstruction_trains_only_the_dropped_modalities_generators(kind):
    model = build(generator=kind).train()
    model.fixed_scenario = ("s2", "dem")
    mask = torch.ones(2, 4, 32, 32, dtype=torch.bool)
    mask[1, 0, :, :16] = False  # s2 really missing on half a chip: its generator runs there
    batch = chips(mask=mask)
    for m in MODS:
        batch[m].requires_grad_(True)
    out = model(batch)
    assert set(out["imputed"]) == {"s2", "s1", "weather"}
    loss = model.loss(out, batch)
    rec = loss["rec"]
    assert _zero(_grads(rec, [batch[m] for m in MODS]))  # inputs and targets are data
    for m in ("s2", "dem"):  # present (kept) modalities: no reconstruction gradient
        assert _zero(_grads(rec, model.generators[m].parameters())), m
    for m in ("s1", "weather"):  # dropped: their generators learn to reconstruct them
        assert not _zero(_grads(rec, model.generators[m].parameters())), m
    rest = [
        p
        for n, p in model.named_parameters()
        if not n.startswith(("generators.", "discriminators."))
    ]
    assert _zero(_grads(rec, rest))  # rec trains generators only
    # the segmentation terms do reach the generator of the really-missing s2 pixels
    assert not _zero(_grads(loss["fused"], model.generators["s2"].parameters()))
    if kind == "cgan":
        assert _zero(_grads(rec, model.discriminators.parameters()))  # frozen D in the G step
        assert _zero(_grads(loss["disc"], model.generators.parameters()))  # detached fakes
        assert not _zero(_grads(loss["disc"], model.discriminators["s1"].parameters()))


def test_inference_imputes_missing_modalities():
    model = build().eval()
    mask = torch.ones(2, 4, 32, 32, dtype=torch.bool)
    mask[0, 1] = False  # chip 0: no s1
    mask[1, 2, 8:, :] = False  # chip 1: weather missing below row 8
    mask[1, :, :4, :4] = False  # nothing in a corner
    base = chips(mask=mask)
    with torch.no_grad():
        out = model(base)
        s1 = base["s1"].clone()
        s1[0] = float("nan")
        w = base["weather"].clone()
        w[1, :, 8:] = 1e30
        got = model({**base, "s1": s1, "weather": w})
    assert set(out["imputed"]) == {"s1", "weather"}
    assert torch.isfinite(out["imputed"]["s1"]).all()
    assert (out["per_modality"]["s1"][0] == 0).all() and (out["logits"][1, :, :4, :4] == 0).all()
    assert out["logits"].shape == (2, K, 32, 32) and torch.isfinite(out["logits"]).all()
    assert torch.equal(got["logits"], out["logits"])


def test_scenario_never_drops_all_data():
    model = build().train()
    avail = torch.rand(8, 4, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    for _ in range(10):
        keep = model._scenario(avail)
        assert not (keep & ~avail).any()
        assert torch.equal(keep.any(1), avail.any(1))


@pytest.mark.parametrize("kind", ["ae", "cgan"])
def test_trains_and_predicts(kind):
    model = build(generator=kind).train()
    batch = chips(separable=True)
    batch["mask"] = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]).bool()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)

    def total():
        torch.manual_seed(3)  # same scenario before and after
        return model.loss(model(batch), batch)["total"]

    before = total()
    for _ in range(4):
        opt.zero_grad()
        total().backward()
        opt.step()
    with torch.no_grad():
        assert total() < before
    probs = model.predict_proba(batch)
    assert model.training and probs.shape == (2, K, 32, 32)
    assert torch.allclose(probs.sum(1), torch.ones(()))


def test_names_and_tasks():
    with pytest.raises(ConfigError, match="segmentation"):
        build_model(
            "gemmnet",
            task="classification",
            modalities=MODS,
            in_channels=CH,
            n_steps=T,
            n_classes=K,
        )
    with pytest.raises(UnknownNameError, match="cgan"):
        build(generator="vae")
    rng = torch.Generator().manual_seed(0)
    m = build(generator=rng)
    assert m.kind == "ae" and m.generator is rng
    assert "s2" in build(generator="cgan").discriminators and not build().discriminators


def test_dice_loss():
    y = torch.tensor([[[0, 1], [2, -100]]])
    perfect = torch.nn.functional.one_hot(y.clamp(min=0), K).permute(0, 3, 1, 2).float() * 50
    valid = torch.ones_like(y, dtype=torch.bool)
    assert dice_loss("multiclass", perfect, y, valid) < 0.01
    assert dice_loss("multiclass", -perfect, y, valid) > 0.5
    assert dice_loss("multiclass", perfect, y, ~valid) == 0
