"""``gemmnet``: Generative-Enhanced MultiModal learning Network for chip segmentation.

Paper: N. Kieu, K. Nguyen, A. Wiliem, C. Fookes and S. Sridharan (2025), *Filling the gaps: a
multitask hybrid multiscale generative framework for missing modality in remote sensing semantic
segmentation* (``docs/methods.md`` lists the losses and what cropmap changed). The building
blocks (HyFEx encoder and generator, PatchGAN, decoder) are in
:mod:`cropmap.models.gemmnet_blocks`.

Components (paper section 3 and the authors' code, ``nhikieu/GEMMNet``), generalised from the
paper's two modalities (RGIR, nDSM) to any number:

* **Generators** (HyFEx generator), one per modality: the input is every *other* modality
  (zero-filled where missing or dropped) plus one availability channel per other modality, so a
  generator imputes its modality from whichever subset is available. Pix2Pix U-Net with four
  stride-2 4x4 convolutions to 1/16, a one-layer transformer bottleneck (1x1 conv to ``tdim``
  tokens, 2-D sin-cos positions) and four transposed convolutions with skips. ``generator="ae"``
  trains it with L2 (eq. 8); ``"cgan"`` with Pix2Pix (eq. 9): a conditional PatchGAN
  discriminator per modality, BCE adversarial loss and ``100 x L1``.
* **HyFEx encoders**, one per modality: five levels (full resolution, then four stride-2
  levels, residual conv blocks; widths ``b, 2b, 4b, 8b, 16b``) with a transformer block at the
  bottleneck (1/16).
* **HyFMA**: conv fusion of the concatenated modality features at scales 1-4 (eq. 3) and a
  transformer over the concatenated bottleneck tokens of all modalities (eq. 4, learned modality
  embeddings + 2-D positions), then a UNet-like decoder (eq. 5) to the fused logits.
* **CoLoss** (eq. 6): ``fused`` + ``scales`` (sum over the four fused scales u1..u4, each through
  a 1x1 head, upsampled to full resolution) + ``modal`` (sum over modalities of a shared UNet
  decoder on each modality's own features, real or imputed, as in the code) + ``rec``; every
  segmentation loss is Dice + class-weighted CE (eq. 7; ``class_weights``).

Training draws one missing scenario per step (uniform over the non-empty subsets of the
configured modalities, as the paper's three scenarios for two modalities): the kept modalities
are the real inputs, every other modality is imputed by its generator from the kept ones. A chip
whose available modalities are all dropped keeps them (and so does a pixel), so every pixel with
data has a real input. ``rec`` is computed for dropped modalities only, on the pixels where they
are really present. At inference every missing modality (per pixel) is imputed from the
available ones and the full network runs; fused logits are 0 where no modality is present and
``per_modality[m]`` is 0 where m is missing (``per_modality_full`` holds the imputed ones too).

Single-optimizer GAN (``cgan``): ``disc`` is the discriminator loss on the real target and the
*detached* imputation (gradient reaches only the discriminator); the generator's adversarial
term evaluates the discriminator with *detached parameters* (``torch.func.functional_call``),
so its gradient reaches only the generator. One Adam step on ``total`` therefore performs both
Pix2Pix updates, each network minimising its own objective. As in the code, the GAN objective is
scaled by ``rec_weight`` (0.05 for cgan: ``0.05 x (adv + 100 L1)``, and ``0.05 x disc``);
``rec_weight`` is 1 for ``ae`` (plain L2, eq. 8). The generator's conditioning input and the
target are detached (data), so ``rec`` trains the generators of dropped modalities only.

Deviations from paper/code, and why:

* Batch norm -> GroupNorm everywhere (the code adapts mmFormer's instance-norm blocks); outputs
  of a chip never depend on the other chips, and 1x1 bottlenecks of 16 px chips still normalise.
* No tanh on the generator output (inputs are z-scored, not in [-1, 1]).
* Positions are 2-D sin-cos, not learned tables sized for 512 px images (chips are 16-64 px).
* The discriminator is conditioned on the generator's input (the kept modalities); the code
  conditions it on the real target itself, which lets it trivially tell real from fake. Its
  last two convolutions are 3x3 stride 1 (the code: 4x4) so 16 px chips still give a patch map.
* Chips are zero-padded to a multiple of 16 (padding counts as missing) and outputs cropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.errors import UnknownNameError
from cropmap.models.base import Batch, Output
from cropmap.models.gemmnet_blocks import (
    HyFExEncoder,
    HyFExGenerator,
    PatchDiscriminator,
    UNetDecoder,
    conv_block,
)
from cropmap.models.losses import dice_loss
from cropmap.models.registry import register_method
from cropmap.models.spatial import Block, ChipModel, group_norm, sincos_2d

#: Size presets: ``base`` is the authors' code (BASIC_DIMS 8, transformer 256 / 8 heads / MLP
#: 512, generator gf 32, discriminator df 64); ``tiny`` is the CPU default: the code's encoder
#: width 8 with a small transformer and generators (width 4 squeezed the 120 stacked S2 channels
#: into 4 at full resolution: 83.5 against 90.5 validation weighted F1 on the demo region after
#: 600 steps, see docs/segmentation.md).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 8, "tdim": 32, "heads": 2, "gf": 8, "df": 8},
    "base": {"width": 8, "tdim": 256, "heads": 8, "gf": 32, "df": 64},
}
GENERATORS: tuple[str, ...] = ("ae", "cgan")
L1_LAMBDA = 100.0


def _bce(logits: Tensor, target: float, valid: Tensor) -> Tensor:
    """Mean BCE-with-logits against a constant target over valid patches."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    t = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits[valid], t[valid])


@register_method("gemmnet", tasks=("segmentation",))
class GEMMNet(ChipModel):
    """GEMMNet (Kieu et al. 2025): generators impute missing modalities; multiscale hybrid fusion.

    Terms of ``loss``: ``fused``, ``scales``, ``modal``, ``rec`` and ``disc`` (0 for ``ae``) and
    ``total``, their unweighted sum; segmentation terms cover pixels with a kept modality.

    Args:
        generator: ``"ae"`` (default) or ``"cgan"``. A :class:`torch.Generator` is accepted here
            as the random-number generator, as for the other methods (then the kind is ``ae``).
        preset: ``"tiny"`` (CPU) or ``"base"`` (the authors' widths; GPU).
        width, tdim, heads, gf, df: override the preset (None keeps it).
        rec_weight: factor of the reconstruction (and discriminator) terms; None = 1 for ``ae``,
            0.05 for ``cgan`` (the code's GAN-loss scale).
        rng: random-number generator for the scenario draws (global RNG when None).
        **kw: the :class:`CoLearningModel` arguments (``class_weights`` weight the CE);
            ``hidden``, ``encoders`` and ``dropout`` are not used.

    Attributes:
        fixed_scenario: when set to a tuple of modality names, training keeps exactly those
            (instead of a random draw) - for ablations and tests.

    Raises:
        ConfigError: ``task="classification"`` (this is a segmentation method).
        UnknownNameError: unknown generator kind or preset.
    """


    def __init__(
        self,
        *,
        generator: str | torch.Generator | None = "ae",
        preset: str = "tiny",
        width: int | None = None,
        tdim: int | None = None,
        heads: int | None = None,
        gf: int | None = None,
        df: int | None = None,
        rec_weight: float | None = None,
        rng: torch.Generator | None = None,
        **kw: Any,
    ):
        if isinstance(generator, torch.Generator):
            rng, generator = generator, "ae"
        super().__init__(generator=rng, **kw)  # refuses the classification task first
        kind = (generator or "ae").strip().lower()
        if kind not in GENERATORS:
            raise UnknownNameError(
                f"unknown gemmnet generator {generator!r}; valid: {', '.join(GENERATORS)}"
            )
        if preset not in PRESETS:
            raise UnknownNameError(
                f"unknown gemmnet preset {preset!r}; valid: {', '.join(PRESETS)}"
            )
        cfg = dict(PRESETS[preset])
        cfg.update(
            {
                k: int(v)
                for k, v in dict(width=width, tdim=tdim, heads=heads, gf=gf, df=df).items()
                if v is not None
            }
        )
        self.cfg, self.preset, self.kind = cfg, preset, kind
        self.rec_weight = (
            float(rec_weight) if rec_weight is not None else (0.05 if kind == "cgan" else 1.0)
        )
        self.fixed_scenario: tuple[str, ...] | None = None
        mods, n_mod = self.modalities, len(self.modalities)
        ws = [cfg["width"] * 2**i for i in range(5)]
        self.widths = ws
        self.encoders = nn.ModuleDict(
            {
                m: HyFExEncoder(self.in_dims[m], cfg["width"], cfg["tdim"], cfg["heads"])
                for m in mods
            }
        )
        cond = {m: sum(self.in_dims[j] + 1 for j in mods if j != m) for m in mods}
        self.cond_dims = cond
        self.generators = nn.ModuleDict(
            {
                m: HyFExGenerator(cond[m], self.in_dims[m], cfg["gf"], cfg["tdim"], cfg["heads"])
                for m in mods
            }
            if n_mod > 1
            else {}
        )
        self.discriminators = nn.ModuleDict(
            {m: PatchDiscriminator(cond[m] + self.in_dims[m], cfg["df"]) for m in mods}
            if kind == "cgan" and n_mod > 1
            else {}
        )
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(n_mod * w, w, 1), group_norm(w), nn.LeakyReLU(0.2), conv_block(w, w))
            for w in ws[:4]
        )
        t = cfg["tdim"]
        self.bott_in = nn.ModuleDict({m: nn.Conv2d(ws[4], t, 1) for m in mods})
        self.mod_embed = nn.Parameter(torch.zeros(n_mod, t))
        nn.init.trunc_normal_(self.mod_embed, std=0.02)
        self.bott_block = Block(t, cfg["heads"], mlp_ratio=2.0)
        self.bott_out = nn.Sequential(nn.Conv2d(n_mod * t, ws[4], 1), group_norm(ws[4]), nn.LeakyReLU(0.2))
        self.decoder = UNetDecoder(ws, self.n_out)
        self.scale_heads = nn.ModuleList(nn.Conv2d(w, self.n_out, 1) for w in ws[:4])
        self.sep_decoder = UNetDecoder(ws, self.n_out)

    # ------------------------------------------------------------------ pieces
    def _scenario(self, avail: Tensor) -> Tensor:
        """Per-pixel kept availability: one subset of modalities per step, never all data lost."""
        n_mod = len(self.modalities)
        if self.fixed_scenario is not None:
            sel = torch.tensor(
                [m in self.fixed_scenario for m in self.modalities], device=avail.device
            )
        else:
            g = self.generator
            dev = g.device if g is not None else torch.device("cpu")
            code = int(torch.randint(1, 2**n_mod, (1,), generator=g, device=dev).item())
            sel = torch.tensor([(code >> i) & 1 == 1 for i in range(n_mod)], device=avail.device)
        rows = avail.flatten(2).any(2)
        keep_chip = rows & sel[None]
        keep_chip = torch.where(keep_chip.any(1, keepdim=True), keep_chip, rows)
        keep = avail & keep_chip[:, :, None, None]
        lost = avail.any(1, keepdim=True) & ~keep.any(1, keepdim=True)
        return torch.where(lost, avail, keep)

    def _condition(self, xs: Mapping[str, Tensor], keep: Tensor, i: int) -> Tensor:
        """Generator input for modality ``i``: other modalities (kept only) + their masks; detached."""
        parts = []
        for j, m in enumerate(self.modalities):
            if j == i:
                continue
            k = keep[:, j : j + 1]
            parts += [xs[m] * k, k.to(xs[m].dtype)]
        return torch.cat(parts, 1).detach()

    def _bottleneck(self, x5: Sequence[Tensor]) -> Tensor:
        b, _, h, w = x5[0].shape
        t = self.cfg["tdim"]
        pos = sincos_2d(h, w, t, x5[0].device)
        toks = [
            self.bott_in[m](x5[i]).flatten(2).transpose(1, 2)
            + (pos + self.mod_embed[i]).to(x5[i].dtype)
            for i, m in enumerate(self.modalities)
        ]
        z = self.bott_block(torch.cat(toks, 1))  # [B, M * n, t]
        z = z.view(b, len(self.modalities), h * w, t).permute(0, 1, 3, 2).reshape(b, -1, h, w)
        return self.bott_out(z)

    # ------------------------------------------------------------------ API
    def forward(self, batch: Batch) -> Output:
        """Impute, encode, fuse, decode. See the module docstring for the outputs."""
        xs0, avail, _ = self._prepare(batch)
        b, _, h, w = avail.shape
        xs, av = self.padded_inputs(xs0, avail, 16)
        keep = self._scenario(av) if self.training else av
        has_data = keep.any(
            1, keepdim=True
        )  # pixels with a real input: only there imputing matters
        filled: dict[str, Tensor] = {}
        imputed: dict[str, Tensor] = {}
        rec: dict[str, dict[str, Tensor]] = {}
        for i, m in enumerate(self.modalities):
            k = keep[:, i : i + 1]
            need = (~k & has_data).flatten(1).any(1)
            if m not in self.generators or not bool(need.any()):
                filled[m] = xs[m] * k
                continue
            cond = self._condition(xs, keep, i)
            if bool(need.all()):
                fake = self.generators[m](cond)
            else:  # only chips that lack m somewhere with data
                g = self.generators[m](cond[need])
                fake = g.new_zeros((cond.shape[0], *g.shape[1:])).index_put(
                    (need.nonzero()[:, 0],), g
                )
            filled[m] = torch.where(k, xs[m], fake.to(xs[m].dtype))
            imputed[m] = fake[..., :h, :w]
            target = av[:, i : i + 1] & ~k
            if self.training and bool(target.any()):
                rec[m] = {"fake": fake, "real": xs[m].detach(), "cond": cond, "valid": target}
        feats = {m: self.encoders[m](filled[m]) for m in self.modalities}
        u = [self.fuse[s](torch.cat([feats[m][s] for m in self.modalities], 1)) for s in range(4)]
        u.append(self._bottleneck([feats[m][4] for m in self.modalities]))
        any_a = avail.any(1, keepdim=True)
        logits = self.decoder(u)[..., :h, :w] * any_a
        size = u[0].shape[-2:]
        scales = [
            F.interpolate(head(u[s]), size=size, mode="bilinear", align_corners=False)[..., :h, :w]
            * any_a
            for s, head in enumerate(self.scale_heads)
        ]
        sep = self.sep_decoder(
            [torch.cat([feats[m][s] for m in self.modalities], 0) for s in range(5)]
        )[..., :h, :w].split(b, 0)
        per_full = {m: sep[i] * any_a for i, m in enumerate(self.modalities)}
        per = {m: sep[i] * avail[:, i : i + 1] for i, m in enumerate(self.modalities)}
        return {
            "logits": logits,
            "per_modality": per,
            "per_modality_full": per_full,
            "scales": scales,
            "avail": avail,
            "keep": keep[..., :h, :w],
            "imputed": imputed,
            "_rec": rec,
        }

    def _seg(self, logits: Tensor, y: Tensor, valid: Tensor) -> Tensor:
        """Dice + class-weighted CE (eq. 7) over valid pixels."""
        return self._sup(logits, y, valid) + dice_loss(self.head_kind, logits, y, valid)

    def _rec_terms(self, out: Output) -> tuple[Tensor, Tensor]:
        zero = out["logits"].sum() * 0.0
        rec, disc = zero, zero
        for m, r in out["_rec"].items():
            fake, real, cond, valid = r["fake"], r["real"], r["cond"], r["valid"]
            vf = valid.to(fake.dtype)
            n = vf.sum() * fake.shape[1]
            if self.kind == "ae":
                rec = rec + ((fake - real) ** 2 * vf).sum() / n
                continue
            d_net = self.discriminators[m]
            real_v, fake_v = real * vf, fake * vf
            d_real = d_net(torch.cat([cond, real_v], 1))
            d_fake = d_net(torch.cat([cond, fake_v.detach()], 1))
            patches = F.adaptive_max_pool2d(vf, d_real.shape[-2:]) > 0
            disc = disc + 0.5 * (_bce(d_real, 1.0, patches) + _bce(d_fake, 0.0, patches))
            frozen = {
                k: v.detach()
                for k, v in itertools.chain(d_net.named_parameters(), d_net.named_buffers())
            }
            g_fake = torch.func.functional_call(d_net, frozen, (torch.cat([cond, fake_v], 1),))
            l1 = ((fake - real).abs() * vf).sum() / n
            rec = rec + _bce(g_fake, 1.0, patches) + L1_LAMBDA * l1
        return rec * self.rec_weight, disc * self.rec_weight

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        valid = out["keep"].any(1)
        fused = self._seg(out["logits"], y, valid)
        scales = torch.stack([self._seg(s, y, valid) for s in out["scales"]]).sum()
        modal = torch.stack(
            [self._seg(out["per_modality_full"][m], y, valid) for m in self.modalities]
        ).sum()
        rec, disc = self._rec_terms(out)
        return {"fused": fused, "scales": scales, "modal": modal, "rec": rec, "disc": disc}
