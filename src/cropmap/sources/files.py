"""Source ``files``: a region's stacks from rasters the user already has.

Per modality, ``regions.<name>.files.<modality>`` is a path or glob, or a mapping (``docs/real_data.md``)::

    files:
      s2: data/mine/s2_cube.nc                  # NetCDF / Zarr cube (time, band, y, x)
      s1: {path: "data/mine/s1_*.tif", scale: linear_db}   # one GeoTIFF per date
      dem: {path: data/mine/dem.tif, bands: {elevation: height}}

What is read:

* **NetCDF / Zarr** cubes (xarray; ``h5netcdf`` / ``zarr``) with a time coordinate, ``y``/``x``
  (or ``lat``/``lon``) and either one variable per band (openEO, GFMap) or a band dimension.
  The CRS comes from the CF ``grid_mapping`` variable or ``spatial_ref`` coordinate (as openEO,
  GFMap and rioxarray write them), else a ``crs`` / ``crs_wkt`` / ``spatial_ref`` attribute, else
  the file's ``crs`` option.
* **GeoTIFF / COG**: one file per date (the date from the file name, ``20230405`` or
  ``2023-04-05``, or from the ``TIFFTAG_DATETIME`` / ``datetime`` / ``date`` tag), or one
  multi-band file, time-major, with dates in the band descriptions (``B04_2023-04-05``) or given
  in ``dates``. Band names come from the band descriptions or ``band_names``.

Bands are matched to cropmap's names through :data:`ALIASES` (``B04``, ``B4``, ``S2-L2A-B04``,
``red`` ...; case and punctuation ignored), overridden per file by ``bands: {B04: my_red}``.
A cloud / scene mask band is applied when present (Sentinel-2 ``SCL`` by default: classes
:data:`~cropmap.sources.stac.SCL_VALID_DEFAULT` kept, clouds, shadows, snow, saturated and
no-data pixels dropped; ``mask_band`` / ``mask_valid`` for others). Values are scaled per file
(``scale``: ``dn10000`` reflectance = DN / 10000, ``linear_db`` 10 * log10(power),
``compressed_db`` 20 * log10(DN) - 83, ``none``, a number, or a mapping per band; ``auto``
decides from the data type and values, and logs its choice). Each observation is reprojected onto
the region grid with odc-geo (GDAL warping; ``resampling``, default bilinear; masked pixels stay
NaN) and the observations of a month are averaged (mean of the valid ones). The result is written
as ``{modality}.tif`` in the stack contract: float32, NaN nodata, time-major band descriptions
(``B04_2023-05``), for the band list asked (``bands``, default :data:`cropmap.modalities.BANDS`).

Every file of every modality is opened and checked (files found, CRS, band names, dates) before
anything is written, so a bad input stops with one line and leaves no stack behind.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import glob as globmod
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from pyproj import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from cropmap.errors import ConfigError, InputDataError
from cropmap.grid import Grid, utm_epsg
from cropmap.modalities import BANDS, TEMPORAL, band_descriptions
from cropmap.sources._blocks import Block, iter_blocks, write_stack
from cropmap.sources.stac import SCL_VALID_DEFAULT
from cropmap.sources.stac_reader import block_geobox, slope_degrees

log = logging.getLogger(__name__)

#: Names a band may carry in users' files, per modality and cropmap band (beside the band's own name).
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "s2": {
        "B01": ("B1", "coastal", "S2-L2A-B01"), "B02": ("B2", "blue", "S2-L2A-B02"), "B03": ("B3", "green", "S2-L2A-B03"),
        "B04": ("B4", "red", "S2-L2A-B04"), "B05": ("B5", "rededge", "rededge1", "S2-L2A-B05"),
        "B06": ("B6", "rededge2", "S2-L2A-B06"), "B07": ("B7", "rededge3", "S2-L2A-B07"), "B08": ("B8", "nir", "S2-L2A-B08"),
        "B8A": ("nir08", "narrow_nir", "rededge4", "S2-L2A-B8A"), "B11": ("swir16", "swir1", "S2-L2A-B11"),
        "B12": ("swir22", "swir2", "S2-L2A-B12"), "SCL": ("scl", "scene_classification", "S2-L2A-SCL"),
    },
    "s1": {"VV": ("sigma0_vv", "S1-SIGMA0-VV", "gamma0_vv"), "VH": ("sigma0_vh", "S1-SIGMA0-VH", "gamma0_vh")},
    "weather": {
        "temperature_2m": ("t2m", "2m_temperature", "temperature", "temperature_mean", "temperature-mean", "AGERA5-TMEAN",
                           "mean_2m_air_temperature"),
        "total_precipitation": ("tp", "precipitation", "precipitation_flux", "precipitation-flux", "AGERA5-PRECIP",
                                "total_precipitation_sum"),
    },
    "dem": {"elevation": ("dem", "height", "altitude", "COP-DEM", "DEM-alt-20m", "DEM"), "slope": ("DEM-slo-20m",)},
}
#: Mask band looked for by default (``mask_band: auto``), per modality.
AUTO_MASK: dict[str, str] = {"s2": "SCL"}
SCALES: tuple[str, ...] = ("auto", "none", "dn10000", "linear_db", "compressed_db")
RESAMPLING: tuple[str, ...] = ("nearest", "bilinear", "cubic", "average")
#: Block side (px) of the region grid processed at a time: bounds memory for large regions.
BLOCK = 1024

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


def _norm(name: str) -> str:
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


# --------------------------------------------------------------------------------------------
# Planning: every file opened, bands matched, dates known, before anything is written
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What one modality reads: files, their layer per band, mask and scale."""

    spec: FileSpec
    bands: tuple[str, ...]
    cubes: list[Cube]
    layers: list[list[int]]  # per cube: layer index per read band (``bands`` minus derived slope)
    masks: list[int | None]  # per cube: layer index of the mask band
    scales: list[list[str | float]]  # per cube: scale per read band
    derive_slope: bool = False

    def read_bands(self) -> tuple[str, ...]:
        return tuple(b for b in self.bands if not (self.derive_slope and b == "slope"))


def match_bands(cube: Cube, spec: FileSpec, bands: Sequence[str]) -> dict[str, int]:
    """Layer index of every band of ``bands`` found in ``cube`` (aliases and ``spec.bands``)."""
    by_norm: dict[str, int] = {}
    for i, n in enumerate(cube.names):
        by_norm.setdefault(_norm(n), i)
    out = {}
    for b in bands:
        names = [spec.bands[b]] if b in spec.bands else [b, *ALIASES.get(spec.modality, {}).get(b, ())]
        for n in names:
            if _norm(n) in by_norm:
                out[b] = by_norm[_norm(n)]
                break
    return out


def _auto_scale(cube: Cube, spec: FileSpec, layer: int) -> str:
    """``auto`` made concrete from the data type (and, for floats, one layer's values)."""
    m = spec.modality
    if m not in ("s2", "s1"):
        return "none"
    integer = np.issubdtype(cube.dtype, np.integer)
    if integer:
        return "dn10000" if m == "s2" else "compressed_db"
    t = 0
    h, w = min(cube.height, 256), min(cube.width, 256)
    with np.errstate(all="ignore"):
        v = cube.read(t, [layer], Window((cube.width - w) // 2, (cube.height - h) // 2, w, h))
        v = v[np.isfinite(v)]
    if v.size == 0:
        return "none"
    if m == "s2":
        return "dn10000" if float(np.median(v)) > 1.5 else "none"
    return "none" if (v < 0).any() else "linear_db"


def plan_modality(spec: FileSpec, bands: Sequence[str], stack: contextlib.ExitStack) -> Plan:
    """Open ``spec``'s files and match ``bands`` (and the mask band) in each.

    Raises:
        InputDataError: one line naming the file: missing / unreadable, no CRS, no dates, bands
            not found (listing the bands found and expected), mask band not found.
    """
    m = spec.modality
    cubes: list[Cube] = []
    for p in expand(spec):
        cube = open_cube(p, spec)
        stack.callback(cube.close)
        cubes.append(cube)
    derive_slope = False
    if m == "dem" and "slope" in bands and "elevation" in bands:
        derive_slope = all("slope" not in match_bands(c, spec, ["slope"]) for c in cubes)
        if derive_slope:
            log.info("files: %s has no slope band: slope is computed from the elevation on the region grid", spec.path)
    read = [b for b in bands if not (derive_slope and b == "slope")]
    layers, masks, scales = [], [], []
    for cube in cubes:
        found = match_bands(cube, spec, read)
        missing = [b for b in read if b not in found]
        if missing:
            hint = ", ".join(f"{b}: <name in the file>" for b in missing[:2])
            raise InputDataError(
                f"{cube.path}: {m} bands {missing} not found (the file has {cube.names}; expected {list(read)}); "
                f"name them in {spec.key}.bands ({{{hint}}}) or narrow bands.{m} to the bands the file has"
            )
        mask: int | None = None
        if spec.mask_band == "auto":
            if m in AUTO_MASK:
                mask = match_bands(cube, spec, [AUTO_MASK[m]]).get(AUTO_MASK[m])
        elif spec.mask_band:
            hits = [i for i, n in enumerate(cube.names) if _norm(n) == _norm(str(spec.mask_band))]
            if not hits:
                raise InputDataError(f"{cube.path}: mask band {spec.mask_band!r} not found (the file has {cube.names}); "
                                     f"fix {spec.key}.mask_band or set it to null")
            mask = hits[0]
        per_band = []
        for b in read:
            s = spec.scale.get(b, "auto") if isinstance(spec.scale, dict) else spec.scale
            if s == "auto":
                s = _auto_scale(cube, spec, found[b])
            per_band.append(s)
        if spec.scale == "auto" or isinstance(spec.scale, dict):
            log.info("files: %s: %s scale %s%s", cube.path.name, m, dict(zip(read, per_band, strict=True)),
                     f", mask {cube.names[mask]} keeps {list(spec.mask_valid)}" if mask is not None else ", no mask band")
        layers.append([found[b] for b in read])
        masks.append(mask)
        scales.append(per_band)
    return Plan(spec, tuple(bands), cubes, layers, masks, scales, derive_slope)


def apply_scale(a: np.ndarray, scale: str | float, offset: float) -> np.ndarray:
    """Stored values -> cropmap units (:data:`SCALES`, or a multiplier); non-positive power/DN -> NaN."""
    a = a + offset if offset else a
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(scale, int | float):
            return a * float(scale)
        if scale == "dn10000":
            return a / 10000.0
        if scale == "linear_db":
            return np.where(a > 0, 10.0 * np.log10(a), np.nan)
        if scale == "compressed_db":
            return np.where((a > 0) & (a < 65535), 20.0 * np.log10(a) - 83.0, np.nan)
    return a


# --------------------------------------------------------------------------------------------
# Reading onto the grid
# --------------------------------------------------------------------------------------------
def _source_window(cube: Cube, grid: Grid, block: Block, halo: int) -> Window | None:
    """Window of ``cube`` covering ``block`` (plus a 2-pixel margin for the resampling kernel), or None."""
    b = block.bounds(grid, halo)
    if CRS.from_user_input(grid.crs) != cube.crs:
        b = transform_bounds(grid.crs, cube.crs, *b, densify_pts=21)
    win = from_bounds(*b, transform=cube.transform)
    c0 = max(0, math.floor(win.col_off) - 2)
    r0 = max(0, math.floor(win.row_off) - 2)
    c1 = min(cube.width, math.ceil(win.col_off + win.width) + 2)
    r1 = min(cube.height, math.ceil(win.row_off + win.height) + 2)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def observation(plan: Plan, ci: int, t: int, grid: Grid, block: Block, halo: int = 0) -> np.ndarray | None:
    """One time step of one file on ``block``: masked, scaled, reprojected; None when it does not overlap."""
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import wrap_xr, xr_reproject

    cube = plan.cubes[ci]
    win = _source_window(cube, grid, block, halo)
    if win is None:
        return None
    layers = plan.layers[ci]
    mask = plan.masks[ci]
    raw = cube.read(t, [*layers, mask] if mask is not None else layers, win)
    vals = raw[: len(layers)]
    if mask is not None:
        keep = np.isin(raw[-1], plan.spec.mask_valid)
        vals = np.where(keep[None], vals, np.nan)
    vals = np.stack([apply_scale(vals[i], s, plan.spec.offset) for i, s in enumerate(plan.scales[ci])]).astype(np.float32)
    src_box = GeoBox((int(win.height), int(win.width)), cube.transform * Affine.translation(win.col_off, win.row_off), cube.crs)
    src = wrap_xr(vals, src_box, nodata=np.nan, axis=1, dims=("band", "y", "x"))
    out = xr_reproject(src, block_geobox(grid, block, halo), resampling=plan.spec.resampling, dst_nodata=np.nan)
    return np.asarray(out.values, dtype=np.float32)


def _mean(obs: Iterator[np.ndarray | None], shape: tuple[int, ...]) -> np.ndarray:
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    for a in obs:
        if a is None:
            continue
        ok = np.isfinite(a)
        total[ok] += a[ok]
        count += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def month_steps(plan: Plan, months: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """``{month: [(cube, time step), ...]}`` of the observations falling in each season month."""
    out: dict[str, list[tuple[int, int]]] = {mo: [] for mo in months}
    for ci, cube in enumerate(plan.cubes):
        for t, d in enumerate(cube.dates):
            if d is not None and (key := d.strftime("%Y-%m")) in out:
                out[key].append((ci, t))
    return out


def write_modality(plan: Plan, grid: Grid, months: Sequence[str], path: Path, size: int = BLOCK) -> Path:
    """Composite ``plan`` monthly on ``grid`` and write the stack ``path`` atomically."""
    m = plan.spec.modality
    grid_blocks = iter_blocks(grid, size)
    read_bands = plan.read_bands()
    desc = band_descriptions(m, months, plan.bands)
    if not TEMPORAL[m]:
        halo = 1 if plan.derive_slope else 0
        steps = [(ci, t) for ci, c in enumerate(plan.cubes) for t in range(len(c.dates))]

        def blocks() -> Iterator[tuple[int, Block, np.ndarray]]:
            for block in grid_blocks:
                shape = (len(read_bands), block.height + 2 * halo, block.width + 2 * halo)
                arr = _mean((observation(plan, ci, t, grid, block, halo) for ci, t in steps), shape)
                if plan.derive_slope:
                    e = arr[read_bands.index("elevation")]
                    got = {b: arr[i, halo:-halo, halo:-halo] for i, b in enumerate(read_bands)}
                    got["slope"] = slope_degrees(e, grid.res)
                    arr = np.stack([got[b] for b in plan.bands])
                yield 0, block, arr
    else:
        by_month = month_steps(plan, months)
        if not any(by_month.values()):
            dates = sorted({d for c in plan.cubes for d in c.dates if d is not None})
            log.warning("files: no date of %s (%s .. %s) falls in the season %s .. %s: every %s month is NaN", plan.spec.path,
                        dates[0].date() if dates else "?", dates[-1].date() if dates else "?", months[0], months[-1], m)

        def blocks() -> Iterator[tuple[int, Block, np.ndarray]]:
            for mi, mo in enumerate(months):
                for block in grid_blocks:
                    shape = (len(plan.bands), block.height, block.width)
                    yield mi * len(plan.bands), block, _mean(
                        (observation(plan, ci, t, grid, block) for ci, t in by_month[mo]), shape)

    tags = {"source": "files", "files": json.dumps([str(c.path) for c in plan.cubes])[:4000]}
    write_stack(path, grid, desc, blocks(), tags)
    return path


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def specs_of(options: Mapping[str, Any], region: str = "<region>") -> dict[str, FileSpec]:
    """Parse a region's ``files`` block into ``{modality: FileSpec}``."""
    return {m: FileSpec.parse(m, v, f"regions.{region}.files.{m}") for m, v in (options or {}).items() if v}


def fetch_files(grid: Grid, months: list[str], cache_dir: Path, *, modalities: Sequence[str], options: Mapping[str, Any],
                bands: Mapping[str, Sequence[str]] | None = None, region: str = "<region>") -> dict[str, Path]:
    """Write ``{modality}.tif`` stacks on ``grid`` from the user's files.

    Args:
        grid: the region grid.
        months: season months ``YYYY-MM``.
        cache_dir: where the stacks are written (``fetch`` moves them into ``raw/``).
        modalities: modalities wanted; those without an entry in ``options`` are not written (absent).
        options: the region's ``files`` block (``{modality: path | glob | mapping}``).
        bands: ``{modality: bands}`` for modalities narrowed to a band subset (default every
            band of :data:`cropmap.modalities.BANDS`).
        region: the region's name, for messages.

    Returns:
        ``{modality: path}`` of the stacks written.

    Raises:
        ConfigError: an invalid ``files`` entry.
        InputDataError: a missing file, a glob matching nothing, a cube without CRS, band names
            not found, ... (one line naming the file, found vs expected, and the fix); nothing is
            written then.
    """
    specs = specs_of(options, region)
    cache_dir = Path(cache_dir)
    out: dict[str, Path] = {}
    with contextlib.ExitStack() as stack:
        plans = {}
        for m in modalities:
            if m not in specs:
                log.info("files: no files for %s in regions.%s.files: %s is absent", m, region, m)
                continue
            want = tuple((bands or {}).get(m) or BANDS[m])
            plans[m] = plan_modality(specs[m], want, stack)
        for m, plan in plans.items():
            out[m] = write_modality(plan, grid, months, cache_dir / f"{m}.tif")
            log.info("files: %s <- %d file(s) (%s)", out[m], len(plan.cubes), plan.spec.path)
    return out


def _bounds_of(options: Mapping[str, Any]) -> list[tuple[CRS, tuple[float, float, float, float]]]:
    out = []
    for spec in specs_of(options).values():
        for p in expand(spec):
            cube = open_cube(p, spec)
            try:
                out.append((cube.crs, cube.bounds))
            finally:
                cube.close()
    if not out:
        raise ConfigError("a files region needs at least one entry under files (e.g. files: {s2: data/s2.nc}) or a bbox")
    return out


def files_footprint(options: Mapping[str, Any]) -> list[float]:
    """The files' footprint as a WGS84 bbox ``[lon_min, lat_min, lon_max, lat_max]`` (union of every file)."""
    boxes = [transform_bounds(crs, "EPSG:4326", *b, densify_pts=21) for crs, b in _bounds_of(options)]
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


@functools.lru_cache(maxsize=64)
def _footprint_grid(options_json: str, res: float, crs: str | None, cwd: str) -> Grid:
    options = json.loads(options_json)
    boxes = _bounds_of(options)
    if crs is None:
        lon0, lat0, lon1, lat1 = files_footprint(options)
        first = boxes[0][0]
        target = first if first.is_projected and all(c == first for c, _ in boxes) else CRS.from_epsg(utm_epsg((lon0 + lon1) / 2, (lat0 + lat1) / 2))
    else:
        target = CRS.from_user_input(crs)
    native = [b if c == target else transform_bounds(c, target, *b, densify_pts=21) for c, b in boxes]
    x0, y0 = min(b[0] for b in native), min(b[1] for b in native)
    x1, y1 = max(b[2] for b in native), max(b[3] for b in native)
    xmin, ymax = math.floor(x0 / res + 1e-9) * res, math.ceil(y1 / res - 1e-9) * res
    epsg = target.to_epsg()
    return Grid(crs=f"EPSG:{epsg}" if epsg else target.to_wkt(), res=res, xmin=xmin, ymax=ymax,
                width=max(1, math.ceil((x1 - xmin) / res - 1e-9)), height=max(1, math.ceil((ymax - y0) / res - 1e-9)))


def footprint_grid(options: Mapping[str, Any], res: float = 10.0, crs: str | None = None) -> Grid:
    """The region grid of a files region without a bbox: the files' footprint, snapped to ``res``.

    The grid CRS is ``crs`` if given, else the files' own CRS when they share one projected CRS
    (a cube on a 10 m UTM grid keeps exactly its grid), else the UTM zone of the footprint's centre.
    """
    return _footprint_grid(json.dumps(options, sort_keys=True, default=str), float(res), crs, str(Path.cwd()))


__all__ = [
    "ALIASES", "Cube", "FileSpec", "Plan", "TiffCube", "XarrayCube", "apply_scale", "expand", "fetch_files",
    "files_footprint", "footprint_grid", "match_bands", "open_cube", "parse_date", "plan_modality", "specs_of",
    "write_modality",
]
