"""Loss terms against hand/numpy computations on tiny batches."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from cropmap.models import losses as L
from cropmap.models.fusion import moddrop_keep

# ---------------------------------------------------------------- numpy references


def np_logsoftmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def np_ce(logits, y, w=None, valid=None) -> float:
    logits, y = np.asarray(logits, float), np.asarray(y)
    valid = np.ones(len(y), bool) if valid is None else np.asarray(valid)
    logits, y = logits[valid], y[valid]
    if len(y) == 0:
        return 0.0
    ls = -np_logsoftmax(logits)[np.arange(len(y)), y]
    wy = np.ones(len(y)) if w is None else np.asarray(w, float)[y]
    return float((wy * ls).sum() / wy.sum())


def np_kd(t, s, tau, valid=None) -> float:
    t, s = np.asarray(t, float), np.asarray(s, float)
    if valid is not None:
        t, s = t[np.asarray(valid)], s[np.asarray(valid)]
    if len(t) == 0:
        return 0.0
    lt, ls = np_logsoftmax(t / tau), np_logsoftmax(s / tau)
    return float(tau**2 * (np.exp(lt) * (lt - ls)).sum(1).mean())


def np_info_nce(a, p, gamma) -> float:
    a, p = np.asarray(a, float), np.asarray(p, float)
    if len(a) == 0:
        return 0.0
    # like F.normalize: a zero vector (e.g. all-ReLU-off features) has cosine 0 to everything
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    s = a @ p.T / gamma
    return float(-np.diag(np_logsoftmax(s)).mean())


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def close(a, b, tol=1e-5) -> bool:
    a = a.detach() if isinstance(a, torch.Tensor) else a
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


# ---------------------------------------------------------------- pure functions


def test_ce_class_weights_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 2, 2])
    w = torch.tensor([1.0, 2.0, 0.5])
    # by hand: l_i = logsumexp(row) - row[y_i]; weights w[y] = 1, .5, .5
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    li = [lse[0] - 2.0, lse[1] - 0.0, lse[2] - 3.0]
    expect = (1.0 * li[0] + 0.5 * li[1] + 0.5 * li[2]) / 2.0
    assert close(L.ce(logits, y, weight=w), expect)
    assert close(L.ce(logits, y, weight=w), np_ce(t2n(logits), y.numpy(), w.numpy()))
    # valid mask and ignore_index drop samples
    valid = torch.tensor([True, False, True])
    assert close(L.ce(logits, y, weight=w, valid=valid), (li[0] + 0.5 * li[2]) / 1.5)
    assert close(L.ce(logits, torch.tensor([0, -100, 2]), weight=w), (li[0] + 0.5 * li[2]) / 1.5)


def test_ce_nothing_valid_is_zero_with_grad():
    logits = torch.randn(2, 3, requires_grad=True)
    out = L.ce(logits, torch.tensor([-100, -100]))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_ce_segmentation_shape():
    logits = torch.randn(2, 3, 2, 2)
    y = torch.tensor([[[0, 1], [2, -100]], [[1, 1], [0, 2]]])
    flat = t2n(logits.permute(0, 2, 3, 1).reshape(-1, 3))
    yf = y.reshape(-1).numpy()
    assert close(L.ce(logits, y), np_ce(flat, yf, valid=yf >= 0))


def test_kd_tau_squared_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    s = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    tau = 0.5
    # sample 1: p_t = softmax([2, 0]), p_s = [.5, .5]; sample 2: p_t = [.5, .5], p_s = softmax([0, 4])
    pt1 = [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))]
    kl1 = sum(p * math.log(p / 0.5) for p in pt1)
    ps2 = [1 / (1 + math.exp(4)), math.exp(4) / (1 + math.exp(4))]
    kl2 = sum(0.5 * math.log(0.5 / q) for q in ps2)
    expect = tau**2 * (kl1 + kl2) / 2
    assert close(L.kd_loss(t, s, tau), expect)
    g = torch.Generator().manual_seed(0)
    t3, s3 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert close(L.kd_loss(t3, s3, 2.0), np_kd(t2n(t3), t2n(s3), 2.0))
    assert close(L.kd_loss(t3, t3, 0.5), 0.0)


def test_kd_teacher_detached():
    t = torch.randn(2, 3, requires_grad=True)
    s = torch.randn(2, 3, requires_grad=True)
    L.kd_loss(t, s, 0.5).backward()
    assert t.grad is None and s.grad is not None


def test_info_nce_by_hand():
    gamma = 0.07
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosine ignores the norm
    p = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # s = [[1, 0], [0, 1]] / gamma -> each row: log(1 + exp(-1/gamma))
    expect = math.log1p(math.exp(-1 / gamma))
    assert close(L.info_nce(a, p, gamma), expect)
    g = torch.Generator().manual_seed(1)
    a3, p3 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert close(L.info_nce(a3, p3, gamma), np_info_nce(t2n(a3), t2n(p3), gamma), 1e-4)
    assert L.info_nce(a3[:0], p3[:0]).item() == 0.0
    assert L.info_nce(a3[:1], p3[:1]).item() == 0.0


def test_nt_xent_is_symmetric_info_nce():
    g = torch.Generator().manual_seed(2)
    a, p = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    expect = 0.5 * (np_info_nce(t2n(a), t2n(p), 0.1) + np_info_nce(t2n(p), t2n(a), 0.1))
    assert close(L.nt_xent(a, p, 0.1), expect, 1e-4)


def test_modality_ce():
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    assert close(L.modality_ce(logits, 1), np_ce(t2n(logits), np.array([1, 1])))


def test_binary_multilabel_regression_losses():
    z = torch.tensor([[0.5], [-1.0], [2.0]])
    y = torch.tensor([1, 0, -100])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    assert close(L.task_loss("binary", z, y), (sp(-0.5) + sp(-1.0)) / 2)
    w = torch.tensor([1.0, 3.0])
    assert close(L.task_loss("binary", z, y, weight=w), (3 * sp(-0.5) + sp(-1.0)) / 4)
    zm = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    ym = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert close(L.task_loss("multilabel", zm, ym), (sp(0.0) + sp(1.0) + sp(1.0)) / 3)
    zr = torch.tensor([[1.0], [2.0], [0.0]])
    yr = torch.tensor([0.0, float("nan"), 3.0])
    assert close(L.task_loss("regression", zr, yr), (1.0 + 9.0) / 2)
    # distillation: bernoulli KL with tau^2, MSE with tau^2 for regression
    assert close(L.distill_loss("regression", zr, zr + 1, 0.5), 0.25)
    assert close(L.distill_loss("binary", z, z, 0.5), 0.0)


# ---------------------------------------------------------------- ModDrop


def test_moddrop_never_drops_everything():
    g = torch.Generator().manual_seed(0)
    avail = torch.tensor(
        [[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    avail = avail.repeat(400, 1)
    for keep_prob in (0.05, 0.5, 0.95):
        keep = moddrop_keep(avail, keep_prob, g)
        assert not (keep & ~avail).any()  # only available modalities are kept
        assert torch.equal(keep.any(1), avail.any(1))  # >= 1 kept wherever something exists
        full = keep[0::5].float().mean(0)  # rows with all 4 available
        expect = keep_prob + (1 - keep_prob) ** 4 / 4
        assert (full - expect).abs().max() < 0.06
    again = moddrop_keep(avail, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(again, moddrop_keep(avail, 0.5, torch.Generator().manual_seed(5)))


def test_moddrop_per_pixel():
    g = torch.Generator().manual_seed(0)
    avail = torch.rand(50, 4, 3, 3, generator=g) < 0.4
    for _ in range(20):
        keep = moddrop_keep(avail, 0.3, g)
        assert not (keep & ~avail).any()
        assert torch.equal(keep.any(1), avail.any(1))


# ---------------------------------------------------------------- method terms


def _forward(build_fn, batch_fn, method, mask=None, **kw):
    torch.manual_seed(0)
    model = build_fn(method, "classification", **kw).train()
    if mask is None:
        mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]])
    batch = batch_fn("classification", b=5, mask=mask.bool())
    out = model(batch)
    return model, batch, out, model.loss(out, batch)


def _cont_np(feats, avail, sl, fn):
    total = 0.0
    mods = list(feats)
    for (i, m), (j, n) in itertools.permutations(enumerate(mods), 2):
        both = avail[:, i] & avail[:, j]
        total += fn(feats[m][both][:, sl], feats[n][both][:, sl])
    return total


def test_comiss_terms_by_hand(build_fn, batch_fn):
    model, batch, out, loss = _forward(build_fn, batch_fn, "comiss", class_weights=[1.0, 2.0, 0.5])
    y, w = batch["y"].numpy(), np.array([1.0, 2.0, 0.5])
    avail, keep = out["avail"].numpy(), out["keep"].numpy()
    per = np.stack([t2n(out["per_modality"][m]) for m in model.modalities], 1)
    full = (per * avail[..., None]).sum(1) / np.maximum(avail.sum(1), 1)[:, None]
    miss = (per * keep[..., None]).sum(1) / np.maximum(keep.sum(1), 1)[:, None]
    assert np.allclose(t2n(out["logits"]), full, atol=1e-6)
    assert np.allclose(t2n(out["logits_miss"]), miss, atol=1e-6)
    assert (keep <= avail).all() and (keep.any(1) == avail.any(1)).all()
    assert close(loss["main"], np_ce(full, y, w))
    assert close(loss["miss_ce"], np_ce(miss, y, w))
    assert close(loss["miss_kd"], np_kd(full, miss, 0.5))
    feats = {m: t2n(f) for m, f in out["features"].items()}
    h = model.hidden // 2
    wm, bm = t2n(model.mod_head.lin.weight), t2n(model.mod_head.lin.bias)
    mod = sum(
        np_ce(feats[m][avail[:, i]][:, h:] @ wm.T + bm, np.full(avail[:, i].sum(), i))
        for i, m in enumerate(model.modalities)
    )
    assert close(loss["mod"], mod)
    cont = _cont_np(feats, avail, slice(0, h), lambda a, b: np_info_nce(a, b, 0.07))
    assert close(loss["cont"], cont, 1e-4)
    assert set(loss) == {"main", "mod", "cont", "miss_ce", "miss_kd", "total"}


def test_fullco_mutual_terms_by_hand(build_fn, batch_fn):
    model, batch, out, loss = _forward(build_fn, batch_fn, "fullco", tau=0.5)
    y, avail = batch["y"].numpy(), out["avail"].numpy()
    full = t2n(out["logits"])
    ce = sum(
        np_ce(t2n(out["per_modality"][m]), y, valid=avail[:, i])
        for i, m in enumerate(model.modalities)
    )
    kd = sum(
        np_kd(full, t2n(out["per_modality"][m]), 0.5, valid=avail[:, i])
        for i, m in enumerate(model.modalities)
    )
    assert close(loss["mut_ce"], ce) and close(loss["mut_kd"], kd)
    assert set(loss) == {"main", "mod", "cont", "mut_ce", "mut_kd", "total"}


def test_dsensd_terms_by_hand(build_fn, batch_fn):
    model, batch, out, loss = _forward(build_fn, batch_fn, "dsensd", tau=0.5)
    y, avail, keep = batch["y"].numpy(), out["avail"].numpy(), out["keep"].numpy()
    full = t2n(out["logits"])
    per = {m: t2n(v) for m, v in out["per_modality"].items()}
    drop = np.stack([per[m] for m in model.modalities], 1)
    drop = (drop * keep[..., None]).sum(1) / np.maximum(keep.sum(1), 1)[:, None]
    assert close(loss["drop"], np_ce(drop, y))
    assert close(loss["main"], np_ce(full, y))
    m_ = len(model.modalities)
    ce = sum(np_ce(per[m], y, valid=avail[:, i]) for i, m in enumerate(model.modalities)) / m_
    kd = sum(np_kd(full, per[m], 0.5, avail[:, i]) for i, m in enumerate(model.modalities)) / m_
    assert close(loss["mut_ce"], ce) and close(loss["mut_kd"], kd)


def test_mdico_four_terms_by_hand(build_fn, batch_fn):
    model, batch, out, loss = _forward(build_fn, batch_fn, "mdico")
    y, avail = batch["y"].numpy(), out["avail"].numpy()
    mods, n = model.modalities, len(model.modalities)
    spe = {m: t2n(v) for m, v in out["specific"].items()}
    unu = {m: t2n(v) for m, v in out["unused"].items()}
    sha = {m: t2n(v) for m, v in out["shared"].items()}
    assert all(v.shape[1] == model.hidden // 2 for v in (*spe.values(), *sha.values()))

    def lin(head, x):
        return x @ t2n(head.lin.weight).T + t2n(head.lin.bias)

    main = sum(np_ce(t2n(out["per_modality"][m]), y, valid=avail[:, i]) for i, m in enumerate(mods))
    aux = sum(
        np_ce(lin(model.aux_head, spe[m]), y, valid=avail[:, i])
        + np_ce(lin(model.aux_head, sha[m]), y, valid=avail[:, i])
        for i, m in enumerate(mods)
    )
    disc = 0.0
    for i, m in enumerate(mods):
        a = avail[:, i]
        lab = np.full(a.sum(), i)
        disc += np_ce(lin(model.disc_specific, spe[m][a]), lab)
        disc += np_ce(lin(model.disc_unused, unu[m][a]), lab)  # unused features (paper)

    def ntx(a, b):
        return 0.5 * (np_info_nce(a, b, 0.1) + np_info_nce(b, a, 0.1))

    cont = _cont_np(sha, avail, slice(None), ntx)
    assert close(loss["main"], main / n)
    assert close(loss["aux"], aux / (2 * n))
    assert close(loss["disc"], disc / (2 * n))
    assert close(loss["cont"], cont, 1e-4)
    assert set(loss) == {"main", "aux", "cont", "disc", "total"}


def test_fcom_av_all_combinations(build_fn, batch_fn):
    model, batch, out, loss = _forward(build_fn, batch_fn, "fcom_av")
    y, avail = batch["y"].numpy(), out["avail"]
    vals = []
    for r in range(1, 5):
        for combo in itertools.combinations(range(4), r):
            sel = torch.zeros_like(avail)
            sel[:, list(combo)] = avail[:, list(combo)]
            with torch.no_grad():
                logits = model._fused(out["features"], sel)
            vals.append(np_ce(t2n(logits), y, valid=sel.any(1).numpy()))
    assert len(vals) == 15
    assert close(loss["main"], np.mean(vals))


@pytest.mark.parametrize("method", ["comiss", "unimodal", "input_fusion"])
def test_segmentation_ce_ignores_unlabelled(method, build_fn, batch_fn):
    torch.manual_seed(0)
    model = build_fn(method, "segmentation").train()
    batch = batch_fn("segmentation", b=2)
    batch["y"] = torch.full_like(batch["y"], -100)
    out = model(batch)
    loss = model.loss(out, batch)
    sup = [k for k in loss if k in ("main", "miss_ce", "ce_s2", "ce_dem")]
    assert sup and all(loss[k].item() == 0.0 for k in sup)
    assert torch.isfinite(loss["total"])


# ---------------------------------------------------------------- segmentation: pixels as samples


def test_pixel_index_draws_pixels_with_data():
    from cropmap.models.fusion import pixel_index, pixel_rows

    g = torch.Generator().manual_seed(0)
    avail = torch.rand(3, 4, 6, 6, generator=g) < 0.3
    cand = avail.any(1).flatten().nonzero().squeeze(1)
    drawn = pixel_index(avail, 20, torch.Generator().manual_seed(1))
    assert len(drawn) == 20 and len(set(drawn.tolist())) == 20 and set(drawn.tolist()) <= set(cand.tolist())
    assert torch.equal(drawn, pixel_index(avail, 20, torch.Generator().manual_seed(1)))
    assert not torch.equal(drawn, pixel_index(avail, 20, torch.Generator().manual_seed(2)))
    even = pixel_index(avail, 20, random=False)
    assert torch.equal(even, pixel_index(avail, 20, random=False)) and set(even.tolist()) <= set(cand.tolist())
    assert torch.equal(pixel_index(avail, 10_000), cand)  # fewer candidates than asked: all of them
    z = torch.randn(3, 5, 6, 6)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.equal(pixel_rows(z, drawn), flat[drawn])
    assert torch.equal(pixel_rows(avail, drawn), avail.permute(0, 2, 3, 1).reshape(-1, 4)[drawn])


@pytest.mark.parametrize("method", ["comiss", "mdico"])
def test_segmentation_feature_terms_use_pixels_as_samples(build_fn, batch_fn, method):
    """For chips the contrastive/discriminant terms run on drawn pixels (evenly spaced in eval)."""
    from cropmap.models.fusion import pixel_index, pixel_rows

    torch.manual_seed(0)
    model = build_fn(method, "segmentation", contrast_pixels=50).eval()
    mask = torch.ones(3, 4, 8, 8, dtype=torch.bool)
    mask[0, 1] = False  # chip 0 without s1
    mask[1, 0, :4] = False  # s2 missing on half of chip 1
    mask[2, :, :2, :2] = False  # no data in a corner of chip 2
    batch = batch_fn("segmentation", b=3, mask=mask)
    with torch.no_grad():
        out = model(batch)
        loss = model.loss(out, batch)
    idx = pixel_index(out["avail"], 50, random=False)
    assert len(idx) == 50
    av = t2n(pixel_rows(out["avail"], idx)).astype(bool)
    if method == "comiss":
        h = model.hidden // 2
        feats = {m: t2n(pixel_rows(f, idx)) for m, f in out["features"].items()}
        cont = _cont_np(feats, av, slice(0, h), lambda a, b: np_info_nce(a, b, 0.07))
        wm, bm = t2n(model.mod_head.lin.weight), t2n(model.mod_head.lin.bias)
        mod = sum(np_ce(feats[m][av[:, i]][:, h:] @ wm.T + bm, np.full(av[:, i].sum(), i))
                  for i, m in enumerate(model.modalities))
        assert close(loss["mod"], mod, 1e-4)
    else:
        shared = {m: t2n(pixel_rows(f, idx)) for m, f in out["shared"].items()}
        cont = _cont_np(shared, av, slice(None), lambda a, b: 0.5 * (np_info_nce(a, b, 0.1) + np_info_nce(b, a, 0.1)))
    assert close(loss["cont"], cont, 1e-4)
    model.train()

    def drawn_cont(seed: int) -> torch.Tensor:
        torch.manual_seed(5)  # same dropout
        model.generator = torch.Generator().manual_seed(seed)
        return model.loss(model(batch), batch)["cont"]

    assert torch.equal(drawn_cont(3), drawn_cont(3)), "the draw follows the method's generator"
    assert not torch.equal(drawn_cont(3), drawn_cont(4))


def test_loss_weights_scale_the_named_terms_of_total(build_fn, batch_fn):
    from cropmap.errors import UnknownNameError

    batch = batch_fn("classification", b=8, seed=3)
    torch.manual_seed(0)
    plain = build_fn("comiss", "classification")
    torch.manual_seed(0)
    weighted = build_fn("comiss", "classification", loss_weights={"cont": 0.1, "mod": 0.0})
    weighted.load_state_dict(plain.state_dict())
    plain.eval(), weighted.eval()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain.generator, weighted.generator = g1, g2  # the same ModDrop draws
    t1 = plain.loss(plain(batch), batch)
    t2 = weighted.loss(weighted(batch), batch)
    for k in t1:
        if k != "total":
            assert close(t1[k], t2[k])  # the terms themselves are unchanged
    assert close(t1["total"], sum(v for k, v in t1.items() if k != "total"))  # unweighted sum by default
    want = sum(v * {"cont": 0.1, "mod": 0.0}.get(k, 1.0) for k, v in t1.items() if k != "total")
    assert close(t2["total"], want)
    bad = build_fn("comiss", "classification", loss_weights={"contrast": 0.5})
    with pytest.raises(UnknownNameError, match="valid: main, mod, cont"):
        bad.loss(bad(batch), batch)
