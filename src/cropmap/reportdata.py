"""What the HTML report computes from the stages' outputs (no HTML here, no plotting).

* :func:`per_class_scores`: precision, recall, F1 and support per class from confusion counts;
* :func:`sensor_gains`: "what would help": for every availability bitmask, the missing sensor
  whose addition raises the held-out score most, and by how much;
* :func:`training_history`: per-epoch training and validation figures of a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.modalities import MODALITIES, bit

#: :func:`sensor_gains` codes of the ``best`` column besides an index into the region's sensors.
ALL_PRESENT, NO_GAIN, UNKNOWN = 254, 253, 255


def subset_code(subset: Iterable[str]) -> int:
    """Availability bitmask of a sensor subset (bit order :data:`cropmap.modalities.MODALITIES`)."""
    return sum(bit(m) for m in subset)


def code_subset(code: int, modalities: Sequence[str]) -> tuple[str, ...]:
    """Sensors of ``modalities`` whose bit is set in ``code``, in the order of ``modalities``."""
    return tuple(m for m in modalities if code & bit(m))


def confusion_matrix(confusion: pd.DataFrame, subset: str, k: int) -> np.ndarray:
    """``k x k`` counts (rows true class, columns predicted) of one subset of ``confusion.csv``."""
    c = confusion[confusion["subset"] == subset]
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (c["true"].to_numpy(int), c["pred"].to_numpy(int)), c["count"].to_numpy(int))
    return m


def per_class_scores(m: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Precision, recall and F1 in percent, and support (true pixels), per class of a confusion matrix."""
    tp = np.diag(m).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = 100 * tp / m.sum(axis=0)
        recall = 100 * tp / m.sum(axis=1)
        f1 = 2 * precision * recall / (precision + recall)
    f1[(tp == 0) & (m.sum(axis=1) > 0)] = 0.0
    return pd.DataFrame({"class": list(names), "precision": precision, "recall": recall, "f1": f1,
                         "support": m.sum(axis=1)})


def subset_scores(metrics: pd.DataFrame, metric: str = "f1_weighted") -> dict[int, float]:
    """Held-out score of every evaluated sensor subset of ``metrics.csv``, by bitmask code."""
    return {subset_code(str(s).split("+")): float(v) for s, v in zip(metrics["subset"], metrics[metric], strict=True)}


def sensor_gains(metrics: pd.DataFrame, metric: str = "f1_weighted") -> tuple[list[str], pd.DataFrame]:
    """For every bitmask code, the missing sensor whose addition raises the expected score most.

    The region's sensors are those of the largest subset in ``metrics``. A pixel mapped with
    subset ``S`` has the expected score ``score(S)`` (0 without any sensor: no map at all);
    adding sensor ``m`` gives ``score(S + m)``. Pixels whose bitmask holds a sensor the model
    was not evaluated with get :data:`UNKNOWN`.

    Returns:
        ``(sensors, table)``: the table has 256 rows (index = code) with ``score`` (now),
        ``best`` (index into ``sensors``, or :data:`ALL_PRESENT`, :data:`NO_GAIN`,
        :data:`UNKNOWN`), ``gain`` (score points, 0 when nothing helps) and ``score_after``.
    """
    scores = subset_scores(metrics, metric)
    full = max(metrics["subset"], key=lambda s: str(s).count("+"))
    sensors: list[str] = [m for m in MODALITIES if m in str(full).split("+")]
    region = subset_code(sensors)
    scores[0] = 0.0
    rows = []
    for code in range(256):
        now = scores.get(code, np.nan)
        if code & ~region or not np.isfinite(now):
            rows.append((now, UNKNOWN, np.nan, np.nan))
            continue
        if code == region:
            rows.append((now, ALL_PRESENT, 0.0, now))
            continue
        cand = [(scores.get(code | bit(m), np.nan) - now, i) for i, m in enumerate(sensors) if not code & bit(m)]
        cand = [(g, i) for g, i in cand if np.isfinite(g)]
        g, i = max(cand, default=(0.0, NO_GAIN))
        rows.append((now, i, g, now + g) if g > 0 else (now, NO_GAIN, 0.0, now))
    return sensors, pd.DataFrame(rows, columns=["score", "best", "gain", "score_after"]).astype(
        {"best": np.uint8})


def gains_by_sensor(gains: pd.DataFrame, sensors: Sequence[str], code_pixels: dict[int, int],
                    pixel_ha: float) -> pd.DataFrame:
    """Area by "missing sensor that matters most", from pixel counts per bitmask code.

    Returns:
        One row per outcome (a sensor, "nothing helps", "all sensors present"): ``area_ha``,
        ``share`` (of all pixels), ``score_now``, ``gain`` and ``score_after`` (area-weighted means).
    """
    label = {ALL_PRESENT: "all sensors present", NO_GAIN: "no single sensor helps", UNKNOWN: "not evaluated"}
    rows = []
    for code, n in code_pixels.items():
        if n == 0:
            continue
        g = gains.loc[code]
        b = int(g["best"])
        rows.append({"missing sensor that matters most": sensors[b] if b < len(sensors) else label[b],
                     "px": n, "score_now": g["score"], "gain": g["gain"], "score_after": g["score_after"],
                     "no_sensor": code == 0})
    if not rows:
        return pd.DataFrame(columns=["missing sensor that matters most", "area_ha", "share", "of which nodata (ha)",
                                     "score_now", "gain", "score_after"])
    df = pd.DataFrame(rows)
    total = df["px"].sum()
    out = []
    for key, g in df.groupby("missing sensor that matters most", sort=False):
        wsum = g["px"].sum()
        out.append({"missing sensor that matters most": key, "area_ha": wsum * pixel_ha, "share": wsum / total,
                    "of which nodata (ha)": g.loc[g.no_sensor, "px"].sum() * pixel_ha,
                    **{c: float(np.average(g[c], weights=g["px"])) if g[c].notna().all() else np.nan
                       for c in ("score_now", "gain", "score_after")}})
    return pd.DataFrame(out).sort_values("area_ha", ascending=False, ignore_index=True)


def training_history(summary_json: Path) -> pd.DataFrame:
    """Per-epoch figures of a training run: one row per epoch (``epoch``, ``train/<term>``, ``val_*``).

    Taken from the ``history`` list of ``train_summary.json`` when it has one, else from the
    Lightning ``CSVLogger`` file beside it (``lightning/logs/version_0/metrics.csv``, where
    training and validation figures of an epoch are on separate rows). Empty when neither exists.
    """
    if summary_json.exists():
        hist = json.loads(summary_json.read_text()).get("history")
        if hist:
            return pd.DataFrame(hist).sort_values("epoch", ignore_index=True)
    csv = summary_json.parent / "lightning" / "logs" / "version_0" / "metrics.csv"
    if not csv.exists():
        return pd.DataFrame()
    df = pd.read_csv(csv)
    if df.empty or "epoch" not in df.columns:
        return pd.DataFrame()
    return df.drop(columns=[c for c in ("step",) if c in df.columns]).groupby("epoch", as_index=False).first()
