"""The missing-sensor comparison on sample tables (:func:`compare_table`) and class counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.compare import TABLE_COLUMNS
from cropmap.datasets import PixelSamples
from cropmap.modalities import TEMPORAL

log = logging.getLogger(__name__)


def cap_per_class(s: PixelSamples, per_class: int, seed: int) -> PixelSamples:
    """At most ``per_class`` samples of each class (seeded choice)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(s.y):
        idx = np.flatnonzero(s.y == c)
        keep.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return s.subset(np.sort(np.concatenate(keep))) if keep else s


def compare_table(samples: PixelSamples, classes: list[dict], methods: Sequence[str], out_dir: str | Path, *,
                  seed: int = 42, epochs: int = 50, patience: int = 10, hidden: int = 64, batch_size: int = 64,
                  lr: float = 1e-3, pixels_per_class: int | None = None, device: str = "auto",
                  months: Sequence[str] | None = None, min_valid_fraction: float = 0.5,
                  encoders: dict[str, str] | None = None) -> pd.DataFrame:
    """Train every method on the same splits and seed; score each on every modality subset.

    For each method: ``fit_pixels`` on ``split == 0`` (early stopping on ``split == 1``) into
    ``out_dir/<method>/model.ckpt``, then :func:`cropmap.metrics.evaluate_samples` on
    ``split == 2`` (test samples with every modality present, the others masked per subset).
    A run whose ``out_dir/<method>/work/last.ckpt`` exists resumes from it: use a fresh
    ``out_dir`` to retrain.

    Args:
        samples: e.g. from :func:`load_worldcereal`.
        classes: the class table (``id``, ``name``, ``colour``).
        methods: names from :data:`cropmap.models.METHODS` that classify pixels
            (``methods_for("classification")``: not the chip-only ``imt``/``gemmnet``).
        out_dir: where checkpoints go.
        pixels_per_class: cap training and validation samples per class (None: all).
        months: month labels (default ``t00``...), only stored in the checkpoints.

    Returns:
        :data:`cropmap.compare.TABLE_COLUMNS` rows, ``2^M - 1`` per method; feed it to
        :func:`cropmap.compare.summarise`.
    """
    from cropmap.metrics import evaluate_samples
    from cropmap.models import methods_for
    from cropmap.predict import Predictor
    from cropmap.train import TrainSettings, fit_pixels

    out_dir = Path(out_dir)
    pixel_methods = methods_for("classification")  # imt, gemmnet need chips: refuse before training
    wrong = [m for m in methods if m not in pixel_methods]
    if wrong:
        raise ValueError(f"methods {wrong} cannot classify pixel samples; use some of {list(pixel_methods)}")
    t_n = next(v.shape[1] for m, v in samples.x.items() if TEMPORAL[m])
    months = list(months) if months is not None else [f"t{i:02d}" for i in range(t_n)]
    if len(months) != t_n:
        raise ValueError(f"{len(months)} month labels for {t_n} time steps")
    train = samples.subset(np.flatnonzero((samples.split == 0) & (samples.y >= 0)))
    val = samples.subset(np.flatnonzero((samples.split == 1) & (samples.y >= 0)))
    test = samples.subset(np.flatnonzero((samples.split == 2) & (samples.y >= 0)))
    if pixels_per_class is not None:
        train, val = cap_per_class(train, pixels_per_class, seed), cap_per_class(val, pixels_per_class, seed + 1)
    table_classes = [{k: c[k] for k in ("id", "name", "colour") if k in c} | {"codes": list(c.get("codes", []))} for c in classes]
    parts = []
    for m in methods:
        settings = TrainSettings(task="classification", method=m, modalities=list(samples.modalities), months=months,
                                 classes=table_classes, seed=seed, hidden=hidden, encoders=dict(encoders or {}),
                                 epochs=epochs, patience=patience, batch_size=batch_size, lr=lr, device=device,
                                 min_valid_fraction=min_valid_fraction)
        ckpt = out_dir / m / "model.ckpt"
        summary = fit_pixels(settings, train, val, ckpt, out_dir / m / "work")
        log.info("%s: %s", m, summary)
        rows = evaluate_samples(Predictor(ckpt, device), test)
        rows.insert(0, "method", m)
        parts.append(rows[TABLE_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def class_counts(samples: PixelSamples, classes: list[dict]) -> pd.DataFrame:
    """Samples per class and split (``train``/``val``/``test``/``total``)."""
    rows = []
    for c in classes:
        sel = samples.y == c["id"]
        rows.append({"id": c["id"], "name": c["name"],
                     **{s: int((sel & (samples.split == i)).sum()) for i, s in enumerate(("train", "val", "test"))},
                     "total": int(sel.sum())})
    return pd.DataFrame(rows)
