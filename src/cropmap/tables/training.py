"""The tables of a training set (``training_sets.<name>.tables``), read into one common form.

Each entry names a file and its ``format``; :func:`read_entry` decodes it with the format's own
reader and returns :class:`TableData`: the band values in cropmap units (a band subset when the
config narrows ``bands``), the month of every time step, the label value of every sample (the
``ewoc_code`` of WorldCereal tables, the ``label`` column of a generic table, the class name of a
CropHarvest array) and its position. :func:`read_training_set` aligns every table to the set's
season by calendar month, concatenates them and resolves the classes. The samples stage
(:mod:`cropmap.samples`) then adds presence masks, spatial groups and the split.

===================  ===========================================  =============================================
``format``           reader                                       months
===================  ===========================================  =============================================
``worldcereal_long`` :func:`~cropmap.tables.worldcereal_long.decode_worldcereal_long`  its timestamps
``worldcereal_wide`` :func:`~cropmap.tables.worldcereal.decode_worldcereal`            ``start`` or its ``start_date``
``generic``          :func:`~cropmap.tables.generic.decode_point_table`                its column names
``cropharvest``      :func:`~cropmap.tables.cropharvest.from_cropharvest_array`        ``start`` (the arrays carry none)
===================  ===========================================  =============================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cropmap.errors import InputDataError
from cropmap.modalities import BANDS, MODALITIES, TEMPORAL, resolve_bands
from cropmap.tables.common import months_from
from cropmap.tables.generic import (
    UnknownCodes,
    decode_point_table,
    point_coords,
    read_table,
    select_season,
    table_classes,
)

log = logging.getLogger(__name__)

#: The ``format`` values of a training set's tables.
FORMATS: tuple[str, ...] = ("worldcereal_long", "worldcereal_wide", "cropharvest", "generic")


@dataclass
class TableData:
    """One table's samples before classes and splits.

    Attributes:
        path: the file.
        x: ``{m: [N, T, C]}`` (``dem [N, C]``) in cropmap units, NaN invalid, every modality.
        months: ``T`` month labels ``YYYY-MM``.
        codes: ``[N]`` label values (strings).
        names: ``[N]`` names of the values (``label_full``), or None.
        lat, lon: ``[N]`` WGS84 degrees.
        ewoc: the values are WorldCereal ``ewoc_code`` s.
    """

    path: Path
    x: dict[str, np.ndarray]
    months: list[str]
    codes: np.ndarray
    names: list[str] | None
    lat: np.ndarray
    lon: np.ndarray
    ewoc: bool

    def season(self, season: tuple[str, str]) -> TableData:
        """The months of ``season`` only (:func:`cropmap.tables.generic.select_season`)."""
        idx = select_season(self.months, season, table=self.path)
        x = {m: (v[:, idx] if TEMPORAL[m] else v) for m, v in self.x.items()}
        return TableData(self.path, x, [self.months[i] for i in idx], self.codes, self.names, self.lat, self.lon, self.ewoc)


def _subset(x: Mapping[str, np.ndarray], want: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Every-band arrays narrowed to the bands of ``want`` (in its order)."""
    return {m: np.ascontiguousarray(x[m][..., [BANDS[m].index(b) for b in want[m]]]) for m in MODALITIES}


def _codes(values: Any) -> np.ndarray:
    """Label values as strings (integer codes without a decimal point)."""
    v = np.asarray(values)
    if np.issubdtype(v.dtype, np.floating) and np.all(np.isfinite(v)) and np.all(v == np.round(v)):
        v = v.astype(np.int64)
    return np.array([str(c) for c in v], dtype=object)


def read_entry(entry: Mapping[str, Any], bands: Mapping[str, Sequence[str]] | None = None) -> TableData:
    """Read one ``tables`` entry (``{path, format, label, start}``).

    Raises:
        InputDataError: one line naming the file: missing, unreadable, a column or band missing
            (the bands found and expected), no dates where the format needs ``start``.
    """
    path, fmt = Path(entry["path"]), str(entry["format"])
    want = resolve_bands(bands)
    if fmt == "worldcereal_long":
        from cropmap.tables.worldcereal_long import decode_worldcereal_long

        df = read_table(path)
        if "ewoc_code" not in df.columns:
            raise InputDataError(f"{path}: no ewoc_code column (the class codes of a WorldCereal table); re-extract it with its labels")
        x, months, samples = decode_worldcereal_long(df, table=path, bands=want)
        names = samples["label_full"].astype(str).tolist() if "label_full" in samples.columns else None
        return TableData(path, x, months, _codes(samples["ewoc_code"]), names, samples["lat"].to_numpy(np.float64),
                         samples["lon"].to_numpy(np.float64), ewoc=True)
    if fmt == "worldcereal_wide":
        from cropmap.tables.worldcereal import decode_worldcereal, worldcereal_months

        df = read_table(path)
        for col in ("ewoc_code", "lat", "lon"):
            if col not in df.columns:
                raise InputDataError(f"{path}: no {col} column; a WorldCereal extraction has ewoc_code, lat and lon")
        x, t_n = decode_worldcereal(df, want, table=path)
        if entry.get("start"):
            months = months_from(entry["start"], t_n)
        elif "start_date" in df.columns:
            months = worldcereal_months(df)
        else:
            raise InputDataError(f"{path}: no start_date column, so the months of ts0 .. ts{t_n - 1} are unknown; "
                                 "give the table's first month as start: YYYY-MM in its tables entry")
        names = df["label_full"].astype(str).tolist() if "label_full" in df.columns else None
        return TableData(path, x, months, _codes(df["ewoc_code"]), names, df["lat"].to_numpy(np.float64),
                         df["lon"].to_numpy(np.float64), ewoc=True)
    if fmt == "generic":
        df = read_table(path)
        label = str(entry.get("label", "label"))
        if label not in df.columns:
            raise InputDataError(f"{path}: no label column {label!r} (columns: {list(df.columns)[:8]}...); "
                                 "name the column holding the classes in the table's label key")
        lat, lon = point_coords(df, path)
        x, months = decode_point_table(df, table=path, bands=want)
        return TableData(path, x, months, _codes(df[label]), None, lat, lon, ewoc=False)
    if fmt == "cropharvest":
        return _read_cropharvest(path, entry, want)
    raise InputDataError(f"{path}: unknown table format {fmt!r}; use one of {list(FORMATS)}")


def _read_cropharvest(path: Path, entry: Mapping[str, Any], want: Mapping[str, Sequence[str]]) -> TableData:
    from cropmap.tables.cropharvest import from_cropharvest_array, read_arrays

    if not path.is_file():
        raise InputDataError(f"{path}: no such file; fix the path (relative paths start from the folder you run in)")
    if path.suffix.lower() not in (".npz", ".h5", ".hdf5"):
        raise InputDataError(f"{path}: a training set's CropHarvest table is an .npz or .h5 of labelled arrays "
                             "(an Earth Engine export carries no labels)")
    d = read_arrays(path)
    missing = [k for k in ("X", "y", "lat", "lon") if k not in d]
    if missing:
        raise InputDataError(f"{path}: arrays {missing} missing (found {sorted(d)}); a training set needs X, y, lat and lon")
    try:
        x = _subset(from_cropharvest_array(d["X"]), want)
    except ValueError as exc:
        raise InputDataError(f"{path}: {exc}") from None
    y = np.asarray(d["y"]).astype(np.int64)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in d["class_names"]] if "class_names" in d else []
    codes = np.array([names[v] if 0 <= v < len(names) else (str(v) if v >= 0 else "") for v in y], dtype=object)
    keep = y >= 0
    x = {m: v[keep] for m, v in x.items()}
    if not entry.get("start"):
        raise InputDataError(f"{path}: CropHarvest arrays carry no dates; give the first month of X as start: YYYY-MM in its tables entry")
    months = months_from(entry["start"], x["s2"].shape[1])
    return TableData(path, x, months, codes[keep], None, np.asarray(d["lat"], np.float64)[keep],
                     np.asarray(d["lon"], np.float64)[keep], ewoc=False)


@dataclass
class TrainingTables:
    """Every table of a training set on its season, with classes.

    Attributes:
        x: ``{m: [N, T, C]}`` (``dem [N, C]``) for every modality.
        months: the season's months.
        y: int64 ``[N]`` class ids (``-100``: a value no class lists, with ``unknown="ignore"``).
        classes: ``[{id, name, colour, codes, n}]``.
        lat, lon: ``[N]``.
        source: ``[N]`` index of each sample's table.
    """

    x: dict[str, np.ndarray]
    months: list[str]
    y: np.ndarray
    classes: list[dict]
    lat: np.ndarray
    lon: np.ndarray
    source: np.ndarray


def read_training_set(tables: Sequence[Mapping[str, Any]], season: tuple[str, str], *, classes: Sequence[dict] | None = None,
                      bands: Mapping[str, Sequence[str]] | None = None, min_samples: int = 20,
                      unknown: UnknownCodes = "error", name: str = "training set") -> TrainingTables:
    """Read ``tables``, keep the months of ``season`` in each (by calendar month) and resolve classes.

    Classes come from ``classes`` (the config's; ``codes`` are the tables' label values) or,
    when empty, from the label values of every table together
    (:func:`cropmap.tables.generic.table_classes`: WorldCereal codes grouped as the wide loader
    does when every table is a WorldCereal table).

    Raises:
        InputDataError: a table that cannot be read or does not cover the season (one line).
        LabelError: label values no class lists (``unknown="error"``).
    """
    parts = [read_entry(t, bands).season(season) for t in tables]
    months = parts[0].months
    x: dict[str, np.ndarray] = {m: np.concatenate([p.x[m] for p in parts]) for m in MODALITIES}
    codes = np.concatenate([p.codes for p in parts])
    names: list[str] | None = None
    if all(p.names is not None for p in parts):
        names = [n for p in parts for n in (p.names or [])]
    what = str(parts[0].path) if len(parts) == 1 else f"the tables of {name}"
    y, table = table_classes(codes, table=what, classes=classes, labels=names, min_samples=min_samples,
                             ewoc=all(p.ewoc for p in parts), unknown=unknown)
    for p in parts:
        log.info("%s: %d samples on %s .. %s", p.path, len(p.codes), months[0], months[-1])
    return TrainingTables(x, months, y, table, np.concatenate([p.lat for p in parts]), np.concatenate([p.lon for p in parts]),
                          np.concatenate([np.full(len(p.codes), i) for i, p in enumerate(parts)]))


__all__ = ["FORMATS", "TableData", "TrainingTables", "read_entry", "read_training_set"]
