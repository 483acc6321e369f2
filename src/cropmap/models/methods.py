"""The multi-modal methods: one class per method on a shared base, :class:`CoLearningModel`.

Common contract (see ``cropmap.models`` for the batch layout):

* Inputs: NaN/inf -> 0, and every modality is zero-filled wherever ``mask`` says it is missing
  *before* encoding. Encoders only see the samples (classification) or chips (segmentation) where
  their modality is available at all, so a missing modality can influence nothing, batch-norm
  statistics included; a modality absent from the whole batch skips its encoder. (Exception: a
  training batch with a single such sample runs the encoder on the whole zero-filled batch,
  because batch norm cannot train on one sample.)
* ``out["logits"]``: fused logits; for decision-level methods the mean of the per-modality
  logits over the *available* modalities (per pixel for per-pixel masks); 0 where no modality is
  available; never NaN. ``out["per_modality"][m]``: logits of modality m, 0 where unavailable.
  ``out["avail"]``: bool ``[B, M]`` (classification) / ``[B, M, H, W]`` (segmentation).
* ``loss(out, batch)``: dict of named terms plus ``"total"`` (their unweighted sum); the same
  keys in eval mode, where ModDrop-style terms drop nothing (a deterministic validation loss).
  Supervised terms ignore positions without label (``-100``) and, for per-modality terms, positions where
  that modality is missing.
* For segmentation the feature-level terms (contrastive, modality discriminant) use per-chip
  features, mean-pooled over the pixels where the modality is available; the predictive and
  distillation terms are per pixel.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cropmap.errors import UnknownNameError
from cropmap.modalities import MODALITIES, TEMPORAL
from cropmap.models import losses as L
from cropmap.models.encoders import build_encoder
from cropmap.models.fusion import fuse_mean, masked_pool, moddrop_keep
from cropmap.models.heads import LinearHead, PredictionHead

Task = Literal["classification", "segmentation"]
TASKS: tuple[str, ...] = ("classification", "segmentation")
HEADS: tuple[str, ...] = ("multiclass", "binary", "multilabel", "regression")

Batch = Mapping[str, Any]
Output = dict[str, Any]


class CoLearningModel(nn.Module, abc.ABC):
    """Base class: input preparation, masked encoding, fusion, prediction.

    Subclasses (one per method) implement :meth:`forward` and :meth:`_terms`.

    Args:
        task: ``"classification"`` (pixel time series) or ``"segmentation"`` (chips).
        modalities: subset of :data:`cropmap.modalities.MODALITIES`; the order of ``mask``'s M axis.
        in_channels: channels per time step of each modality.
        n_steps: time steps T of temporal modalities.
        n_classes: K (for ``head="binary"`` the model has a single logit).
        hidden: encoder width D.
        encoders: encoder name per modality (defaults: ``tempcnn`` temporal / ``mlp`` static for
            classification, ``unet`` for segmentation).
        head: ``multiclass`` | ``binary`` | ``multilabel`` | ``regression``.
        class_weights: ``[K]`` weights of the supervised loss (``[2]`` for binary), or None.
        generator: RNG for the method's random draws (ModDrop); the global RNG when None.
        dropout: dropout of the encoders.
    """

    method: ClassVar[str] = ""

    def __init__(
        self,
        *,
        task: Task,
        modalities: Sequence[str],
        in_channels: Mapping[str, int],
        n_steps: int,
        n_classes: int,
        hidden: int = 128,
        encoders: Mapping[str, str] | None = None,
        head: str = "multiclass",
        class_weights: Tensor | Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        dropout: float = 0.2,
    ):
        super().__init__()
        if task not in TASKS:
            raise UnknownNameError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
        if head not in HEADS:
            raise UnknownNameError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
        mods = list(modalities)
        for m in mods:
            if m not in MODALITIES:
                raise UnknownNameError(f"unknown modality {m!r}; valid: {', '.join(MODALITIES)}")
        if not mods or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be non-empty and unique, got {mods}")
        missing = [m for m in mods if m not in in_channels]
        if missing:
            raise ValueError(f"in_channels lacks {missing}; give channels per time step")
        self.task: Task = task
        self.spatial = task == "segmentation"
        self.modalities: list[str] = mods
        self.in_channels = {m: int(in_channels[m]) for m in mods}
        self.n_steps = int(n_steps)
        self.n_classes = int(n_classes)
        self.hidden = int(hidden)
        self.head_kind: L.HeadKind = head  # type: ignore[assignment]
        self.n_out = 1 if head == "binary" else self.n_classes
        self.dropout = dropout
        self.generator = generator
        enc = dict(encoders or {})
        for name in enc:  # entries for known but unselected modalities are ignored
            if name not in MODALITIES and name != "input":
                valid = ", ".join((*MODALITIES, "input"))
                raise UnknownNameError(
                    f"encoders given for unknown modality {name!r}; valid: {valid}"
                )
        self.encoder_names = {m: enc.get(m, self._default_encoder(m)) for m in mods}
        if "input" in enc:
            self.encoder_names["input"] = enc["input"]
        w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", w, persistent=False)  # config, not state

    # ------------------------------------------------------------------ building blocks
    def _default_encoder(self, m: str) -> str:
        if self.spatial:
            return "unet"
        return "tempcnn" if TEMPORAL[m] else "mlp"

    def _encoder(self, m: str, out: int | None = None) -> nn.Module:
        return build_encoder(
            self.encoder_names[m],
            task=self.task,
            temporal=TEMPORAL[m],
            in_channels=self.in_channels[m],
            n_steps=self.n_steps,
            hidden=out or self.hidden,
            dropout=self.dropout,
        )

    def _encoders(self) -> nn.ModuleDict:
        return nn.ModuleDict({m: self._encoder(m) for m in self.modalities})

    # ------------------------------------------------------------------ inputs
    def _prepare(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Clean inputs.

        Returns:
            ``xs``: modality -> zero-filled float input (only modalities present in ``batch``);
            ``avail``: bool ``[B, M]`` or ``[B, M, H, W]``;
            ``rows``: bool ``[B, M]``, samples/chips where the modality is available anywhere.
        """
        present = [m for m in self.modalities if m in batch and batch[m] is not None]
        if not present:
            raise ValueError(f"batch holds none of the modalities {self.modalities}")
        raw: dict[str, Tensor] = {}
        for m in present:
            x = torch.as_tensor(batch[m])
            if self.spatial and x.dim() == 5:  # [B, T, C, H, W] -> time-major channels
                x = x.flatten(1, 2)
            raw[m] = x.float()
        ref = raw[present[0]]
        b = ref.shape[0]
        n_mod = len(self.modalities)
        mask = batch.get("mask")
        if mask is None:
            avail = torch.ones(b, n_mod, dtype=torch.bool, device=ref.device)
        else:
            avail = torch.as_tensor(mask).to(device=ref.device, dtype=torch.bool).clone()
            if avail.shape[:2] != (b, n_mod):
                raise ValueError(
                    f"mask has shape {tuple(avail.shape)}; expected [B={b}, M={n_mod}, ...] "
                    f"for modalities {self.modalities}"
                )
        if self.spatial and avail.dim() == 2:
            h, w = ref.shape[-2:]
            avail = avail[:, :, None, None].expand(b, n_mod, h, w).clone()
        for i, m in enumerate(self.modalities):
            if m not in raw:
                avail[:, i] = False
        xs: dict[str, Tensor] = {}
        for i, m in enumerate(self.modalities):
            if m not in raw:
                continue
            x = torch.nan_to_num(raw[m], nan=0.0, posinf=0.0, neginf=0.0)
            a = avail[:, i]
            a = a.unsqueeze(1) if self.spatial else a.view(b, *([1] * (x.dim() - 1)))
            xs[m] = torch.where(a, x, torch.zeros((), dtype=x.dtype, device=x.device))
        rows = avail.flatten(2).any(2) if self.spatial else avail
        return xs, avail, rows

    def _run(self, encoder: nn.Module, x: Tensor | None, rows: Tensor, out_dim: int) -> Tensor:
        """Encode only the rows where the modality is available; zeros elsewhere."""
        b = rows.shape[0]
        n = int(rows.sum())
        if x is None or n == 0:
            shape: tuple[int, ...] = (b, out_dim)
            if self.spatial and x is not None:
                shape += tuple(x.shape[-2:])
            elif self.spatial:
                shape += tuple(self._hw)
            ref = x if x is not None else rows
            return torch.zeros(shape, device=ref.device)
        if n == b or (self.training and n == 1):
            return encoder(x)
        f = encoder(x[rows])
        out = f.new_zeros((b, *f.shape[1:]))
        out[rows] = f
        return out

    def _a(self, avail: Tensor, i: int) -> Tensor:
        """Availability of modality ``i`` broadcastable to ``[B, K(, H, W)]``."""
        return avail[:, i].unsqueeze(1)

    def _encode_all(
        self, encoders: nn.ModuleDict, xs: Mapping[str, Tensor], rows: Tensor, dim: int
    ) -> dict[str, Tensor]:
        return {
            m: self._run(encoders[m], xs.get(m), rows[:, i], dim)
            for i, m in enumerate(self.modalities)
        }

    def _set_hw(self, xs: Mapping[str, Tensor]) -> None:
        first = next(iter(xs.values()))
        self._hw = tuple(first.shape[-2:]) if self.spatial else ()

    # ------------------------------------------------------------------ API
    @abc.abstractmethod
    def forward(self, batch: Batch) -> Output:
        """Fused and per-modality logits plus method-specific tensors."""

    def loss(self, out: Output, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms and ``"total"`` (their unweighted sum)."""
        terms = self._terms(out, batch["y"])
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    @abc.abstractmethod
    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        """The method's named loss terms (:meth:`loss` adds ``"total"``)."""

    def _sup(self, logits: Tensor, y: Tensor, valid: Tensor | None) -> Tensor:
        return L.task_loss(self.head_kind, logits, y, self.class_weights, valid)

    def _kd(self, teacher: Tensor, student: Tensor, tau: float, valid: Tensor | None) -> Tensor:
        return L.distill_loss(self.head_kind, teacher, student, tau, valid)

    @torch.no_grad()
    def predict_proba(self, batch: Batch) -> Tensor:
        """Probabilities of the fused prediction in eval mode (the training mode is restored).

        Softmax over classes for ``multiclass`` (uniform where no modality is available),
        sigmoid for ``binary``/``multilabel``, raw values for ``regression``.
        """
        was = self.training
        self.eval()
        try:
            logits = self(batch)["logits"]
        finally:
            self.train(was)
        if self.head_kind == "multiclass":
            return torch.softmax(logits, dim=1)
        if self.head_kind == "regression":
            return logits
        return torch.sigmoid(logits)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, task={self.task!r}, modalities={self.modalities}"


# ====================================================================== decision-level methods
class _DecisionLevel(CoLearningModel):
    """Encoder + :class:`PredictionHead` per modality, fused by the mean of logits."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.encoders = self._encoders()
        self.heads = nn.ModuleDict(
            {m: PredictionHead(self.hidden, self.n_out, self.hidden) for m in self.modalities}
        )

    def _features(self, xs: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        return self._encode_all(self.encoders, xs, rows, self.hidden)

    def _head_input(self, feats: Mapping[str, Tensor], m: str) -> Tensor:
        return feats[m]

    def forward(self, batch: Batch) -> Output:
        xs, avail, rows = self._prepare(batch)
        self._set_hw(xs)
        feats = self._features(xs, rows)
        per = {
            m: self.heads[m](self._head_input(feats, m)) * self._a(avail, i)
            for i, m in enumerate(self.modalities)
        }
        stacked = torch.stack([per[m] for m in self.modalities], 1)
        out: Output = {
            "logits": fuse_mean(stacked, avail),
            "per_modality": per,
            "avail": avail,
            "features": feats,
        }
        self._extra(out, stacked, avail)
        return out

    def _extra(self, out: Output, stacked: Tensor, avail: Tensor) -> None:
        """Hook for method-specific outputs (e.g. the ModDrop-fused logits in training)."""

    def _dropped(self, out: Output, stacked: Tensor, avail: Tensor, keep_prob: float) -> None:
        """``out["keep"]`` and ``out["logits_miss"]``: ModDrop in training, no drop in eval."""
        keep = moddrop_keep(avail, keep_prob, self.generator) if self.training else avail
        out["keep"] = keep
        out["logits_miss"] = fuse_mean(stacked, keep)


class Unimodal(_DecisionLevel):
    """Uni-modal baselines: one encoder + head per modality, trained separately.

    The loss is ``sum_m CE(y, y_m)`` over samples where m is available; the parameters are
    disjoint, so the gradients (and Adam's per-parameter updates) equal those of separate
    trainings. At inference the available modalities' logits are averaged (decision fusion).
    """

    method = "unimodal"

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        avail = out["avail"]
        return {
            f"ce_{m}": self._sup(out["per_modality"][m], y, avail[:, i])
            for i, m in enumerate(self.modalities)
        }


class DSensDPlus(_DecisionLevel):
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

    method = "dsensd"

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


class _FeatureCoLearning(_DecisionLevel):
    """FullCo / Co-Miss feature level (Mena et al., seed 000).

    Each modality's encoder output (D = ``hidden``) is split into shared features (first
    ``D // 2`` channels) and specific features (the rest): ``z_sha, z_spe = E_m(X_m)``, and
    ``y_m = P_m(z_sha || z_spe)`` with the per-modality :class:`PredictionHead`. Terms:

    * ``main = CE(y, y_full)`` (eq. 3);
    * ``mod = sum_m CE(m, P_spe(z_m^spe))`` with one linear layer ``P_spe`` shared by all
      modalities (eq. 4), over samples where m is available;
    * ``cont = sum_m sum_{j != m} InfoNCE(z_m^sha, z_j^sha; gamma)`` (eq. 5), cosine, positives
      the same sample, negatives the other samples of the batch where both are available.

    The paper does not say how one encoder yields both feature sets; splitting its output in
    halves is the MDiCo code's convention for its specific/unused features.
    """

    def __init__(self, *, gamma: float = 0.07, tau: float = 0.5, **kw: Any):
        super().__init__(**kw)
        self.gamma, self.tau = gamma, tau
        self.n_sha = self.hidden // 2
        self.mod_head = LinearHead(self.hidden - self.n_sha, len(self.modalities))

    def _feature_terms(self, out: Output) -> dict[str, Tensor]:
        avail, feats = out["avail"], out["features"]
        pooled, valid = {}, {}
        for i, m in enumerate(self.modalities):
            pooled[m], valid[m] = masked_pool(feats[m], avail[:, i])
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


class FullCo(_FeatureCoLearning):
    """FullCo (seed 000, eq. 1): ``main + mod + cont + sum_m L_mut^m``.

    ``L_mut^m = CE(y, y_m) + tau^2 KD(y_full, y_m; tau)`` (eq. 6) over samples where m is
    available, reported as ``mut_ce`` and ``mut_kd`` (each summed over m). KD detaches the
    teacher ``y_full``, as the DSensD+ code does. Defaults: ``tau=0.5``, ``gamma=0.07``.
    """

    method = "fullco"

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


class CoMiss(_FeatureCoLearning):
    """Co-Miss (seed 000, eq. 2): ``main + mod + cont + L_miss``.

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

    method = "comiss"

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


class MDiCo(_DecisionLevel):
    """MDiCo (Mena et al. 2025, seeds 001/002): disentangled shared/specific/unused features.

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

    method = "mdico"

    def __init__(self, *, temperature: float = 0.1, **kw: Any):
        super().__init__(**kw)
        self.temperature = temperature
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
        valid: dict[str, Tensor] = {}
        for i, m in enumerate(self.modalities):
            a = avail[:, i]
            main = main + self._sup(per[m], y, a) / n_mod
            aux = aux + (
                self._sup(self.aux_head(out["specific"][m]), y, a)
                + self._sup(self.aux_head(out["shared"][m]), y, a)
            ) / (2 * n_mod)
            for k in pooled:
                pooled[k][m], valid[m] = masked_pool(out[k][m], a)
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


# ====================================================================== feature/input fusion
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


class FCoMAv(_FeatureMean):
    """FCoM-av (Mena et al., Neurocomputing 2025): feature averaging over available modalities.

    Training uses every one of the ``2^M - 1`` non-empty modality combinations of each batch
    (missing data as augmentation): for combination c the features are averaged over the
    modalities in c that are available, one head predicts, and ``main`` is the mean of the
    combinations' CE (each over the samples having at least one modality of c), i.e. the CE of
    the augmented batch.
    """

    method = "fcom_av"

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


class ModDrop(_FeatureMean):
    """ModDrop / sensor dropout (TIMML-like): feature averaging with random modality dropping.

    In training the features are averaged over the ModDrop-kept modalities (each available
    modality kept with probability ``alpha``, never all dropped) and ``drop = CE(y, head(.))``
    is the only term. At inference the available modalities are averaged.

    Args:
        alpha: probability of keeping a modality (default 0.5).
    """

    method = "moddrop"

    def __init__(self, *, alpha: float = 0.5, **kw: Any):
        super().__init__(**kw)
        self.alpha = alpha

    def _extra(self, out: Output, feats: Mapping[str, Tensor], avail: Tensor) -> None:
        keep = moddrop_keep(avail, self.alpha, self.generator) if self.training else avail
        out["keep"] = keep
        out["logits_miss"] = self._fused(feats, keep)

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        return {"drop": self._sup(out["logits_miss"], y, out["keep"].any(1))}


class FeatureFusion(CoLearningModel):
    """Feature-level fusion baseline: per-modality encoders, features concatenated (zero-filled
    where a modality is missing), one head on the ``M * D`` vector; ``main = CE(y, fused)``.

    ``per_modality[m]`` is the head applied with only m's features (the others zero).
    """

    method = "feature_fusion"

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


class InputFusion(CoLearningModel):
    """Input-level fusion baseline: all modalities stacked along channels, missing ones zero.

    Classification: temporal inputs ``[B, T, C_m]`` are concatenated to ``[B, T, sum C_m]``; a
    static modality is repeated over the T steps. Segmentation: all channels (time-major per
    modality) are concatenated. One encoder (``encoders["input"]``, else the first modality's
    encoder name) and one head; ``main = CE(y, fused)``. ``per_modality`` is empty: the model
    has no per-modality prediction.
    """

    method = "input_fusion"

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


#: Method name -> class.
REGISTRY: dict[str, type[CoLearningModel]] = {
    cls.method: cls
    for cls in (
        FullCo,
        CoMiss,
        MDiCo,
        DSensDPlus,
        FCoMAv,
        ModDrop,
        InputFusion,
        FeatureFusion,
        Unimodal,
    )
}
