"""What the chip (segmentation-only) methods share: their base class, channel counts, padding,
inputs, positions, normalisation and transformer block.

:class:`ChipModel` is the base of ``imt`` and ``gemmnet`` (it refuses the classification task
with :func:`segmentation_only` and gives them complete, padded chips); :func:`flat_channels`,
:func:`pad_to`, :func:`complete_inputs`, :func:`prepare_chips`, :func:`sincos_2d` and
:func:`group_norm` serve both; :class:`Block` is the pre-norm transformer block both use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.errors import ConfigError
from cropmap.modalities import TEMPORAL
from cropmap.models.base import CoLearningModel
from cropmap.models.registry import methods_for


def segmentation_only(method: str, task: object) -> None:
    """Refuse ``task="classification"`` for a chip-only method, naming the alternatives."""
    if task != "classification":
        return
    raise ConfigError(
        f"method {method!r} is a segmentation method (it needs chips with spatial context): set "
        f"model.task: segmentation, or for task='classification' use one of {', '.join(methods_for('classification'))}"
    )


def flat_channels(
    in_channels: Mapping[str, int], n_steps: int, modalities: Sequence[str]
) -> dict[str, int]:
    """Input channels of each modality's chip: ``T * C`` (time-major) or ``C`` for static ones."""
    return {m: int(in_channels[m]) * (int(n_steps) if TEMPORAL[m] else 1) for m in modalities}


def pad_to(x: Tensor, mult: int) -> Tensor:
    """Zero-pad the last two dims (bottom/right) up to a multiple of ``mult``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % mult, (-w) % mult
    if ph == 0 and pw == 0:
        return x
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), (0, pw, 0, ph)).bool()
    return F.pad(x, (0, pw, 0, ph))


def complete_inputs(
    xs: Mapping[str, Tensor], avail: Tensor, modalities: Sequence[str], dims: Mapping[str, int]
) -> dict[str, Tensor]:
    """Every modality as a zero-filled ``[B, C, H, W]`` tensor (zeros for keys absent from the batch)."""
    b, _, h, w = avail.shape
    ref = next(iter(xs.values()))
    return {m: xs[m] if m in xs else ref.new_zeros(b, dims[m], h, w) for m in modalities}


def prepare_chips(
    batch: Mapping[str, Any], modalities: Sequence[str], dims: Mapping[str, int]
) -> tuple[dict[str, Tensor], Tensor]:
    """Chip batch -> (zero-filled inputs of every modality, per-pixel availability ``[B, M, H, W]``).

    Same rules as :meth:`cropmap.models.base.CoLearningModel._prepare` (NaN/inf -> 0, zero-fill where ``mask`` is
    False, a modality absent from the batch is missing), for code that is not a model.
    """
    present = [m for m in modalities if batch.get(m) is not None]
    if not present:
        raise ValueError(f"batch holds none of the modalities {list(modalities)}")
    ref = torch.as_tensor(batch[present[0]])
    b, (h, w) = ref.shape[0], ref.shape[-2:]
    mask = batch.get("mask")
    if mask is None:
        avail = torch.ones(b, len(modalities), h, w, dtype=torch.bool, device=ref.device)
    else:
        avail = torch.as_tensor(mask).to(device=ref.device, dtype=torch.bool)
        if avail.dim() == 2:
            avail = avail[:, :, None, None].expand(b, len(modalities), h, w)
        avail = avail.clone()
    xs = {}
    for i, m in enumerate(modalities):
        if m not in present:
            avail[:, i] = False
            continue
        x = torch.nan_to_num(torch.as_tensor(batch[m]).float(), nan=0.0, posinf=0.0, neginf=0.0)
        xs[m] = torch.where(avail[:, i : i + 1], x, torch.zeros((), device=x.device))
    return complete_inputs(xs, avail, modalities, dims), avail


def sincos_2d(gh: int, gw: int, dim: int, device: torch.device | None = None) -> Tensor:
    """MAE 2-D sin-cos positions ``[gh * gw, dim]`` (half the channels for y, half for x)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be a multiple of 4 for 2-D sin-cos positions")
    d = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float32, device=device) / d)
    y, x = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32, device=device),
        torch.arange(gw, dtype=torch.float32, device=device),
        indexing="ij",
    )
    oy = y.reshape(-1, 1) * omega
    ox = x.reshape(-1, 1) * omega
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], 1)


def group_norm(c: int) -> nn.GroupNorm:
    """GroupNorm with groups of 8 channels (one group when ``c`` is not a multiple of 8).

    The chip methods normalise with GroupNorm only, so a chip's outputs never depend on the
    other chips of its batch.
    """
    return nn.GroupNorm(max(1, c // 8) if c % 8 == 0 else 1, c)


class Block(nn.Module):
    """Pre-norm transformer block with an optional boolean attention mask (True = attend)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B, L, D]``, ``mask`` bool ``[B, L, L]`` or None -> ``[B, L, D]``."""
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None]
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ChipModel(CoLearningModel):
    """Base of the chip-only methods: refuses ``task="classification"``, pads complete chips.

    Attributes:
        in_dims: chip channels of each modality (``T * C`` time-major, or ``C`` for static
            ones; :func:`flat_channels`).
    """

    def __init__(self, **kw: Any) -> None:
        segmentation_only(self.method, kw.get("task"))
        super().__init__(**kw)
        self.in_dims = flat_channels(self.in_channels, self.n_steps, self.modalities)

    def padded_inputs(self, xs: Mapping[str, Tensor], avail: Tensor, mult: int) -> tuple[dict[str, Tensor], Tensor]:
        """Every modality as a zero-filled chip (:func:`complete_inputs`) and the availability
        ``[B, M, H, W]``, zero-padded bottom/right to a multiple of ``mult`` (padding is missing)."""
        full = complete_inputs(xs, avail, self.modalities, self.in_dims)
        return {m: pad_to(x, mult) for m, x in full.items()}, pad_to(avail, mult)
