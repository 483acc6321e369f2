"""Labelled sample tables as training data, and the missing-sensor comparison on them.

Two layouts are read into :class:`~cropmap.tiles.PixelSamples` (``docs/sample_tables.md``
describes both precisely, so a user with another table can convert to one of them):

* **WorldCereal point extractions** (:func:`load_worldcereal`): one row per point, wide columns
  ``OPTICAL-B02-ts{t}-10m`` ... ``SAR-VV-ts{t}-20m`` ... ``METEO-*-ts{t}-100m``,
  ``DEM-alt-20m``, ``DEM-slo-20m``, the crop code ``ewoc_code``, ``lat``/``lon``.
* **CropHarvest arrays** (:func:`load_cropharvest`): ``X [N, 12, 18]`` in the band order of
  :data:`CROPHARVEST_ORDER` (``.npz`` or ``.h5``), plus real Earth Engine exports in the
  CropHarvest layout (GeoTIFF, unlabelled, decoded with
  :func:`cropmap.sources.earthengine.decode_cropharvest_export`).

Every value is converted to the units of cropmap's modalities (:data:`cropmap.modalities.BANDS`):
S2 surface reflectance 0-1, S1 backscatter in dB, 2 m temperature in K, precipitation in metres
per month, elevation in m, slope in degrees; invalid values are NaN. Presence masks follow
:func:`cropmap.availability.present` (a temporal modality is present when at least
``min_valid_fraction`` of its months have every channel finite; DEM when both bands are finite).

Splits are spatial: samples are grouped by ``cell_deg`` x ``cell_deg`` lat/lon cells and whole
cells are assigned to train / val / test with a seeded stratified group k-fold, so no cell (and
no field sampled several times) is in two splits.

:func:`compare_table` then trains every method on the same splits and seed and scores each on
every non-empty subset of modalities (the protocol of seed 000, Table 1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cropmap.availability import present
from cropmap.compare import TABLE_COLUMNS
from cropmap.modalities import BANDS, MODALITIES, TEMPORAL
from cropmap.tiles import IGNORE_INDEX, PixelSamples

log = logging.getLogger(__name__)

#: Band order of the CropHarvest arrays ``X [N, T, 18]``.
CROPHARVEST_ORDER: tuple[str, ...] = (
    "VV", "VH", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
    "temperature_2m", "total_precipitation", "elevation", "slope", "NDVI",
)
#: cropmap band -> CropHarvest band (B9 and NDVI are dropped).
_CH_NAME: dict[str, str] = {
    "B02": "B2", "B03": "B3", "B04": "B4", "B05": "B5", "B06": "B6", "B07": "B7", "B08": "B8",
    "B8A": "B8A", "B11": "B11", "B12": "B12", "VV": "VV", "VH": "VH",
    "temperature_2m": "temperature_2m", "total_precipitation": "total_precipitation",
    "elevation": "elevation", "slope": "slope",
}
#: Mean length of a month in days: converts a monthly mean of daily precipitation (m/day) to m/month.
DAYS_PER_MONTH = 365.25 / 12

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


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """``"Unspecified Sorghum"`` -> ``"sorghum"``; lower case, ``[a-z0-9_]`` only."""
    s = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    s = re.sub(r"^unspecified_", "", s)
    return s or "class"


def colour_for(name: str, i: int) -> str:
    """A colour for class ``name`` (known names keep theirs; the rest cycle through tab20)."""
    return COLOURS.get(name, _TAB20[i % len(_TAB20)])


def presence_mask(x: dict[str, np.ndarray], modalities: Sequence[str], min_valid_fraction: float) -> np.ndarray:
    """bool ``[N, M]``: :func:`cropmap.availability.present` applied to pixel samples.

    Args:
        x: ``{m: [N, T, C]}`` (static ``[N, C]``).
        modalities: order of the M axis.
        min_valid_fraction: share of months that must be valid for a temporal modality.
    """
    cols = []
    for m in modalities:
        a = x[m]
        # [N, T, C] -> time-major [T*C, N], the stack layout `present` reads
        stack = a.transpose(1, 2, 0).reshape(-1, a.shape[0]) if TEMPORAL[m] else a.T
        cols.append(present(stack, m, min_valid_fraction))
    return np.stack(cols, axis=1)


def location_groups(lat: np.ndarray, lon: np.ndarray, cell_deg: float) -> np.ndarray:
    """Integer group id per sample: its ``cell_deg`` x ``cell_deg`` lat/lon cell."""
    keys = np.stack([np.floor(np.asarray(lat, float) / cell_deg), np.floor(np.asarray(lon, float) / cell_deg)], axis=1)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    return inv.ravel().astype(np.int64)


def spatial_split(y: np.ndarray, groups: np.ndarray, seed: int,
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), fold: int | None = None) -> np.ndarray:
    """Seeded group split (0 train, 1 val, 2 test); every group lies wholly in one split.

    Groups are dealt into ``k = round(1 / test_fraction)`` folds with scikit-learn's
    ``StratifiedGroupKFold`` (class proportions kept as far as whole groups allow). Fold
    ``fold`` (default ``seed % k``) is the test split, the next ``round(val_fraction * k)`` folds
    (cyclically) the validation split, the rest train. The fold rotation matters: the
    stratified dealing itself hardly depends on the seed (its shuffle only breaks ties), so
    different seeds give different test regions through ``seed % k``; ``fold = 0 .. k-1`` gives
    a spatial k-fold cross-validation. Unlabelled samples (``y < 0``) follow their group.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    _, _, f_test = fractions
    k = max(3, round(1 / f_test))
    n_val = max(1, round(fractions[1] * k))
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise ValueError(f"{n_groups} location groups for a {k}-fold spatial split: use a smaller cell_deg")
    strat = np.where(y >= 0, y, y.max() + 1)
    folds = np.empty(len(y), dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():  # "least populated class has only n members": expected for rare classes
        warnings.simplefilter("ignore", UserWarning)
        for i, (_, test_idx) in enumerate(cv.split(np.zeros(len(y)), strat, groups)):
            folds[test_idx] = i
    test = (seed if fold is None else fold) % k
    rel = (folds - test) % k
    split = np.zeros(len(y), dtype=np.uint8)
    split[(rel >= 1) & (rel <= n_val)] = 1
    split[rel == 0] = 2
    return split


def _samples(x: dict[str, np.ndarray], y: np.ndarray, split: np.ndarray, min_valid_fraction: float) -> PixelSamples:
    mods: list[str] = list(MODALITIES)
    x = {m: np.ascontiguousarray(x[m], dtype=np.float32) for m in mods}
    return PixelSamples(x, presence_mask(x, mods, min_valid_fraction), y.astype(np.int64), split.astype(np.uint8), mods)


def months_from(start: str, n: int) -> list[str]:
    """``n`` month labels ``YYYY-MM`` from ``start`` (``YYYY-MM`` or ``YYYY-MM-DD``)."""
    p = pd.Period(str(start)[:7], freq="M")
    return [str(p + i) for i in range(n)]


# --------------------------------------------------------------------------------------------
# WorldCereal wide extractions
# --------------------------------------------------------------------------------------------
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


def decode_worldcereal(df: pd.DataFrame) -> tuple[dict[str, np.ndarray], int]:
    """Wide WorldCereal columns -> ``{m: [N, T, C]}`` (``dem [N, 2]``) in cropmap units.

    Conversions (nodata 65535 -> NaN first):

    * S2 ``OPTICAL-Bxx`` (L2A DN): reflectance = DN / 10000. ``B8A`` absent from a table is
      filled with ``B08`` (narrow vs broad NIR, nearly identical over vegetation) with a
      warning, so S2 is not marked missing for every sample; any other missing band is an error.
    * S1 ``SAR-VV/VH`` (uint16 compressed): dB = 20 * log10(DN) - 83; DN 0 is NaN.
    * ``METEO-temperature_mean`` (AgERA5 daily mean, monthly mean, K x 100): K = DN / 100.
    * ``METEO-precipitation_flux`` (AgERA5, monthly sum in mm x 100): m per month = DN / 100 / 1000
      (the unit of ``total_precipitation`` in the weather modality, ERA5-Land monthly sums).
    * ``DEM-alt-20m`` (m) and ``DEM-slo-20m`` (degrees): as stored.

    Returns:
        The arrays and the number of time steps ``T``.
    """
    n = len(df)
    steps = _ts_columns(df, "OPTICAL-B02") or _ts_columns(df, "SAR-VV") or _ts_columns(df, "METEO-temperature_mean")
    if not steps:
        raise ValueError("no OPTICAL-B02-ts*/SAR-VV-ts*/METEO-temperature_mean-ts* columns: is it a WorldCereal extraction table?")
    t_n = max(steps) + 1
    x: dict[str, np.ndarray] = {}
    for m, cols in WC_COLUMNS.items():
        arr = np.full((n, t_n, len(BANDS[m])), np.nan)
        for ci, band in enumerate(BANDS[m]):
            found = _ts_columns(df, cols[band])
            if not found:
                if band == "B8A" and _ts_columns(df, cols["B08"]):
                    log.warning("no OPTICAL-B8A columns: B8A is filled with B08")
                    found = _ts_columns(df, cols["B08"])
                else:
                    raise ValueError(f"no {cols[band]}-ts* columns in the table (needed for {m} band {band})")
            for t in range(t_n):
                arr[:, t, ci] = _wc_raw(df, found.get(t), n)
        if m == "s2":
            arr = arr / 10000.0
        elif m == "s1":
            with np.errstate(divide="ignore", invalid="ignore"):
                arr = np.where(arr > 0, 20.0 * np.log10(arr) - 83.0, np.nan)
        else:
            arr[..., 0] = arr[..., 0] / 100.0  # K
            arr[..., 1] = arr[..., 1] / 100.0 / 1000.0  # mm x 100 per month -> m per month
        x[m] = arr.astype(np.float32)
    missing = [c for c in WC_STATIC.values() if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} missing from the table")
    x["dem"] = np.stack([_wc_raw(df, WC_STATIC[b], n) for b in BANDS["dem"]], axis=1).astype(np.float32)
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
    s = _samples(x, y, split, min_valid_fraction)
    log.info("%s: %d samples, classes %s, split sizes %s", path.name, len(s),
             {c["name"]: c["n"] for c in classes}, np.bincount(split, minlength=3).tolist())
    return s, classes


# --------------------------------------------------------------------------------------------
# CropHarvest arrays and Earth Engine exports
# --------------------------------------------------------------------------------------------
def from_cropharvest_array(X: np.ndarray, s2_scale: float = 10000.0, precip_unit: str = "m/day") -> dict[str, np.ndarray]:
    """CropHarvest ``X [N, T, 18]`` -> ``{m: [N, T, C]}``, ``dem [N, 2]`` in cropmap units.

    B9 and NDVI are dropped; S2 is divided by ``s2_scale`` (CropHarvest stores Sentinel-2 DN);
    precipitation in ``"m/day"`` (ERA5-Land monthly averaged: mean daily total) is multiplied by
    :data:`DAYS_PER_MONTH` to m per month, ``"m/month"`` is kept; elevation and slope come from
    time step 0. Non-finite values stay NaN.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3 or X.shape[2] != len(CROPHARVEST_ORDER):
        raise ValueError(f"CropHarvest X must be [N, T, {len(CROPHARVEST_ORDER)}], got {list(X.shape)}")
    if precip_unit not in ("m/day", "m/month"):
        raise ValueError(f"precip_unit must be 'm/day' or 'm/month', not {precip_unit!r}")
    idx = {b: i for i, b in enumerate(CROPHARVEST_ORDER)}
    out: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        cols = [idx[_CH_NAME[b]] for b in BANDS[m]]
        a = X[:, :, cols].copy() if TEMPORAL[m] else X[:, 0, cols].copy()
        if m == "s2":
            a /= s2_scale
        if m == "weather" and precip_unit == "m/day":
            a[..., 1] *= DAYS_PER_MONTH
        out[m] = a.astype(np.float32)
    return out


def decode_export(path: str | Path, precip_unit: str = "m/day") -> dict[str, np.ndarray]:
    """A real Earth Engine export in the CropHarvest layout -> ``{m: [H*W, T, C]}``, ``dem [H*W, 2]``.

    Uses :func:`cropmap.sources.earthengine.decode_cropharvest_export` (band names ``VV``,
    ``VH_1``, ..., S2 / 10000), then reorders pixels row-major and converts precipitation like
    :func:`from_cropharvest_array`.
    """
    from cropmap.sources.earthengine import decode_cropharvest_export

    arrays = decode_cropharvest_export(path)
    out: dict[str, np.ndarray] = {}
    for m, a in arrays.items():
        c = len(BANDS[m])
        hw = a.shape[1] * a.shape[2]
        v: np.ndarray
        if TEMPORAL[m]:
            v = a.reshape(a.shape[0] // c, c, hw).transpose(2, 0, 1).copy()
            if m == "weather" and precip_unit == "m/day":
                v[..., 1] *= DAYS_PER_MONTH
        else:
            v = a.reshape(c, hw).T.copy()
        out[m] = v.astype(np.float32)
    return out


def _read_arrays(path: Path) -> dict[str, Any]:
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in f}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_cropharvest(path: str | Path, *, seed: int = 42, cell_deg: float = 0.1, min_valid_fraction: float = 0.5,
                     s2_scale: float = 10000.0, precip_unit: str = "m/day",
                     fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     fold: int | None = None) -> tuple[PixelSamples, list[dict]]:
    """Read CropHarvest-layout samples (``.npz``/``.h5``) or an Earth Engine export (``.tif``).

    Arrays file keys: ``X [N, T, 18]`` (:data:`CROPHARVEST_ORDER`), ``y [N]`` (int class ids,
    ``-100`` unlabelled), optional ``lat``/``lon [N]`` (spatial split by ``cell_deg`` cells),
    optional ``groups [N]`` (used instead of lat/lon), optional ``class_names [K]``. Without
    either, the split is a seeded random one (logged as not spatial).

    A ``.tif`` is an unlabelled export (:func:`decode_export`): one sample per pixel,
    ``y = -100``, ``split = 2``, classes ``[]``.

    Returns:
        ``(samples, classes)`` with classes ``[{id, name, colour, codes: [], n}]``.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        x = decode_export(path, precip_unit)
        n = len(x["dem"])
        return _samples(x, np.full(n, IGNORE_INDEX), np.full(n, 2), min_valid_fraction), []
    d = _read_arrays(path)
    if "X" not in d or "y" not in d:
        raise ValueError(f"{path}: needs arrays 'X' [N, T, 18] and 'y' [N]; found {sorted(d)}")
    x = from_cropharvest_array(d["X"], s2_scale, precip_unit)
    y = np.asarray(d["y"]).astype(np.int64)
    k = int(y.max()) + 1 if (y >= 0).any() else 0
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in d["class_names"]] if "class_names" in d else []
    if names and len(names) < k:
        raise ValueError(f"{path}: {len(names)} class_names for class ids up to {k - 1}")
    names = [slug(n) for n in names] or [f"class_{i}" for i in range(k)]
    classes = [{"id": i, "name": names[i], "colour": colour_for(names[i], i), "codes": [], "n": int((y == i).sum())}
               for i in range(len(names))]
    if "groups" in d:
        groups = np.unique(np.asarray(d["groups"]), return_inverse=True)[1].ravel()
    elif "lat" in d and "lon" in d:
        groups = location_groups(d["lat"], d["lon"], cell_deg)
    else:
        log.warning("%s: no lat/lon or groups: the split is random, not spatial", path.name)
        groups = np.arange(len(y))
    split = spatial_split(y, groups, seed, fractions, fold)
    return _samples(x, y, split, min_valid_fraction), classes


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------
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
    ``out_dir/<method>/model.ckpt``, then :func:`cropmap.report.evaluate_samples` on
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
    from cropmap.predict import Predictor
    from cropmap.report import evaluate_samples
    from cropmap.train import TrainSettings, fit_pixels

    out_dir = Path(out_dir)
    from cropmap.models import methods_for

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


__all__ = [
    "CROPHARVEST_ORDER", "class_counts", "compare_table", "decode_export", "decode_worldcereal",
    "ewoc_classes", "from_cropharvest_array", "load_cropharvest", "load_worldcereal", "location_groups",
    "months_from", "presence_mask", "spatial_split", "worldcereal_months",
]
