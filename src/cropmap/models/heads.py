"""Prediction heads and the helper that applies a feature-last module to spatial maps."""

from __future__ import annotations

from torch import Tensor, nn


def apply_last(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a module acting on the last dim to ``[B, D]`` or channel-first ``[B, D, H, W]``.

    For 4-D input the module runs per pixel (like a 1x1 convolution) and the result is
    returned channel-first ``[B, D', H, W]``.
    """
    if x.dim() == 4:
        return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return module(x)


class PredictionHead(nn.Module):
    """Per-modality head of the DSensD+ code: MLP(hidden) -> Linear(K) -> LayerNorm(K).

    ``[B, D]`` -> ``[B, K]`` (or ``[B, D, H, W]`` -> ``[B, K, H, W]`` per pixel). The LayerNorm
    on the logits is dropped when ``K == 1`` (binary / scalar regression), where it would
    collapse every output to its bias.
    """

    def __init__(self, in_dim: int, n_out: int, hidden: int = 128, layer_norm: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
            nn.LayerNorm(n_out) if layer_norm and n_out > 1 else nn.Identity(),
        )

    def forward(self, z: Tensor) -> Tensor:
        """``z [B, D]`` or ``[B, D, H, W]`` -> logits ``[B, K]`` or ``[B, K, H, W]``."""
        return apply_last(self.net, z)


class LinearHead(nn.Module):
    """One linear layer (auxiliary classifiers: modality discriminators, MDiCo's auxiliary head).

    ``[B, D]`` -> ``[B, K]``, per pixel for ``[B, D, H, W]``.
    """

    def __init__(self, in_dim: int, n_out: int):
        super().__init__()
        self.lin = nn.Linear(in_dim, n_out)

    def forward(self, z: Tensor) -> Tensor:
        """``z [B, D]`` or ``[B, D, H, W]`` -> ``[B, K]`` or ``[B, K, H, W]``."""
        return apply_last(self.lin, z)
