"""Training augmentations of pixel time series that look like real gaps.

Each one takes a *normalised* batch ``{m: [B, T, C] (static [B, C]), "mask": bool [B, M], "y": [B]}``
(the layout of :class:`cropmap.train.PixelDataset`, after :class:`cropmap.normalize.Normalizer`)
and returns a new batch; the input is not modified, labels are never touched.

* :func:`mask_months` (clouds): each month of a present temporal modality is made invalid
  (NaN, which the model zero-fills) with probability ``p``; the presence mask is unchanged
  (a present modality may have invalid months, as in real data), and a modality that had a
  valid month keeps at least one.
* :func:`drop_modalities` (a sensor that does not cover the pixel): each present modality is
  dropped with probability ``p`` (mask False, values NaN); a sample keeps at least one of its
  present modalities (:func:`cropmap.models.fusion.moddrop_keep`).
* :func:`shift_months` (phenology a month early or late): with probability ``p`` a sample's
  temporal modalities all move by one month, earlier or later at random; the month shifted in
  is invalid. Static modalities and the mask are unchanged.
* :func:`add_noise` (radiometric noise): Gaussian noise of standard deviation ``sigma`` (in
  normalised units) on every valid value; invalid values stay invalid, the mask is unchanged.

:class:`Augment` chains them with the rates of ``training.augment``. Random draws come from
``generator`` (the global torch RNG when None, whose state training checkpoints save, so a
resumed run draws the same augmentations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from cropmap.errors import ConfigError
from cropmap.modalities import TEMPORAL
from cropmap.models.fusion import moddrop_keep

Batch = Mapping[str, Any]


def _rand(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(tuple(shape), device=like.device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(like.device)


def _temporal(batch: Batch, modalities: Sequence[str]) -> list[tuple[int, str]]:
    return [(i, m) for i, m in enumerate(modalities) if TEMPORAL[m] and batch.get(m) is not None]


def mask_months(batch: Batch, modalities: Sequence[str], p: float,
                generator: torch.Generator | None = None) -> dict[str, Any]:
    """Invalidate each month of each present temporal modality with probability ``p`` (see module doc)."""
    out = dict(batch)
    if p <= 0:
        return out
    mask = batch["mask"]
    for i, m in _temporal(batch, modalities):
        x = batch[m]
        valid = torch.isfinite(x).all(-1)  # [B, T]
        u = _rand(valid.shape, x, generator)
        hit = (u < p) & valid & mask[:, i : i + 1]
        # a sample that would lose every valid month keeps the one with the highest draw
        emptied = valid.any(1) & ~(valid & ~hit).any(1)
        spare = torch.nn.functional.one_hot(u.masked_fill(~valid, -1.0).argmax(1), valid.shape[1]).bool()
        hit &= ~(emptied[:, None] & spare)
        out[m] = x.masked_fill(hit.unsqueeze(-1), float("nan"))
    return out


def drop_modalities(batch: Batch, modalities: Sequence[str], p: float,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Drop each present modality with probability ``p``, never all of a sample's (see module doc)."""
    out = dict(batch)
    if p <= 0:
        return out
    mask = batch["mask"].bool()
    keep = moddrop_keep(mask, 1.0 - p, generator)
    out["mask"] = keep
    for i, m in enumerate(modalities):
        x = batch.get(m)
        if x is None:
            continue
        dropped = mask[:, i] & ~keep[:, i]
        out[m] = x.masked_fill(dropped.view(-1, *([1] * (x.dim() - 1))), float("nan"))
    return out


def shift_months(batch: Batch, modalities: Sequence[str], p: float,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
    """Move a sample's temporal modalities one month earlier or later with probability ``p``."""
    out = dict(batch)
    temporal = _temporal(batch, modalities)
    if p <= 0 or not temporal:
        return out
    ref = batch[temporal[0][1]]
    b = ref.shape[0]
    u = _rand((b,), ref, generator)
    shift = torch.where(u < p / 2, -1, torch.where(u < p, 1, 0))  # -1: one month earlier
    for _, m in temporal:
        x = batch[m]
        nan = torch.full_like(x[:, :1], float("nan"))
        later = torch.cat([nan, x[:, :-1]], 1)  # month t shows what was at t-1
        earlier = torch.cat([x[:, 1:], nan], 1)
        s = shift.view(b, 1, 1)
        out[m] = torch.where(s > 0, later, torch.where(s < 0, earlier, x))
    return out


def add_noise(batch: Batch, modalities: Sequence[str], sigma: float,
              generator: torch.Generator | None = None) -> dict[str, Any]:
    """Add Gaussian noise of std ``sigma`` to the valid values of every modality."""
    out = dict(batch)
    if sigma <= 0:
        return out
    for m in modalities:
        x = batch.get(m)
        if x is None:
            continue
        if generator is None:
            e = torch.randn(x.shape, device=x.device)
        else:
            e = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        out[m] = x + sigma * e  # NaN + noise stays NaN
    return out


@dataclass
class AugmentSettings:
    """Rates of ``training.augment`` (0 disables an augmentation)."""

    month_mask: float = 0.0
    modality_drop: float = 0.0
    shift: float = 0.0
    noise: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AugmentSettings:
        """From the config block; unknown keys are a :class:`~cropmap.errors.ConfigError`."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config key training.augment: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        s = cls(**{k: float(v) for k, v in d.items()})
        for k, v in asdict(s).items():
            if not 0 <= v <= (10 if k == "noise" else 1):
                raise ConfigError(f"config key training.augment.{k}: {v} is out of range; use a rate in [0, 1] (noise: a std >= 0)")
        return s

    def active(self) -> bool:
        """Whether any augmentation is on."""
        return any(v > 0 for v in asdict(self).values())


class Augment:
    """The augmentations of :class:`AugmentSettings`, in the order drop, shift, month mask, noise."""

    def __init__(self, settings: AugmentSettings, modalities: Sequence[str],
                 generator: torch.Generator | None = None) -> None:
        self.s, self.modalities, self.generator = settings, list(modalities), generator

    def __call__(self, batch: Batch) -> dict[str, Any]:
        """The augmented copy of a normalised training batch."""
        g = self.generator
        out = drop_modalities(batch, self.modalities, self.s.modality_drop, g)
        out = shift_months(out, self.modalities, self.s.shift, g)
        out = mask_months(out, self.modalities, self.s.month_mask, g)
        return add_noise(out, self.modalities, self.s.noise, g)
