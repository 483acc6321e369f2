"""Building blocks of ``gemmnet`` (:mod:`cropmap.models.gemmnet`): HyFEx encoder and generator,
conditional PatchGAN discriminator, UNet-like decoder and the token transformer they share.

GroupNorm throughout (:func:`~cropmap.models.spatial.group_norm`), so a chip's outputs never
depend on the other chips of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.models.spatial import Block, group_norm, sincos_2d


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), group_norm(c_out), nn.LeakyReLU(0.2)
    )


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_block(c, c), conv_block(c, c))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class TokenTransformer(nn.Module):
    """1x1 conv to ``tdim`` tokens + 2-D sin-cos positions -> one block -> 1x1 conv back (residual)."""

    def __init__(self, c: int, tdim: int, heads: int, c_out: int | None = None):
        super().__init__()
        self.tdim = tdim
        self.to_tok = nn.Conv2d(c, tdim, 1)
        self.block = Block(tdim, heads, mlp_ratio=2.0)
        self.from_tok = nn.Conv2d(tdim, c_out or c, 1)

    def tokens(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        return self.to_tok(x).flatten(2).transpose(1, 2) + sincos_2d(h, w, self.tdim, x.device).to(
            x.dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        t = self.block(self.tokens(x))
        return self.from_tok(t.transpose(1, 2).reshape(b, self.tdim, h, w))


class HyFExEncoder(nn.Module):
    """Five-level conv encoder with a transformer at the bottleneck -> ``[x1, ..., x5]``.

    ``x_i`` has ``width * 2^(i-1)`` channels at ``1 / 2^(i-1)`` resolution (H, W multiples of 16).
    """

    def __init__(self, c_in: int, width: int, tdim: int, heads: int):
        super().__init__()
        ws = [width * 2**i for i in range(5)]
        self.widths = ws
        self.stem = nn.Conv2d(c_in, ws[0], 3, padding=1)
        self.levels = nn.ModuleList(
            [ResBlock(ws[0])]
            + [nn.Sequential(conv_block(ws[i - 1], ws[i], 2), ResBlock(ws[i])) for i in range(1, 5)]
        )
        self.attn = TokenTransformer(ws[4], tdim, heads)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats, h = [], self.stem(x)
        for level in self.levels:
            h = level(h)
            feats.append(h)
        feats[4] = feats[4] + self.attn(feats[4])
        return feats


class HyFExGenerator(nn.Module):
    """Pix2Pix-style U-Net generator to 1/16 with a one-layer transformer bottleneck (authors' code)."""

    def __init__(self, c_in: int, c_out: int, gf: int, tdim: int, heads: int):
        super().__init__()
        self.e1 = nn.Conv2d(c_in, gf, 4, 2, 1)
        self.e2 = nn.Sequential(nn.Conv2d(gf, 2 * gf, 4, 2, 1), group_norm(2 * gf))
        self.e3 = nn.Sequential(nn.Conv2d(2 * gf, 4 * gf, 4, 2, 1), group_norm(4 * gf))
        self.e4 = nn.Conv2d(4 * gf, 8 * gf, 4, 2, 1)
        self.tdim = tdim
        self.to_tok = nn.Conv2d(8 * gf, tdim, 1)
        self.block = Block(tdim, heads, mlp_ratio=2.0)
        self.d1 = nn.Sequential(nn.ConvTranspose2d(tdim, 4 * gf, 4, 2, 1), group_norm(4 * gf))
        self.d2 = nn.Sequential(nn.ConvTranspose2d(8 * gf, 2 * gf, 4, 2, 1), group_norm(2 * gf))
        self.d3 = nn.Sequential(nn.ConvTranspose2d(4 * gf, gf, 4, 2, 1), group_norm(gf))
        self.d4 = nn.ConvTranspose2d(2 * gf, c_out, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, c_in, H, W]`` (H, W multiples of 16) -> ``[B, c_out, H, W]``."""
        lr = F.leaky_relu
        e1 = self.e1(x)
        e2 = self.e2(lr(e1, 0.2))
        e3 = self.e3(lr(e2, 0.2))
        e4 = self.e4(lr(e3, 0.2))
        b, _, h, w = e4.shape
        t = self.to_tok(e4).flatten(2).transpose(1, 2)
        t = self.block(t + sincos_2d(h, w, self.tdim, x.device).to(t.dtype))
        t = t.transpose(1, 2).reshape(b, self.tdim, h, w)
        d1 = torch.cat([self.d1(F.relu(t)), e3], 1)
        d2 = torch.cat([self.d2(F.relu(d1)), e2], 1)
        d3 = torch.cat([self.d3(F.relu(d2)), e1], 1)
        return self.d4(F.relu(d3))


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: ``[condition, target]`` -> patch logits ``[B, 1, H/8, W/8]``."""

    def __init__(self, c_in: int, df: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, df, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(df, 2 * df, 4, 2, 1),
            group_norm(2 * df),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * df, 4 * df, 4, 2, 1),
            group_norm(4 * df),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * df, 8 * df, 3, 1, 1),
            group_norm(8 * df),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8 * df, 1, 3, 1, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UNetDecoder(nn.Module):
    """UNet-like decoder over five feature levels -> logits at full resolution."""

    def __init__(self, widths: Sequence[int], n_out: int):
        super().__init__()
        ws = list(widths)
        self.up = nn.ModuleList(conv_block(ws[i], ws[i - 1]) for i in range(4, 0, -1))
        self.merge = nn.ModuleList(conv_block(2 * ws[i - 1], ws[i - 1]) for i in range(4, 0, -1))
        self.head = nn.Conv2d(ws[0], n_out, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        h = feats[4]
        for k, (up, merge) in enumerate(zip(self.up, self.merge, strict=True)):
            skip = feats[3 - k]
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            h = merge(torch.cat([h, skip], 1))
        return self.head(h)
