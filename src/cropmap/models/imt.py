"""``imt``: incomplete multimodal transformer for chip segmentation.

Paper: Y. Chen, M. Zhao and L. Bruzzone (2024), *Incomplete multimodal learning for remote
sensing data fusion* (IEEE TGRS; ``docs/methods.md`` lists the losses and what cropmap changed).

Architecture (paper, section III):

* one patch projection per modality (``Conv2d`` with kernel = stride = ``patch``; temporal
  modalities enter with their months stacked as channels, time-major), 2-D sin-cos positions
  added to every token (no modality embedding, as in MultiMAE);
* learnable spatial fusion tokens, one per patch position: a ``[D, G, G]`` parameter
  (``G = fusion_grid``, sized for 64 px chips) bilinearly resized to the chip's token grid,
  plus the same 2-D positions;
* Bi-LSTM attention (eqs. 2-3): per patch position the sequence ``[f, h_m1, h_m2, ...]`` of the
  fusion token and the *fused* modality tokens (missing or dropped ones are left out of the
  sequence, not zero-filled) runs through a one-layer Bi-LSTM (``D/2`` per direction);
  ``beta_i = softmax_i(u^T tanh(W [h_f; h_i] + b))`` and the new fusion token is
  ``a = sum_i beta_i h_i`` (the learned token is kept where no modality is fused);
* masked self-attention (eq. 4) in every block: modality tokens attend only to available
  tokens of their own modality, fusion tokens to all fusion tokens and all fused modality tokens;
  missing tokens are never keys (each token may always attend to itself, so no row is empty);
* decoders: per-pixel logits from the fusion-token grid (``per_modality`` from each modality's
  own token grid, one decoder each), a light progressive-upsampling conv decoder (``log2(patch)``
  x [upsample x2, conv3x3, GroupNorm, GELU]).

Deviations from the paper, and why:

* The paper's downstream head is Mask2Former; a small conv upsampling decoder replaces it
  (crop chips are 16-64 px; Mask2Former's 1/32 pyramid does not exist there).
* Per-modality heads and their loss ``uni`` are an addition the interface needs
  (``per_modality``); thanks to the masked attention each modality stream is uni-modal, so
  ``uni`` also trains modalities that the random combination dropped from the fusion.
* No dropout (the paper gives none; MAE/MultiMAE use none) and only GroupNorm/LayerNorm: outputs
  of a chip never depend on the other chips of the batch.

Masks and sizes:

* ``mask`` ``[B, M]`` or per pixel ``[B, M, H, W]``. A modality token (one ``patch x patch``
  patch) counts as present when the modality is present at **any** pixel of the patch; the
  missing pixels inside it are zero-filled before the projection, so their values never matter.
  The fused logits are 0 at pixels where no modality is present; ``per_modality[m]`` is 0 where
  ``m`` is missing.
* ``patch``: 4 in the ``tiny`` preset, 16 in ``base`` (the paper's ViT-B/16); chips whose side is
  not a multiple of ``patch`` are zero-padded (padding counts as missing) and the output cropped,
  so any chip size works (a 16 px chip gives 4 x 4 tokens with patch 4, 1 token with patch 16).
  ``tiny`` is the CPU default: with patch 8 a 32-dim token had to carry the 8 x 8 pixels' labels
  (boundaries inside a patch blurred; 91.5 against 95.9 validation weighted F1 on the demo region
  after 600 steps, for 1.7x the step time at patch 4, see docs/segmentation.md).
* Training draws a random modality combination per chip (each available modality kept with
  probability ``keep_prob``, never all dropped: :func:`~cropmap.models.fusion.moddrop_keep`);
  dropped modalities' tokens are left out of the fusion exactly like missing ones.

Self-supervised pretraining of the encoder (MultiMAE masking, reconstruction and contrastive
losses) is :class:`cropmap.models.imt_pretrain.IMTPretrainer`, driven by :mod:`cropmap.pretrain`;
``build_model("imt", ..., pretrained=path)`` loads the encoder weights when the file exists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cropmap.errors import ConfigError, UnknownNameError
from cropmap.models.base import Batch, Output
from cropmap.models.fusion import moddrop_keep
from cropmap.models.registry import register_method
from cropmap.models.spatial import Block, ChipModel, group_norm, sincos_2d

log = logging.getLogger(__name__)

#: Size presets. ``fusion_grid`` learnable fusion tokens per side cover a 64 px chip.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 32, "depth": 2, "heads": 2, "patch": 4, "dec_dim": 32, "dec_depth": 2},
    "base": {"dim": 768, "depth": 12, "heads": 12, "patch": 16, "dec_dim": 256, "dec_depth": 2},
}
#: Format tag of the pretrained-encoder checkpoints written by :mod:`cropmap.pretrain`.
CKPT_FORMAT = "cropmap.imt-encoder/1"


def token_mask(avail_px: Tensor, patch: int) -> Tensor:
    """Per-pixel availability ``[B, M, H, W]`` (H, W multiples of ``patch``) -> tokens ``[B, M, N]``.

    A token is present when its modality is present at any pixel of the patch.
    """
    return F.max_pool2d(avail_px.float(), patch).flatten(2) > 0


def tokens_to_pixels(tok: Tensor, gh: int, gw: int, patch: int) -> Tensor:
    """Token flags ``[B, N]`` -> pixel flags ``[B, 1, gh * patch, gw * patch]``."""
    g = tok.view(tok.shape[0], 1, gh, gw)
    return g.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def attention_mask(tok_avail: Tensor, tok_fuse: Tensor) -> Tensor:
    """Masked self-attention of eq. 4 over ``[fusion (N), m_1 (N), ..., m_M (N)]`` tokens.

    Args:
        tok_avail: bool ``[B, M, N]``, tokens a modality stream may attend to (its own).
        tok_fuse: bool ``[B, M, N]``, modality tokens the fusion tokens may attend to.

    Returns:
        bool ``[B, L, L]`` with ``L = (M + 1) N``; ``True`` = query row may attend to key column.
        Modality queries see available keys of their own modality, fusion queries see every
        fusion token and the fused modality tokens; every token sees itself.
    """
    b, n_mod, n = tok_avail.shape
    dev = tok_avail.device
    group = torch.arange(n_mod + 1, device=dev).repeat_interleave(n)
    ones = torch.ones(b, n, dtype=torch.bool, device=dev)
    key_own = torch.cat([ones, tok_avail.flatten(1)], 1)
    key_fuse = torch.cat([ones, tok_fuse.flatten(1)], 1)
    same = group[:, None] == group[None, :]
    is_fusion = (group == 0)[None, :, None]
    allowed = torch.where(is_fusion, key_fuse[:, None, :], same[None] & key_own[:, None, :])
    return allowed | torch.eye(len(group), dtype=torch.bool, device=dev)[None]


class BiLSTMAttention(nn.Module):
    """Eqs. 2-3: fold each position's fused modality tokens into its fusion token.

    The sequence ``[f, h_1, ..., h_n]`` holds the fusion token and only the fused modality tokens
    (in modality order; missing ones are left out via packing). Bi-LSTM with ``D/2`` units per
    direction gives ``h = [h_fwd; h_bwd]`` of size D;
    ``beta_i = softmax_i(u^T tanh(W [h_f; h_i] + b))``, ``a = sum_i beta_i h_i``.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Bi-LSTM attention needs an even dim, got {dim}")
        self.lstm = nn.LSTM(dim, dim // 2, batch_first=True, bidirectional=True)
        self.w = nn.Linear(2 * dim, dim)
        self.u = nn.Parameter(torch.randn(dim) * dim**-0.5)

    def forward(self, fusion: Tensor, tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Fold tokens into fusion tokens.

        Args:
            fusion: ``[S, D]`` fusion tokens (S = batch x positions).
            tokens: ``[S, M, D]`` modality tokens at the same positions.
            valid: bool ``[S, M]``, tokens to fold in.

        Returns:
            ``(new fusion [S, D], beta [S, M])``; ``beta`` sums to 1 over valid tokens and is 0
            elsewhere; where no token is valid, the fusion token is returned unchanged (beta 0).
        """
        s, n_mod, d = tokens.shape
        n = valid.sum(1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid ones first
        tok = tokens.gather(1, order[..., None].expand(s, n_mod, d))
        seq = torch.cat([fusion[:, None], tok], 1).float()
        with torch.autocast(device_type=seq.device.type, enabled=False):
            packed = pack_padded_sequence(
                seq, (n + 1).cpu(), batch_first=True, enforce_sorted=False
            )
            h, _ = self.lstm(packed)
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=n_mod + 1)
        hf, hi = h[:, :1], h[:, 1:]
        e = torch.tanh(self.w(torch.cat([hf.expand_as(hi), hi], -1))) @ self.u.to(hi.dtype)
        in_seq = torch.arange(n_mod, device=n.device)[None] < n[:, None]
        e = e.masked_fill(~in_seq, torch.finfo(e.dtype).min)
        beta_sorted = torch.softmax(e, 1) * in_seq
        a = (beta_sorted[..., None] * hi).sum(1)
        beta = torch.zeros_like(beta_sorted).scatter(1, order, beta_sorted)
        new = torch.where((n > 0)[:, None], a.to(fusion.dtype), fusion)
        return new, beta


class UpDecoder(nn.Module):
    """Token grid ``[B, D, gh, gw]`` -> per-pixel logits ``[B, K, gh * patch, gw * patch]``."""

    def __init__(self, dim: int, n_out: int, patch: int, width: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(dim, width, 1), group_norm(width), nn.GELU()]
        c = width
        for _ in range(int(math.log2(patch))):
            c2 = max(16, c // 2)
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(c, c2, 3, padding=1),
                group_norm(c2),
                nn.GELU(),
            ]
            c = c2
        layers.append(nn.Conv2d(c, n_out, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class IMTEncoder(nn.Module):
    """Patch projections, fusion tokens, Bi-LSTM attention and masked transformer blocks.

    Args:
        modalities: token groups, in mask order.
        in_dims: chip channels per modality (``T * C`` or ``C``).
        dim, depth, heads: transformer size.
        patch: patch side in pixels (a power of two).
        fusion_grid: learnable fusion tokens per side (resized to the chip's grid).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        *,
        dim: int,
        depth: int,
        heads: int,
        patch: int,
        fusion_grid: int,
    ):
        super().__init__()
        if patch < 1 or patch & (patch - 1):
            raise ValueError(f"patch must be a power of two, got {patch}")
        self.modalities = list(modalities)
        self.dim, self.patch = dim, patch
        self.config: dict[str, Any] = {
            "modalities": list(modalities),
            "in_dims": {m: int(in_dims[m]) for m in modalities},
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "patch": patch,
            "fusion_grid": fusion_grid,
        }
        self.embed = nn.ModuleDict(
            {m: nn.Conv2d(in_dims[m], dim, patch, stride=patch) for m in self.modalities}
        )
        self.fusion = nn.Parameter(torch.zeros(dim, fusion_grid, fusion_grid))
        nn.init.trunc_normal_(self.fusion, std=0.02)
        self.bilstm = BiLSTMAttention(dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def fusion_tokens(self, gh: int, gw: int) -> Tensor:
        """Learnable fusion tokens for a ``gh x gw`` grid ``[N, D]``."""
        f: Tensor = self.fusion
        if tuple(f.shape[-2:]) != (gh, gw):
            f = F.interpolate(f[None], size=(gh, gw), mode="bilinear", align_corners=False)[0]
        return f.flatten(1).T

    def forward(
        self, xs: Mapping[str, Tensor], tok_avail: Tensor, tok_fuse: Tensor
    ) -> dict[str, Any]:
        """Encode a chip batch.

        Args:
            xs: every modality, zero-filled ``[B, C_m, H, W]`` with H, W multiples of ``patch``.
            tok_avail: bool ``[B, M, N]``, tokens present (visible) in each modality stream.
            tok_fuse: bool ``[B, M, N]``, tokens folded into the fusion (a subset of tok_avail).

        Returns:
            ``fusion [B, N, D]``, ``tokens [B, M, N, D]`` (normed outputs), ``beta [B, N, M]``
            (Bi-LSTM attention weights), ``grid (gh, gw)``.
        """
        first = xs[self.modalities[0]]
        b = first.shape[0]
        gh, gw = first.shape[-2] // self.patch, first.shape[-1] // self.patch
        n, d, n_mod = gh * gw, self.dim, len(self.modalities)
        pos = sincos_2d(gh, gw, d, first.device)
        toks = torch.stack(
            [self.embed[m](xs[m]).flatten(2).transpose(1, 2) for m in self.modalities], 1
        ) + pos.to(first.dtype)
        fus = (self.fusion_tokens(gh, gw) + pos)[None].expand(b, n, d)
        new, beta = self.bilstm(
            fus.reshape(b * n, d),
            toks.transpose(1, 2).reshape(b * n, n_mod, d),
            tok_fuse.transpose(1, 2).reshape(b * n, n_mod),
        )
        x = torch.cat([new.view(b, n, d).to(toks.dtype), toks.flatten(1, 2)], 1)
        mask = attention_mask(tok_avail, tok_fuse)
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        return {
            "fusion": x[:, :n],
            "tokens": x[:, n:].reshape(b, n_mod, n, d),
            "beta": beta.view(b, n, n_mod),
            "grid": (gh, gw),
        }


def imt_config(preset: str, **overrides: int | None) -> dict[str, int]:
    """Preset sizes with explicit overrides (None = keep the preset's value)."""
    if preset not in PRESETS:
        raise UnknownNameError(f"unknown imt preset {preset!r}; valid: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    cfg.update({k: int(v) for k, v in overrides.items() if v is not None})
    cfg.setdefault("fusion_grid", max(1, 64 // cfg["patch"]))
    return cfg


def build_encoder(
    modalities: Sequence[str], in_dims: Mapping[str, int], cfg: Mapping[str, int]
) -> IMTEncoder:
    """An :class:`IMTEncoder` from a config of :func:`imt_config`."""
    return IMTEncoder(
        modalities,
        in_dims,
        dim=cfg["dim"],
        depth=cfg["depth"],
        heads=cfg["heads"],
        patch=cfg["patch"],
        fusion_grid=cfg["fusion_grid"],
    )


@register_method("imt", tasks=("segmentation",))
class IMT(ChipModel):
    """IMT (Chen, Zhao & Bruzzone 2024): fusion tokens, Bi-LSTM attention and masked self-attention.

    Terms: ``main = CE(y, fused)`` over pixels where a fused (kept) modality is present, and
    ``uni = sum_m CE(y, y_m) / M`` over pixels where m is present (per-modality heads).

    Args:
        preset: ``"tiny"`` (D 32, 2 blocks, 2 heads, patch 4; CPU) or ``"base"`` (ViT-B:
            D 768, 12 blocks, 12 heads, patch 16; GPU).
        patch, dim, depth, heads, fusion_grid: override the preset (None keeps it).
        keep_prob: probability of keeping each available modality in the random combination of
            a training chip (never all dropped); 0.5 by default.
        pretrained: path of an encoder checkpoint from :mod:`cropmap.pretrain`; loaded when the
            file exists (a warning otherwise).
        **kw: the :class:`CoLearningModel` arguments; ``hidden``, ``encoders`` and ``dropout``
            are not used (sizes come from the preset; no dropout).

    Raises:
        ConfigError: ``task="classification"`` (this is a segmentation method).
    """


    def __init__(
        self,
        *,
        preset: str = "tiny",
        patch: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        fusion_grid: int | None = None,
        keep_prob: float = 0.5,
        pretrained: str | Path | None = None,
        **kw: Any,
    ):
        super().__init__(**kw)
        self.preset = preset
        self.cfg = imt_config(
            preset, patch=patch, dim=dim, depth=depth, heads=heads, fusion_grid=fusion_grid
        )
        self.patch = self.cfg["patch"]
        self.keep_prob = keep_prob
        self.encoder = build_encoder(self.modalities, self.in_dims, self.cfg)
        d = self.cfg["dim"]
        width = max(32, min(256, d // 2))
        self.fused_head = UpDecoder(d, self.n_out, self.patch, width)
        self.heads = nn.ModuleDict(
            {m: UpDecoder(d, self.n_out, self.patch, width) for m in self.modalities}
        )
        self.pretrained_from: str | None = None
        if pretrained:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str | Path) -> bool:
        """Load encoder weights from a :mod:`cropmap.pretrain` checkpoint if ``path`` exists.

        Tensors whose name or shape differs (e.g. a modality pretrained with other channels)
        are left as initialised and listed in a warning.

        Returns:
            Whether weights were loaded.

        Raises:
            ConfigError: the checkpoint is not an IMT encoder or has another size.
        """
        p = Path(path)
        if not p.exists():
            log.warning("imt: pretrained encoder %s not found; training from scratch", p)
            return False
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
            raise ConfigError(
                f"{p} is not an IMT encoder checkpoint (format {CKPT_FORMAT}); rerun the pretrain stage"
            )
        cfg = ckpt["config"]
        for k in ("dim", "depth", "heads", "patch"):
            if int(cfg[k]) != self.cfg[k]:
                raise ConfigError(
                    f"{p}: the pretrained encoder has {k}={cfg[k]} but the model has {k}={self.cfg[k]}; "
                    "pretrain and fine-tune with the same preset and size options"
                )
        own = self.encoder.state_dict()
        state = {k: v for k, v in ckpt["encoder"].items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(state))
        self.encoder.load_state_dict(state, strict=False)
        if skipped:
            log.warning(
                "imt: %d encoder tensors not in %s (kept random): %s", len(skipped), p, skipped
            )
        self.pretrained_from = str(p)
        return True

    def forward(self, batch: Batch) -> Output:
        """Fused and per-modality logits plus tokens, Bi-LSTM weights and the fused mask."""
        xs, avail, rows = self._prepare(batch)
        b, _, h, w = avail.shape
        full, av = self.padded_inputs(xs, avail, self.patch)
        tok_avail = token_mask(av, self.patch)
        keep = moddrop_keep(rows, self.keep_prob, self.generator) if self.training else rows
        tok_fuse = tok_avail & keep[:, :, None]
        enc = self.encoder(full, tok_avail, tok_fuse)
        gh, gw = enc["grid"]

        def grid(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(b, -1, gh, gw)

        any_a = avail.any(1, keepdim=True)
        logits = self.fused_head(grid(enc["fusion"]))[..., :h, :w] * any_a
        per = {
            m: self.heads[m](grid(enc["tokens"][:, i]))[..., :h, :w] * avail[:, i : i + 1]
            for i, m in enumerate(self.modalities)
        }
        return {
            "logits": logits,
            "per_modality": per,
            "avail": avail,
            "keep": avail & keep[:, :, None, None],
            "beta": enc["beta"],
            "tokens": {"fusion": enc["fusion"]}
            | {m: enc["tokens"][:, i] for i, m in enumerate(self.modalities)},
            "tok_avail": tok_avail,
            "tok_fuse": tok_fuse,
        }

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        avail, per = out["avail"], out["per_modality"]
        main = self._sup(out["logits"], y, out["keep"].any(1))
        uni = torch.stack(
            [self._sup(per[m], y, avail[:, i]) for i, m in enumerate(self.modalities)]
        ).sum() / len(self.modalities)
        return {"main": main, "uni": uni}
