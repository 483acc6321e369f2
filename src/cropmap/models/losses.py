"""Loss terms as pure functions.

Shapes: ``N`` samples (pixels of a chip batch are handled by passing ``[N, K, H, W]`` logits
with ``[N, H, W]`` targets), ``K`` outputs, ``D`` feature size. ``valid`` masks select the
positions a term is averaged over (e.g. samples where a modality is available); a term with no
valid position is an exact, graph-connected zero, never NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
HeadKind = Literal["multiclass", "binary", "multilabel", "regression"]


def _zero(x: Tensor) -> Tensor:
    return x.sum() * 0.0


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``values`` over ``valid`` positions (same shape); 0 when none."""
    if valid is None:
        return values.mean() if values.numel() else _zero(values)
    if not bool(valid.any()):
        return _zero(values)
    return values[valid].mean()


def ce(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    valid: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Cross-entropy ``-log softmax(logits)[y]``, class-weighted like :func:`torch.nn.functional.cross_entropy`.

    Args:
        logits: ``[N, K]`` or ``[N, K, H, W]``.
        target: ``[N]`` or ``[N, H, W]`` class ids; ``ignore_index`` marks unlabelled positions.
        weight: ``[K]`` class weights; the result is ``sum_i w[y_i] l_i / sum_i w[y_i]``.
        valid: bool, shape of ``target``; positions outside are ignored too.

    Returns:
        Scalar; 0 when no position is labelled and valid.
    """
    t = target.long()
    if valid is not None:
        t = torch.where(valid, t, torch.full_like(t, ignore_index))
    if not bool((t != ignore_index).any()):
        return _zero(logits)
    return F.cross_entropy(logits, t, weight=weight, ignore_index=ignore_index)


def kd_loss(teacher: Tensor, student: Tensor, tau: float, valid: Tensor | None = None) -> Tensor:
    """Knowledge distillation with the tau^2 factor (Hinton et al.): ``tau^2 * KL(p_t || p_s)``.

    ``p = softmax(logits / tau)`` over dim 1; KL summed over classes and averaged over valid
    positions. The teacher is detached (it is a target).

    Args:
        teacher, student: ``[N, K]`` or ``[N, K, H, W]`` logits.
        tau: temperature.
        valid: bool ``[N]`` or ``[N, H, W]``.

    Returns:
        Scalar ``tau**2 * mean_n sum_k p_t,k (log p_t,k - log p_s,k)``.
    """
    log_pt = F.log_softmax(teacher.detach() / tau, dim=1)
    log_ps = F.log_softmax(student / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    return tau**2 * _masked_mean(kl, valid)


def info_nce(anchor: Tensor, positive: Tensor, gamma: float = 0.07) -> Tensor:
    """InfoNCE with cosine similarity (SimCLR/CLIP style, one direction).

    ``s_ij = cos(anchor_i, positive_j) / gamma``; loss ``= mean_i -log softmax_j(s_i.)[i]``:
    the positive of anchor ``i`` is ``positive_i`` (same sample, other modality), the negatives
    are ``positive_j, j != i`` (other samples of the batch).

    Args:
        anchor, positive: ``[N, D]``.
        gamma: temperature (0.07 in Co-Miss/FullCo).

    Returns:
        Scalar; 0 when ``N == 0`` (``N == 1`` gives exactly 0 too).
    """
    if anchor.shape[0] == 0:
        return _zero(anchor) + _zero(positive)
    a = F.normalize(anchor, dim=1)
    p = F.normalize(positive, dim=1)
    sim = a @ p.T / gamma
    return F.cross_entropy(sim, torch.arange(a.shape[0], device=a.device))


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric NT-Xent between two views: ``(info_nce(z1, z2) + info_nce(z2, z1)) / 2``.

    This is what MDiCo's code computes (pytorch-metric-learning ``SelfSupervisedLoss(NTXentLoss,
    symmetric=True)``: negatives are the other samples of the *other* view).

    Args:
        z1, z2: ``[N, D]``.
        temperature: 0.1 in MDiCo.
    """
    return 0.5 * (info_nce(z1, z2, temperature) + info_nce(z2, z1, temperature))


def modality_ce(logits: Tensor, modality: int, valid: Tensor | None = None) -> Tensor:
    """Modality-discriminant CE: every (valid) row of ``logits [N, M]`` should predict ``modality``."""
    target = torch.full(logits.shape[:1], modality, dtype=torch.long, device=logits.device)
    return ce(logits, target, valid=valid)


def _bernoulli_kl(t_logit: Tensor, s_logit: Tensor) -> Tensor:
    pt = torch.sigmoid(t_logit)
    return pt * (F.logsigmoid(t_logit) - F.logsigmoid(s_logit)) + (1 - pt) * (
        F.logsigmoid(-t_logit) - F.logsigmoid(-s_logit)
    )


def _dense_target(kind: HeadKind, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Target shaped like ``logits`` and its element validity (multi-output heads)."""
    if kind == "binary" or y.dim() == logits.dim() - 1:
        y = y.unsqueeze(1)
    y = y.to(logits.dtype).expand_as(logits)
    ok = torch.isfinite(y) if kind == "regression" else (y >= 0)
    return torch.where(ok, y, torch.zeros_like(y)), ok


def task_loss(
    kind: HeadKind,
    logits: Tensor,
    y: Tensor,
    weight: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Supervised loss of a head of the given kind.

    * ``multiclass``: :func:`ce` (``y [N]`` / ``[N, H, W]`` ids, ``-100`` ignored).
    * ``binary``: BCE-with-logits on ``logits [N, 1, ...]``, ``y`` in {0, 1}, negative ignored;
      ``weight [2]`` weights the two classes.
    * ``multilabel``: BCE per label, ``y`` shaped like ``logits`` (multi-hot), negative ignored;
      ``weight [K]`` weights labels.
    * ``regression``: MSE, ``y`` shaped like ``logits`` (or without the K axis when K = 1),
      NaN ignored.

    ``valid`` is a sample/pixel mask (``[N]`` or ``[N, H, W]``).
    """
    if kind == "multiclass":
        return ce(logits, y, weight=weight, valid=valid)
    target, ok = _dense_target(kind, logits, y)
    if valid is not None:
        ok = ok & valid.unsqueeze(1)
    if kind == "regression":
        return _masked_mean((logits - target) ** 2, ok)
    elem = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is not None:
        shape = [1, -1] + [1] * (logits.dim() - 2)
        w = (
            torch.where(target > 0.5, weight[1], weight[0])
            if kind == "binary"
            else weight.view(shape).expand_as(elem)
        )
        okf = ok.to(elem.dtype)
        den = (w * okf).sum()
        return (elem * w * okf).sum() / den if bool(den > 0) else _zero(logits)
    return _masked_mean(elem, ok)


def distill_loss(
    kind: HeadKind, teacher: Tensor, student: Tensor, tau: float, valid: Tensor | None = None
) -> Tensor:
    """``lambda * KD(teacher, student; tau)`` with ``lambda = tau^2``, for any head kind.

    * ``multiclass``: :func:`kd_loss`.
    * ``binary`` / ``multilabel``: ``tau^2 *`` Bernoulli KL of ``sigmoid(logit / tau)`` summed
      over outputs, averaged over valid positions.
    * ``regression``: ``tau^2 *`` MSE to the (detached) teacher; temperature has no meaning.
    """
    if kind == "multiclass":
        return kd_loss(teacher, student, tau, valid)
    t = teacher.detach()
    elem = (student - t) ** 2 if kind == "regression" else _bernoulli_kl(t / tau, student / tau)
    return tau**2 * _masked_mean(elem.sum(1), valid)


def dice_loss(kind: HeadKind | str, logits: Tensor, y: Tensor, valid: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice ``1 - mean_k (2 sum p_k y_k + s) / (sum p_k + sum y_k + s)`` over valid pixels.

    ``multiclass``: softmax probabilities vs one-hot ids (``-100`` ignored); ``binary``: the two
    classes of a sigmoid; ``multilabel``: per-label sigmoid vs multi-hot ``y [B, K, H, W]``
    (negative ignored); ``regression``: 0 (no Dice).
    """
    zero = logits.sum() * 0.0
    if kind == "regression":
        return zero
    logits = logits.float()
    if kind == "multilabel":
        ok = (y >= 0) & valid[:, None]
        p, t = torch.sigmoid(logits), y.clamp(min=0).to(logits.dtype)
    else:
        ok1 = valid & (y >= 0)
        if kind == "binary":
            q = torch.sigmoid(logits[:, 0])
            p = torch.stack([1 - q, q], 1)
            t = F.one_hot(y.clamp(0, 1).long(), 2).permute(0, 3, 1, 2).to(p.dtype)
        else:
            p = torch.softmax(logits, 1)
            t = F.one_hot(y.clamp(min=0).long(), logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
        ok = ok1[:, None].expand_as(p)
    if not bool(ok.any()):
        return zero
    w = ok.to(p.dtype)
    inter = (p * t * w).sum((0, 2, 3))
    den = (p * w).sum((0, 2, 3)) + (t * w).sum((0, 2, 3))
    return 1.0 - ((2 * inter + smooth) / (den + smooth)).mean()
