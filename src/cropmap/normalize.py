"""Per-channel z-score normalisation, fitted on training data only, stored with the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def fit_stats(samples: Mapping[str, np.ndarray], layout: str,
              channels: Mapping[str, int] | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """Per-channel mean and std over valid (finite) values.

    Args:
        samples: ``{m: array}``; layout ``"pixels"``: ``[N, T, C]`` or ``[N, C]``;
            layout ``"chips"``: ``[N, T*C, H, W]`` or ``[N, C, H, W]``.
        layout: ``"pixels"`` (channels from the arrays' last axis) or ``"chips"``.
        channels: chips layout: channels per time step ``C`` of each modality (the stacks' bands).

    Returns:
        ``{m: (mean[C], std[C])}``; channels without any valid value get mean 0, std 1.
    """
    stats = {}
    for m, x in samples.items():
        if layout == "pixels":
            c = x.shape[-1]
            flat = x.reshape(-1, c)
        else:
            if channels is None or m not in channels:
                raise ValueError(f"fit_stats: chips of {m} need its channels per time step")
            c = channels[m]
            n = x.shape[0]
            t = x.shape[1] // c
            flat = np.moveaxis(x.reshape(n, t, c, -1), 2, -1).reshape(-1, c)
        with np.errstate(all="ignore"):
            mean = np.nanmean(flat, axis=0)
            std = np.nanstd(flat, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
        stats[m] = (mean.astype(float).tolist(), std.astype(float).tolist())
    return stats


class Normalizer(nn.Module):
    """Applies stored per-channel statistics to a batch; NaN stays NaN (the model zero-fills it).

    Handles ``[B, T, C]`` / ``[B, C]`` pixel tensors and ``[B, T*C, H, W]`` / ``[B, C, H, W]`` chips.
    """

    def __init__(self, stats: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
        super().__init__()
        self.modalities = list(stats)
        for m, (mean, std) in stats.items():
            self.register_buffer(f"mean_{m}", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer(f"std_{m}", torch.tensor(std, dtype=torch.float32))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(batch)
        for m in self.modalities:
            if m not in batch:
                continue
            x = batch[m]
            mean: Tensor = getattr(self, f"mean_{m}")
            std: Tensor = getattr(self, f"std_{m}")
            c = mean.numel()
            if x.dim() == 4:  # chips, channels time-major
                t = x.shape[1] // c
                y = (x.view(x.shape[0], t, c, *x.shape[2:]) - mean.view(1, 1, c, 1, 1)) / std.view(1, 1, c, 1, 1)
                out[m] = y.view_as(x)
            else:
                out[m] = (x - mean) / std
        return out

    def stats(self) -> dict[str, tuple[list[float], list[float]]]:
        """The statistics as plain lists."""
        return {m: (getattr(self, f"mean_{m}").tolist(), getattr(self, f"std_{m}").tolist()) for m in self.modalities}
