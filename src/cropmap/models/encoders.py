"""Per-modality encoders.

Classification (pixel time series):

* temporal input ``[B, T, C]`` -> features ``[B, D]``: :class:`TempCNN` (default, exactly the
  authors' architecture), :class:`LTAE` (lightweight temporal attention encoder) or
  :class:`GRUEncoder`;
* static input (DEM) ``[B, C]`` -> ``[B, D]``: :class:`StaticMLP`.

Segmentation (chips): :class:`UNetEncoder` maps ``[B, C_in, H, W]`` -> ``[B, D, H, W]``. Temporal
modalities enter it with their time steps stacked as channels (``C_in = T * C``, time-major as in
the stacks), so the time axis is mixed by its per-pixel stem; a static modality uses its bands
(``C_in = C``). ``"smp:<encoder>"`` (e.g. ``"smp:resnet18"``) builds a
segmentation-models-pytorch U-Net (random init, depth 3) with the same contract instead.

``D`` is ``hidden`` (the authors use 128) for every encoder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cropmap.errors import UnknownNameError

#: Encoder names valid per (task, temporal?) combination.
ENCODERS: dict[tuple[str, bool], tuple[str, ...]] = {
    ("classification", True): ("tempcnn", "ltae", "gru"),
    ("classification", False): ("mlp",),
    ("segmentation", True): ("unet", "smp:<encoder_name>"),
    ("segmentation", False): ("unet", "smp:<encoder_name>"),
}


class TempCNN(nn.Module):
    """TempCNN (Pelletier et al. 2019) as configured by the authors.

    ``[B, T, C]`` -> 2 x [Conv1d(k=5, pad 2, hidden) -> BN -> ReLU -> Dropout] -> flatten ->
    Linear(hidden*T, 4*hidden) -> BN -> ReLU -> Dropout -> Linear(4*hidden, hidden) -> ``[B, hidden]``.
    With ``hidden=128`` this is exactly the authors' encoder (512-unit dense layer).
    """

    def __init__(self, in_channels: int, n_steps: int, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(2):
            layers += [
                nn.Conv1d(c, hidden, kernel_size=5, padding=2),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
            ]
            c = hidden
        self.conv = nn.Sequential(*layers)
        self.dense = nn.Sequential(
            nn.Flatten(),
            nn.Linear(hidden * n_steps, 4 * hidden),
            nn.BatchNorm1d(4 * hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4 * hidden, hidden),
        )
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C]`` -> ``[B, hidden]``."""
        return self.dense(self.conv(x.transpose(1, 2)))


def _sinusoid(n_steps: int, dim: int) -> Tensor:
    pos = torch.arange(n_steps, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1000.0) / dim))
    pe = torch.zeros(n_steps, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class LTAE(nn.Module):
    """Lightweight Temporal Attention Encoder (Garnot & Landrieu 2020), compact version.

    ``[B, T, C]`` -> Linear(C, hidden) + LayerNorm + sinusoidal position of the month ->
    ``n_head`` learnable master queries attend over time (keys of size ``d_k``); each head pools
    its own ``hidden / n_head`` channel group -> concat -> Linear -> BN -> ReLU -> ``[B, hidden]``.
    """

    def __init__(
        self,
        in_channels: int,
        n_steps: int,
        hidden: int = 128,
        n_head: int = 16,
        d_k: int = 8,
        dropout: float = 0.2,
    ):
        super().__init__()
        while hidden % n_head:
            n_head //= 2
        self.n_head, self.d_k = n_head, d_k
        self.inp = nn.Sequential(nn.Linear(in_channels, hidden), nn.LayerNorm(hidden))
        self.pe: Tensor
        self.register_buffer("pe", _sinusoid(n_steps, hidden), persistent=False)
        self.key = nn.Linear(hidden, n_head * d_k)
        self.query = nn.Parameter(torch.randn(n_head, d_k) * d_k**-0.5)
        self.out = nn.Sequential(
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C]`` -> ``[B, hidden]``."""
        b, t, _ = x.shape
        h = self.inp(x) + self.pe[:t]  # [B, T, D]
        k = self.key(h).view(b, t, self.n_head, self.d_k)  # [B, T, H, dk]
        att = torch.softmax((k * self.query).sum(-1) / self.d_k**0.5, dim=1)  # [B, T, H]
        v = h.view(b, t, self.n_head, -1)  # [B, T, H, D/H]
        pooled = (att.unsqueeze(-1) * v).sum(1).reshape(b, -1)  # [B, D]
        return self.out(pooled)


class GRUEncoder(nn.Module):
    """Two-layer GRU; ``[B, T, C]`` -> last hidden state of the top layer ``[B, hidden]``."""

    def __init__(self, in_channels: int, n_steps: int, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        del n_steps
        self.gru = nn.GRU(in_channels, hidden, num_layers=2, batch_first=True, dropout=dropout)
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, C]`` -> ``[B, hidden]``."""
        _, h = self.gru(x)
        return self.norm(h[-1])


class StaticMLP(nn.Module):
    """Static encoder (DEM): Linear(C, hidden) -> ReLU -> Dropout -> Linear(hidden, hidden)."""

    def __init__(self, in_channels: int, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
        )
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C]`` -> ``[B, hidden]``."""
        return self.net(x)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _pointwise(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class UNetEncoder(nn.Module):
    """Per-pixel temporal stem + small two-level U-Net: ``[B, C_in, H, W]`` -> ``[B, hidden, H, W]``.

    * **stem**: 2 x [1x1 conv -> BN -> ReLU] to ``hidden`` channels, i.e. a per-pixel MLP over the
      stacked time series (the segmentation analogue of TempCNN's dense layers): the ``T * C``
      input channels are encoded at full width before any spatial mixing;
    * **U-Net** on the stem features: widths ``w, 2w, 4w`` (``w = width`` or
      ``max(hidden // 4, 8)``), two poolings, transposed-conv upsampling with skips;
    * **out**: 1x1 conv over ``[decoder, stem]``: the pixel's own features reach the output
      unblurred (field edges), the U-Net adds the neighbourhood.

    Why the stem: the earlier plain U-Net (first 3x3 conv straight from ``T * C = 120`` S2
    channels to ``hidden // 8 = 8``) squeezed each pixel's time series into 8 numbers, and the
    ``hidden``-wide output was a 1x1 projection of them (rank 8): the classifier and the
    co-learning feature terms (shared/specific halves, contrastive) competed for those 8
    dimensions and the contrastive term won (Co-Miss stayed near chance on the demo region).
    At ``hidden=64`` this encoder has ~0.14 M parameters and ~50 kMAC per pixel for S2
    (H and W must be divisible by 4).
    """

    def __init__(self, in_channels: int, hidden: int = 128, dropout: float = 0.2, width: int | None = None):
        super().__init__()
        w = width or max(hidden // 4, 8)
        self.stem = nn.Sequential(*_pointwise(in_channels, hidden), *_pointwise(hidden, hidden))
        self.enc1 = _double_conv(hidden, w)
        self.enc2 = _double_conv(w, 2 * w)
        self.bott = nn.Sequential(_double_conv(2 * w, 4 * w), nn.Dropout2d(dropout))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _double_conv(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _double_conv(2 * w, w)
        self.out = nn.Conv2d(w + hidden, hidden, 1)
        self.pool = nn.MaxPool2d(2)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W]`` -> ``[B, hidden, H, W]``."""
        s = self.stem(x)
        e1 = self.enc1(s)
        e2 = self.enc2(self.pool(e1))
        b = self.bott(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(torch.cat([d1, s], 1))


class SMPUNetEncoder(nn.Module):
    """segmentation-models-pytorch U-Net (no pretrained weights, depth 3) -> ``[B, hidden, H, W]``.

    H and W must be divisible by 8.
    """

    def __init__(self, in_channels: int, encoder_name: str, hidden: int = 128):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.net = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=None,
            encoder_depth=3,
            decoder_channels=(hidden, max(hidden // 2, 8), max(hidden // 4, 8)),
            in_channels=in_channels,
            classes=hidden,
        )
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W]`` -> ``[B, hidden, H, W]``."""
        return self.net(x)


def build_encoder(
    name: str,
    *,
    task: str,
    temporal: bool,
    in_channels: int,
    n_steps: int,
    hidden: int = 128,
    dropout: float = 0.2,
) -> nn.Module:
    """Build one encoder by name.

    Args:
        name: see :data:`ENCODERS` for the names valid for ``(task, temporal)``.
        task: ``"classification"`` or ``"segmentation"``.
        temporal: whether the modality has a time axis.
        in_channels: channels per time step.
        n_steps: number of time steps T (ignored for static modalities).
        hidden: output feature size D.
        dropout: dropout rate of the encoder.

    Raises:
        UnknownNameError: ``name`` is not valid for this task/modality kind.
    """
    valid = ENCODERS[(task, temporal)]
    if task == "classification":
        if temporal and name == "tempcnn":
            return TempCNN(in_channels, n_steps, hidden, dropout)
        if temporal and name == "ltae":
            return LTAE(in_channels, n_steps, hidden, dropout=dropout)
        if temporal and name == "gru":
            return GRUEncoder(in_channels, n_steps, hidden, dropout)
        if not temporal and name == "mlp":
            return StaticMLP(in_channels, hidden, dropout)
    else:
        c_in = in_channels * n_steps if temporal else in_channels
        if name == "unet":
            return UNetEncoder(c_in, hidden, dropout)
        if name.startswith("smp:") and len(name) > 4:
            return SMPUNetEncoder(c_in, name[4:], hidden)
    kind = "temporal" if temporal else "static"
    raise UnknownNameError(
        f"unknown encoder {name!r} for a {kind} modality in {task}; valid: {', '.join(valid)}"
    )
