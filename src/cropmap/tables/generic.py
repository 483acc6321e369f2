"""Generic point tables in cropmap's own band naming, and what every sample-table reader shares.

A **generic point table** (GeoParquet, Parquet or CSV) holds one row per labelled point and one
column per band and month, named like the stacks' band descriptions with the modality in front:
``s2_B04_2023-05``, ``s1_VV_2023-05``, ``weather_temperature_2m_2023-05``, and
``dem_elevation`` / ``dem_slope`` for the static DEM; plus a label column and either ``lat`` /
``lon`` columns or a point geometry. Values are in cropmap's units (``docs/sample_tables.md``);
NaN (or an empty CSV cell) is invalid. :func:`load_point_table` reads it.

Shared by every table reader (this module and :mod:`cropmap.tables.worldcereal_long`):

* :func:`select_season`: the months of a training set's season, by calendar month, from a
  table's month labels (one line naming the table, its months and the season when they do not
  cover it); :func:`check_calendar_alignment` checks that a region's season maps month by month
  onto a training season (January to January, whatever the years).
* :func:`table_classes`: class ids from the config's ``classes`` (``codes`` = the table's label
  values) or, when the config gives none, from the table itself.
* :func:`pixel_samples`: presence masks (the rule of :func:`cropmap.availability.present`, for
  any number of bands per modality) and the seeded spatial split of :mod:`cropmap.tables`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cropmap.datasets import IGNORE_INDEX, PixelSamples
from cropmap.errors import InputDataError, LabelError
from cropmap.grid import check_calendar_alignment, season_months
from cropmap.labels import code_table
from cropmap.modalities import MODALITIES, TEMPORAL, resolve_bands
from cropmap.tables.common import colour_for, location_groups, presence_mask, slug, spatial_split
from cropmap.tables.worldcereal import ewoc_classes

log = logging.getLogger(__name__)

#: ``s2_B04_2023-05`` -> modality, band, month (temporal columns of a generic table).
TEMPORAL_COLUMN = re.compile(r"^(s2|s1|weather)_(.+)_(\d{4}-\d{2})$")
#: ``dem_elevation`` -> band (static columns).
STATIC_COLUMN = re.compile(r"^dem_(.+)$")

UnknownCodes = Literal["error", "ignore"]


# --------------------------------------------------------------------------------------------
# Bands, months and seasons
# --------------------------------------------------------------------------------------------
def month_range(labels: Sequence[str]) -> list[str]:
    """Every month from the earliest to the latest of ``labels`` (``YYYY-MM``), gaps included."""
    if not labels:
        return []
    return season_months(min(labels), max(labels))


def select_season(months: Sequence[str], season: tuple[str, str] | Sequence[str], *, table: str | Path) -> list[int]:
    """Indices in ``months`` of the months of ``season``, in season order.

    A training set's season names calendar months (``2021-01`` .. ``2021-12``); the table must hold
    every one of them.

    Args:
        months: the table's month labels ``YYYY-MM``.
        season: ``(start, end)`` months, inclusive.
        table: the table's path or name (for the message).

    Returns:
        Positions of the season's months in ``months``.

    Raises:
        InputDataError: one line naming the table, its months and the season when the table
            does not cover the season.
    """
    start, end = str(season[0]), str(season[1])
    wanted = season_months(start, end)
    pos = {m: i for i, m in enumerate(months)}
    missing = [m for m in wanted if m not in pos]
    if missing:
        have = f"{months[0]} .. {months[-1]} ({len(months)} months)" if months else "no months"
        raise InputDataError(
            f"{table}: its months {have} do not cover the season {start} .. {end} (missing {missing[0]}"
            f"{f' .. {missing[-1]}' if len(missing) > 1 else ''}); set the training set's season within the table's months "
            "or extract the table over the whole season"
        )
    return [pos[m] for m in wanted]


# --------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------
def value_classes(values: Sequence[object] | np.ndarray, min_samples: int = 20) -> tuple[np.ndarray, list[dict]]:
    """One class per distinct label value with at least ``min_samples`` samples; the rest is ``other``.

    Ids follow decreasing sample count, ``other`` last; names are slugs of the values.

    Returns:
        Class id per sample and the class table ``[{id, name, colour, codes, n}]``.
    """
    vals = np.asarray([str(v) for v in values])
    uniq, counts = np.unique(vals, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    kept = [(str(uniq[i]), int(counts[i])) for i in order if counts[i] >= min_samples]
    rest = [str(uniq[i]) for i in order if counts[i] < min_samples]
    groups: list[tuple[str, list[str], int]] = [(slug(v), [v], k) for v, k in kept]
    if rest:
        groups.append(("other", rest, int(np.isin(vals, rest).sum())))
    y = np.full(len(vals), IGNORE_INDEX, dtype=np.int64)
    table: list[dict] = []
    seen: set[str] = set()
    for i, (name, codes, k) in enumerate(groups):
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        table.append({"id": i, "name": name, "colour": colour_for(name, i), "codes": codes, "n": k})
        y[np.isin(vals, codes)] = i
    return y, table


def table_classes(codes: Sequence[object] | np.ndarray, *, table: str | Path, classes: Sequence[dict] | None = None,
                  labels: Sequence[str] | None = None, min_samples: int = 20, ewoc: bool = False,
                  unknown: UnknownCodes = "error") -> tuple[np.ndarray, list[dict]]:
    """Class id per sample, from the config's classes or from the table's own codes.

    Args:
        codes: the table's label value per sample (``ewoc_code``, a crop name, ...).
        table: path or name of the table (for messages).
        classes: the config's ``classes`` (``[{id, name, colour, codes}]``): a sample belongs to
            the class whose ``codes`` (or ``name``) equal its value. Empty or None: classes come
            from the table (below).
        labels: names of the codes (``label_full``), for classes drawn from the table.
        min_samples: classes drawn from the table pool codes with fewer samples.
        ewoc: the codes are WorldCereal ``ewoc_code`` values: classes drawn from the table follow
            :func:`cropmap.tables.ewoc_classes` (as the wide loader); otherwise one class per
            distinct value (:func:`value_classes`).
        unknown: with config classes, what a value that no class lists does: ``"error"`` stops,
            ``"ignore"`` leaves the sample unlabelled (``-100``).

    Returns:
        ``(y, classes)``: int64 ids (``-100`` unlabelled) and ``[{id, name, colour, codes, n}]``.

    Raises:
        LabelError: values no config class lists (with ``unknown="error"``).
    """
    values = np.asarray(codes)
    if not classes:
        if ewoc:
            return ewoc_classes(values, labels, min_samples)
        return value_classes(values, min_samples)
    lookup = code_table(classes)
    keys = [str(v) for v in values]
    y = np.array([lookup.get(k, IGNORE_INDEX) for k in keys], dtype=np.int64)
    missing = sorted({k for k in keys if k not in lookup})
    if missing and unknown == "error":
        raise LabelError(
            f"{table}: {len(missing)} label value(s) that no class lists, e.g. {missing[:5]}; add them to a class's codes "
            "in config.yaml (classes[].codes) or leave them out (the training set's unknown_codes: ignore)"
        )
    if missing:
        log.info("%s: %d samples with values no class lists (e.g. %s) are left unlabelled", table, int((y < 0).sum()), missing[:3])
    out = [{"id": c["id"], "name": c["name"], "colour": c.get("colour", "#808080"),
            "codes": list(c.get("codes", [])), "n": int((y == c["id"]).sum())} for c in classes]
    return y, out


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------
def pixel_samples(x: Mapping[str, np.ndarray], y: np.ndarray, lat: np.ndarray, lon: np.ndarray, *, seed: int,
                  cell_deg: float, min_valid_fraction: float, fractions: tuple[float, float, float],
                  fold: int | None) -> PixelSamples:
    """:class:`~cropmap.datasets.PixelSamples` with presence masks and a spatial split.

    The split is :func:`cropmap.tables.spatial_split` over ``cell_deg`` lat/lon cells.
    """
    mods: list[str] = [m for m in MODALITIES if m in x]
    xs: dict[str, np.ndarray] = {m: np.ascontiguousarray(x[m], dtype=np.float32) for m in mods}
    split = spatial_split(y, location_groups(lat, lon, cell_deg), seed, fractions, fold)
    return PixelSamples(xs, presence_mask(xs, mods, min_valid_fraction), y.astype(np.int64), split.astype(np.uint8), mods)


def read_table(path: str | Path) -> pd.DataFrame:
    """A Parquet/GeoParquet or CSV table; a point geometry becomes ``lat``/``lon`` (WGS84).

    Raises:
        InputDataError: a missing file or another format.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such table; fix the path (relative paths start from the folder you run in)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix not in (".parquet", ".geoparquet", ".pq"):
        raise InputDataError(f"{path}: a {suffix or 'suffix-less'} file is not a table cropmap reads; give .parquet, .geoparquet or .csv")
    import pyarrow.parquet as pq

    if b"geo" in (pq.read_schema(path).metadata or {}):
        import geopandas as gpd

        gdf = gpd.read_parquet(path)
        if gdf.crs is not None and not gdf.empty:
            gdf = gdf.to_crs("EPSG:4326")
        pts = gdf.geometry.representative_point()
        df = pd.DataFrame(gdf.drop(columns=gdf.geometry.name))
        if "lat" not in df.columns or "lon" not in df.columns:
            df["lat"], df["lon"] = pts.y.to_numpy(), pts.x.to_numpy()
        return df
    return pd.read_parquet(path)


def point_coords(df: pd.DataFrame, path: Path) -> tuple[np.ndarray, np.ndarray]:
    for la, lo in (("lat", "lon"), ("latitude", "longitude")):
        if la in df.columns and lo in df.columns:
            return df[la].to_numpy(np.float64), df[lo].to_numpy(np.float64)
    raise InputDataError(f"{path}: no lat/lon columns and no point geometry (columns: {list(df.columns)[:8]}...); "
                         "add lat and lon in WGS84 degrees, or save the table as GeoParquet with point geometries")


def decode_point_table(df: pd.DataFrame, *, table: str | Path,
                       bands: Mapping[str, Sequence[str]] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Band columns of a generic point table -> ``{m: [N, T, C]}`` (``dem [N, C]``) and the months.

    A modality without any column is absent (all NaN, logged). A modality that has columns must
    have every band asked for (``bands``, default all of :data:`BANDS`); a band missing for
    some months only is NaN there. The months run from the earliest to the latest month of any
    column, gaps included (NaN).

    Raises:
        InputDataError: one line listing the bands found and expected when a band is missing,
            or when no column follows the naming.
    """
    want = resolve_bands(bands)
    found: dict[str, dict[str, dict[str, str]]] = {m: {} for m in MODALITIES}  # m -> band -> month -> column
    for col in df.columns:
        if (mt := TEMPORAL_COLUMN.match(str(col))) is not None:
            found[mt.group(1)].setdefault(mt.group(2), {})[mt.group(3)] = str(col)
        elif (ms := STATIC_COLUMN.match(str(col))) is not None:
            found["dem"].setdefault(ms.group(1), {})["static"] = str(col)
    if not any(found.values()):
        raise InputDataError(f"{table}: no band column named like s2_B04_2023-05, s1_VV_2023-05, weather_temperature_2m_2023-05 "
                             f"or dem_elevation (columns: {list(df.columns)[:8]}...); rename the columns (docs/sample_tables.md)")
    months = month_range(sorted({mo for m in ("s2", "s1", "weather") for per in found[m].values() for mo in per}))
    n = len(df)
    x: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        cols = found[m]
        shape = (n, len(months), len(want[m])) if TEMPORAL[m] else (n, len(want[m]))
        arr = np.full(shape, np.nan, dtype=np.float32)
        if not cols:
            log.warning("%s: no %s_* columns: %s is absent for every sample", table, m, m)
            x[m] = arr
            continue
        missing = [b for b in want[m] if b not in cols]
        if missing:
            raise InputDataError(f"{table}: {m} bands {missing} have no column (found {m} bands {sorted(cols)}, expected {list(want[m])}); "
                                 f"add columns like {m}_{missing[0]}_{months[0] if TEMPORAL[m] and months else ''}".rstrip("_")
                                 + " or narrow the bands to those the table has")
        for ci, b in enumerate(want[m]):
            if not TEMPORAL[m]:
                arr[:, ci] = pd.to_numeric(df[cols[b]["static"]], errors="coerce").to_numpy(np.float32, na_value=np.nan)
                continue
            for ti, mo in enumerate(months):
                if mo in cols[b]:
                    arr[:, ti, ci] = pd.to_numeric(df[cols[b][mo]], errors="coerce").to_numpy(np.float32, na_value=np.nan)
        x[m] = arr
    return x, months


def load_point_table(path: str | Path, *, label: str = "label", season: tuple[str, str] | None = None,
                     classes: Sequence[dict] | None = None, bands: Mapping[str, Sequence[str]] | None = None,
                     unknown: UnknownCodes = "error", seed: int = 42, min_samples: int = 20, cell_deg: float = 0.1,
                     min_valid_fraction: float = 0.5, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     fold: int | None = None) -> tuple[PixelSamples, list[dict], list[str]]:
    """Read a generic point table (module docstring) as pixel samples.

    Args:
        path: ``.parquet`` / ``.geoparquet`` / ``.csv``.
        label: the column holding each point's class code or name.
        season: ``(start, end)`` months to keep (:func:`select_season`); None keeps every month.
        classes: the config's classes (``codes`` = values of ``label``); empty: one class per
            distinct value with at least ``min_samples`` samples, the rest ``other``.
        bands: ``{modality: bands}`` to read a band subset (default every band).
        unknown: with config classes, ``"ignore"`` leaves values no class lists unlabelled.
        seed, cell_deg, fractions, fold: the spatial split (:func:`cropmap.tables.spatial_split`).
        min_valid_fraction: presence threshold for temporal modalities.

    Returns:
        ``(samples, classes, months)``.

    Raises:
        InputDataError: missing file / columns / bands, or a season the table does not cover.
        LabelError: label values no config class lists.
    """
    path = Path(path)
    df = read_table(path)
    if label not in df.columns:
        raise InputDataError(f"{path}: no label column {label!r} (columns: {list(df.columns)[:8]}...); name the column holding the classes")
    lat, lon = point_coords(df, path)
    x, months = decode_point_table(df, table=path, bands=bands)
    if season is not None:
        idx = select_season(months, season, table=path)
        x = {m: (v[:, idx] if TEMPORAL[m] else v) for m, v in x.items()}
        months = [months[i] for i in idx]
    y, table = table_classes(df[label].to_numpy(), table=path, classes=classes, min_samples=min_samples, unknown=unknown)
    s = pixel_samples(x, y, lat, lon, seed=seed, cell_deg=cell_deg, min_valid_fraction=min_valid_fraction,
                      fractions=fractions, fold=fold)
    log.info("%s: %d samples, %d months, classes %s", path.name, len(s), len(months), {c["name"]: c["n"] for c in table})
    return s, table, months


__all__ = [
    "check_calendar_alignment", "decode_point_table", "load_point_table", "month_range", "pixel_samples",
    "read_table", "resolve_bands", "select_season", "table_classes", "value_classes",
]
