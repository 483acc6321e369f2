"""One grid per region: CRS, 10 m pixels, origin snapped to the resolution.

Every stack of a region is on exactly this grid, so sampling never reprojects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import rasterio
from affine import Affine
from pyproj import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from cropmap.errors import ConfigError, GridMismatchError, InputDataError


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone containing ``(lon, lat)``.

    Args:
        lon: longitude in degrees, -180..180.
        lat: latitude in degrees, -80..84.

    Returns:
        ``326ZZ`` north of the equator, ``327ZZ`` south of it.
    """
    zone = math.floor((lon + 180.0) / 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid.

    Attributes:
        crs: coordinate reference system, as ``EPSG:xxxx`` or WKT.
        res: pixel size in CRS units (metres).
        xmin: left edge, a multiple of ``res``.
        ymax: top edge, a multiple of ``res``.
        width: columns.
        height: rows.
    """

    crs: str
    res: float
    xmin: float
    ymax: float
    width: int
    height: int

    @property
    def transform(self) -> Affine:
        """Affine transform of the grid (north-up)."""
        return Affine(self.res, 0.0, self.xmin, 0.0, -self.res, self.ymax)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in grid CRS units."""
        return (
            self.xmin,
            self.ymax - self.height * self.res,
            self.xmin + self.width * self.res,
            self.ymax,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    @classmethod
    def from_bbox(
        cls, bbox: tuple[float, float, float, float] | list[float], res: float = 10.0, crs: str | None = None
    ) -> Grid:
        """Grid covering a WGS84 bbox.

        Args:
            bbox: ``[lon_min, lat_min, lon_max, lat_max]`` in degrees.
            res: pixel size in metres.
            crs: target CRS; defaults to the UTM zone of the bbox centroid.

        Returns:
            The snapped grid.

        Raises:
            ConfigError: if the bbox is inverted, empty or crosses the antimeridian.
        """
        lon0, lat0, lon1, lat1 = (float(v) for v in bbox)
        if not (-180 <= lon0 <= 180 and -180 <= lon1 <= 180 and -90 <= lat0 <= 90 and -90 <= lat1 <= 90):
            raise ConfigError(
                f"bbox {list(bbox)} is outside [-180, -90, 180, 90]: give [lon_min, lat_min, lon_max, lat_max] in degrees"
            )
        if lon1 <= lon0:
            raise ConfigError(
                f"bbox {list(bbox)} has lon_max <= lon_min: if the region crosses the antimeridian, "
                "split it into two regions, one on each side of 180°; otherwise swap the longitudes"
            )
        if lat1 <= lat0:
            raise ConfigError(f"bbox {list(bbox)} has lat_max <= lat_min: swap the latitudes")
        target = CRS.from_user_input(crs) if crs else CRS.from_epsg(utm_epsg((lon0 + lon1) / 2, (lat0 + lat1) / 2))
        x0, y0, x1, y1 = transform_bounds("EPSG:4326", target, lon0, lat0, lon1, lat1, densify_pts=21)
        xmin = math.floor(x0 / res) * res
        ymax = math.ceil(y1 / res) * res
        width = math.ceil((x1 - xmin) / res)
        height = math.ceil((ymax - y0) / res)
        epsg = target.to_epsg()
        return cls(crs=f"EPSG:{epsg}" if epsg else target.to_wkt(), res=res, xmin=xmin, ymax=ymax, width=width, height=height)

    def profile(self, count: int, dtype: str = "float32", nodata: float | None = float("nan")) -> dict:
        """A rasterio profile for a tiled, compressed GeoTIFF on this grid."""
        block = 256 if min(self.width, self.height) >= 256 else 16 * max(1, min(self.width, self.height) // 16)
        prof: dict = {
            "driver": "GTiff",
            "width": self.width,
            "height": self.height,
            "count": count,
            "dtype": dtype,
            "crs": self.crs,
            "transform": self.transform,
            "compress": "deflate",
            "predictor": 3 if dtype.startswith("float") else 2,
            "BIGTIFF": "IF_SAFER",
        }
        if block >= 16:
            prof.update(tiled=True, blockxsize=block, blockysize=block)
        if nodata is not None:
            prof["nodata"] = nodata
        return prof

    def check(self, path: str | Path, fix: str = "delete it and rerun so the stack stage rebuilds it") -> None:
        """Raise if the raster at ``path`` is not on this grid.

        Args:
            path: the raster.
            fix: what the user should do, ending the error message.

        Raises:
            GridMismatchError: naming the file, what differs and ``fix``.
        """
        with rasterio.open(path) as src:
            if src.crs is None:
                raise GridMismatchError(f"{path} has no CRS (a damaged header, or not written on a region grid): {fix}")
            same_crs = CRS.from_user_input(src.crs) == CRS.from_user_input(self.crs)
            if not same_crs or src.width != self.width or src.height != self.height or not src.transform.almost_equals(self.transform, precision=1e-6):
                t = src.transform
                raise GridMismatchError(
                    f"{path} is not on its region's grid (file: {src.crs} {src.width}x{src.height} px, origin "
                    f"({t.c:.10g}, {t.f:.10g}), {t.a:.6g} m; grid: {self.crs} {self.width}x{self.height} px, origin "
                    f"({self.xmin:.1f}, {self.ymax:.1f}), {self.res:g} m): {fix}"
                )

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"crs": self.crs, "res": self.res, "xmin": self.xmin, "ymax": self.ymax, "width": self.width, "height": self.height}


def season_months(start: str, end: str) -> list[str]:
    """Month labels from ``start`` to ``end`` inclusive.

    Args:
        start: ``YYYY-MM``.
        end: ``YYYY-MM``, not before ``start``.

    Returns:
        ``["2023-01", "2023-02", ...]``.

    Raises:
        ConfigError: if a label is malformed or ``end`` is before ``start``.
    """
    def parse(label: str, key: str) -> tuple[int, int]:
        try:
            y, m = (int(v) for v in str(label).split("-")[:2])
            if not 1 <= m <= 12:
                raise ValueError
        except ValueError:
            raise ConfigError(f"season.{key} = {label!r} is not a month: write it as YYYY-MM, e.g. 2023-04") from None
        return y, m

    y0, m0 = parse(start, "start")
    y1, m1 = parse(end, "end")
    if (y1, m1) < (y0, m0):
        raise ConfigError(f"season.end {end} is before season.start {start}: swap them or fix the year")
    out = []
    y, m = y0, m0
    while (y, m) <= (y1, m1):
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out



def check_calendar_alignment(train_months: Sequence[str], region_months: Sequence[str], *, what: str) -> None:
    """Check that a region's season maps month by month onto a training season.

    A model learned on ``train_months`` reads a region's ``region_months`` step by step: the two
    must have the same length and start in the same calendar month (January to January, whatever
    the years).

    Raises:
        InputDataError: naming ``what`` (e.g. the region and the training set), both seasons and the fix.
    """
    same_len = len(train_months) == len(region_months)
    same_start = bool(train_months) and bool(region_months) and train_months[0][5:7] == region_months[0][5:7]
    if not (same_len and same_start):
        raise InputDataError(
            f"{what}: the season {region_months[0] if region_months else '?'} .. {region_months[-1] if region_months else '?'} "
            f"({len(region_months)} months) does not align month by month with the training season "
            f"{train_months[0] if train_months else '?'} .. {train_months[-1] if train_months else '?'} ({len(train_months)} months); "
            "give both seasons the same length and the same first calendar month"
        )


def window_key(row: int, col: int) -> str:
    """Name of a grid window from its top-left pixel offsets: ``r000123_c000456``.

    The one key format of the project: prediction tiles (``results/R/tiles/{key}.tif``) and
    fetch blocks (``raw/.parts/{modality}/{step}_{key}.npy``) are named with it.
    """
    return f"r{row:06d}_c{col:06d}"


def pixel_windows(grid: Grid, size: int) -> list[tuple[int, int, int, int]]:
    """``(row, col, height, width)`` of the ``size`` px squares covering ``grid``, row-major (edge ones smaller)."""
    return [(r, c, min(size, grid.height - r), min(size, grid.width - c))
            for r in range(0, grid.height, size) for c in range(0, grid.width, size)]


def tiles(grid: Grid, size: int) -> list[str]:
    """Names of the tiles covering ``grid`` in ``size`` px squares (edge tiles are smaller)."""
    return [window_key(r, c) for r, c, _, _ in pixel_windows(grid, size)]


def tile_window(grid: Grid, name: str, size: int) -> Window:
    """Window of tile ``name`` (see :func:`window_key`)."""
    r, c = (int(p[1:]) for p in name.split("_"))
    return Window(c, r, min(size, grid.width - c), min(size, grid.height - r))
