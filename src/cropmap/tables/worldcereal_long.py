"""WorldCereal point extractions in the current **long** layout.

One row per ``sample_id`` x ``timestamp``; steps are monthly (``timestamp`` on the 1st) or dekadal
(the 1st, 11th and 21st, as ``worldcereal.train`` validates them). Columns:

=====================================  =========================================  ==========================================
column                                 content                                    cropmap unit
=====================================  =========================================  ==========================================
``S2-L2A-B02`` .. ``B12``, ``B8A``     Sentinel-2 L2A DN (uint16)                 reflectance = DN / 10000
``S1-SIGMA0-VV``, ``S1-SIGMA0-VH``     sigma0, compressed dB (uint16)             dB = 20 * log10(DN) - 83 (DN 0 invalid)
``AGERA5-TMEAN``                       AgERA5 mean 2 m temperature, K x 100       K = DN / 100
``AGERA5-PRECIP``                      AgERA5 precipitation over the step, mm x100 metres per month (below)
``elevation``, ``slope``               Copernicus DEM, m and degrees              as stored
``ewoc_code``, ``lat``, ``lon``        WorldCereal legend code, WGS84 position    classes, spatial split
=====================================  =========================================  ==========================================

Nodata is 65535 in every band column. The compressed-dB formula inverts openEO GFMap's
``compress_backscatter_uint16`` (``DN = 10 ** ((10 * log10(power) + 83) / 20)``).

**Precipitation.** ``AGERA5-PRECIP`` of a step is the precipitation *total* over that step, in
mm x 100: WorldCereal composites AgERA5's daily ``precipitation-flux`` with a *sum* per month
(and per dekad: ``aggregate_temporal_period(period="dekad", reducer="sum")`` in its AgERA5
dekadal composite job), while temperature is a *mean*; its training code divides the value by
100 and by 1000 to metres whatever the step (``prometheo``'s ``WorldCerealDataset``), and its data
notes call it "the precipitation sum ... expressed in mm". The Flanders monthly table agrees:
22-161 mm per month. So a step converts to metres as ``DN / 100 / 1000``, and a month's total is
the sum of its steps; when a step is nodata the month's total is the valid steps' total scaled
to the whole month by day count (``sum(valid) * days_in_month / days(valid steps)``; a dekad
covers days 1-10, 11-20 and 21-end). Every other band of a month is the mean of its valid steps
(S1 averaged in dB).

A band column that is nodata in every row, or absent, is handled as in the wide loader: ``B8A``
is filled with ``B08`` (narrow vs broad NIR, nearly equal over vegetation) with a warning; any
other absent band is an error, any other all-nodata band stays NaN (with a warning).
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.datasets import PixelSamples
from cropmap.errors import InputDataError
from cropmap.modalities import MODALITIES, TEMPORAL
from cropmap.tables.generic import (
    UnknownCodes,
    month_range,
    pixel_samples,
    read_table,
    resolve_bands,
    select_season,
    table_classes,
)
from cropmap.tables.worldcereal import WC_NODATA

log = logging.getLogger(__name__)

#: Column of each cropmap band in the long layout.
LONG_COLUMNS: dict[str, dict[str, str]] = {
    "s2": {b: f"S2-L2A-{b}" for b in ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")},
    "s1": {"VV": "S1-SIGMA0-VV", "VH": "S1-SIGMA0-VH"},
    "weather": {"temperature_2m": "AGERA5-TMEAN", "total_precipitation": "AGERA5-PRECIP"},
    "dem": {"elevation": "elevation", "slope": "slope"},
}
#: Columns every long table needs besides the bands.
REQUIRED = ("sample_id", "timestamp", "lat", "lon")


def step_days(ts: pd.Series, freq: str) -> np.ndarray:
    """Days each step covers: the whole month for monthly steps; 10, 10 and the rest for dekads."""
    dim = ts.dt.days_in_month.to_numpy()
    if freq == "month":
        return dim.astype(np.float64)
    day = ts.dt.day.to_numpy()
    return np.where(day < 21, 10.0, dim - 20.0)


def step_frequency(ts: pd.Series, *, table: str | Path) -> str:
    """``"month"`` when every timestamp is on the 1st, ``"dekad"`` when they are on the 1st/11th/21st.

    Raises:
        InputDataError: other days (naming a few).
    """
    days = set(np.unique(ts.dt.day.to_numpy()).tolist())
    if days <= {1}:
        return "month"
    if days <= {1, 11, 21}:
        return "dekad"
    raise InputDataError(f"{table}: timestamps on days {sorted(days - {1, 11, 21})[:5]} of the month; a WorldCereal long table "
                         "has monthly steps (the 1st) or dekads (the 1st, 11th, 21st): re-extract it or resample the timestamps")


def _raw(df: pd.DataFrame, col: str) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    v[v == WC_NODATA] = np.nan
    return v


def _to_units(m: str, band: str, v: np.ndarray) -> np.ndarray:
    """One band column (nodata already NaN) in cropmap units; precipitation in metres over the step."""
    if m == "s2":
        return v / 10000.0
    if m == "s1":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, 20.0 * np.log10(v) - 83.0, np.nan)
    if m == "weather":
        return v / 100.0 if band == "temperature_2m" else v / 100.0 / 1000.0
    return v


def _band_columns(df: pd.DataFrame, m: str, bands: Sequence[str], table: str | Path) -> dict[str, str]:
    """Column per band, with B8A -> B08 when B8A is absent or nodata in every row."""
    cols = {}
    found = [b for b, c in LONG_COLUMNS[m].items() if c in df.columns]
    for b in bands:
        col = LONG_COLUMNS[m][b]
        usable = col in df.columns and bool(np.isfinite(_raw(df, col)).any())
        if b == "B8A" and not usable and LONG_COLUMNS[m]["B08"] in df.columns:
            log.warning("%s: %s is %s: B8A is filled with B08", table, col, "nodata in every row" if col in df.columns else "absent")
            cols[b] = LONG_COLUMNS[m]["B08"]
            continue
        if col not in df.columns:
            raise InputDataError(f"{table}: no column {col} for {m} band {b} (found {m} bands {found}, expected {list(bands)}); "
                                 "re-extract with that band or narrow the bands to those the table has")
        if not usable:
            log.warning("%s: %s is nodata in every row: %s band %s is NaN", table, col, m, b)
        cols[b] = col
    return cols


def decode_worldcereal_long(df: pd.DataFrame, *, table: str | Path = "table",
                            bands: Mapping[str, Sequence[str]] | None = None
                            ) -> tuple[dict[str, np.ndarray], list[str], pd.DataFrame]:
    """Long WorldCereal rows -> ``{m: [N, T, C]}`` (``dem [N, C]``) per sample and calendar month.

    Args:
        df: the table (module docstring).
        table: its path or name, for messages.
        bands: ``{modality: bands}`` to read a band subset (default every band).

    Returns:
        ``(x, months, samples)``: arrays in cropmap units (NaN invalid), the month labels
        ``YYYY-MM`` (every month from the first step to the last, gaps NaN), and one row per
        sample (``sample_id``, ``lat``, ``lon`` and ``ewoc_code`` / ``label_full`` when present),
        in order of first appearance.

    Raises:
        InputDataError: a missing column or band, or timestamps that are neither monthly nor dekadal.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputDataError(f"{table}: columns {missing} missing (a WorldCereal long table has {list(REQUIRED)}, one row per sample and "
                             "time step); for the wide layout use cropmap.tables.load_worldcereal")
    want = resolve_bands(bands)
    ts = pd.to_datetime(df["timestamp"])
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_localize(None)
    freq = step_frequency(ts, table=table)
    period = ts.dt.to_period("M")
    months = month_range(sorted({str(p) for p in period.unique()}))
    m_idx = (period.dt.year.to_numpy() * 12 + period.dt.month.to_numpy()) - (int(months[0][:4]) * 12 + int(months[0][5:7]))
    codes, uniq = pd.factorize(df["sample_id"], sort=False)
    n, t_n = len(uniq), len(months)
    first = pd.DataFrame({"row": np.arange(len(df)), "s": codes}).groupby("s")["row"].min().to_numpy()
    keep = [c for c in ("sample_id", "lat", "lon", "ewoc_code", "label_full") if c in df.columns]
    samples = df.iloc[first][keep].reset_index(drop=True)
    days = step_days(ts, freq)
    x: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        cols = _band_columns(df, m, want[m], table)
        if not TEMPORAL[m]:
            arr = np.full((n, len(want[m])), np.nan)
            for ci, b in enumerate(want[m]):
                v = _to_units(m, b, _raw(df, cols[b]))
                ok = np.isfinite(v)
                tot, cnt = np.zeros(n), np.zeros(n)
                np.add.at(tot, codes[ok], v[ok])
                np.add.at(cnt, codes[ok], 1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    arr[:, ci] = np.where(cnt > 0, tot / cnt, np.nan)
            x[m] = arr.astype(np.float32)
            continue
        arr = np.full((n, t_n, len(want[m])), np.nan)
        cell = codes * t_n + m_idx
        dim = np.array([calendar.monthrange(int(mo[:4]), int(mo[5:7]))[1] for mo in months], dtype=np.float64)
        for ci, b in enumerate(want[m]):
            v = _to_units(m, b, _raw(df, cols[b]))
            ok = np.isfinite(v)
            tot, cnt = np.zeros(n * t_n), np.zeros(n * t_n)
            # precipitation: total over the valid steps scaled to the month by day count; else mean of the valid steps
            w = days if b == "total_precipitation" else np.ones(len(v))
            np.add.at(tot, cell[ok], v[ok])
            np.add.at(cnt, cell[ok], w[ok])
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(cnt > 0, tot / cnt, np.nan).reshape(n, t_n)
            if b == "total_precipitation":
                out = out * dim[None, :]
            arr[:, :, ci] = out
        x[m] = arr.astype(np.float32)
    log.info("%s: %d samples, %s steps -> %d months (%s .. %s)", table, n, freq, t_n, months[0], months[-1])
    return x, months, samples


def load_worldcereal_long(path: str | Path, *, season: tuple[str, str] | None = None,
                          classes: Sequence[dict] | None = None, bands: Mapping[str, Sequence[str]] | None = None,
                          unknown: UnknownCodes = "error", seed: int = 42, min_samples: int = 20,
                          cell_deg: float = 0.1, min_valid_fraction: float = 0.5,
                          fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                          fold: int | None = None) -> tuple[PixelSamples, list[dict], list[str]]:
    """Read a WorldCereal long extraction table (parquet or csv) as pixel samples.

    Args:
        path: the table (module docstring).
        season: ``(start, end)`` months to keep (:func:`cropmap.tables.generic.select_season`);
            None keeps every month of the table.
        classes: the config's classes (``codes`` = ``ewoc_code`` values); empty or None: classes
            from the table's codes (:func:`cropmap.tables.ewoc_classes`, as the wide loader).
        bands: ``{modality: bands}`` to read a band subset (default every band).
        unknown: with config classes, ``"ignore"`` leaves codes no class lists unlabelled.
        seed, cell_deg, fractions, fold: the spatial split (:func:`cropmap.tables.spatial_split`).
        min_samples: classes drawn from the table pool codes with fewer samples.
        min_valid_fraction: presence threshold for temporal modalities.

    Returns:
        ``(samples, classes, months)``: ``samples.modalities == ["s2", "s1", "weather", "dem"]``,
        the class table ``[{id, name, colour, codes, n}]``, the month labels of the steps.

    Raises:
        InputDataError: a missing file / column / band, or a season the table does not cover.
        LabelError: codes no config class lists (with ``unknown="error"``).
    """
    path = Path(path)
    df = read_table(path)
    if "ewoc_code" not in df.columns:
        raise InputDataError(f"{path}: no ewoc_code column (the class codes of a WorldCereal table); re-extract it with its labels")
    x, months, samples = decode_worldcereal_long(df, table=path, bands=bands)
    if season is not None:
        idx = select_season(months, season, table=path)
        x = {m: (v[:, idx] if TEMPORAL[m] else v) for m, v in x.items()}
        months = [months[i] for i in idx]
    labels = samples["label_full"].astype(str).tolist() if "label_full" in samples.columns else None
    y, table = table_classes(samples["ewoc_code"].to_numpy(), table=path, classes=classes, labels=labels,
                             min_samples=min_samples, ewoc=True, unknown=unknown)
    s = pixel_samples(x, y, samples["lat"].to_numpy(np.float64), samples["lon"].to_numpy(np.float64), seed=seed,
                      cell_deg=cell_deg, min_valid_fraction=min_valid_fraction, fractions=fractions, fold=fold)
    log.info("%s: %d samples, months %s .. %s, classes %s, split sizes %s", path.name, len(s), months[0], months[-1],
             {c["name"]: c["n"] for c in table}, np.bincount(s.split, minlength=3).tolist())
    return s, table, months


__all__ = ["LONG_COLUMNS", "decode_worldcereal_long", "load_worldcereal_long", "step_days", "step_frequency"]
