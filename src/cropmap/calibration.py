"""Calibrated confidence: temperature scaling fitted on validation data, and its measure (ECE).

A map's confidence band is only useful if 80 % confidence means right 80 % of the time.
Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
logits by one scalar ``T`` fitted by minimising the negative log-likelihood on held-out data;
the arg-max, and so the map's classes, is unchanged. With missing sensors a model can be
over-confident on one subset and under-confident on another, so ``per="subset"`` fits one
temperature per sensor subset (each on the validation samples evaluated with that subset's
sensors only; a subset with too few samples falls back to the pooled temperature).

:class:`Calibrated` wraps a model with the temperatures (stored in ``model.ckpt`` under
``"calibration"``) so that every prediction path (:class:`cropmap.predict.Predictor`, the
metrics) uses them. :func:`ece` is the expected calibration error with equal-width bins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

Per = Literal["none", "global", "subset"]
#: Validation samples a subset needs for its own temperature (else the pooled one).
MIN_SUBSET_SAMPLES = 30
#: Range of the temperature search.
T_RANGE = (0.05, 20.0)


def ece(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error (fraction, 0-1) of the top-class confidence.

    ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over ``bins`` equal-width confidence bins
    ``(0, 1/bins], (1/bins, 2/bins], ...`` (a confidence of exactly 0 goes to the first bin).

    Args:
        proba: ``[N, K]`` class probabilities.
        y: ``[N]`` true class ids.
        bins: number of bins (10 is the usual ECE).

    Returns:
        ECE, NaN when ``N == 0``.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y)
    if len(y) == 0:
        return float("nan")
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() / len(y) * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / t)``."""
    z = np.asarray(logits, np.float64) / t
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising :func:`nll` (log-spaced grid, then golden-section refinement).

    Returns 1.0 when there is no sample.
    """
    if len(y) == 0:
        return 1.0
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    grid = np.linspace(lo, hi, 61)
    vals = [nll(logits, y, math.exp(g)) for g in grid]
    i = int(np.argmin(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - phi * (b - a), a + phi * (b - a)
        if nll(logits, y, math.exp(c)) < nll(logits, y, math.exp(d)):
            b = d
        else:
            a = c
    return float(math.exp((a + b) / 2))


def subset_codes(avail: Tensor) -> Tensor:
    """Integer code per row of a bool ``[B, M]`` mask (bit ``i``: modality ``i`` present)."""
    w = 2 ** torch.arange(avail.shape[1], device=avail.device)
    return (avail.long() * w).sum(1)


class Wrapper(nn.Module):
    """A module around ``self.model`` whose attributes (``modalities``, ``task``, ``n_classes``
    ...) show through, so that a wrapped model is used like the model itself."""

    model: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


class Calibrated(Wrapper):
    """A model whose fused logits are divided by the temperature of each sample's sensor subset.

    Args:
        model: any cropmap model (``forward(batch)`` -> ``{"logits", "avail", ...}``).
        temperatures: ``[2^M]`` temperature per subset code (index 0, no sensor, is unused).
    """

    def __init__(self, model: nn.Module, temperatures: Sequence[float] | Tensor) -> None:
        super().__init__()
        self.subset_temperatures: Tensor  # registered before the model: its attributes show through
        self.register_buffer("subset_temperatures", torch.as_tensor(temperatures, dtype=torch.float32).clone())
        self.model = model

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(self.model(batch))
        avail = out["avail"]
        if avail.dim() == 2:
            t = self.subset_temperatures.to(out["logits"].device)[subset_codes(avail)].view(-1, 1)
        else:  # per-pixel masks [B, M, H, W]
            codes = subset_codes(avail.movedim(1, -1).reshape(-1, avail.shape[1]))
            t = self.subset_temperatures.to(out["logits"].device)[codes].view(avail.shape[0], *avail.shape[2:]).unsqueeze(1)
        out["logits"] = out["logits"] / t.to(out["logits"].dtype)
        return out



@torch.no_grad()
def subset_logits(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], modalities: Sequence[str],
                  ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Logits and labels of every non-empty subset of ``modalities`` (others masked as missing).

    Args:
        model: the (uncalibrated) model in eval mode; batches must be normalised and hold ``y``.
        batches: pixel batches ``{m, "mask", "y"}``.
        modalities: the mask's modality order.

    Returns:
        ``{code: (logits [n, K], y [n])}`` over the samples that have at least one sensor of the subset.
    """
    n_mod = len(modalities)
    out: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for k in range(n_mod, 0, -1):
        for sub in itertools.combinations(range(n_mod), k):
            keep = torch.zeros(n_mod, dtype=torch.bool)
            keep[list(sub)] = True
            for b in batches:
                mask = b["mask"].bool() & keep.view(1, -1)
                rows = mask.any(1) & (b["y"] >= 0)
                if not bool(rows.any()):
                    continue
                logits = model({**b, "mask": mask})["logits"].float()
                codes = subset_codes(mask)
                for c in torch.unique(codes[rows]).tolist():
                    sel = rows & (codes == c)
                    acc = out.setdefault(int(c), ([], []))
                    acc[0].append(logits[sel].cpu().numpy())
                    acc[1].append(b["y"][sel].cpu().numpy())
    return {c: (np.concatenate(lg), np.concatenate(ys)) for c, (lg, ys) in out.items()}


def fit_temperatures(per_subset: Mapping[int, tuple[np.ndarray, np.ndarray]], n_modalities: int,
                     per: Per = "subset") -> list[float]:
    """Temperatures ``[2^M]`` from :func:`subset_logits` output.

    ``global``: one temperature fitted on every subset's samples pooled; ``subset``: one per
    subset with at least :data:`MIN_SUBSET_SAMPLES` samples, the pooled one for the others;
    ``none``: all 1.
    """
    temps = [1.0] * (2**n_modalities)
    if per == "none" or not per_subset:
        return temps
    pooled = fit_temperature(np.concatenate([v[0] for v in per_subset.values()]),
                             np.concatenate([v[1] for v in per_subset.values()]))
    temps = [pooled] * (2**n_modalities)
    temps[0] = 1.0
    if per == "subset":
        for c, (lg, y) in per_subset.items():
            if len(y) >= MIN_SUBSET_SAMPLES:
                temps[c] = fit_temperature(lg, y)
    return temps
