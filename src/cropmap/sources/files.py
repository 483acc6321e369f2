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
anything is written, so a bad input stops with one line and leaves no stack behind. The readers
of the files (:class:`~cropmap.sources._cubes.Cube`) and their config entries
(:class:`~cropmap.sources._cubes.FileSpec`) are :mod:`cropmap.sources._cubes`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from pyproj import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from cropmap.errors import ConfigError, InputDataError
from cropmap.grid import Grid, utm_epsg
from cropmap.modalities import BANDS, TEMPORAL, band_descriptions
from cropmap.sources._blocks import Block, iter_blocks, write_stack
from cropmap.sources._cubes import (
    AUTO_MASK,
    Cube,
    FileSpec,
    TiffCube,
    XarrayCube,
    expand,
    norm_name,
    open_cube,
    parse_date,
)
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
#: Block side (px) of the region grid processed at a time: bounds memory for large regions.
BLOCK = 1024




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
        by_norm.setdefault(norm_name(n), i)
    out = {}
    for b in bands:
        names = [spec.bands[b]] if b in spec.bands else [b, *ALIASES.get(spec.modality, {}).get(b, ())]
        for n in names:
            if norm_name(n) in by_norm:
                out[b] = by_norm[norm_name(n)]
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
            hits = [i for i, n in enumerate(cube.names) if norm_name(n) == norm_name(str(spec.mask_band))]
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
