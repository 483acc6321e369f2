"""Blending a pixel co-learning model with per-subset gradient-boosted trees (``training.blend``).

On small real training sets (hundreds of labelled parcels) per-subset tree models are hard to
beat on some sensor subsets and a co-learning network on others; averaging both is the usual
remedy for tabular data (stacking). :class:`Blended` is one model whose output, for a sample
of sensor subset ``S``, is the log-linear pool

    ``logits = w_S * log_softmax(net(x)) + (1 - w_S) * log p_trees_S(x)``

of the network and of :class:`cropmap.models.trees.TreesDedicated` (one tree model per
subset, fitted on the same normalised training pixels). The weight ``w_S`` is chosen on the
validation split (:func:`fit_weights`): per subset, the weight of the grid
``0, 0.1, ..., 1`` whose pooled log-probabilities, after their best temperature, have the lowest
validation negative log-likelihood (a subset with fewer than
:data:`cropmap.calibration.MIN_SUBSET_SAMPLES` validation samples takes the weight chosen on
every subset pooled). ``w_S = 1`` is the network alone, ``0`` the trees alone: the blend can
only choose between and mix what the validation data supports. Temperatures are fitted
afterwards on the blended model (:mod:`cropmap.calibration`).

Both parts see only the sensors of a sample's subset, so a missing sensor's values cannot
change the output. The bundle stores the trees and weights under ``blend.*`` weights
(:func:`cropmap.predict.bundle.save_bundle`), which the checksum covers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from cropmap.calibration import MIN_SUBSET_SAMPLES, Wrapper, fit_temperature, nll, subset_codes

Blend = Literal["none", "trees_dedicated"]
#: Candidate network weights ``w``.
GRID = tuple(round(0.1 * i, 1) for i in range(11))
#: Method of the tree part, and the :func:`cropmap.models.build_model` arguments it takes from the network's.
TREES = "trees_dedicated"
TREE_KWARGS = ("task", "modalities", "in_channels", "n_steps", "n_classes")
#: Most validation samples one weight is chosen on (:func:`best_weight`).
MAX_WEIGHT_SAMPLES = 4_000


def trees_kwargs(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`cropmap.models.build_model` arguments of the tree part of a network built with ``model_kwargs``."""
    return {"method": TREES, **{k: model_kwargs[k] for k in TREE_KWARGS}}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[N, K]`` logits (float64)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def pooled(net: np.ndarray, trees: np.ndarray, w: float) -> np.ndarray:
    """``w * log_softmax(net) + (1 - w) * log_softmax(trees)``, both ``[N, K]``."""
    return w * log_softmax(net) + (1 - w) * log_softmax(trees)


def best_weight(net: np.ndarray, trees: np.ndarray, y: np.ndarray, max_samples: int = MAX_WEIGHT_SAMPLES) -> float:
    """The :data:`GRID` weight whose pool has the lowest NLL at its best temperature (ties: the larger ``w``).

    On at most ``max_samples`` rows (a fixed-seed random subset of larger sets: 11 temperature
    fits on a region's hundreds of thousands of validation pixels would take minutes).
    """
    if len(y) > max_samples:
        rows = np.sort(np.random.default_rng(0).choice(len(y), max_samples, replace=False))
        net, trees, y = net[rows], trees[rows], y[rows]
    scores = []
    for w in GRID:
        z = pooled(net, trees, w)
        scores.append(nll(z, y, fit_temperature(z, y)))
    best = min(scores)
    return max(w for w, s in zip(GRID, scores, strict=True) if s <= best + 1e-12)


def fit_weights(net: Mapping[int, tuple[np.ndarray, np.ndarray]], trees: Mapping[int, tuple[np.ndarray, np.ndarray]],
                n_modalities: int) -> list[float]:
    """Network weight ``w`` per subset code ``[2^M]`` from the validation logits of both parts.

    Args:
        net, trees: :func:`cropmap.calibration.subset_logits` of the network and of the trees
            on the same validation batches (so rows align): ``{code: (logits [n, K], y [n])}``.
        n_modalities: M.

    Returns:
        ``[2^M]`` weights (index 0, no sensor, is unused and 1).
    """
    codes = sorted(set(net) & set(trees))
    weights = [1.0] * (2**n_modalities)
    if not codes:
        return weights
    for c in codes:
        if not np.array_equal(net[c][1], trees[c][1]):
            raise ValueError(f"subset {c}: the network's and the trees' validation samples differ")
    all_w = best_weight(np.concatenate([net[c][0] for c in codes]), np.concatenate([trees[c][0] for c in codes]),
                        np.concatenate([net[c][1] for c in codes]))
    weights = [all_w] * (2**n_modalities)
    weights[0] = 1.0
    for c in codes:
        if len(net[c][1]) >= MIN_SUBSET_SAMPLES:
            weights[c] = best_weight(net[c][0], trees[c][0], net[c][1])
    return weights


class Blended(Wrapper):
    """A pixel model whose logits are pooled with a tree model's, with one weight per sensor subset.

    Args:
        model: the network (``forward(batch)`` -> ``{"logits" [B, K], "avail" [B, M], ...}``).
        trees: a fitted :class:`cropmap.models.trees.TreesDedicated` on the same inputs.
        weights: ``[2^M]`` network weight per subset code.
    """

    def __init__(self, model: nn.Module, trees: nn.Module, weights: Sequence[float] | Tensor) -> None:
        super().__init__()
        self.blend_weights: Tensor  # registered before the parts: their attributes show through
        self.register_buffer("blend_weights", torch.as_tensor(weights, dtype=torch.float32).clone())
        self.model = model
        self.trees = trees

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(self.model(batch))
        logits = out["logits"]
        if logits.dim() != 2:
            raise ValueError(f"blending with trees needs pixel logits [B, K]; got shape {tuple(logits.shape)}")
        w = self.blend_weights.to(logits.device)[subset_codes(out["avail"])].view(-1, 1)
        pooled = w * torch.log_softmax(logits.float(), 1)
        rows = (w.view(-1) < 1).nonzero().view(-1)  # samples whose subset takes the trees at all
        if len(rows):
            n = len(logits)
            part = {k: v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() and len(v) == n else v
                    for k, v in batch.items()}
            tree_logp = self.trees(part)["logits"].to(logits.device, torch.float32)
            pooled[rows] += (1 - w[rows]) * tree_logp
        out["logits"] = pooled
        return out

    def pool_subset_logits(self, net: Mapping[int, tuple[np.ndarray, np.ndarray]],
                           trees: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """What :func:`cropmap.calibration.subset_logits` gives for this model, from those of its
        two parts on the same batches (the same float32 operations as :meth:`forward`, so the
        validation logits are not computed twice).

        Args:
            net, trees: ``{code: (logits [n, K], y [n])}`` of the network and of the trees.

        Returns:
            ``{code: (pooled logits [n, K], y [n])}``.
        """
        out = {}
        for c, (z, y) in net.items():
            w = self.blend_weights[c].view(1, 1)
            pool = w * torch.log_softmax(torch.from_numpy(z).float(), 1)
            if w.item() < 1:
                pool += (1 - w) * torch.from_numpy(trees[c][0]).float()
            out[c] = (pool.numpy(), y)
        return out
