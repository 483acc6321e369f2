"""Stage ``area``: error-adjusted area per class and map accuracy with confidence intervals.

The stratified estimator of Olofsson, Foody, Herold, Stehman, Woodcock and Wulder, "Good
practices for estimating area and assessing accuracy of land change" (Remote Sensing of
Environment 148, 2014), with the map classes as strata. From the error matrix in sample counts
``n[i, j]`` (row ``i`` map class, column ``j`` reference class) and the mapped area ``A[i]`` of
each map class (``W[i] = A[i] / sum(A)``):

* cell proportions ``p[i, j] = W[i] * n[i, j] / n[i.]``;
* area proportion of reference class ``j``: ``p[., j] = sum_i p[i, j]``, standard error
  ``sqrt(sum_i W[i]^2 f[i, j] (1 - f[i, j]) / (n[i.] - 1))`` with ``f[i, j] = n[i, j] / n[i.]``;
  area ``A_total * p[., j]`` with standard error ``A_total * SE``;
* user's accuracy ``U[i] = n[i, i] / n[i.]``, variance ``U (1 - U) / (n[i.] - 1)``;
* producer's accuracy ``P[j] = p[j, j] / p[., j]``, variance (their eq. 7, with proportions)
  ``(W[j]^2 (1 - P)^2 U[j] (1 - U[j]) / (n[j.] - 1) + P^2 sum_{i != j} W[i]^2 f[i, j] (1 - f[i, j]) / (n[i.] - 1)) / p[., j]^2``;
* overall accuracy ``O = sum_j p[j, j]``, variance ``sum_i W[i]^2 U[i] (1 - U[i]) / (n[i.] - 1)``.

95 % confidence intervals are ``estimate +- 1.96 SE`` (areas: the lower bound is clipped at 0).
:func:`stratified_estimate` follows the formulas as they are: a mapped class without reference
pixels makes every area estimate undefined (NaN: its stratum's area cannot be shared out among
the reference classes), one with a single pixel leaves the standard errors undefined. The stage
(:func:`run`) therefore leaves map classes with fewer than 2 reference pixels out of the
estimated population and reports their mapped area as not assessed (``unassessed_px``).

The reference sample of a region is every labelled pixel of the test split (``labels.tif``),
with the map class read from ``map.tif`` at those pixels. Test pixels come in whole spatial
blocks, a clustered sample rather than the stratified random sample the estimator assumes, so
the standard errors (and CIs) are approximate: typically too narrow, since pixels of one field
are not independent.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from cropmap.errors import GridMismatchError, LabelError
from cropmap.io import atomic_path
from cropmap.labels import NODATA, SPLITS

log = logging.getLogger(__name__)

#: Normal quantile of a two-sided 95 % confidence interval.
Z95 = 1.959963984540054

#: Columns of ``area.csv``, one row per class.
AREA_COLUMNS = [
    "class_id", "class", "mapped_px", "mapped_ha", "map_share", "n_map", "n_ref",
    "area_ha", "area_se_ha", "area_ci95_low_ha", "area_ci95_high_ha", "proportion", "proportion_se",
    "users_accuracy", "users_accuracy_se", "producers_accuracy", "producers_accuracy_se",
]


@dataclass(frozen=True)
class StratifiedEstimate:
    """Estimates of :func:`stratified_estimate` (arrays indexed by class; areas in the units of ``mapped``)."""

    counts: np.ndarray
    weights: np.ndarray
    cell_proportions: np.ndarray
    proportion: np.ndarray
    proportion_se: np.ndarray
    area: np.ndarray
    area_se: np.ndarray
    users: np.ndarray
    users_se: np.ndarray
    producers: np.ndarray
    producers_se: np.ndarray
    overall: float
    overall_se: float


def error_matrix(map_class: np.ndarray, ref_class: np.ndarray, k: int) -> np.ndarray:
    """Sample counts ``n[i, j]``: pixels mapped as ``i`` whose reference class is ``j`` (``k x k``)."""
    idx = np.asarray(map_class, np.int64) * k + np.asarray(ref_class, np.int64)
    return np.bincount(idx.ravel(), minlength=k * k).reshape(k, k)


def stratified_estimate(counts: np.ndarray, mapped: np.ndarray) -> StratifiedEstimate:
    """Area and accuracy estimates with standard errors, map classes as strata (Olofsson et al. 2014).

    Args:
        counts: ``k x k`` error matrix in sample counts, rows map class, columns reference class.
        mapped: mapped area of each map class (pixels, ha, ...): the strata sizes.

    Returns:
        The estimates; ``area``/``area_se`` are in the units of ``mapped``.
    """
    n = np.asarray(counts, np.float64)
    a = np.asarray(mapped, np.float64)
    if n.ndim != 2 or n.shape[0] != n.shape[1] or a.shape != (n.shape[0],):
        raise ValueError(f"counts must be k x k and mapped of length k; got {n.shape} and {a.shape}")
    total = a.sum()
    w = a / total
    n_i = n.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = n / n_i[:, None]
        f[(n_i == 0) & (w == 0)] = 0.0  # an unmapped, unsampled class contributes nothing
        p = w[:, None] * f
        # per stratum i and reference class j: W_i^2 f (1 - f) / (n_i - 1)
        v = np.where((w == 0)[:, None], 0.0, w[:, None] ** 2 * f * (1 - f) / (n_i - 1)[:, None])
        prop = p.sum(axis=0)
        prop_se = np.sqrt(v.sum(axis=0))
        users = np.diag(f).copy()
        users[n_i == 0] = np.nan
        users_var = users * (1 - users) / (n_i - 1)
        diag_p = np.diag(p)
        producers = diag_p / prop
        off = v.sum(axis=0) - np.diag(v)
        own = np.where(w == 0, 0.0, w**2 * (1 - producers) ** 2 * users_var)
        prod_var = (own + producers**2 * off) / prop**2
        overall = float(diag_p.sum())
        overall_var = float(np.where(w == 0, 0.0, w**2 * users_var).sum())
    return StratifiedEstimate(
        counts=n.astype(np.int64), weights=w, cell_proportions=p, proportion=prop, proportion_se=prop_se,
        area=total * prop, area_se=total * prop_se, users=users, users_se=np.sqrt(users_var),
        producers=producers, producers_se=np.sqrt(prod_var), overall=overall, overall_se=math.sqrt(overall_var),
    )


def sample_counts(map_tif: Path, labels_tif: Path, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Error matrix of the test-split reference pixels and the mapped pixels per class.

    Reads both rasters block by block (bounded memory). Only mapped pixels (class not nodata)
    take part: nodata is not a stratum.

    Returns:
        ``(counts k x k, mapped pixels per class, pixel area in ha)``.
    """
    test = SPLITS.index("test")
    counts = np.zeros((k, k), np.int64)
    mapped = np.zeros(k, np.int64)
    with rasterio.open(map_tif) as m, rasterio.open(labels_tif) as lab:
        if (m.width, m.height) != (lab.width, lab.height) or not m.transform.almost_equals(lab.transform):
            raise GridMismatchError(f"{labels_tif}: grid {lab.width}x{lab.height} {tuple(lab.transform)[:6]} differs from "
                            f"{map_tif} ({m.width}x{m.height} {tuple(m.transform)[:6]}); rerun the labels and maps stages")
        pixel_ha = abs(m.transform.a * m.transform.e) / 10_000
        for _, win in m.block_windows(1):
            cls = m.read(1, window=win)
            ref, split = lab.read(window=win)
            ok = cls != NODATA
            if (cls[ok] >= k).any() or (ref[ref != NODATA] >= k).any():
                raise LabelError(f"{map_tif} or {labels_tif}: class id >= {k} found, but classes has ids below {k}; "
                                 "the classes changed since they were written: rerun the labels and maps stages")
            mapped += np.bincount(cls[ok].ravel(), minlength=k)
            s = ok & (split == test) & (ref != NODATA)
            counts += error_matrix(cls[s], ref[s], k)
    return counts, mapped, pixel_ha


def area_table(est: StratifiedEstimate, mapped_px: np.ndarray, pixel_ha: float, names: Sequence[str],
               population_px: float | None = None) -> pd.DataFrame:
    """``area.csv`` rows (``AREA_COLUMNS``): areas in ha, 95 % CIs, accuracies as fractions.

    ``population_px``: pixels of the estimated population (default: every mapped pixel).
    """
    total = mapped_px.sum() if population_px is None else population_px
    area_ha = est.proportion * total * pixel_ha
    se_ha = est.proportion_se * total * pixel_ha
    df = pd.DataFrame({
        "class_id": range(len(names)), "class": list(names), "mapped_px": mapped_px,
        "mapped_ha": mapped_px * pixel_ha, "map_share": mapped_px / max(mapped_px.sum(), 1), "n_map": est.counts.sum(axis=1),
        "n_ref": est.counts.sum(axis=0), "area_ha": area_ha, "area_se_ha": se_ha,
        "area_ci95_low_ha": area_ha - Z95 * se_ha, "area_ci95_high_ha": area_ha + Z95 * se_ha,
        "proportion": est.proportion, "proportion_se": est.proportion_se,
        "users_accuracy": est.users, "users_accuracy_se": est.users_se,
        "producers_accuracy": est.producers, "producers_accuracy_se": est.producers_se,
    })
    return df[AREA_COLUMNS]


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def run(map_tif: Path, labels_tif: Path, classes: Sequence[dict], out_csv: Path, out_json: Path) -> dict:
    """Estimate areas and accuracies of a region's map; write ``area.csv`` and ``area.json``."""
    k = max(c["id"] for c in classes) + 1
    names = [next((c["name"] for c in classes if c["id"] == i), str(i)) for i in range(k)]
    counts, mapped, pixel_ha = sample_counts(map_tif, labels_tif, k)
    if counts.sum() == 0:
        log.warning("%s: no labelled test pixel on mapped pixels: every estimate is undefined", labels_tif)
    # a stratum needs 2 reference pixels for a variance: smaller ones are left out of the population
    assessed = counts.sum(axis=1) >= 2
    unassessed = [names[i] for i in range(k) if mapped[i] > 0 and not assessed[i]]
    if unassessed:
        log.warning("map classes with fewer than 2 reference pixels, left out of the estimates: %s", ", ".join(unassessed))
    est = stratified_estimate(counts * assessed[:, None], mapped * assessed)
    df = area_table(est, mapped, pixel_ha, names, population_px=float(mapped[assessed].sum()))
    df["area_ci95_low_ha"] = df["area_ci95_low_ha"].clip(lower=0)
    keep = (df.mapped_px > 0) | (df.n_ref > 0)
    summary = {
        "method": "stratified estimator, map classes as strata (Olofsson et al. 2014, Remote Sensing of Environment 148)",
        "sample": "labelled pixels of the test split; blocks of pixels, not a probability sample: CIs are approximate",
        "pixel_area_ha": pixel_ha, "mapped_px": int(mapped.sum()), "sample_px": int(counts[assessed].sum()),
        "overall_accuracy": _finite(est.overall), "overall_accuracy_se": _finite(est.overall_se),
        "unassessed_strata": unassessed, "unassessed_px": int(mapped[~assessed].sum()),
        "class_ids": list(range(k)), "class_names": names, "error_matrix": counts.tolist(),
        "classes": [{c: (_finite(v) if isinstance(v, float) else v) for c, v in row.items()}
                    for row in df[keep].astype(object).to_dict("records")],
    }
    with atomic_path(out_csv) as tmp:
        df[keep].to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def confusion_long(y: np.ndarray, pred: np.ndarray, subset: str) -> pd.DataFrame:
    """Confusion counts in long format (``subset, true, pred, count``; only non-zero cells)."""
    k = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    m = error_matrix(y, pred, k)
    t, p = np.nonzero(m)
    return pd.DataFrame({"subset": subset, "true": t, "pred": p, "count": m[t, p]})


def write_confusion(records: Sequence[tuple], out: Path) -> None:
    """Write ``confusion.csv`` (``subset, true, pred, count``) from :func:`confusion_long` records."""
    with atomic_path(out) as tmp:
        pd.DataFrame(list(records), columns=["subset", "true", "pred", "count"]).to_csv(tmp, index=False)
