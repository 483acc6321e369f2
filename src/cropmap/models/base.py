"""The shared base of every multi-modal method, :class:`CoLearningModel`, and the decision-level base.

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
* For segmentation the samples of the feature-level terms (contrastive, modality discriminant)
  are pixels: up to ``contrast_pixels`` (default 512) drawn across the chip batch where a
  modality is present, the other drawn pixels being the negatives (as the samples of a
  classification batch); the predictive and distillation terms are per pixel.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cropmap.errors import UnknownNameError
from cropmap.modalities import MODALITIES, TEMPORAL
from cropmap.models import losses as L
from cropmap.models.encoders import build_encoder
from cropmap.models.fusion import fuse_mean, moddrop_keep, pixel_index, pixel_rows
from cropmap.models.heads import PredictionHead
from cropmap.models.registry import TASKS, Task

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
        loss_weights: weight of named loss terms in ``total`` (``{"cont": 0.1}``; default 1 each):
            ``model.options.loss_weights``. The papers sum their terms unweighted.
    """

    #: Set by :func:`~cropmap.models.registry.register_method`.
    method: ClassVar[str] = ""
    tasks: ClassVar[tuple[Task, ...]] = TASKS
    #: Whether the method encodes each sensor with its own encoder (what pixel pretraining
    #: initialises, :mod:`cropmap.models.pixel_pretrain`).
    sensor_encoders: ClassVar[bool] = True

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
        loss_weights: Mapping[str, float] | None = None,
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
        self.loss_weights = {str(k): float(v) for k, v in (loss_weights or {}).items()}
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
        """Named loss terms and ``"total"``: their sum, each term times its ``loss_weights`` entry (default 1)."""
        terms = self._terms(out, batch["y"])
        unknown = sorted(set(self.loss_weights) - set(terms))
        if unknown:
            raise UnknownNameError(f"model.options.loss_weights names {unknown}, not loss terms of {self.method}; "
                                   f"valid: {', '.join(terms)}")
        terms["total"] = torch.stack([v * self.loss_weights.get(k, 1.0) for k, v in terms.items()]).sum()
        return terms

    @abc.abstractmethod
    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        """The method's named loss terms (:meth:`loss` adds ``"total"``)."""

    def _sup(self, logits: Tensor, y: Tensor, valid: Tensor | None) -> Tensor:
        return L.task_loss(self.head_kind, logits, y, self.class_weights, valid)

    def _kd(self, teacher: Tensor, student: Tensor, tau: float, valid: Tensor | None) -> Tensor:
        return L.distill_loss(self.head_kind, teacher, student, tau, valid)

    def _sample_rows(self, avail: Tensor, n: int) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """The samples of the feature-level terms: a gather function and their availability ``[N, M]``.

        Classification: the batch's samples (identity). Segmentation: up to ``n`` pixels of the
        chip batch with data (:func:`~cropmap.models.fusion.pixel_index`; random in training,
        evenly spaced in eval), so the contrastive and modality-discriminant terms see pixels as
        the papers' samples, with the other drawn pixels as negatives.
        """
        if not self.spatial:
            return (lambda z: z), avail
        idx = pixel_index(avail, n, self.generator, self.training)
        return (lambda z: pixel_rows(z, idx)), pixel_rows(avail, idx)

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


class DecisionLevelModel(CoLearningModel):
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
