"""``imt``: masked attention, Bi-LSTM attention, MultiMAE masking, training and pretrained weights."""

from __future__ import annotations

import logging

import pytest
import torch

from cropmap.errors import ConfigError
from cropmap.models import build_model
from cropmap.models.imt import IMT, BiLSTMAttention, attention_mask
from cropmap.models.imt_pretrain import IMTPretrainer, multimae_allocate, multimae_mask
from tests.models.conftest import checker_chips

MODS = ("s2", "s1", "weather", "dem")
CH = {"s2": 10, "s1": 2, "weather": 2, "dem": 2}
T, K = 3, 3


def chips(b: int = 2, hw: int = 32, *, seed: int = 0, separable: bool = False, mask=None) -> dict:
    return checker_chips(b, hw, seed=seed, separable=separable, mask=mask, steps=T, n_classes=K)


def build(**kw) -> IMT:
    torch.manual_seed(0)
    return build_model(
        "imt", task="segmentation", modalities=MODS, in_channels=CH, n_steps=T, n_classes=K, **kw
    )


def test_modality_token_streams_are_independent():
    model = build().eval()
    base = chips()
    other = {**base, "s1": base["s1"] + torch.randn_like(base["s1"]) * 3}
    with torch.no_grad():
        a, b = model(base)["tokens"], model(other)["tokens"]
    for m in ("s2", "weather", "dem"):
        assert torch.equal(a[m], b[m]), m
    assert not torch.allclose(a["s1"], b["s1"])
    assert not torch.allclose(a["fusion"], b["fusion"])  # fusion tokens see every modality


@pytest.mark.parametrize("train", [False, True])
def test_missing_modality_values_change_nothing(train):
    model = build().train(train)
    mask = torch.ones(2, 4, 32, 32, dtype=torch.bool)
    mask[0, 1] = False  # chip 0: no s1
    mask[1, 1, :, :16] = False  # chip 1: s1 on the right half only
    mask[1, :, :4, :4] = False  # chip 1: nothing in a corner
    base = chips(mask=mask)

    def run(batch):
        torch.manual_seed(5)
        out = model(batch)
        return out, model.loss(out, batch)["total"]

    ref, ref_loss = run(base)
    assert (ref["logits"][1, :, :4, :4] == 0).all()
    assert (ref["per_modality"]["s1"][0] == 0).all()
    for fill in (float("nan"), 1e30, 7.0):
        s1 = base["s1"].clone()
        s1[0] = fill
        s1[1, :, :, :16] = fill
        got, got_loss = run({**base, "s1": s1})
        assert torch.equal(got["logits"], ref["logits"])
        assert torch.equal(got["tokens"]["fusion"], ref["tokens"]["fusion"])
        assert all(torch.equal(got["per_modality"][m], ref["per_modality"][m]) for m in MODS)
        assert torch.equal(got_loss, ref_loss)


def test_bilstm_attention_weights_sum_to_one():
    torch.manual_seed(0)
    att = BiLSTMAttention(8)
    fusion, tokens = torch.randn(5, 8), torch.randn(5, 4, 8)
    valid = torch.tensor(
        [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    ).bool()
    new, beta = att(fusion, tokens, valid)
    assert torch.allclose(beta[:3].sum(1), torch.ones(3)) and torch.allclose(
        beta[4].sum(), torch.ones(())
    )
    assert (beta[~valid] == 0).all() and (beta[valid] > 0).all()
    assert torch.equal(new[3], fusion[3])  # nothing to fold in: the learned token stays
    # in the model, with per-chip missing modalities
    model = build().eval()
    mask = torch.tensor([[True, True, True, True], [False, True, False, True]])
    beta = model(chips(mask=mask))["beta"]  # [B, N, M]
    assert torch.allclose(beta.sum(-1), torch.ones(beta.shape[:2]))
    assert (beta[1, :, 0] == 0).all() and (beta[1, :, 2] == 0).all()


def test_attention_mask_follows_eq4():
    avail = torch.tensor([[[True, False], [True, True]]])  # B=1, M=2, N=2
    fuse = torch.tensor([[[True, False], [False, False]]])  # modality 1 dropped from the fusion
    a = attention_mask(avail, fuse)[0].int()
    # token order: f0 f1 | m0_0 m0_1 | m1_0 m1_1
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],  # a missing token sees only itself and its own modality
            [0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(a, expected)


def test_multimae_mask_keeps_the_token_budget():
    g = torch.Generator().manual_seed(0)
    avail = torch.rand(64, 4, 16, generator=g) < 0.7
    avail[:8, 1:] = False  # one modality only
    avail[8:16, 0, :3] = True
    avail[8:16, 0, 3:] = False  # capacity binding
    avail[16] = False  # nothing
    for budget in (1, 5, 20, 80):
        vis = multimae_mask(avail, budget, generator=g)
        assert not (vis & ~avail).any()
        assert torch.equal(vis.sum((1, 2)), avail.sum((1, 2)).clamp(max=budget))
    counts = multimae_allocate(
        torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5]]),
        torch.tensor([[2, 10, 10], [4, 4, 4]]),
        torch.tensor([10, 12]),
    )
    assert counts.tolist()[1] == [4, 4, 4] and counts[0, 0] == 2 and counts[0].sum() == 10


def test_trains_and_predicts():
    model = build().train()
    batch = chips(separable=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def total():
        torch.manual_seed(3)
        out = model(batch)
        return model.loss(out, batch)

    before = total()
    assert set(before) == {"main", "uni", "total"}
    for _ in range(8):
        opt.zero_grad()
        total()["total"].backward()
        opt.step()
    with torch.no_grad():
        after = total()["total"]
    assert after < before["total"]
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out["logits"].shape == (2, K, 32, 32) and torch.isfinite(out["logits"]).all()
    assert torch.allclose(model.predict_proba(batch).sum(1), torch.ones(()))


@pytest.mark.parametrize(("hw", "patch"), [(20, None), (16, None), (16, 16), (24, 4)])
def test_patch_adapts_to_chip_size(hw, patch):
    model = build(patch=patch).eval()
    with torch.no_grad():
        out = model(chips(hw=hw))
    assert out["logits"].shape == (2, K, hw, hw) and torch.isfinite(out["logits"]).all()


def test_classification_is_refused():
    with pytest.raises(ConfigError, match="segmentation") as err:
        build_model(
            "imt", task="classification", modalities=MODS, in_channels=CH, n_steps=T, n_classes=K
        )
    assert isinstance(err.value, ValueError) and "comiss" in str(err.value)


def test_pretraining_objective_and_weights_load(tmp_path, caplog):
    torch.manual_seed(0)
    model = build()
    pre = IMTPretrainer(
        IMT(task="segmentation", modalities=MODS, in_channels=CH, n_steps=T, n_classes=K).encoder,
        dec_dim=16,
    )
    batch = chips(b=3, mask=torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]]).bool())
    terms = pre(batch)
    assert {"rec", "cont", "total", "rec_dem", "cont_s2"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["rec"] > 0
    terms["total"].backward()
    assert pre.encoder.embed["s2"].weight.grad.abs().sum() > 0
    path = tmp_path / "imt.pt"
    torch.save(pre.checkpoint(), path)
    tuned = build(pretrained=str(path))
    assert tuned.pretrained_from == str(path)
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(tuned.encoder.state_dict()[k], v), k
    assert not torch.equal(model.encoder.fusion, tuned.encoder.fusion)
    with caplog.at_level(logging.WARNING):
        build(pretrained=str(tmp_path / "missing.pt"))
    assert "not found" in caplog.text
    with pytest.raises(ConfigError, match="dim"):
        build(pretrained=str(path), dim=16)
