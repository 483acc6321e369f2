"""Multi-modal crop-mapping models robust to missing sensors.

>>> model = build_model("comiss", task="classification", modalities=("s2", "s1"),
...                     in_channels={"s2": 10, "s1": 2}, n_steps=12, n_classes=5)

Batch: ``{modality: FloatTensor, "mask": BoolTensor [B, M] (or [B, M, H, W]), "y": ...}``;
``model(batch)`` -> ``{"logits", "per_modality", "avail", ...}``; ``model.loss(out, batch)`` ->
named terms + ``"total"``; ``model.predict_proba(batch)``. Modules: ``encoders``, ``heads``,
``losses`` (pure functions), ``fusion``, ``methods`` (one class per method), ``factory``.
"""

from cropmap.models.factory import METHODS, build_model, methods_for
from cropmap.models.methods import CoLearningModel

__all__ = ["METHODS", "CoLearningModel", "build_model", "methods_for"]
