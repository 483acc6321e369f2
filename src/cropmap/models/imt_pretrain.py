"""Self-supervised pretraining of the ``imt`` encoder (:class:`IMTPretrainer`).

As in Y. Chen, M. Zhao and L. Bruzzone (2024), *Incomplete multimodal learning for remote
sensing data fusion*: MultiMAE masking with a Dirichlet(alpha) split of a fixed visible-token
budget across modalities (:func:`multimae_mask`), one shallow transformer decoder per modality
reconstructing the masked patches from the fusion tokens (MSE for s2/s1/weather, L1 for dem,
masked tokens and present pixels only), and InfoNCE between each modality's global vector and
the fusion vector (eq. 6), the global vectors coming from one masked cross-attention layer with
learnable class tokens. :mod:`cropmap.pretrain` drives it; the checkpoint it writes is read by
:meth:`cropmap.models.imt.IMT.load_pretrained`.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropmap.models import losses as L
from cropmap.models.base import Batch
from cropmap.models.imt import CKPT_FORMAT, IMTEncoder, token_mask, tokens_to_pixels
from cropmap.models.spatial import Block, pad_to, prepare_chips

#: Reconstruction loss per modality (paper eq. 5: L1 for heights, MSE for images).
RECON_LOSS: dict[str, str] = {"s2": "mse", "s1": "mse", "weather": "mse", "dem": "l1"}


def multimae_allocate(lam: Tensor, cap: Tensor, budget: Tensor) -> Tensor:
    """Split a token budget across modalities in proportion to ``lam``, within capacities.

    Args:
        lam: ``[B, M]`` non-negative proportions (Dirichlet draws).
        cap: int ``[B, M]`` available tokens per modality.
        budget: int ``[B]``, at most ``cap.sum(1)``.

    Returns:
        int ``[B, M]`` counts with ``0 <= counts <= cap`` and ``counts.sum(1) == budget`` exactly
        (floor of the proportional shares, capped, then the remainder one token at a time to the
        modality with room and the largest unmet share).
    """
    cap = cap.long()
    budget = torch.minimum(budget.long(), cap.sum(1))
    lam = lam * (cap > 0)
    counts = torch.zeros_like(cap)
    active = cap > 0
    for _ in range(cap.shape[1]):
        w = lam * active
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        left = budget - counts.sum(1)
        add = torch.minimum((w * left[:, None]).floor().long(), cap - counts)
        counts = counts + add
        active = active & (counts < cap)
    while True:
        left = budget - counts.sum(1)
        todo = left > 0
        if not bool(todo.any()):
            return counts
        room = counts < cap
        unmet = lam * budget[:, None] - counts
        j = torch.where(room, unmet, torch.full_like(unmet, -math.inf)).argmax(1)
        counts = counts + F.one_hot(j, cap.shape[1]) * todo[:, None].long()


def multimae_mask(
    tok_avail: Tensor,
    n_visible: int,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MultiMAE masking: which tokens stay visible.

    Per sample, ``lambda ~ Dir(alpha)`` over the modalities that have tokens; the visible budget
    ``min(n_visible, available tokens)`` is split by :func:`multimae_allocate` and each
    modality's visible tokens are drawn uniformly among its available ones.

    Args:
        tok_avail: bool ``[B, M, N]`` available tokens.
        n_visible: visible tokens per sample (the budget, kept exactly).
        alpha: Dirichlet concentration (1 in the paper and MultiMAE).
        generator: RNG (only used for ``alpha == 1``; other alphas use the global RNG).

    Returns:
        bool ``[B, M, N]``, a subset of ``tok_avail`` with ``min(n_visible, avail)`` True per sample.
    """
    b, n_mod, n = tok_avail.shape
    dev = tok_avail.device

    def rand(*shape: int) -> Tensor:
        if generator is None:
            return torch.rand(shape, device=dev)
        return torch.rand(shape, generator=generator, device=generator.device).to(dev)

    if alpha == 1.0:  # Dir(1) = normalised Exp(1)
        lam = -torch.log(rand(b, n_mod).clamp_min(1e-12))
    else:
        lam = torch.distributions.Dirichlet(torch.full((n_mod,), float(alpha))).sample((b,)).to(dev)
    cap = tok_avail.sum(2)
    counts = multimae_allocate(lam, cap, torch.full((b,), int(n_visible), device=dev))
    score = rand(b, n_mod, n).masked_fill(~tok_avail, 2.0)
    rank = score.argsort(dim=2, stable=True).argsort(dim=2, stable=True)
    return (rank < counts[:, :, None]) & tok_avail


class CrossAttention(nn.Module):
    """One masked cross-attention layer: queries ``[B, Q, D]`` attend to keys ``[B, K, D]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        """``mask`` bool ``[B, Q, K]`` (each row must allow at least one key)."""
        b, nq, d = q.shape
        h = self.heads
        qq = self.q(self.norm_q(q)).view(b, nq, h, d // h).transpose(1, 2)
        kv = self.kv(self.norm_k(k)).view(b, k.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qq, kv[0], kv[1], attn_mask=mask[:, None])
        return q + self.proj(a.transpose(1, 2).reshape(b, nq, d))


class IMTPretrainer(nn.Module):
    """MultiMAE + contrastive pretraining of an :class:`IMTEncoder` (paper III-D/E, eq. 7).

    * Masking: :func:`multimae_mask` keeps ``round(visible_fraction * (M + 1) * N)`` modality
      tokens visible per chip (the paper: 256 visible = 1/4 of all tokens, fusion tokens
      included); masked tokens are left out exactly like missing ones.
    * Reconstruction: per modality, Linear(D -> dec_dim) of the fusion tokens + a learned
      modality embedding, ``dec_depth`` transformer blocks, Linear -> ``patch^2 * C`` pixels; the
      loss (MSE, or L1 for dem) covers masked tokens' pixels where the modality is present.
    * Contrastive: learnable class tokens (fusion + one per modality) cross-attend once to the
      encoder outputs with the same masking rule (a modality's class token sees its visible
      tokens, the fusion class token sees all fusion and visible tokens); linear projections
      give ``z_m`` and ``z_f``; ``cont = sum_m InfoNCE(z_m, z_f; temperature)`` over chips where
      m has a visible token (eq. 6, negatives: the other chips of the batch).
    * ``total = rec + contrastive_weight * cont`` (eq. 7 with lambda_2 = ``contrastive_weight``).
    """

    def __init__(
        self,
        encoder: IMTEncoder,
        *,
        dec_dim: int = 256,
        dec_depth: int = 2,
        dec_heads: int | None = None,
        visible_fraction: float = 0.25,
        alpha: float = 1.0,
        temperature: float = 0.1,
        contrastive_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        mods = encoder.modalities
        d, p = encoder.dim, encoder.patch
        dims = encoder.config["in_dims"]
        heads = dec_heads or max(1, dec_dim // 32)
        self.visible_fraction, self.alpha = visible_fraction, alpha
        self.temperature, self.contrastive_weight = temperature, contrastive_weight
        self.generator = generator
        self.dec_in = nn.ModuleDict({m: nn.Linear(d, dec_dim) for m in mods})
        self.dec_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(dec_dim)) for m in mods})
        self.dec_blocks = nn.ModuleDict(
            {m: nn.ModuleList(Block(dec_dim, heads) for _ in range(dec_depth)) for m in mods}
        )
        self.dec_norm = nn.ModuleDict({m: nn.LayerNorm(dec_dim) for m in mods})
        self.dec_out = nn.ModuleDict({m: nn.Linear(dec_dim, p * p * dims[m]) for m in mods})
        self.cls = nn.Parameter(torch.zeros(len(mods) + 1, d))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.cross = CrossAttention(d, encoder.config["heads"])
        self.proj = nn.ModuleDict({k: nn.Linear(d, d) for k in ["fusion", *mods]})

    def n_visible(self, n_tokens: int) -> int:
        """Visible-token budget of a chip with ``n_tokens`` positions."""
        return max(1, round(self.visible_fraction * (len(self.encoder.modalities) + 1) * n_tokens))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Loss terms: ``rec_<m>``, ``cont_<m>``, ``rec``, ``cont`` and ``total``."""
        enc_mods = self.encoder.modalities
        p = self.encoder.patch
        dims = self.encoder.config["in_dims"]
        xs, avail = prepare_chips(batch, enc_mods, dims)
        xs = {m: pad_to(x, p) for m, x in xs.items()}
        av = pad_to(avail, p)
        tok_avail = token_mask(av, p)
        b, n_mod, n = tok_avail.shape
        vis = multimae_mask(tok_avail, self.n_visible(n), self.alpha, self.generator)
        out = self.encoder(xs, vis, vis)
        gh, gw = out["grid"]
        fusion, tokens = out["fusion"], out["tokens"]
        zero = fusion.sum() * 0.0
        terms: dict[str, Tensor] = {}
        for i, m in enumerate(enc_mods):
            z = self.dec_in[m](fusion) + self.dec_embed[m]
            for blk in cast(nn.ModuleList, self.dec_blocks[m]):
                z = blk(z)
            pix = self.dec_out[m](self.dec_norm[m](z))  # [B, N, C * p * p]
            c = dims[m]
            pred = (
                pix.view(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)
            )
            sel = tokens_to_pixels(tok_avail[:, i] & ~vis[:, i], gh, gw, p) & av[:, i : i + 1]
            diff = pred.float() - xs[m]
            err = diff.abs() if RECON_LOSS.get(m, "mse") == "l1" else diff**2
            cnt = sel.sum() * c
            terms[f"rec_{m}"] = (err * sel).sum() / cnt if bool(cnt > 0) else zero
        # global vectors: class tokens cross-attend to [cls, fusion, modality tokens]
        keys = torch.cat(
            [self.cls[None].expand(b, -1, -1).to(fusion.dtype), fusion, tokens.flatten(1, 2)], 1
        )
        q = self.cls[None].expand(b, -1, -1).to(fusion.dtype)
        nq = n_mod + 1
        own = torch.eye(nq, dtype=torch.bool, device=fusion.device)[None].expand(b, nq, nq)
        fus_keys = torch.zeros(b, nq, n, dtype=torch.bool, device=fusion.device)
        fus_keys[:, 0] = True
        mod_keys = torch.zeros(b, nq, n_mod, n, dtype=torch.bool, device=fusion.device)
        mod_keys[:, 0] = vis
        idx = torch.arange(n_mod, device=fusion.device)
        mod_keys[:, idx + 1, idx] = vis
        mask = torch.cat([own, fus_keys, mod_keys.flatten(2)], 2)
        g = self.cross(q, keys, mask)
        z_f = self.proj["fusion"](g[:, 0]).float()
        for i, m in enumerate(enc_mods):
            ok = vis[:, i].any(1)
            z_m = self.proj[m](g[:, i + 1]).float()
            terms[f"cont_{m}"] = (
                L.info_nce(z_m[ok], z_f[ok], self.temperature) if int(ok.sum()) > 1 else zero
            )
        rec = torch.stack([terms[f"rec_{m}"] for m in enc_mods]).sum()
        cont = torch.stack([terms[f"cont_{m}"] for m in enc_mods]).sum()
        terms.update(rec=rec, cont=cont, total=rec + self.contrastive_weight * cont)
        return terms

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """The encoder checkpoint that :meth:`IMT.load_pretrained` reads."""
        return {
            "format": CKPT_FORMAT,
            "config": dict(self.encoder.config),
            "encoder": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            **extra,
        }
