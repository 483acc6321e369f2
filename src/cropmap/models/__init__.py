"""Multi-modal crop-mapping models robust to missing sensors.

>>> model = build_model("comiss", task="classification", modalities=("s2", "s1"),
...                     in_channels={"s2": 10, "s1": 2}, n_steps=12, n_classes=5)

Batch: ``{modality: FloatTensor, "mask": BoolTensor [B, M] (or [B, M, H, W]), "y": ...}``;
``model(batch)`` -> ``{"logits", "per_modality", "avail", ...}``; ``model.loss(out, batch)`` ->
named terms + ``"total"``; ``model.predict_proba(batch)``.

Modules: ``registry`` (the method registry), ``base`` (the shared :class:`CoLearningModel`),
``colearning`` (FullCo, Co-Miss, MDiCo, DSensD+), ``baselines`` (FCoM-av, ModDrop, fusion and
uni-modal baselines), ``imt`` / ``imt_pretrain`` and ``gemmnet`` / ``gemmnet_blocks`` (chip
segmentation), ``encoders``, ``heads``, ``fusion``, ``losses`` (pure functions), ``spatial``
(chip helpers), ``trees`` (gradient-boosted tree references), ``factory`` (:func:`build_model`). Importing the package registers every method,
in this order (the order of the tables): co-learning methods, baselines, imt, gemmnet, the
gradient-boosted tree references (``trees``: ``trees_dedicated``, ``trees_nan``).
"""

# isort: off
# Registration order is the order of the tables: co-learning methods, baselines, imt, gemmnet, trees.
from cropmap.models import colearning  # noqa: F401
from cropmap.models import baselines  # noqa: F401
from cropmap.models import imt  # noqa: F401
from cropmap.models import gemmnet  # noqa: F401
from cropmap.models import trees  # noqa: F401

# isort: on
from cropmap.models.base import CoLearningModel
from cropmap.models.factory import build_model
from cropmap.models.registry import method_names, methods_for

#: Every method name, in registration order.
METHODS: tuple[str, ...] = method_names()

__all__ = ["METHODS", "CoLearningModel", "build_model", "methods_for"]
