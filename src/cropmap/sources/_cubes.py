"""The user's raster files as cubes of layers x dates (:class:`Cube`), and the ``files`` entries
that name them (:class:`FileSpec`): the reading half of :mod:`cropmap.sources.files`.

GeoTIFF / COG files (:class:`TiffCube`: one date per file, or several time-major with dates in
the band descriptions or the config) and NetCDF / Zarr cubes (:class:`XarrayCube`: one variable
per band or a band dimension; CRS from ``grid_mapping`` / ``spatial_ref`` / a ``crs``
attribute). Every problem is one :class:`~cropmap.errors.InputDataError` line naming the file.
"""

from __future__ import annotations

import abc
import contextlib
import glob as globmod
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from pyproj import CRS
from rasterio.windows import Window

from cropmap.errors import ConfigError, InputDataError
from cropmap.modalities import BANDS, TEMPORAL
from cropmap.sources.stac import SCL_VALID_DEFAULT

#: Mask band looked for by default (``mask_band: auto``), per modality.
AUTO_MASK: dict[str, str] = {"s2": "SCL"}
SCALES: tuple[str, ...] = ("auto", "none", "dn10000", "linear_db", "compressed_db")
RESAMPLING: tuple[str, ...] = ("nearest", "bilinear", "cubic", "average")

_NETCDF = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")
_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})-(\d{2})(?![\d-])"),
)
_DATE_TAGS = ("TIFFTAG_DATETIME", "datetime", "DATETIME", "date", "DATE", "time", "DATE_ACQUIRED", "ACQUISITION_DATE")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSpec:
    """One modality's entry of a region's ``files`` block.

    Attributes:
        modality: the modality.
        key: the config key (``regions.<r>.files.<m>``), for messages.
        path: a file, Zarr folder or glob.
        bands: cropmap band -> name in the file (overrides :data:`ALIASES`).
        band_names: names of a GeoTIFF's bands in band order (when it has no descriptions;
            for a time-major file, the names of one date's bands).
        dates: dates of a file without them (``YYYY-MM-DD``): one per GeoTIFF band group, or
            the single date of a cube without a time coordinate.
        scale: one of :data:`SCALES`, a multiplier, or ``{band: scale}``.
        offset: added to the stored values before scaling (e.g. -1000 for Sentinel-2 DN of
            processing baseline 04.00+ not yet harmonised).
        nodata: stored value that means no data (default: the file's own).
        mask_band: name of the mask band; ``"auto"`` looks for SCL in Sentinel-2 files; None: no mask.
        mask_valid: mask values kept (default :data:`~cropmap.sources.stac.SCL_VALID_DEFAULT`).
        crs: CRS of a cube that carries none.
        resampling: onto the region grid, one of :data:`RESAMPLING`.
    """

    modality: str
    key: str
    path: str
    bands: dict[str, str] = field(default_factory=dict)
    band_names: tuple[str, ...] | None = None
    dates: tuple[str, ...] | None = None
    scale: str | float | dict[str, str | float] = "auto"
    offset: float = 0.0
    nodata: float | None = None
    mask_band: str | None = "auto"
    mask_valid: tuple[int, ...] = SCL_VALID_DEFAULT
    crs: str | None = None
    resampling: str = "bilinear"

    @classmethod
    def parse(cls, modality: str, value: Any, key: str) -> FileSpec:
        """Read a ``files.<modality>`` entry (a path / glob string, or a mapping).

        Raises:
            ConfigError: naming the key, the bad value and the fix.
        """
        if modality not in BANDS:
            raise ConfigError(f"config key {key}: unknown modality {modality!r}; use some of {list(BANDS)}")
        if isinstance(value, str | Path):
            value = {"path": str(value)}
        if not isinstance(value, Mapping) or not value.get("path"):
            raise ConfigError(f"config key {key}: give a path or glob, or a mapping with path (see docs/real_data.md)")
        known = {"path", "bands", "band_names", "dates", "scale", "offset", "nodata", "mask_band", "mask_valid", "crs", "resampling"}
        extra = sorted(set(value) - known)
        if extra:
            raise ConfigError(f"config key {key}: unknown key(s) {extra}; valid keys: {sorted(known)}")
        bands = {str(k): str(v) for k, v in (value.get("bands") or {}).items()}
        wrong = [b for b in bands if b not in BANDS[modality] and b not in AUTO_MASK.values()]
        if wrong:
            raise ConfigError(f"config key {key}.bands: {wrong} are not {modality} bands; map some of {list(BANDS[modality])} to the names in the file")
        scale = value.get("scale", "auto")
        for s in (scale.values() if isinstance(scale, Mapping) else [scale]):
            if not isinstance(s, int | float) and s not in SCALES:
                raise ConfigError(f"config key {key}.scale: {s!r} is not one of {list(SCALES)} or a number")
        if value.get("resampling", "bilinear") not in RESAMPLING:
            raise ConfigError(f"config key {key}.resampling: {value['resampling']!r} is not one of {list(RESAMPLING)}")
        dates = value.get("dates")
        if dates is not None:
            for d in dates:
                if parse_date(str(d)) is None:
                    raise ConfigError(f"config key {key}.dates: {d!r} is not a date; write YYYY-MM-DD")
        return cls(
            modality=modality, key=key, path=str(value["path"]), bands=bands,
            band_names=tuple(str(b) for b in value["band_names"]) if value.get("band_names") else None,
            dates=tuple(str(d) for d in dates) if dates else None,
            scale=dict(scale) if isinstance(scale, Mapping) else scale, offset=float(value.get("offset", 0.0)),
            nodata=None if value.get("nodata") is None else float(value["nodata"]),
            mask_band=value.get("mask_band", "auto"),
            mask_valid=tuple(int(v) for v in value.get("mask_valid", SCL_VALID_DEFAULT)),
            crs=value.get("crs"), resampling=str(value.get("resampling", "bilinear")),
        )


def parse_date(text: str) -> pd.Timestamp | None:
    """The first date in ``text`` (``2023-04-05``, ``20230405`` or ``2023-04`` = the 1st), else None."""
    for pat in _DATE_PATTERNS:
        for mt in pat.finditer(text):
            y, mo = int(mt.group(1)), int(mt.group(2))
            d = int(mt.group(3)) if mt.re.groups == 3 else 1
            if 1900 <= y <= 2200 and 1 <= mo <= 12 and 1 <= d <= 31:
                with contextlib.suppress(ValueError):
                    return pd.Timestamp(year=y, month=mo, day=d)
    return None


def norm_name(name: str) -> str:
    """Case- and punctuation-free name with leading zeros of band numbers dropped (``B04`` == ``b4``)."""
    s = re.sub(r"[^a-z0-9]+", "", str(name).lower())
    return re.sub(r"(?<=[a-z])0+(?=\d)", "", s)


def expand(spec: FileSpec) -> list[Path]:
    """The files of a spec: the path itself, or the sorted matches of a glob.

    Raises:
        InputDataError: a missing file, or a glob that matches nothing.
    """
    if any(ch in spec.path for ch in "*?["):
        found = sorted(Path(p) for p in globmod.glob(spec.path))
        if not found:
            raise InputDataError(f"{spec.path}: the glob of {spec.key} matches no file (in {Path.cwd()}); fix the pattern "
                                 "(relative paths start from the folder snakemake runs in)")
        return found
    path = Path(spec.path)
    if not path.exists():
        raise InputDataError(f"{path}: no such file for {spec.key}; fix the path (relative paths start from the folder "
                             f"snakemake runs in, here {Path.cwd()})")
    return [path]


# --------------------------------------------------------------------------------------------
# Cubes
# --------------------------------------------------------------------------------------------
class Cube(abc.ABC):
    """One file's raster layers: ``names`` (band names) x ``dates`` on one grid.

    Attributes:
        path: the file.
        crs: its CRS.
        transform: affine transform of the pixel corners (north-up).
        width, height: pixels.
        names: band names as stored.
        dates: one per time step (``None`` for a static file).
        dtype: stored data type.
    """

    path: Path
    crs: CRS
    transform: Affine
    width: int
    height: int
    names: list[str]
    dates: list[pd.Timestamp | None]
    dtype: np.dtype

    @abc.abstractmethod
    def read(self, t: int, layers: Sequence[int], window: Window) -> np.ndarray:
        """float64 ``[len(layers), h, w]`` of time step ``t``, the file's nodata as NaN."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file."""

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in the file's CRS."""
        t = self.transform
        xs = (t.c, t.c + t.a * self.width)
        ys = (t.f, t.f + t.e * self.height)
        return (min(xs), min(ys), max(xs), max(ys))


def _nan_nodata(a: np.ndarray, nodata: float | None) -> np.ndarray:
    if nodata is not None and not math.isnan(nodata):
        a[a == nodata] = np.nan
    return a


class TiffCube(Cube):
    """A GeoTIFF / COG: one date, or several dates time-major (module docstring)."""

    def __init__(self, path: Path, spec: FileSpec) -> None:
        self.path = path
        self.src = rasterio.open(path)
        src = self.src
        if src.crs is None and spec.crs is None:
            src.close()
            raise InputDataError(f"{path}: the GeoTIFF has no CRS; write one (rio edit-info --crs EPSG:32631) or set {spec.key}.crs")
        self.crs = CRS.from_user_input(spec.crs or src.crs)
        self.transform, self.width, self.height = src.transform, src.width, src.height
        self.dtype = np.dtype(src.dtypes[0])
        self.nodata = spec.nodata if spec.nodata is not None else src.nodata
        desc = [d or "" for d in src.descriptions]
        static = not TEMPORAL[spec.modality]
        parsed = [(_strip_date(d), parse_date(d)) for d in desc]
        if not static and desc and all(desc) and all(dt is not None for _, dt in parsed):
            names = list(dict.fromkeys(n for n, _ in parsed))
            dates = list(dict.fromkeys(dt for _, dt in parsed))
            index = {(dates.index(dt), names.index(n)): i for i, (n, dt) in enumerate(parsed)}
        else:
            if spec.band_names:
                names = list(spec.band_names)
            elif desc and all(desc):
                names = desc
            else:
                src.close()
                raise InputDataError(f"{path}: its {src.count} bands have no names (no band descriptions); "
                                     f"list them in {spec.key}.band_names (e.g. [B04, B08, B11])")
            if src.count % len(names):
                src.close()
                raise InputDataError(f"{path}: {src.count} bands are not a whole number of dates x {len(names)} names {names}; "
                                     f"fix {spec.key}.band_names")
            n_t = src.count // len(names)
            if static:
                dates = [None] * n_t
            elif spec.dates and len(spec.dates) == n_t:
                dates = [parse_date(d) for d in spec.dates]
            elif n_t == 1 and (found := parse_date(path.name) or _tag_date(src)) is not None:
                dates = [found]
            else:
                src.close()
                raise InputDataError(f"{path}: no date for its {n_t} band group(s) (none in the file name, band descriptions or "
                                     f"tags); give {spec.key}.dates with {n_t} date(s)")
            index = {(t, k): t * len(names) + k for t in range(n_t) for k in range(len(names))}
        if len(index) != src.count or len(names) * len(dates) != src.count:
            src.close()
            raise InputDataError(f"{path}: band descriptions {desc[:4]}... are not every name x every date, time-major; "
                                 f"rename them like B04_2023-04-05 or set {spec.key}.band_names and dates")
        self.names, self.dates, self._index = names, dates, index

    def read(self, t: int, layers: Sequence[int], window: Window) -> np.ndarray:
        bands = [self._index[(t, k)] + 1 for k in layers]
        a = self.src.read(bands, window=window, out_dtype="float64")
        return _nan_nodata(a, self.nodata)

    def close(self) -> None:
        self.src.close()


def _strip_date(desc: str) -> str:
    out = desc
    for pat in _DATE_PATTERNS:
        out = pat.sub("", out)
    return out.strip(" _-.:T")


def _tag_date(src: Any) -> pd.Timestamp | None:
    tags = src.tags()
    for k in _DATE_TAGS:
        if k in tags and (d := parse_date(str(tags[k]).replace(":", "-", 2))) is not None:
            return d
    return None


class XarrayCube(Cube):
    """A NetCDF / Zarr cube: one variable per band (openEO, GFMap), or a band dimension."""

    def __init__(self, path: Path, spec: FileSpec) -> None:
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        self.path = path
        is_zarr = path.is_dir() or path.suffix.lower() == ".zarr"
        kwargs: dict[str, Any] = {"engine": "zarr", "consolidated": None} if is_zarr else {"engine": "h5netcdf"}
        try:
            ds = xr.open_dataset(path, decode_coords="all", **kwargs)
        except Exception as exc:  # the backends raise many types
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputDataError(f"{path}: cannot open the cube ({type(exc).__name__}: {why}); give a NetCDF-4 or Zarr file "
                                 "(pip install h5netcdf zarr)") from None
        self.ds = ds
        try:
            ydim, xdim = ds.rio.y_dim, ds.rio.x_dim
        except Exception:
            ds.close()
            raise InputDataError(f"{path}: no spatial dimensions (x/y, lon/lat) found in {list(ds.dims)}; "
                                 "name them x and y (or lon and lat)") from None
        layers: list[tuple[str, Any]] = []
        tdim: str | None = None
        for var, da in ds.data_vars.items():
            if ydim not in da.dims or xdim not in da.dims:
                continue
            others = [d for d in da.dims if d not in (ydim, xdim)]
            times = [d for d in others if np.issubdtype(ds[d].dtype, np.datetime64)] if others else []
            if times:
                tdim = str(times[0])
            rest = [d for d in others if d not in times]
            if len(rest) > 1:
                ds.close()
                raise InputDataError(f"{path}: variable {var} has dimensions {list(da.dims)}; a cube needs time, band, y, x at most")
            if rest:
                layers += [(str(var), (rest[0], lab)) for lab in ds[rest[0]].values.tolist()]
            else:
                layers.append((str(var), None))
        if not layers:
            ds.close()
            raise InputDataError(f"{path}: no variable on the {ydim}/{xdim} grid; the cube holds {list(ds.data_vars)}")
        self.layers, self.ydim, self.xdim, self.tdim = layers, ydim, xdim, tdim
        self.names = [str(sel[1]) if sel is not None else var for var, sel in layers]
        first = ds[layers[0][0]]
        crs = spec.crs or first.rio.crs or ds.rio.crs or _attr_crs(first.attrs) or _attr_crs(ds.attrs)
        if crs is None:
            ds.close()
            raise InputDataError(f"{path}: the cube has no CRS (no grid_mapping / spatial_ref / crs attribute); write one "
                                 f"(rioxarray: ds.rio.write_crs('EPSG:32631')) or set {spec.key}.crs")
        self.crs = CRS.from_user_input(crs)
        xs, ys = ds[xdim].values.astype(np.float64), ds[ydim].values.astype(np.float64)
        self._flip = ys.size > 1 and ys[1] > ys[0]  # south-up cubes are read flipped
        if xs.size > 1 and ys.size > 1:  # pixel centres on a regular grid -> corner transform, north-up
            rx, ry = (xs[-1] - xs[0]) / (xs.size - 1), abs(ys[-1] - ys[0]) / (ys.size - 1)
            tr = Affine(rx, 0.0, xs[0] - rx / 2, 0.0, -ry, ys.max() + ry / 2)
        else:  # a one-pixel axis: only the stored GeoTransform knows the resolution
            tr = first.rio.transform()
        self.transform, self.width, self.height = tr, int(ds.sizes[xdim]), int(ds.sizes[ydim])
        self.dtype = np.dtype(first.dtype)
        self.nodata = spec.nodata if spec.nodata is not None else first.rio.nodata
        if not TEMPORAL[spec.modality]:
            self.dates = [None] * (int(ds.sizes[tdim]) if tdim else 1)
        elif tdim is not None:
            self.dates = [pd.Timestamp(v) for v in ds[tdim].values]
        elif spec.dates and len(spec.dates) == 1:
            self.dates = [parse_date(spec.dates[0])]
        else:
            ds.close()
            raise InputDataError(f"{path}: no time coordinate (datetime dimension) in {list(ds.dims)}; add one or give "
                                 f"{spec.key}.dates with the cube's single date")

    def read(self, t: int, layers: Sequence[int], window: Window) -> np.ndarray:
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        rows = slice(self.height - r0 - h, self.height - r0) if self._flip else slice(r0, r0 + h)
        out = np.empty((len(layers), h, w), np.float64)
        for i, k in enumerate(layers):
            var, sel = self.layers[k]
            da = self.ds[var]
            idx: dict[str, Any] = {self.ydim: rows, self.xdim: slice(c0, c0 + w)}
            if self.tdim is not None and self.tdim in da.dims:
                idx[self.tdim] = t
            if sel is not None:
                da = da.sel({sel[0]: sel[1]})
            a = np.asarray(da.isel(idx).transpose(self.ydim, self.xdim).values, dtype=np.float64)
            out[i] = a[::-1] if self._flip else a
        return _nan_nodata(out, self.nodata)

    def close(self) -> None:
        self.ds.close()


def _attr_crs(attrs: Mapping[str, Any]) -> str | None:
    for k in ("crs", "crs_wkt", "spatial_ref", "epsg"):
        v = attrs.get(k)
        if v is not None and str(v).strip():
            return f"EPSG:{int(v)}" if k == "epsg" else str(v)
    return None


def open_cube(path: Path, spec: FileSpec) -> Cube:
    """A :class:`Cube` for a GeoTIFF, NetCDF or Zarr path."""
    if path.is_dir() or path.suffix.lower() in (".zarr", *_NETCDF):
        return XarrayCube(path, spec)
    try:
        return TiffCube(path, spec)
    except rasterio.errors.RasterioIOError as exc:
        raise InputDataError(f"{path}: not a raster cropmap reads ({str(exc).splitlines()[0]}); give GeoTIFF/COG, NetCDF-4 "
                             "or Zarr") from None


__all__ = ["AUTO_MASK", "RESAMPLING", "SCALES", "Cube", "FileSpec", "TiffCube", "XarrayCube", "expand", "open_cube", "parse_date"]
