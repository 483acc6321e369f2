"""Decision/feature fusion over available modalities, ModDrop draws, masked pooling and pixel draws."""

from __future__ import annotations

import torch
from torch import Tensor


def _w(avail: Tensor, like: Tensor) -> Tensor:
    """Availability ``[B, M, (H, W)]`` as weights broadcastable to stacked ``[B, M, K, (H, W)]``."""
    return avail.unsqueeze(2).to(like.dtype)


def fuse_mean(stacked: Tensor, avail: Tensor) -> Tensor:
    """Mean over available modalities.

    Args:
        stacked: ``[B, M, K]`` or ``[B, M, K, H, W]`` (per-modality logits or features); values
            at unavailable positions must be finite (they are multiplied by 0).
        avail: bool ``[B, M]`` or ``[B, M, H, W]``.

    Returns:
        ``[B, K]`` / ``[B, K, H, W]``; exactly 0 where no modality is available.
    """
    w = _w(avail, stacked)
    return (stacked * w).sum(1) / w.sum(1).clamp(min=1.0)


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=like.device)
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def moddrop_keep(
    avail: Tensor, keep_prob: float, generator: torch.Generator | None = None
) -> Tensor:
    """Draw which modalities ModDrop keeps; never drops every available modality.

    Each modality is kept with probability ``keep_prob`` independently per sample (per chip for
    segmentation). Only available modalities can be kept; a sample whose draw keeps none of its
    available modalities keeps one of them chosen uniformly at random. With a per-pixel
    ``avail``, draws are per chip and a pixel whose kept modalities are all unavailable keeps
    its available ones (no drop there), so every pixel with data keeps at least one modality.

    Args:
        avail: bool ``[B, M]`` or ``[B, M, H, W]``.
        keep_prob: probability of keeping a modality (``1 - alpha`` of the Co-Miss paper, whose
            ``d_m ~ Bern(alpha)`` is the *drop* decision).
        generator: RNG; the global one when None.

    Returns:
        bool, shape of ``avail``, subset of ``avail``.
    """
    spatial = avail.dim() == 4
    chip = avail.flatten(2).any(2) if spatial else avail
    b, m = chip.shape
    keep = (_rand((b, m), chip, generator) < keep_prob) & chip
    none = chip.any(1) & ~keep.any(1)
    score = _rand((b, m), chip, generator).masked_fill(~chip, -1.0)
    pick = torch.nn.functional.one_hot(score.argmax(1), m).bool() & chip
    keep = torch.where(none[:, None], pick, keep)
    if not spatial:
        return keep
    kept = keep[:, :, None, None] & avail
    lost = avail.any(1, keepdim=True) & ~kept.any(1, keepdim=True)
    return torch.where(lost, avail, kept)


def masked_pool(z: Tensor, avail: Tensor) -> tuple[Tensor, Tensor]:
    """Per-chip mean of features over available pixels (identity for vectors).

    Args:
        z: ``[B, D]`` or ``[B, D, H, W]``.
        avail: bool ``[B]`` or ``[B, H, W]``.

    Returns:
        ``([B, D], valid [B])``; ``valid`` is False for chips with no available pixel.
    """
    if z.dim() == 2:
        return z, avail
    w = avail.unsqueeze(1).to(z.dtype)
    n = w.flatten(2).sum(2)
    return (z * w).flatten(2).sum(2) / n.clamp(min=1.0), n[:, 0] > 0


def pixel_index(avail: Tensor, n: int, generator: torch.Generator | None = None, random: bool = True) -> Tensor:
    """Up to ``n`` pixels of a chip batch where at least one modality is available.

    The feature-level terms of the co-learning methods (contrastive, modality discriminant) are
    defined on samples; for chips the samples are pixels, drawn across the whole batch so that
    the negatives of a pixel are mostly pixels of other fields and chips.

    Args:
        avail: bool ``[B, M, H, W]``.
        n: pixels to draw (all candidates when there are fewer).
        generator: RNG of the random draw; the global one when None.
        random: uniform draw without replacement (training) or evenly spaced candidates (eval:
            a deterministic loss).

    Returns:
        int64 ``[n']`` flat indices into ``B * H * W`` (``n' = min(n, candidates)``), ascending.
    """
    cand = avail.any(1).flatten().nonzero().squeeze(1)
    if cand.numel() <= n:
        return cand
    if random:
        pick = _rand((cand.numel(),), cand, generator).topk(n).indices
        return cand[pick].sort().values
    step = cand.numel() / n
    return cand[(torch.arange(n, device=cand.device) * step).long()]


def pixel_rows(z: Tensor, idx: Tensor) -> Tensor:
    """Rows of a chip tensor ``[B, D, H, W]`` at flat pixel indices ``idx`` -> ``[len(idx), D]``."""
    hw = z.shape[-2] * z.shape[-1]
    return z.flatten(2)[idx // hw, :, idx % hw]
