"""The co-learning methods: FullCo, Co-Miss, MDiCo and DSensD+ (decision-level fusion).

Papers (``docs/methods.md`` lists each method's loss terms and what cropmap changed):

* FullCo and Co-Miss: F. Mena, D. Ienco, C. F. Dantas and R. Interdonato (2025), *Harnessing
  multi-modal co-learning for missing Earth observation modalities*.
* MDiCo: F. Mena, D. Ienco, C. F. Dantas, R. Interdonato and A. Dengel (2025), *Multi-modal
  co-learning for Earth observation: enhancing single-modality models via modality
  collaboration* (arXiv:2510.19579).
* DSensD+: F. Mena, D. Ienco, C. F. Dantas, R. Interdonato and A. Dengel (2025), *Multi-sensor
  model for Earth observation robust to missing data via sensor dropout and mutual
  distillation* (IEEE Access 13).

The contract every method follows is in :mod:`cropmap.models.base`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cropmap.models import losses as L
from cropmap.models.base import Batch, DecisionLevelModel, Output
from cropmap.models.heads import LinearHead, PredictionHead
from cropmap.models.registry import register_method


class _FeatureCoLearning(DecisionLevelModel):
    """FullCo / Co-Miss feature level (Mena, Ienco, Dantas & Interdonato 2025).

    Each modality's encoder output (D = ``hidden``) is split into shared features (first
    ``D // 2`` channels) and specific features (the rest): ``z_sha, z_spe = E_m(X_m)``, and
    ``y_m = P_m(z_sha || z_spe)`` with the per-modality :class:`PredictionHead`. Terms:

    * ``main = CE(y, y_full)`` (eq. 3);
    * ``mod = sum_m CE(m, P_spe(z_m^spe))`` with one linear layer ``P_spe`` shared by all
      modalities (eq. 4), over samples where m is available;
    * ``cont = sum_m sum_{j != m} InfoNCE(z_m^sha, z_j^sha; gamma)`` (eq. 5), cosine, positives
      the same sample, negatives the other samples of the batch where both are available.

    The paper does not say how one encoder yields both feature sets; splitting its output in
    halves is the MDiCo code's convention for its specific/unused features. For chips, ``mod``
    and ``cont`` run on ``contrast_pixels`` pixels drawn across the batch (the paper's samples are
    pixels; see :meth:`~cropmap.models.base.CoLearningModel._sample_rows`).
    """

    def __init__(self, *, gamma: float = 0.07, tau: float = 0.5, contrast_pixels: int = 512, **kw: Any):
        super().__init__(**kw)
        self.gamma, self.tau = gamma, tau
        self.contrast_pixels = contrast_pixels
        self.n_sha = self.hidden // 2
        self.mod_head = LinearHead(self.hidden - self.n_sha, len(self.modalities))

    def _feature_terms(self, out: Output) -> dict[str, Tensor]:
        avail, feats = out["avail"], out["features"]
        rows, avail_rows = self._sample_rows(avail, self.contrast_pixels)
        pooled = {m: rows(feats[m]) for m in self.modalities}
        valid = {m: avail_rows[:, i] for i, m in enumerate(self.modalities)}
        zero = torch.zeros((), device=avail.device)
        mod = sum(
            (
                L.modality_ce(self.mod_head(pooled[m][:, self.n_sha :]), i, valid[m])
                for i, m in enumerate(self.modalities)
            ),
            zero,
        )
        cont = zero
        for m, j in itertools.permutations(self.modalities, 2):
            both = valid[m] & valid[j]
            cont = cont + L.info_nce(
                pooled[m][both, : self.n_sha], pooled[j][both, : self.n_sha], self.gamma
            )
        fused = out["logits"]
        return {"main": self._sup(fused, out["y"], avail.any(1)), "mod": mod, "cont": cont}

    def forward(self, batch: Batch) -> Output:
        out = super().forward(batch)
        out["shared"] = {m: f[:, : self.n_sha] for m, f in out["features"].items()}
        out["specific"] = {m: f[:, self.n_sha :] for m, f in out["features"].items()}
        return out

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        return self._feature_terms({**out, "y": y})


@register_method("fullco")
class FullCo(_FeatureCoLearning):
    """FullCo (Mena et al. 2025, eq. 1): ``main + mod + cont + sum_m L_mut^m``.

    ``L_mut^m = CE(y, y_m) + tau^2 KD(y_full, y_m; tau)`` (eq. 6) over samples where m is
    available, reported as ``mut_ce`` and ``mut_kd`` (each summed over m). KD detaches the
    teacher ``y_full``, as the DSensD+ code does. Defaults: ``tau=0.5``, ``gamma=0.07``.
    """


    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        terms = super()._terms(out, y)
        avail, fused, per = out["avail"], out["logits"], out["per_modality"]
        zero = torch.zeros((), device=fused.device)
        terms["mut_ce"] = sum(
            (self._sup(per[m], y, avail[:, i]) for i, m in enumerate(self.modalities)), zero
        )
        terms["mut_kd"] = sum(
            (self._kd(fused, per[m], self.tau, avail[:, i]) for i, m in enumerate(self.modalities)),
            zero,
        )
        return terms


@register_method("comiss")
class CoMiss(_FeatureCoLearning):
    """Co-Miss (Mena et al. 2025, eq. 2): ``main + mod + cont + L_miss``.

    ModDrop at decision level in training: ``y_miss`` = mean of the per-modality logits over
    the kept modalities (:func:`~cropmap.models.fusion.moddrop_keep`: only available modalities
    can be kept and at least one always is). ``L_miss = CE(y, y_miss) + tau^2 KD(y_full, y_miss;
    tau)`` (eq. 7), reported as ``miss_ce`` and ``miss_kd``; the teacher is detached.

    Note on the paper's mean: eq. 2 writes ``M^-1 sum_m (1 - d_m) y_m``; the text says missing
    modalities are ignored in the merging, so the mean is over the kept ones (as for ``y_full``).

    Args:
        alpha: probability of *keeping* a modality (the interface's convention; the paper's
            ``d_m ~ Bern(alpha)`` is the drop decision, i.e. paper alpha = 1 - this alpha). The
            default 0.5 is the same under both conventions.
        tau: KD temperature (0.5). gamma: InfoNCE temperature (0.07).
    """


    def __init__(self, *, alpha: float = 0.5, **kw: Any):
        super().__init__(**kw)
        self.alpha = alpha

    def _extra(self, out: Output, stacked: Tensor, avail: Tensor) -> None:
        self._dropped(out, stacked, avail, self.alpha)

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        terms = super()._terms(out, y)
        valid = out["keep"].any(1)
        terms["miss_ce"] = self._sup(out["logits_miss"], y, valid)
        terms["miss_kd"] = self._kd(out["logits"], out["logits_miss"], self.tau, valid)
        return terms


def _proj(d_in: int, d_out: int, spatial: bool) -> nn.Module:
    """Linear -> BN -> ReLU (per pixel as 1x1 conv for maps)."""
    if spatial:
        return nn.Sequential(nn.Conv2d(d_in, d_out, 1), nn.BatchNorm2d(d_out), nn.ReLU())
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU())


@register_method("mdico")
class MDiCo(DecisionLevelModel):
    """MDiCo (Mena et al. 2025): disentangled shared/specific/unused features.

    Architecture (authors' code): per modality a *specific* encoder whose D-dim output is split
    into the specific (first D/2) and unused (last D/2) features, and a *shared* encoder followed
    by Linear(D, D/2) -> BN -> ReLU (64-d each at D = 128). ``y_m = P_m(z_spe || z_sha)``.

    Terms (each modality-averaged term divided by M as in the code, unweighted sum):

    * ``main = sum_m CE(y, y_m) / M``;
    * ``aux = sum_m [CE(y, A(z_m^spe)) + CE(y, A(z_m^sha))] / 2 / M`` with one linear head A
      shared across modalities;
    * ``cont = sum_{m != j} NT-Xent(z_m^sha, z_j^sha; 0.1)`` over ordered pairs (symmetric
      NT-Xent, :func:`~cropmap.models.losses.nt_xent`);
    * ``disc = sum_m [CE(m, D_spe(z_m^spe)) + CE(m, D_unu(z_m^unused))] / 2 / M``.

    Paper vs code: the code feeds the 'unused' discriminator with the *shared* features, which
    contradicts the paper (shared features must be modality-invariant); this follows the paper
    and applies it to the unused features. Loss normalisation and temperature follow the code,
    where the paper is silent. All per-modality terms use only samples where m is available.
    """


    def __init__(self, *, temperature: float = 0.1, contrast_pixels: int = 512, **kw: Any):
        super().__init__(**kw)
        self.temperature = temperature
        self.contrast_pixels = contrast_pixels
        half = self.hidden // 2
        self.d_half = half
        self.shared_encoders = self._encoders()
        self.shared_proj = nn.ModuleDict(
            {m: _proj(self.hidden, half, self.spatial) for m in self.modalities}
        )
        self.heads = nn.ModuleDict(
            {m: PredictionHead(2 * half, self.n_out, self.hidden) for m in self.modalities}
        )
        self.aux_head = LinearHead(half, self.n_out)
        self.disc_specific = LinearHead(half, len(self.modalities))
        self.disc_unused = LinearHead(half, len(self.modalities))

    def _features(self, xs: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        spe = self._encode_all(self.encoders, xs, rows, self.hidden)
        feats = {}
        for i, m in enumerate(self.modalities):
            sha_full = self._run(self.shared_encoders[m], xs.get(m), rows[:, i], self.hidden)
            proj = self.shared_proj[m]
            sha = self._run(proj, sha_full if m in xs else None, rows[:, i], self.d_half)
            # [specific | unused | shared]
            feats[m] = torch.cat([spe[m], sha], 1)
        return feats

    def _head_input(self, feats: Mapping[str, Tensor], m: str) -> Tensor:
        f = feats[m]
        return torch.cat([f[:, : self.d_half], f[:, self.hidden :]], 1)

    def forward(self, batch: Batch) -> Output:
        out = super().forward(batch)
        f = out["features"]
        h = self.d_half
        out["specific"] = {m: v[:, :h] for m, v in f.items()}
        out["unused"] = {m: v[:, h : self.hidden] for m, v in f.items()}
        out["shared"] = {m: v[:, self.hidden :] for m, v in f.items()}
        return out

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        avail, per = out["avail"], out["per_modality"]
        n_mod = len(self.modalities)
        zero = torch.zeros((), device=avail.device)
        main, aux, disc = zero, zero, zero
        pooled: dict[str, dict[str, Tensor]] = {"specific": {}, "unused": {}, "shared": {}}
        rows, avail_rows = self._sample_rows(avail, self.contrast_pixels)
        valid: dict[str, Tensor] = {}
        for i, m in enumerate(self.modalities):
            a = avail[:, i]
            main = main + self._sup(per[m], y, a) / n_mod
            aux = aux + (
                self._sup(self.aux_head(out["specific"][m]), y, a)
                + self._sup(self.aux_head(out["shared"][m]), y, a)
            ) / (2 * n_mod)
            for k in pooled:
                pooled[k][m] = rows(out[k][m])
            valid[m] = avail_rows[:, i]
            disc = disc + (
                L.modality_ce(self.disc_specific(pooled["specific"][m]), i, valid[m])
                + L.modality_ce(self.disc_unused(pooled["unused"][m]), i, valid[m])
            ) / (2 * n_mod)
        cont = zero
        for m, j in itertools.permutations(self.modalities, 2):
            both = valid[m] & valid[j]
            cont = cont + L.nt_xent(
                pooled["shared"][m][both], pooled["shared"][j][both], self.temperature
            )
        return {"main": main, "aux": aux, "cont": cont, "disc": disc}


@register_method("dsensd")
class DSensDPlus(DecisionLevelModel):
    """DSensD+ (Mena et al. 2025, authors' code): sensor dropout + mutual distillation.

    Terms: ``drop = CE(y, fused over the ModDrop-kept modalities)``, ``main = CE(y, y_full)``,
    ``mut_ce = sum_v CE(y, y_v) / M`` and ``mut_kd = sum_v tau^2 KL(y_full.detach()/tau ||
    y_v/tau) / M`` (M = number of configured modalities, as the code divides).

    The code runs a second forward pass with dropped sensors; with decision-level fusion the
    dropped-sensor prediction is the mean of the same per-modality logits over the kept
    sensors, so it is computed from the single pass here (only dropout noise differs).

    Args:
        alpha: probability of *keeping* a modality in the dropped pass (default 0.5).
        tau: distillation temperature (default 0.5).
    """


    def __init__(self, *, alpha: float = 0.5, tau: float = 0.5, **kw: Any):
        super().__init__(**kw)
        self.alpha, self.tau = alpha, tau

    def _extra(self, out: Output, stacked: Tensor, avail: Tensor) -> None:
        self._dropped(out, stacked, avail, self.alpha)

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        avail, fused, per = out["avail"], out["logits"], out["per_modality"]
        n_mod = len(self.modalities)
        any_a = avail.any(1)
        terms = {"main": self._sup(fused, y, any_a)}
        terms["drop"] = self._sup(out["logits_miss"], y, out["keep"].any(1))
        terms["mut_ce"] = (
            sum(
                (self._sup(per[m], y, avail[:, i]) for i, m in enumerate(self.modalities)),
                torch.zeros((), device=fused.device),
            )
            / n_mod
        )
        terms["mut_kd"] = (
            sum(
                (
                    self._kd(fused, per[m], self.tau, avail[:, i])
                    for i, m in enumerate(self.modalities)
                ),
                torch.zeros((), device=fused.device),
            )
            / n_mod
        )
        return terms
