"""``build_model``: one factory for every method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cropmap.models.base import CoLearningModel
from cropmap.models.registry import Task, method_class


def build_model(
    method: str,
    *,
    task: Task,
    modalities: Sequence[str],
    in_channels: Mapping[str, int],
    n_steps: int,
    n_classes: int,
    hidden: int = 128,
    encoders: Mapping[str, str] | None = None,
    head: str = "multiclass",
    **method_kwargs: Any,
) -> CoLearningModel:
    """Build a multi-modal model by method name.

    Args:
        method: a registered method (:data:`cropmap.models.METHODS`).
        task: ``"classification"`` (pixel time series ``[B, T, C]``, static ``[B, C]``) or
            ``"segmentation"`` (chips ``[B, T*C, H, W]``, static ``[B, C, H, W]``).
        modalities: subset of ``("s2", "s1", "weather", "dem")``; order of the mask's M axis.
        in_channels: channels per time step of each modality.
        n_steps: months T of the temporal modalities.
        n_classes: number of classes K.
        hidden: encoder width (128 in the papers).
        encoders: encoder per modality (``tempcnn``/``ltae``/``gru``/``mlp`` for
            classification, ``unet``/``smp:<name>`` for segmentation).
        head: ``multiclass`` | ``binary`` | ``multilabel`` | ``regression``.
        **method_kwargs: ``class_weights``, ``generator``, ``dropout`` for every method, plus
            ``alpha`` (ModDrop keep probability: comiss, dsensd, moddrop), ``tau`` (KD
            temperature: fullco, comiss, dsensd), ``gamma`` (InfoNCE temperature: fullco,
            comiss), ``temperature`` (NT-Xent: mdico), ``contrast_pixels`` (segmentation: pixels
            drawn per batch for the feature-level terms: fullco, comiss, mdico).

    Raises:
        UnknownNameError: unknown method (the message lists the registered ones), task, head,
            modality or encoder.
    """
    return method_class(method)(
        task=task,
        modalities=modalities,
        in_channels=in_channels,
        n_steps=n_steps,
        n_classes=n_classes,
        hidden=hidden,
        encoders=encoders,
        head=head,
        **method_kwargs,
    )
