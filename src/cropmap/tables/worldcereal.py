"""WorldCereal point extractions (wide layout) as pixel samples (:func:`load_worldcereal`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.datasets import IGNORE_INDEX, PixelSamples
from cropmap.errors import InputDataError
from cropmap.modalities import BANDS, resolve_bands
from cropmap.tables.common import (
    colour_for,
    location_groups,
    months_from,
    samples_from,
    slug,
    spatial_split,
)

log = logging.getLogger(__name__)

#: WorldCereal nodata value (uint16).
WC_NODATA = 65535
#: WorldCereal column prefix per cropmap band (the resolution suffix ``-10m``/``-20m``/``-100m`` varies).
WC_COLUMNS: dict[str, dict[str, str]] = {
    "s2": {b: f"OPTICAL-{b}" for b in BANDS["s2"]},
    "s1": {"VV": "SAR-VV", "VH": "SAR-VH"},
    "weather": {"temperature_2m": "METEO-temperature_mean", "total_precipitation": "METEO-precipitation_flux"},
}
WC_STATIC: dict[str, str] = {"elevation": "DEM-alt-20m", "slope": "DEM-slo-20m"}

#: Names of the 4-digit WorldCereal (EWOC) legend groups that occur in extractions; other groups
#: are named ``ewoc_group_<prefix>``.
EWOC_GROUPS: dict[str, str] = {
    "1101": "other_cereals", "1105": "pulses", "1106": "oilseeds", "1107": "root_tuber_crops",
    "1108": "fibre_crops", "2000": "herbaceous_vegetation", "2001": "grassland", "4300": "trees",
    "6000": "built_up",
}


def _ts_columns(df: pd.DataFrame, prefix: str) -> dict[int, str]:
    pat = re.compile(rf"^{re.escape(prefix)}-ts(\d+)(?:-\d+m)?$")
    return {int(m.group(1)): c for c in df.columns if (m := pat.match(c))}


def _wc_raw(df: pd.DataFrame, col: str | None, n: int) -> np.ndarray:
    """Column as float64 with the nodata value as NaN (an absent column is all NaN)."""
    if col is None:
        return np.full(n, np.nan)
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    v[v == WC_NODATA] = np.nan
    return v


def decode_worldcereal(df: pd.DataFrame, bands: Mapping[str, Sequence[str]] | None = None, *,
                       table: str | Path = "the table") -> tuple[dict[str, np.ndarray], int]:
    """Wide WorldCereal columns -> ``{m: [N, T, C]}`` (``dem [N, C]``) in cropmap units.

    ``bands`` (``{modality: bands}``, default every band of :data:`BANDS`) reads a band subset;
    ``table`` names the table in messages.

    Conversions (nodata 65535 -> NaN first):

    * S2 ``OPTICAL-Bxx`` (L2A DN): reflectance = DN / 10000. ``B8A`` absent from a table is
      filled with ``B08`` (narrow vs broad NIR, nearly identical over vegetation) with a
      warning, so S2 is not marked missing for every sample; any other missing band is an error
      (one line listing the bands found and expected).
    * S1 ``SAR-VV/VH`` (uint16 compressed): dB = 20 * log10(DN) - 83; DN 0 is NaN.
    * ``METEO-temperature_mean`` (AgERA5 daily mean, monthly mean, K x 100): K = DN / 100.
    * ``METEO-precipitation_flux`` (AgERA5, monthly sum in mm x 100): m per month = DN / 100 / 1000
      (the unit of ``total_precipitation`` in the weather modality, ERA5-Land monthly sums).
    * ``DEM-alt-20m`` (m) and ``DEM-slo-20m`` (degrees): as stored.

    Returns:
        The arrays and the number of time steps ``T``.
    """
    n = len(df)
    want = resolve_bands(bands)
    steps = _ts_columns(df, "OPTICAL-B02") or _ts_columns(df, "SAR-VV") or _ts_columns(df, "METEO-temperature_mean")
    if not steps:
        raise InputDataError(f"{table}: no OPTICAL-B02-ts*/SAR-VV-ts*/METEO-temperature_mean-ts* columns; is it a WorldCereal "
                             "extraction in the wide layout? (the long layout is format worldcereal_long)")
    t_n = max(steps) + 1
    x: dict[str, np.ndarray] = {}
    for m, cols in WC_COLUMNS.items():
        arr = np.full((n, t_n, len(want[m])), np.nan)
        found_bands = [b for b in BANDS[m] if _ts_columns(df, cols[b])]
        for ci, band in enumerate(want[m]):
            found = _ts_columns(df, cols[band])
            if not found:
                if band == "B8A" and _ts_columns(df, cols["B08"]):
                    log.warning("no OPTICAL-B8A columns: B8A is filled with B08")
                    found = _ts_columns(df, cols["B08"])
                else:
                    raise InputDataError(f"{table}: no {cols[band]}-ts* columns for {m} band {band} (found {m} bands {found_bands}, "
                                         f"expected {list(want[m])}); re-extract with that band or narrow the bands to those the table has")
            for t in range(t_n):
                arr[:, t, ci] = _wc_raw(df, found.get(t), n)
        if m == "s2":
            arr = arr / 10000.0
        elif m == "s1":
            with np.errstate(divide="ignore", invalid="ignore"):
                arr = np.where(arr > 0, 20.0 * np.log10(arr) - 83.0, np.nan)
        else:
            for ci, band in enumerate(want[m]):  # K x 100 -> K; mm x 100 per month -> m per month
                arr[..., ci] = arr[..., ci] / 100.0 if band == "temperature_2m" else arr[..., ci] / 100.0 / 1000.0
        x[m] = arr.astype(np.float32)
    missing = [WC_STATIC[b] for b in want["dem"] if WC_STATIC[b] not in df.columns]
    if missing:
        raise InputDataError(f"{table}: columns {missing} missing (found {[c for c in WC_STATIC.values() if c in df.columns]}, "
                             f"expected {[WC_STATIC[b] for b in want['dem']]}); re-extract with them or narrow bands.dem")
    x["dem"] = np.stack([_wc_raw(df, WC_STATIC[b], n) for b in want["dem"]], axis=1).astype(np.float32)
    return x, t_n


def ewoc_classes(codes: np.ndarray, labels: Sequence[str] | None = None, min_samples: int = 20) -> tuple[np.ndarray, list[dict]]:
    """Group WorldCereal ``ewoc_code`` values into classes with enough samples.

    Rule (hierarchical, data-driven): a code with at least ``min_samples`` samples is a class of
    its own (named from ``labels``, e.g. ``label_full``, else ``ewoc_<code>``); the remaining codes
    are pooled by their 4-digit legend group (``1106`` oilseeds, ``1105`` pulses, ...), and a pool
    with at least ``min_samples`` becomes a class; whatever is left goes to ``other``.
    Ids follow decreasing sample count, ``other`` last.

    Returns:
        Class id per sample and the class table ``[{id, name, colour, codes, n}]`` (``codes``:
        the ewoc codes in the class; ``n``: its sample count).
    """
    codes = np.asarray(codes).astype(np.int64)
    uniq, counts = np.unique(codes, return_counts=True)
    names: dict[int, str] = {}
    if labels is not None:
        for c, lab in zip(codes, labels, strict=True):
            names.setdefault(int(c), slug(lab))
    groups: list[tuple[str, list[int], int]] = []
    rest: dict[str, list[int]] = {}
    for c, k in zip(uniq, counts, strict=True):
        if k >= min_samples:
            groups.append((names.get(int(c), f"ewoc_{c}"), [int(c)], int(k)))
        else:
            rest.setdefault(str(c)[:4], []).append(int(c))
    other: list[int] = []
    for prefix, cs in sorted(rest.items()):
        k = int(sum(counts[uniq == c][0] for c in cs))
        if k >= min_samples:
            groups.append((EWOC_GROUPS.get(prefix, f"ewoc_group_{prefix}"), cs, k))
        else:
            other.extend(cs)
    groups.sort(key=lambda g: -g[2])
    if other:
        groups.append(("other", other, int(sum(counts[uniq == c][0] for c in other))))
    seen: dict[str, int] = {}
    table, y = [], np.full(len(codes), IGNORE_INDEX, dtype=np.int64)
    for i, (name, cs, k) in enumerate(groups):
        if name in seen:  # two groups with one name: keep both, distinguishable
            name = f"{name}_{cs[0]}"
        seen[name] = i
        table.append({"id": i, "name": name, "colour": colour_for(name, i), "codes": sorted(cs), "n": k})
        y[np.isin(codes, cs)] = i
    return y, table


def worldcereal_months(path: str | Path | pd.DataFrame) -> list[str]:
    """Month labels of a WorldCereal table: ``T`` months from its (most common) ``start_date``."""
    df = path if isinstance(path, pd.DataFrame) else pd.read_parquet(path)
    steps = _ts_columns(df, "OPTICAL-B02") or _ts_columns(df, "SAR-VV")
    t_n = max(steps) + 1
    if "start_date" not in df.columns:
        return [f"t{i:02d}" for i in range(t_n)]
    starts = df["start_date"].astype(str).str[:7]
    if starts.nunique() > 1:
        log.warning("%d different start dates: time steps are relative to each sample's start", starts.nunique())
    return months_from(starts.mode().iloc[0], t_n)


def load_worldcereal(path: str | Path, *, seed: int = 42, min_samples: int = 20, cell_deg: float = 0.1,
                     min_valid_fraction: float = 0.5, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     fold: int | None = None) -> tuple[PixelSamples, list[dict]]:
    """Read WorldCereal point extractions (wide parquet or csv) as pixel samples.

    Args:
        path: ``.parquet`` (or ``.csv``) with the wide columns described in :func:`decode_worldcereal`,
            ``ewoc_code`` and ``lat``/``lon``.
        seed: seeds the spatial split.
        min_samples: classes with fewer samples are pooled (:func:`ewoc_classes`).
        cell_deg: side of the lat/lon cells that group samples for the spatial split.
        min_valid_fraction: presence threshold for temporal modalities.
        fractions: train / val / test shares (by group).
        fold: which spatial fold is the test split (default ``seed % k``; :func:`spatial_split`).

    Returns:
        ``(samples, classes)``; ``samples.modalities == ["s2", "s1", "weather", "dem"]``.
    """
    path = Path(path)
    df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    if "ewoc_code" not in df.columns:
        raise ValueError(f"{path}: no ewoc_code column")
    x, _ = decode_worldcereal(df)
    labels = df["label_full"].astype(str).tolist() if "label_full" in df.columns else None
    y, classes = ewoc_classes(df["ewoc_code"].to_numpy(), labels, min_samples)
    if {"lat", "lon"} <= set(df.columns):
        groups = location_groups(df["lat"].to_numpy(), df["lon"].to_numpy(), cell_deg)
    else:
        raise ValueError(f"{path}: lat/lon columns are needed for the spatial split")
    split = spatial_split(y, groups, seed, fractions, fold)
    s = samples_from(x, y, split, min_valid_fraction)
    log.info("%s: %d samples, classes %s, split sizes %s", path.name, len(s),
             {c["name"]: c["n"] for c in classes}, np.bincount(split, minlength=3).tolist())
    return s, classes
