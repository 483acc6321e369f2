"""Self-supervised pretraining of the per-sensor pixel encoders (:class:`PixelMAE`).

Masked reconstruction across months and sensors, the pixel-time-series version of MultiMAE
(R. Bachmann, D. Mizrahi, A. Atanov and A. Zamir (2022), *MultiMAE: Multi-modal Multi-task
Masked Autoencoders*):

* each present sensor of a pixel is hidden with probability ``modality_mask``, at least one
  staying visible (:func:`cropmap.augment.drop_modalities`), and each month of a visible
  temporal sensor with probability ``month_mask`` (:func:`cropmap.augment.mask_months`);
* one encoder per sensor, built by :func:`cropmap.models.encoders.build_encoder` with the
  names and width of the model that is fine-tuned (``model.encoders``, ``model.hidden``),
  encodes what is visible (a hidden sensor is never encoded); the features are averaged over
  the visible sensors (:func:`cropmap.models.fusion.fuse_mean`);
* one small decoder per sensor reconstructs the sensor's whole normalised series from the
  fused features; the loss (:func:`reconstruction_terms`) is the mean squared error on the
  hidden values (hidden months, hidden sensors) that are valid in the data, per sensor, then
  averaged over the sensors that had any.

:mod:`cropmap.pretrain` drives it and writes the checkpoint (:meth:`PixelMAE.checkpoint`);
:func:`load_encoders` copies its encoders into a co-learning model's ``encoders`` (and MDiCo's
``shared_encoders``) and :func:`init_module` does that for fine-tuning
(:func:`cropmap.train.fit`), which then normalises with the checkpoint's statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cropmap.augment import drop_modalities, mask_months
from cropmap.errors import ConfigError, InputDataError
from cropmap.modalities import TEMPORAL
from cropmap.models.encoders import build_encoder
from cropmap.models.fusion import fuse_mean

if TYPE_CHECKING:
    from cropmap.loop import CoLearningModule

log = logging.getLogger(__name__)

#: Format tag of the checkpoints :meth:`PixelMAE.checkpoint` writes.
CKPT_FORMAT = "cropmap-pixel-pretrain/1"
#: The ``ModuleDict`` attributes of a co-learning model that hold per-sensor encoders.
ENCODER_ATTRS: tuple[str, ...] = ("encoders", "shared_encoders")


def pixel_pretrainable(method: str) -> bool:
    """Whether ``method`` classifies pixels with per-sensor encoders trained by gradient steps
    (the methods the pixel pretraining serves; not the tree references nor ``input_fusion``)."""
    from cropmap.models.registry import method_class

    cls = method_class(method)
    return ("classification" in cls.tasks and not getattr(cls, "gradient_free", False)
            and bool(getattr(cls, "sensor_encoders", True)))


def encoder_names(modalities: Sequence[str], encoders: Mapping[str, str] | None) -> dict[str, str]:
    """Encoder name per sensor: the configured one, else ``tempcnn`` (temporal) / ``mlp`` (static),
    the classification defaults of :class:`cropmap.models.base.CoLearningModel`."""
    enc = dict(encoders or {})
    return {m: enc.get(m, "tempcnn" if TEMPORAL[m] else "mlp") for m in modalities}


def reconstruction_terms(pred: Mapping[str, Tensor], batch: Mapping[str, Tensor], visible: Mapping[str, Tensor],
                         modalities: Sequence[str]) -> dict[str, Tensor]:
    """Per-sensor MSE on the hidden values that are valid in the data, and their mean.

    Args:
        pred: ``{m: [B, T*C]}`` (static ``[B, C]``) reconstructions.
        batch: the normalised batch ``{m: [B, T, C] / [B, C], "mask": [B, M]}`` (NaN invalid).
        visible: the same batch after masking (hidden values NaN, hidden sensors' ``mask`` False).
        modalities: order of the mask's M axis.

    Returns:
        ``rec_<m>`` for every sensor with a hidden valid value, and ``total``: their mean (a zero
        connected to ``pred`` when nothing is hidden).
    """
    avail, shown = batch["mask"].bool(), visible["mask"].bool()
    terms: dict[str, Tensor] = {}
    for i, m in enumerate(modalities):
        n = len(avail)
        target = batch[m].float().reshape(n, -1)
        seen = visible[m].float().reshape(n, -1)
        valid = torch.isfinite(target) & avail[:, i : i + 1]
        hidden = valid & ~(torch.isfinite(seen) & shown[:, i : i + 1])
        if bool(hidden.any()):
            terms[f"rec_{m}"] = ((pred[m].float() - torch.nan_to_num(target)) ** 2)[hidden].mean()
    zero = sum(p.sum() for p in pred.values()) * 0.0
    terms["total"] = torch.stack(list(terms.values())).mean() if terms else torch.as_tensor(zero)
    return terms


class PixelMAE(nn.Module):
    """Per-sensor encoders and reconstruction decoders (see the module docstring).

    Args:
        modalities: sensor order of the mask.
        in_channels: channels per time step of each sensor (its bands).
        n_steps: months T.
        hidden: encoder width (the fine-tuned model's ``model.hidden``).
        encoders: encoder name per sensor (:func:`encoder_names`).
        month_mask: probability of hiding a month of a visible temporal sensor.
        modality_mask: probability of hiding a present sensor (one always stays visible).
        dropout: encoder dropout.
        generator: RNG of the masks (the global one when None).
    """

    def __init__(self, modalities: Sequence[str], in_channels: Mapping[str, int], n_steps: int, hidden: int,
                 encoders: Mapping[str, str] | None = None, month_mask: float = 0.5, modality_mask: float = 0.5,
                 dropout: float = 0.2, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.in_channels = {m: int(in_channels[m]) for m in self.modalities}
        self.n_steps, self.hidden = int(n_steps), int(hidden)
        self.encoder_names = encoder_names(self.modalities, encoders)
        self.month_mask, self.modality_mask = float(month_mask), float(modality_mask)
        self.generator = generator
        self.encoders = nn.ModuleDict({
            m: build_encoder(self.encoder_names[m], task="classification", temporal=TEMPORAL[m],
                             in_channels=self.in_channels[m], n_steps=self.n_steps, hidden=self.hidden, dropout=dropout)
            for m in self.modalities})
        self.decoders = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, self.in_channels[m] * (self.n_steps if TEMPORAL[m] else 1)))
            for m in self.modalities})

    def hide(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The visible part of a normalised batch: sensors hidden, then months of the rest."""
        vis = drop_modalities(batch, self.modalities, self.modality_mask, self.generator)
        return mask_months(vis, self.modalities, self.month_mask, self.generator)

    def encode(self, visible: Mapping[str, Tensor]) -> Tensor:
        """Mean over the visible sensors of their encoders' features ``[B, hidden]``; a sensor is
        encoded only on the rows where it is visible (zero-filled gaps), so a hidden or missing
        sensor's values reach nothing (as in :meth:`cropmap.models.base.CoLearningModel._run`,
        a training batch with one such row runs the encoder on the whole zero-filled batch)."""
        shown = visible["mask"].bool()
        feats = []
        for i, m in enumerate(self.modalities):
            rows = shown[:, i]
            x = torch.nan_to_num(visible[m].float(), nan=0.0, posinf=0.0, neginf=0.0)
            x = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))
            f = x.new_zeros(len(x), self.hidden)
            n = int(rows.sum())
            if n == len(x) or (n == 1 and self.training):
                f = self.encoders[m](x) * rows[:, None]
            elif n:
                f[rows] = self.encoders[m](x[rows])
            feats.append(f)
        return fuse_mean(torch.stack(feats, 1), shown)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Loss terms (:func:`reconstruction_terms`) of one normalised batch ``{m, "mask"}``."""
        visible = self.hide(batch)
        fused = self.encode(visible)
        pred = {m: self.decoders[m](fused) for m in self.modalities}
        return reconstruction_terms(pred, batch, visible, self.modalities)

    def checkpoint(self, stats: Mapping[str, Any], bands: Mapping[str, Sequence[str]], months: Sequence[str],
                   summary: Mapping[str, Any]) -> dict[str, Any]:
        """What :func:`load_encoders` reads: encoder weights, names, width, bands, months and the
        normalisation statistics (tensors and plain types only)."""
        return {
            "format": CKPT_FORMAT, "modalities": list(self.modalities), "encoder_names": dict(self.encoder_names),
            "hidden": self.hidden, "months": list(months), "bands": {m: list(bands[m]) for m in self.modalities},
            "stats": {m: [list(a), list(b)] for m, (a, b) in stats.items()},
            "encoders": {m: {k: v.detach().cpu() for k, v in self.encoders[m].state_dict().items()} for m in self.modalities},
            "summary": dict(summary),
        }


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A pixel-pretraining checkpoint.

    Raises:
        InputDataError: the file is missing or is not such a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"{path}: pixel-pretraining checkpoint not found; run the pretrain stage "
                             "(snakemake runs it before train) or set model.pretrain.enabled: false")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputDataError(f"{path}: unreadable ({type(exc).__name__}); delete it and rerun the pretrain stage") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise InputDataError(f"{path}: not a pixel-pretraining checkpoint (format {CKPT_FORMAT}); delete it and rerun "
                             "the pretrain stage")
    return ckpt


def _check(path: Path, ckpt: Mapping[str, Any], model: nn.Module, bands: Mapping[str, Sequence[str]]) -> None:
    """Raise a :class:`ConfigError` naming the first difference between checkpoint and model."""
    fix = "pretrain with the model's settings (snakemake reruns the pretrain rule when they change)"
    hidden = int(getattr(model, "hidden", -1))
    if int(ckpt["hidden"]) != hidden:
        raise ConfigError(f"{path}: encoders pretrained with width {ckpt['hidden']} but model.hidden is {hidden}; {fix}")
    n_steps = int(getattr(model, "n_steps", -1))
    if len(ckpt["months"]) != n_steps:
        raise ConfigError(f"{path}: encoders pretrained on {len(ckpt['months'])} months but the model has {n_steps}; {fix}")
    names: Mapping[str, str] = getattr(model, "encoder_names", {})
    for m in getattr(model, "modalities", []):
        if m not in ckpt["encoders"]:
            raise ConfigError(f"{path}: no pretrained encoder for sensor {m} (it has {list(ckpt['encoders'])}); {fix}")
        if ckpt["encoder_names"][m] != names.get(m):
            raise ConfigError(f"{path}: the {m} encoder was pretrained as {ckpt['encoder_names'][m]} but model.encoders "
                              f"gives {names.get(m)}; {fix}")
        if list(ckpt["bands"][m]) != list(bands[m]):
            raise ConfigError(f"{path}: the {m} encoder was pretrained on bands {list(ckpt['bands'][m])} but the model "
                              f"reads {list(bands[m])}; {fix}")


def load_encoders(model: nn.Module, path: Path, bands: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Copy the pretrained encoders of ``path`` into every per-sensor encoder of ``model``
    (its :data:`ENCODER_ATTRS` ``ModuleDict`` s, at any depth).

    Args:
        model: a pixel co-learning model (:func:`cropmap.models.build_model`).
        path: a checkpoint of :meth:`PixelMAE.checkpoint`.
        bands: the bands per sensor the model reads.

    Returns:
        The checkpoint, with ``"copied"``: the number of tensors copied.

    Raises:
        ConfigError: the model has no per-sensor encoders, or its encoder names, width, months
            or bands differ from the checkpoint's.
    """
    ckpt = read_checkpoint(path)
    targets = [mod for name, mod in model.named_modules()
               if name.rsplit(".", 1)[-1] in ENCODER_ATTRS and isinstance(mod, nn.ModuleDict)]
    if not targets:
        raise ConfigError(f"{path}: method {getattr(model, 'method', type(model).__name__)} has no per-sensor encoders "
                          "to load pretrained weights into; set model.pretrain.enabled: false for it")
    _check(path, ckpt, model, bands)
    copied = 0
    for encoders in targets:
        for m, enc in encoders.items():
            enc.load_state_dict(ckpt["encoders"][m])
            copied += len(ckpt["encoders"][m])
    return ckpt | {"copied": copied}


def init_module(module: CoLearningModule, path: Path, bands: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Start fine-tuning from the pretraining: the encoders of ``module.model`` get the
    checkpoint's weights and ``module.norm`` its normalisation statistics (the scale the
    encoders learnt on).

    Args:
        module: a :class:`cropmap.loop.CoLearningModule`.
        path, bands: see :func:`load_encoders`.

    Returns:
        Summary keys ``pretrained_from`` and ``pretrained_tensors``.
    """
    from cropmap.normalize import Normalizer

    model = module.model
    ckpt = load_encoders(model, path, bands)
    old = module.norm.stats()
    stats = {m: (list(ckpt["stats"][m][0]), list(ckpt["stats"][m][1])) for m in model.modalities}
    if any(len(stats[m][0]) != len(old[m][0]) for m in stats):
        raise ConfigError(f"{path}: the normalisation statistics do not fit the model's channels; rerun the pretrain stage")
    module.norm = Normalizer(stats).to(next(module.parameters()).device)
    log.info("fine-tuning from the pretrained encoders of %s (%d tensors, its normalisation)", path, ckpt["copied"])
    return {"pretrained_from": str(path), "pretrained_tensors": int(ckpt["copied"])}
