"""Gradient-boosted tree methods: the references practitioners already use, as cropmap methods.

Both use scikit-learn's :class:`~sklearn.ensemble.HistGradientBoostingClassifier` with
class-balanced sample weights (``class_weight="balanced"``) on the flattened, normalised
time series (``[T*C]`` per temporal modality, the bands of a static one), NaN for invalid
months (the trees route missing values natively):

* ``trees_dedicated``: one model per non-empty subset of the modalities, trained on the
  training samples where every modality of that subset is present, with only that subset's
  features. At prediction each pixel uses the model of its own subset, so a missing
  sensor's values cannot change the output. This is the protocol's strongest reference: one
  dedicated classifier per sensor combination.
* ``trees_nan``: one model on every modality; a missing modality's features are NaN (whatever
  values the batch holds there), so its values cannot change the output either.

They are registered :class:`~cropmap.models.base.CoLearningModel` subclasses, so they are
methods like the others: they train through the same entry point (:func:`cropmap.train.fit`
calls :meth:`_Trees.fit_samples` instead of the gradient loop), run in ``snakemake compare``,
are saved in the same ``model.ckpt`` bundle (the fitted scikit-learn models are the module's
*extra state*, pickled into a byte tensor so the bundle's weight checksum covers them) and
predict through the same :class:`~cropmap.predict.Predictor`: ``forward(batch)`` returns
``{"logits": log-probabilities, "per_modality": {}, "avail": mask}`` computed on the CPU.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cropmap.errors import ConfigError
from cropmap.modalities import TEMPORAL
from cropmap.models.base import Batch, CoLearningModel, Output
from cropmap.models.registry import Task, method_class, method_names, register_method

log = logging.getLogger(__name__)

#: Floor of a probability before the log: classes a tree never saw get this.
PROBA_FLOOR = 1e-4


def subset_code(avail: np.ndarray) -> np.ndarray:
    """Integer code per row of a bool ``[N, M]`` mask: bit ``i`` set where modality ``i`` is."""
    return (avail.astype(np.int64) << np.arange(avail.shape[1], dtype=np.int64)).sum(axis=1)


class _Trees(CoLearningModel):
    """Shared part: flattening the inputs, fitting one classifier, predicting log-probabilities.

    Args:
        max_iter, learning_rate, max_leaf_nodes, min_samples_leaf, l2_regularization, max_bins: of
            :class:`~sklearn.ensemble.HistGradientBoostingClassifier` (scikit-learn defaults,
            early stopping included: ``"auto"``, on only for more than 10 000 samples).
        balanced: class-balanced sample weights (``class_weight="balanced"``).
        random_state: seed of the trees (the early-stopping hold-out of large training sets).
        threads: OpenMP threads of the trees per calling thread (None: scikit-learn's default,
            every core). 1 by default: OpenMP's busy-waiting threads slow fitting tenfold on a
            shared or busy machine, and prediction already runs one model thread per core.
        **kw: the :class:`CoLearningModel` arguments; ``hidden``, ``encoders``, ``dropout``,
            ``class_weights`` and ``generator`` are not used (balance comes from ``balanced``).
    """

    tasks: ClassVar[tuple[Task, ...]] = ("classification",)
    #: Fitted by :meth:`fit_samples`, not by gradient steps.
    gradient_free: ClassVar[bool] = True

    def __init__(self, *, max_iter: int = 100, learning_rate: float = 0.1, max_leaf_nodes: int = 31,
                 min_samples_leaf: int = 20, l2_regularization: float = 0.0, max_bins: int = 255, balanced: bool = True,
                 random_state: int = 0, threads: int | None = 1, **kw: Any):
        if kw.get("task") != "classification":
            raise ConfigError(f"method {self.method!r} classifies pixel time series: set model.task: classification, "
                              "or use a segmentation method (imt, gemmnet, or any co-learning method)")
        super().__init__(**kw)
        if self.head_kind != "multiclass":
            raise ValueError(f"{self.method} supports the multiclass head only, not {self.head_kind!r}")
        self.hgb_params: dict[str, Any] = {
            "max_iter": max_iter, "learning_rate": learning_rate, "max_leaf_nodes": max_leaf_nodes,
            "min_samples_leaf": min_samples_leaf, "l2_regularization": l2_regularization, "max_bins": max_bins,
            "class_weight": "balanced" if balanced else None, "random_state": random_state,
            "early_stopping": "auto",  # scikit-learn's default: on above 10 000 samples (10 % held out)
        }
        self.threads = threads
        self.models: dict[int, Any] = {}  # subset code -> fitted classifier

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Tensor:
        """The fitted classifiers and their parameters, pickled into a uint8 tensor."""
        blob = pickle.dumps({"models": self.models, "hgb_params": self.hgb_params})
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        d = pickle.loads(state.numpy().tobytes()) if isinstance(state, Tensor) else state
        self.models = dict(d["models"])
        self.hgb_params = dict(d["hgb_params"])

    # ------------------------------------------------------------------ inputs
    def _flat(self, x: Mapping[str, Any], m: str, n: int) -> np.ndarray:
        """``[N, T*C]`` (static ``[N, C]``) float32 features of modality ``m``; NaN if absent."""
        width = self.in_channels[m] * (self.n_steps if TEMPORAL[m] else 1)
        v = x.get(m)
        if v is None:
            return np.full((n, width), np.nan, np.float32)
        a = v.detach().float().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v, np.float32)
        return np.array(a.reshape(n, width), dtype=np.float32, order="C", copy=True)  # never a view of the batch

    def _inputs(self, batch: Batch) -> tuple[dict[str, np.ndarray], np.ndarray, torch.device]:
        present = [m for m in self.modalities if batch.get(m) is not None]
        if not present:
            raise ValueError(f"batch holds none of the modalities {self.modalities}")
        ref = torch.as_tensor(batch[present[0]])
        n = ref.shape[0]
        mask = batch.get("mask")
        avail = (np.ones((n, len(self.modalities)), bool) if mask is None
                 else torch.as_tensor(mask).detach().cpu().numpy().astype(bool).copy())
        if avail.shape != (n, len(self.modalities)):
            raise ValueError(f"mask has shape {avail.shape}; expected [B={n}, M={len(self.modalities)}] (pixel samples)")
        for i, m in enumerate(self.modalities):
            if m not in present:
                avail[:, i] = False
        feats = {m: self._flat(batch, m, n) for m in self.modalities}
        for i, m in enumerate(self.modalities):
            feats[m][~avail[:, i]] = np.nan  # a missing modality's values never reach a tree
        return feats, avail, ref.device

    def _design(self, feats: Mapping[str, np.ndarray], code: int) -> np.ndarray:
        """Feature matrix of the modalities in ``code`` (in modality order)."""
        return np.concatenate([feats[m] for i, m in enumerate(self.modalities) if code >> i & 1], axis=1)

    # ------------------------------------------------------------------ fitting
    def _new(self) -> Any:
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(**self.hgb_params)

    def _fit_one(self, x: np.ndarray, y: np.ndarray) -> Any | None:
        if len(y) == 0 or len(np.unique(y)) < 2:
            return None
        clf = self._new()
        with self._threads():
            clf.fit(x, y)
        return clf

    def _threads(self) -> contextlib.AbstractContextManager:
        """OpenMP threads of the trees in the calling thread (OpenMP's limit is per calling thread)."""
        if not self.threads:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=self.threads, user_api="openmp")

    @abc.abstractmethod
    def _codes(self) -> list[int]:
        """Subset codes this method fits a classifier for."""

    @abc.abstractmethod
    def _training_rows(self, avail: np.ndarray, code: int) -> np.ndarray:
        """bool ``[N]``: the training samples of the classifier of ``code``."""

    def fit_samples(self, x: Mapping[str, np.ndarray], mask: np.ndarray, y: np.ndarray,
                    workers: int = 1) -> dict[str, Any]:
        """Fit the classifiers on normalised samples.

        Args:
            x: ``{m: [N, T, C]}`` (static ``[N, C]``), normalised, NaN where invalid.
            mask: bool ``[N, M]`` presence in :attr:`modalities` order.
            y: int ``[N]`` class ids (``< 0`` ignored).
            workers: classifiers fitted at once, each in its own thread with :attr:`threads`
                OpenMP threads (the fits release the GIL); the result does not depend on it.

        Returns:
            Summary: samples per fitted subset.
        """
        from concurrent.futures import ThreadPoolExecutor

        keep = np.asarray(y) >= 0
        batch = {m: np.asarray(v)[keep] for m, v in x.items()} | {"mask": np.asarray(mask)[keep]}
        feats, avail, _ = self._inputs(batch)
        y = np.asarray(y)[keep]
        rows = {code: self._training_rows(avail, code) for code in self._codes()}

        def fit(code: int) -> Any | None:
            return self._fit_one(self._design(feats, code)[rows[code]], y[rows[code]])

        with ThreadPoolExecutor(max(1, workers)) as pool:
            fitted = dict(zip(rows, pool.map(fit, rows), strict=True))
        self.models = {code: clf for code, clf in fitted.items() if clf is not None}
        sizes = {self._name(code): int(rows[code].sum()) for code in self.models}
        if not self.models:
            raise ValueError(f"{self.method}: no subset has training samples of two classes or more")
        return {"fitted_subsets": sizes}

    def fit_cached(self, x: Mapping[str, np.ndarray], mask: np.ndarray, y: np.ndarray,
                   cache_dir: str | Path | None = None, workers: int = 1) -> dict[str, Any]:
        """:meth:`fit_samples`, reusing an identical earlier fit found in ``cache_dir``.

        The cache is content-addressed: a fit is reused only when the method, its
        hyper-parameters, the input layout, scikit-learn's version and every training value are
        the same (the SHA-256 of them names the file). The folds of ``snakemake compare`` fit
        the same trees for ``trees_dedicated`` and for every network blended with it
        (``training.blend``); this fits them once per fold. Files are written atomically, so
        parallel jobs at worst fit the same trees twice; an unreadable file is refitted.

        Args:
            x, mask, y, workers: as :meth:`fit_samples`.
            cache_dir: folder of fitted trees; None fits without a cache.

        Returns:
            :meth:`fit_samples`' summary, with ``trees_cache: "hit" | "miss"`` when a cache is used.
        """
        if cache_dir is None:
            return self.fit_samples(x, mask, y, workers)
        import sklearn

        h = hashlib.sha256(repr((self.method, sorted(self.hgb_params.items()), list(self.modalities),
                                 sorted(self.in_channels.items()), self.n_steps, self.n_classes,
                                 sklearn.__version__)).encode())
        for a in [*(x[m] for m in sorted(x)), mask, y]:
            a = np.ascontiguousarray(a)
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        path = Path(cache_dir) / f"{self.method}-{h.hexdigest()[:32]}.pkl"
        if path.exists():
            try:
                with path.open("rb") as f:
                    cached = pickle.load(f)
                self.set_extra_state(cached["state"])
                log.info("%s: reused the trees fitted on the same pixels (%s)", self.method, path)
                return dict(cached["summary"]) | {"trees_cache": "hit"}
            except (OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
                log.warning("%s: refitting, the cached trees %s are unreadable (%s)", self.method, path, e)
        summary = self.fit_samples(x, mask, y, workers)
        from cropmap.io import atomic_path

        with atomic_path(path) as tmp, tmp.open("wb") as f:
            pickle.dump({"state": {"models": self.models, "hgb_params": self.hgb_params}, "summary": summary}, f)
        return summary | {"trees_cache": "miss"}

    def _name(self, code: int) -> str:
        return "+".join(m for i, m in enumerate(self.modalities) if code >> i & 1)

    # ------------------------------------------------------------------ prediction
    def _log_proba(self, clf: Any, x: np.ndarray) -> np.ndarray:
        p = np.full((len(x), self.n_classes), PROBA_FLOOR)
        with self._threads():
            proba = clf.predict_proba(x)
        p[:, clf.classes_.astype(np.int64)] = np.maximum(proba, PROBA_FLOOR)
        p /= p.sum(axis=1, keepdims=True)
        return np.log(p)

    @abc.abstractmethod
    def _model_for(self, code: int) -> tuple[int, Any]:
        """``(code of the features it reads, classifier)`` that predicts samples of subset ``code``."""

    def forward(self, batch: Batch) -> Output:
        """Log-probabilities ``[B, K]`` per sample from the model of its subset (0 where none)."""
        feats, avail, device = self._inputs(batch)
        n = len(avail)
        logits = np.zeros((n, self.n_classes), np.float32)
        codes = subset_code(avail)
        for code in np.unique(codes):
            if code == 0:
                continue
            rows = codes == code
            used, clf = self._model_for(int(code))
            logits[rows] = self._log_proba(clf, self._design({m: f[rows] for m, f in feats.items()}, used))
        return {"logits": torch.from_numpy(logits).to(device), "per_modality": {},
                "avail": torch.from_numpy(avail).to(device)}

    def _terms(self, out: Output, y: Tensor) -> dict[str, Tensor]:
        """The supervised CE of the fused log-probabilities (for reporting; trees do not descend it)."""
        return {"main": self._sup(out["logits"], y, out["avail"].any(1))}


@register_method("trees_dedicated", tasks=("classification",))
class TreesDedicated(_Trees):
    """One class-balanced gradient-boosted tree model per non-empty sensor subset.

    The model of subset S is trained on the training samples where every modality of S is
    present, on S's features only. A pixel uses the model of its own subset; if that subset
    had no training data, the model of its largest sub-subset that has one (ties: the first in
    modality order).
    """

    def _codes(self) -> list[int]:
        m = len(self.modalities)
        return sorted(range(1, 2**m), key=lambda c: (-bin(c).count("1"), c))

    def _training_rows(self, avail: np.ndarray, code: int) -> np.ndarray:
        sel = np.array([code >> i & 1 for i in range(avail.shape[1])], bool)
        return np.asarray(avail[:, sel].all(axis=1))

    def _model_for(self, code: int) -> tuple[int, Any]:
        if code in self.models:
            return code, self.models[code]
        bits = [i for i in range(len(self.modalities)) if code >> i & 1]
        for k in range(len(bits) - 1, 0, -1):
            for sub in itertools.combinations(bits, k):
                c = sum(1 << i for i in sub)
                if c in self.models:
                    return c, self.models[c]
        raise ValueError(f"{self.method}: no model for sensor subset {self._name(code)} or any part of it")


@register_method("trees_nan", tasks=("classification",))
class TreesNaN(_Trees):
    """One class-balanced gradient-boosted tree model on every sensor; missing ones are NaN."""

    def _all(self) -> int:
        return 2 ** len(self.modalities) - 1

    def _codes(self) -> list[int]:
        return [self._all()]

    def _training_rows(self, avail: np.ndarray, code: int) -> np.ndarray:
        return np.asarray(avail.any(axis=1))

    def _model_for(self, code: int) -> tuple[int, Any]:
        return self._all(), self.models[self._all()]


def tree_methods() -> tuple[str, ...]:
    """Names of the gradient-free tree methods."""
    return tuple(name for name in method_names() if is_gradient_free(name))


def is_gradient_free(method: str) -> bool:
    """Whether ``method`` is fitted by :meth:`_Trees.fit_samples` instead of gradient steps."""
    return bool(getattr(method_class(method), "gradient_free", False))


__all__: Sequence[str] = ("TreesDedicated", "TreesNaN", "is_gradient_free", "subset_code", "tree_methods")
