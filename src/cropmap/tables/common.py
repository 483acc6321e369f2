"""What the sample-table readers share: class names and colours, presence masks, spatial splits."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cropmap.availability import present
from cropmap.datasets import PixelSamples
from cropmap.modalities import MODALITIES, TEMPORAL
from cropmap.splits import group_counts, group_splits

#: Colours of common class names; others take the tab20 palette in order.
COLOURS: dict[str, str] = {
    "maize": "#3f8f29", "sorghum": "#c98c2a", "millet": "#e0b96a", "wheat": "#e6c229", "barley": "#f1a208",
    "rice": "#6fc3df", "groundnuts": "#a0522d", "sunflower": "#d1495b", "soybean": "#00798c",
    "rapeseed": "#f7f052", "cassava": "#7b3f99", "beans": "#8c6d31", "cotton": "#e7cba9",
    "trees_mixed": "#1b5e20", "trees": "#1b5e20", "grassland": "#9ccc65", "built_up": "#d32f2f",
    "non_crop": "#9e9e9e", "other": "#757575",
}
_TAB20 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
          "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]


def slug(text: str) -> str:
    """``"Unspecified Sorghum"`` -> ``"sorghum"``; lower case, ``[a-z0-9_]`` only."""
    s = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    s = re.sub(r"^unspecified_", "", s)
    return s or "class"


def colour_for(name: str, i: int) -> str:
    """A colour for class ``name`` (known names keep theirs; the rest cycle through tab20)."""
    return COLOURS.get(name, _TAB20[i % len(_TAB20)])


def presence_mask(x: Mapping[str, np.ndarray], modalities: Sequence[str], min_valid_fraction: float) -> np.ndarray:
    """bool ``[N, M]``: :func:`cropmap.availability.present` applied to pixel samples.

    Args:
        x: ``{m: [N, T, C]}`` (static ``[N, C]``); ``C`` may be a band subset.
        modalities: order of the M axis.
        min_valid_fraction: share of months that must be valid for a temporal modality.
    """
    cols = []
    for m in modalities:
        a = x[m]
        # [N, T, C] -> time-major [T*C, N], the stack layout `present` reads
        stack = a.transpose(1, 2, 0).reshape(-1, a.shape[0]) if TEMPORAL[m] else a.T
        cols.append(present(stack, m, min_valid_fraction, channels=a.shape[-1]))
    return np.stack(cols, axis=1)


def location_groups(lat: np.ndarray, lon: np.ndarray, cell_deg: float) -> np.ndarray:
    """Integer group id per sample: its ``cell_deg`` x ``cell_deg`` lat/lon cell."""
    keys = np.stack([np.floor(np.asarray(lat, float) / cell_deg), np.floor(np.asarray(lon, float) / cell_deg)], axis=1)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    return inv.ravel().astype(np.int64)


def spatial_split(y: np.ndarray, groups: np.ndarray, seed: int,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), fold: int | None = None) -> np.ndarray:
    """Seeded split of samples (0 train, 1 val, 2 test) by their location groups: the workflow's
    splitter, :func:`cropmap.splits.group_splits`, on the groups' class counts.

    The groups are dealt into ``k = round(1 / test_fraction)`` folds (7 for the default shares)
    with class proportions kept as far as whole groups allow; fold ``fold`` (default ``seed % k``)
    is the test split, so ``fold = 0 .. k-1`` is a spatial k-fold cross-validation. Of the other
    groups the share ``val / (train + val)`` validates (dealt the same way), the rest trains.
    Unlabelled samples (``y < 0``) follow their group.
    """
    fr = dict(zip(("train", "val", "test"), fractions, strict=True))
    ids = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    k = max(3, round(sum(fractions) / fractions[2]))
    per_group = group_splits(group_counts(np.asarray(y), ids), seed=seed, fractions=fr, folds=1 if fold is None else k,
                             fold=0 if fold is None else fold % k, what="location groups", fix="use a smaller cell_deg")
    return per_group[ids]


def samples_from(x: dict[str, np.ndarray], y: np.ndarray, split: np.ndarray, min_valid_fraction: float) -> PixelSamples:
    """Pixel samples of every modality with presence masks (:func:`presence_mask`)."""
    mods: list[str] = list(MODALITIES)
    x = {m: np.ascontiguousarray(x[m], dtype=np.float32) for m in mods}
    return PixelSamples(x, presence_mask(x, mods, min_valid_fraction), y.astype(np.int64), split.astype(np.uint8), mods)


def months_from(start: str, n: int) -> list[str]:
    """``n`` month labels ``YYYY-MM`` from ``start`` (``YYYY-MM`` or ``YYYY-MM-DD``)."""
    p = pd.Period(str(start)[:7], freq="M")
    return [str(p + i) for i in range(n)]


def class_counts(samples: PixelSamples, classes: Sequence[Mapping]) -> pd.DataFrame:
    """Samples per class and split (``train``/``val``/``test``/``total``)."""
    rows = []
    for c in classes:
        sel = samples.y == c["id"]
        rows.append({"id": c["id"], "name": c["name"],
                     **{s: int((sel & (samples.split == i)).sum()) for i, s in enumerate(("train", "val", "test"))},
                     "total": int(sel.sum())})
    return pd.DataFrame(rows)
