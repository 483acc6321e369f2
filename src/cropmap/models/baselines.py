"""The baselines of the missing-sensor protocol: feature averaging (FCoM-av, ModDrop), feature
and input fusion, and uni-modal models.

Papers: FCoM-av, F. Mena, D. Arenas and A. Dengel (2025), *Missing data as augmentation in the
Earth observation domain: a multi-view learning approach* (Neurocomputing 638); ModDrop / sensor
dropout as in TIMML, G. Xu et al. (2024), *Transformer-based incomplete multi-modal learning for
land cover classification* (IGARSS). Input-level, feature-level and uni-modal models are the
classic fusion baselines those papers compare against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cropmap.modalities import TEMPORAL
from cropmap.models.base import Batch, CoLearningModel, DecisionLevelModel, Output
from cropmap.models.encoders import build_encoder
from cropmap.models.fusion import fuse_mean, moddrop_keep
from cropmap.models.heads import PredictionHead
from cropmap.models.registry import register_method


class _FeatureMean(CoLearningModel):
    """Per-modality encoders, features averaged over a set of modalities, one shared head."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.encoders = self._encoders()
        self.head = PredictionHead(self.hidden, self.n_out, self.hidden)

    def _fused(self, feats: Mapping[str, Tensor], sel: Tensor) -> Tensor:
        stacked = torch.stack([feats[m] for m in self.modalities], 1)
        logits = self.head(fuse_mean(stacked, sel))
        return logits * sel.any(1, keepdim=True)

    def forward(self, batch: Batch) -> Output:
        xs, avail, rows = self._prepare(batch)
        self._set_hw(xs)
        feats = self._encode_all(self.encoders, xs, rows, self.hidden)
        per = {m: self.head(feats[m]) * self._a(avail, i) for i, m in enumerate(self.modalities)}
        out: Output = {
            "logits": self._fused(feats, avail),
            "per_modality": per,
            "avail": avail,
            "features": feats,
        }
        self._extra(out, feats, avail)
        return out

    def _extra(self, out: Output, feats: Mapping[str, Tensor], avail: Tensor) -> None:
        pass


@register_method("fcom_av")
class FCoMAv(_FeatureMean):
    """FCoM-av (Mena, Arenas & Dengel 2025): feature averaging over available modalities.

    Training uses every one of the ``2^M - 1`` non-empty modality combinations of each batch
    (missing data as augmentation): for combination c the features are averaged over the
    modalities in c that are available, one head predicts, and ``main`` is the mean of the
    combinations' CE (each over the samples having at least one modality of c), i.e. the CE of
    the augmented batch.
    """


    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        avail, feats = out["avail"], out["features"]
        n_mod = len(self.modalities)
        losses = []
        for code in range(1, 2**n_mod):
            sel_m = torch.tensor([(code >> i) & 1 for i in range(n_mod)], dtype=torch.bool)
            shape = [1, n_mod] + [1] * (avail.dim() - 2)
            sel = avail & sel_m.to(avail.device).view(shape)
            losses.append(self._sup(self._fused(feats, sel), y, sel.any(1)))
        return {"main": torch.stack(losses).mean()}


@register_method("moddrop")
class ModDrop(_FeatureMean):
    """ModDrop / sensor dropout (as in TIMML, Xu et al. 2024): feature averaging, random modality drops.

    In training the features are averaged over the ModDrop-kept modalities (each available
    modality kept with probability ``alpha``, never all dropped) and ``drop = CE(y, head(.))``
    is the only term. At inference the available modalities are averaged.

    Args:
        alpha: probability of keeping a modality (default 0.5).
    """


    def __init__(self, *, alpha: float = 0.5, **kw: Any):
        super().__init__(**kw)
        self.alpha = alpha

    def _extra(self, out: Output, feats: Mapping[str, Tensor], avail: Tensor) -> None:
        keep = moddrop_keep(avail, self.alpha, self.generator) if self.training else avail
        out["keep"] = keep
        out["logits_miss"] = self._fused(feats, keep)

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        return {"drop": self._sup(out["logits_miss"], y, out["keep"].any(1))}


@register_method("input_fusion")
class InputFusion(CoLearningModel):
    """Input-level fusion baseline: all modalities stacked along channels, missing ones zero.

    Classification: temporal inputs ``[B, T, C_m]`` are concatenated to ``[B, T, sum C_m]``; a
    static modality is repeated over the T steps. Segmentation: all channels (time-major per
    modality) are concatenated. One encoder (``encoders["input"]``, else the first modality's
    encoder name) and one head; ``main = CE(y, fused)``. ``per_modality`` is empty: the model
    has no per-modality prediction.
    """

    sensor_encoders = False  # one encoder over the stacked sensors

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        temporal = [m for m in self.modalities if TEMPORAL[m]]
        self._temporal = bool(temporal) or self.spatial
        name = self.encoder_names.get("input", self.encoder_names[self.modalities[0]])
        if not self.spatial and not temporal:
            name = self.encoder_names.get("input", "mlp")
        elif not self.spatial and name == "mlp":
            name = self.encoder_names[temporal[0]]
        if self.spatial:
            c_in = sum(
                self.in_channels[m] * (self.n_steps if TEMPORAL[m] else 1) for m in self.modalities
            )
            steps = 1
        else:
            c_in = sum(self.in_channels[m] for m in self.modalities)
            steps = self.n_steps
        self.encoder = build_encoder(
            name,
            task=self.task,
            temporal=self._temporal and not self.spatial,
            in_channels=c_in,
            n_steps=steps,
            hidden=self.hidden,
            dropout=self.dropout,
        )
        self.head = PredictionHead(self.hidden, self.n_out, self.hidden)

    def forward(self, batch: Batch) -> Output:
        xs, avail, _ = self._prepare(batch)
        ref = next(iter(xs.values()))
        b = ref.shape[0]
        parts = []
        for m in self.modalities:
            x = xs.get(m)
            c = self.in_channels[m]
            if self.spatial:
                if x is None:
                    x = ref.new_zeros(b, c * (self.n_steps if TEMPORAL[m] else 1), *ref.shape[-2:])
            elif TEMPORAL[m]:
                x = ref.new_zeros(b, self.n_steps, c) if x is None else x
            elif self._temporal:
                x = (
                    ref.new_zeros(b, self.n_steps, c)
                    if x is None
                    else x.unsqueeze(1).expand(b, self.n_steps, c)
                )
            elif x is None:
                x = ref.new_zeros(b, c)
            parts.append(x)
        z = torch.cat(parts, 1 if self.spatial or not self._temporal else 2)
        any_a = avail.any(1)
        rows = any_a.flatten(1).any(1) if self.spatial else any_a
        self._hw = tuple(z.shape[-2:]) if self.spatial else ()
        feats = self._run(self.encoder, z, rows, self.hidden)
        logits = self.head(feats) * any_a.unsqueeze(1)
        return {"logits": logits, "per_modality": {}, "avail": avail, "features": feats}

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        return {"main": self._sup(out["logits"], y, out["avail"].any(1))}


@register_method("feature_fusion")
class FeatureFusion(CoLearningModel):
    """Feature-level fusion baseline: per-modality encoders, features concatenated (zero-filled
    where a modality is missing), one head on the ``M * D`` vector; ``main = CE(y, fused)``.

    ``per_modality[m]`` is the head applied with only m's features (the others zero).
    """


    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.encoders = self._encoders()
        self.head = PredictionHead(self.hidden * len(self.modalities), self.n_out, self.hidden)

    def _cat(self, feats: Mapping[str, Tensor], sel: Tensor) -> Tensor:
        parts = [
            feats[m] * self._a(sel, i).to(feats[m].dtype) for i, m in enumerate(self.modalities)
        ]
        return self.head(torch.cat(parts, 1)) * sel.any(1, keepdim=True)

    def forward(self, batch: Batch) -> Output:
        xs, avail, rows = self._prepare(batch)
        self._set_hw(xs)
        feats = self._encode_all(self.encoders, xs, rows, self.hidden)
        per = {}
        for i, m in enumerate(self.modalities):
            only = torch.zeros_like(avail)
            only[:, i] = avail[:, i]
            per[m] = self._cat(feats, only)
        return {
            "logits": self._cat(feats, avail),
            "per_modality": per,
            "avail": avail,
            "features": feats,
        }

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        return {"main": self._sup(out["logits"], y, out["avail"].any(1))}


@register_method("unimodal")
class Unimodal(DecisionLevelModel):
    """Uni-modal baselines: one encoder + head per modality, trained separately.

    The loss is ``sum_m CE(y, y_m)`` over samples where m is available; the parameters are
    disjoint, so the gradients (and Adam's per-parameter updates) equal those of separate
    trainings. At inference the available modalities' logits are averaged (decision fusion).
    """


    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        avail = out["avail"]
        return {
            f"ce_{m}": self._sup(out["per_modality"][m], y, avail[:, i])
            for i, m in enumerate(self.modalities)
        }
