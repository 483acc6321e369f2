"""The built-in synthetic source: a fake but physically plausible region.

:func:`fetch_synthetic` writes the raw inputs of one region (field parcels, Sentinel-2,
Sentinel-1, weather and DEM) from a seed, so the whole pipeline runs offline in minutes. The
signals are built so that the models have something real to learn and something real to miss:

* **Fields** are a rotated recursive split of the region into 0.5-20 ha parcels with thin
  unlabelled gaps (roads, hedges) between them. Class priors depend on terrain and climate
  (maize and soybean in warm, wet lowlands, sunflower on warm dry ground, barley and non-crop on
  high or steep ground), so the DEM and weather carry a real but weaker class signal than S2.
* **Sentinel-2** follows a class-specific double-logistic NDVI (winter versus summer crops,
  different green-up and senescence dates, rapeseed flowering, cover crops, mown grass) with
  per-field jitter and per-pixel noise, unmixed into soil and vegetation reflectance spectra.
  Spatially coherent clouds (more in winter, some places cloudy most of the year) blank every
  band of a pixel-month as NaN.
* **Sentinel-1** VV/VH backscatter follows a water-cloud model driven by the same phenology
  (biomass) and by soil moisture from the weather's precipitation, with gamma speckle and an
  orbit gap (a vertical strip without data).
* **Weather** (ERA5-Land-like, 0.01° in EPSG:4326) and **DEM** (GLO-30-like, 1/3600° in
  EPSG:4326) are written on their own geographic grids; the stack stage reprojects them.

Everything is a function of the seed: each component draws from its own random stream, so the
same seed gives the same fields and rasters whichever modalities are requested.
"""

from __future__ import annotations

import calendar
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

from cropmap.errors import ConfigError, UnknownNameError
from cropmap.grid import Grid
from cropmap.modalities import MODALITIES, band_descriptions, n_channels

#: Class names the generator has phenology for; ``classes`` in config may use any subset.
SUPPORTED_CLASSES: tuple[str, ...] = (
    "non_crop",
    "wheat",
    "barley",
    "maize",
    "rapeseed",
    "sunflower",
    "soybean",
)

#: Keys accepted in ``options`` (the region's ``synthetic:`` block in config).
OPTION_KEYS: tuple[str, ...] = ("seed", "cloud_cover", "s1_gap")

_WEATHER_RES = 0.01  # degrees, ERA5-Land-like cells
_DEM_RES = 1.0 / 3600.0  # degrees, Copernicus GLO-30-like pixels
_DEM_MARGIN = 4  # DEM pixels of margin around the grid bounds
_LAPSE_RATE = 0.0065  # K per m
_NON_CROP_SHARE = 0.30  # expected share of non-crop parcels
_MIN_HA, _MAX_HA = 0.5, 20.0

# Double-logistic phenology per crop (day of year, NDVI). Winter crops keep a winter cover
# ``winter`` from autumn sowing ``sow`` until senescence ``eos``; summer crops are bare until
# ``sos``. ``flower`` is the day of peak flowering (rapeseed), ``struct`` the S1 canopy
# structure factor (tall, stemmy canopies scatter more).
_CROPS: dict[str, dict[str, float]] = {
    "wheat": {"winter": 0.38, "sow": 295, "sos": 80, "eos": 178, "peak": 0.86, "r_up": 9, "r_down": 8, "struct": 1.0},
    "barley": {"winter": 0.36, "sow": 280, "sos": 68, "eos": 162, "peak": 0.82, "r_up": 8, "r_down": 7, "struct": 0.9},
    "rapeseed": {"winter": 0.55, "sow": 245, "sos": 55, "eos": 152, "peak": 0.82, "r_up": 10, "r_down": 8, "struct": 1.3, "flower": 110},
    "maize": {"winter": 0.0, "sow": 0, "sos": 158, "eos": 262, "peak": 0.86, "r_up": 9, "r_down": 11, "struct": 1.6},
    "sunflower": {"winter": 0.0, "sow": 0, "sos": 145, "eos": 222, "peak": 0.76, "r_up": 8, "r_down": 7, "struct": 1.3},
    "soybean": {"winter": 0.0, "sow": 0, "sos": 170, "eos": 250, "peak": 0.88, "r_up": 7, "r_down": 7, "struct": 0.8},
}

# Crop class priors: expected share among crop parcels, and logit coefficients on the
# standardised elevation, slope, annual temperature and annual precipitation of the parcel.
_CROP_SHARE: dict[str, float] = {
    "wheat": 0.30, "barley": 0.15, "maize": 0.20, "rapeseed": 0.12, "sunflower": 0.12, "soybean": 0.11,
}
_PRIORS: dict[str, tuple[float, float, float, float]] = {
    "wheat": (0.0, 0.0, 0.0, 0.0),
    "barley": (0.6, 0.4, -0.3, 0.0),
    "maize": (-0.5, -0.4, 0.6, 0.4),
    "rapeseed": (0.1, 0.0, 0.0, 0.2),
    "sunflower": (-0.2, -0.2, 0.6, -0.7),
    "soybean": (-0.5, -0.3, 0.5, 0.5),
}

# Reflectance endmembers (B02 B03 B04 B05 B06 B07 B08 B8A B11 B12).
_VEG = np.array([0.025, 0.055, 0.030, 0.095, 0.280, 0.360, 0.400, 0.420, 0.200, 0.100])
_SOIL = np.array([0.070, 0.100, 0.140, 0.165, 0.180, 0.190, 0.200, 0.215, 0.310, 0.270])
_FLOWER = np.array([0.0, 0.06, 0.05, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # yellow petals
_VEG_MULT: dict[str, np.ndarray] = {
    "wheat": np.array([1.0, 1.0, 1.0, 1.0, 0.97, 0.95, 0.95, 0.95, 1.0, 1.0]),
    "barley": np.array([1.0, 1.03, 1.0, 1.0, 0.95, 0.93, 0.93, 0.93, 1.02, 1.02]),
    "rapeseed": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.02, 1.03, 1.03, 0.95, 0.95]),
    "maize": np.array([1.0, 1.0, 1.0, 1.0, 1.02, 1.05, 1.05, 1.05, 0.97, 0.95]),
    "sunflower": np.array([1.0, 1.0, 1.0, 1.0, 1.03, 1.07, 1.08, 1.08, 0.95, 0.93]),
    "soybean": np.array([1.0, 1.0, 1.0, 1.0, 1.05, 1.10, 1.12, 1.12, 0.93, 0.90]),
    "grass": np.ones(10),
    "forest": np.array([0.8, 0.8, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.7, 0.6]),
    "gap": np.ones(10),
}


@dataclass(frozen=True)
class _Options:
    seed: int
    cloud_cover: float
    s1_gap: bool


def fetch_synthetic(
    grid: Grid,
    months: list[str],
    classes: list[dict],
    raw_dir: Path,
    *,
    seed: int,
    modalities: Sequence[str] = MODALITIES,
    options: dict | None = None,
) -> dict[str, Path]:
    """Write a synthetic region's raw inputs, deterministically per seed.

    Files written in ``raw_dir`` (only those of the requested modalities, plus the fields):

    * ``fields.gpkg``: layer ``fields``, parcels (0.5-20 ha) in the grid CRS with columns
      ``field_id`` (int, from 1) and ``code`` (str, the class name, e.g. ``"wheat"``).
      Pixels between parcels (roads, hedges) are unlabelled.
    * ``s2.tif``: on ``grid``, float32, bands ``B02..B12`` time-major, surface reflectance
      (0-1, quantised to 1e-4 like L2A), NaN where cloudy (all bands of that pixel-month).
    * ``s1.tif``: on ``grid``, float32, ``VV``/``VH`` backscatter in dB time-major, NaN in the
      orbit-gap strip in every month.
    * ``weather.tif``: EPSG:4326 at 0.01° covering the grid bounds plus one cell,
      ``temperature_2m`` in kelvin (as ERA5-Land) and ``total_precipitation`` in metres
      (monthly total), time-major.
    * ``dem.tif``: EPSG:4326 at 1/3600° covering the grid bounds plus a few pixels,
      ``elevation`` (m) and ``slope`` (degrees, from the elevation with metric spacing).

    Args:
        grid: the region's grid.
        months: month labels ``YYYY-MM`` (as from :func:`cropmap.grid.season_months`).
        classes: the config class table, dicts with at least ``name``; every name must be in
            :data:`SUPPORTED_CLASSES`. Only these classes are generated.
        raw_dir: output folder, created if missing.
        seed: seed of the generator (the config's global seed).
        modalities: modalities to write, a subset of :data:`cropmap.modalities.MODALITIES`.
        options: the region's ``synthetic`` options, all optional:

            * ``seed`` (int >= 0): region-specific seed, overrides ``seed``.
            * ``cloud_cover`` (float >= 0, default 1.0): scale factor of the monthly S2 cloud
              cover (0 gives cloud-free S2; each month is capped at 60 %).
            * ``s1_gap`` (bool, default True): blank a vertical strip of ~15 % of the width in
              every S1 month, as an orbit gap (position from the seed).

    Returns:
        ``{modality: path}`` for each requested modality plus ``"fields": path``.

    Raises:
        ConfigError: for an unsupported class name (naming it and the supported names), an
            empty class table, a malformed month, a negative seed or a bad option.
        UnknownNameError: for an unknown modality.
    """
    opts = _parse_options(options, seed)
    names = _class_names(classes)
    mods = _check_modalities(modalities)
    doy = _month_doys(months)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)

    lon_c, lat_c = _grid_centre_lonlat(grid)
    if lat_c < 0:  # southern hemisphere: seasons shifted by half a year
        doy = (doy + 182.5) % 365.0
    terrain = _Terrain.make(grid, lon_c, lat_c, _rng(opts.seed, "terrain"))
    climate = _Climate.make(terrain, _rng(opts.seed, "climate"), opts.seed, lat_c)
    fields = _make_fields(grid, names, terrain, climate, _rng(opts.seed, "fields"))

    out: dict[str, Path] = {}
    if "s2" in mods or "s1" in mods:
        fid = _rasterize_fields(grid, fields["geometry"])
        params = _field_params(fields, names, climate, _rng(opts.seed, "phenology"))
        if "s2" in mods:
            out["s2"] = _write_s2(raw_dir / "s2.tif", grid, months, doy, fid, params, opts)
        if "s1" in mods:
            out["s1"] = _write_s1(raw_dir / "s1.tif", grid, months, doy, fid, params, climate, opts)
        del fid
    if "weather" in mods:
        out["weather"] = _write_weather(raw_dir / "weather.tif", grid, months, climate)
    if "dem" in mods:
        out["dem"] = _write_dem(raw_dir / "dem.tif", grid, terrain)
    out["fields"] = _write_fields(raw_dir / "fields.gpkg", grid, fields)
    return {m: out[m] for m in (*[m for m in MODALITIES if m in out], "fields")}


# --------------------------------------------------------------------------------------------
# validation


def _parse_options(options: Mapping | None, seed: int) -> _Options:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(
            f"synthetic option(s) {unknown} are not known: valid options are {list(OPTION_KEYS)}"
        )
    s = opts.get("seed", seed)
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
        raise ConfigError(f"synthetic seed {s!r} must be an integer >= 0")
    cc = opts.get("cloud_cover", 1.0)
    if isinstance(cc, bool) or not isinstance(cc, (int, float)) or not math.isfinite(cc) or cc < 0:
        raise ConfigError(f"synthetic.cloud_cover = {cc!r} must be a number >= 0 (1 = default cover)")
    gap = opts.get("s1_gap", True)
    if not isinstance(gap, bool):
        raise ConfigError(f"synthetic.s1_gap = {gap!r} must be true or false")
    return _Options(seed=int(s), cloud_cover=float(cc), s1_gap=gap)


def _class_names(classes: Sequence[Mapping]) -> list[str]:
    if not classes:
        raise ConfigError(
            f"classes is empty: the synthetic source needs at least one of {list(SUPPORTED_CLASSES)}"
        )
    names = [str(c["name"]) for c in classes]
    for name in names:
        if name not in SUPPORTED_CLASSES:
            raise ConfigError(
                f"class {name!r} has no synthetic phenology: the synthetic source supports "
                f"{list(SUPPORTED_CLASSES)}; rename the class or use a real source for this region"
            )
    return list(dict.fromkeys(names))


def _check_modalities(modalities: Sequence[str]) -> set[str]:
    mods = set(modalities)
    bad = sorted(mods - set(MODALITIES))
    if bad:
        raise UnknownNameError(f"unknown modality {bad}: valid modalities are {list(MODALITIES)}")
    return mods


def _month_doys(months: Sequence[str]) -> np.ndarray:
    """Day of year (0-based, float) of the middle of each month."""
    out = []
    for label in months:
        try:
            y, m = (int(v) for v in str(label).split("-")[:2])
            if not 1 <= m <= 12:
                raise ValueError
        except ValueError:
            raise ConfigError(f"month {label!r} is not YYYY-MM, e.g. 2023-04") from None
        first = sum(calendar.monthrange(y, k)[1] for k in range(1, m))
        out.append(first + calendar.monthrange(y, m)[1] / 2.0)
    return np.asarray(out, dtype=np.float64)


def _rng(seed: int, component: str, *extra: int) -> np.random.Generator:
    """An independent random stream per component, stable across Python runs."""
    return np.random.default_rng([seed, zlib.crc32(component.encode()), *extra])


# --------------------------------------------------------------------------------------------
# geometry helpers


def _metres_per_degree(lat: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Metres per degree of longitude and latitude on WGS84 at latitude ``lat``."""
    phi = np.radians(lat)
    m_lat = 111132.92 - 559.82 * np.cos(2 * phi) + 1.175 * np.cos(4 * phi)
    m_lon = 111412.84 * np.cos(phi) - 93.5 * np.cos(3 * phi)
    return np.asarray(m_lon), np.asarray(m_lat)


def _to_lonlat(grid: Grid, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from pyproj import Transformer

    tr = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
    lon, lat = tr.transform(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return np.asarray(lon), np.asarray(lat)


def _grid_centre_lonlat(grid: Grid) -> tuple[float, float]:
    x0, y0, x1, y1 = grid.bounds
    lon, lat = _to_lonlat(grid, np.array([(x0 + x1) / 2]), np.array([(y0 + y1) / 2]))
    return float(lon[0]), float(lat[0])


def _lonlat_bounds(grid: Grid) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    return transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21)


def _geo_grid(grid: Grid, res: float, margin: int) -> Grid:
    """An EPSG:4326 grid of ``res`` degrees snapped to ``res`` covering ``grid`` plus ``margin`` cells."""
    w, s, e, n = _lonlat_bounds(grid)
    ix0 = math.floor(w / res + 1e-9) - margin
    ix1 = math.ceil(e / res - 1e-9) + margin
    iy0 = math.floor(s / res + 1e-9) - margin
    iy1 = math.ceil(n / res - 1e-9) + margin
    return Grid(crs="EPSG:4326", res=res, xmin=ix0 * res, ymax=iy1 * res, width=ix1 - ix0, height=iy1 - iy0)


def _geo_centres(g: Grid) -> tuple[np.ndarray, np.ndarray]:
    lon = g.xmin + (np.arange(g.width) + 0.5) * g.res
    lat = g.ymax - (np.arange(g.height) + 0.5) * g.res
    return np.meshgrid(lon, lat)


def _upsample(coarse: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a coarse field by an integer factor, cropped to ``shape``."""
    from scipy.ndimage import zoom

    full = zoom(coarse.astype(np.float32), factor, order=1, prefilter=False, grid_mode=False)
    return full[: shape[0], : shape[1]]


def _coarse_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    return (shape[0] // factor + 2, shape[1] // factor + 2)


# --------------------------------------------------------------------------------------------
# terrain and climate: analytic functions of (lon, lat), so every grid agrees


@dataclass(frozen=True)
class _Terrain:
    """Smooth hills plus gentle roughness, 100-900 m typical."""

    lon0: float
    lat0: float
    kx: float  # km per degree of longitude
    ky: float  # km per degree of latitude
    base: float
    trend: tuple[float, float]  # m per km in x, y
    hills: np.ndarray  # (n, 4): x_km, y_km, sigma_km, height_m
    waves: np.ndarray  # (m, 4): kx, ky (rad/km), phase, amplitude_m

    @classmethod
    def make(cls, grid: Grid, lon0: float, lat0: float, rng: np.random.Generator) -> _Terrain:
        m_lon, m_lat = _metres_per_degree(lat0)
        half_x = grid.width * grid.res / 2000.0 + 2.0
        half_y = grid.height * grid.res / 2000.0 + 2.0
        n = int(np.clip(4 * half_x * half_y / 10.0, 6, 60))
        hills = np.column_stack(
            [
                rng.uniform(-half_x, half_x, n),
                rng.uniform(-half_y, half_y, n),
                rng.uniform(1.0, 3.5, n),
                rng.uniform(-100.0, 300.0, n),
            ]
        )
        m = 12
        wavelength = rng.uniform(0.3, 1.5, m)  # km
        angle = rng.uniform(0, 2 * np.pi, m)
        k = 2 * np.pi / wavelength
        waves = np.column_stack(
            [k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi, m), 10.0 * wavelength * rng.uniform(0.4, 1.0, m)]
        )
        return cls(
            lon0=lon0,
            lat0=lat0,
            kx=float(m_lon) / 1000.0,
            ky=float(m_lat) / 1000.0,
            base=float(rng.uniform(150.0, 350.0)),
            trend=(float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10))),
            hills=hills,
            waves=waves,
        )

    def local_km(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(lon) - self.lon0) * self.kx, (np.asarray(lat) - self.lat0) * self.ky

    def elevation(self, lon: np.ndarray, lat: np.ndarray, *, smooth: bool = False) -> np.ndarray:
        """Elevation in metres; ``smooth`` leaves out the sub-kilometre roughness."""
        x, y = self.local_km(lon, lat)
        z = self.base + self.trend[0] * x + self.trend[1] * y
        for hx, hy, sig, h in self.hills:
            z = z + h * np.exp(-((x - hx) ** 2 + (y - hy) ** 2) / (2 * sig * sig))
        if not smooth:
            for kx, ky, ph, amp in self.waves:
                z = z + amp * np.sin(kx * x + ky * y + ph)
        # soft limits keep the relief in the 100-900 m range typical of farmland
        z = 900.0 - 60.0 * np.logaddexp(0.0, (900.0 - z) / 60.0)
        return 100.0 + 60.0 * np.logaddexp(0.0, (z - 100.0) / 60.0)

    def slope(self, lon: np.ndarray, lat: np.ndarray, step_m: float = 15.0) -> np.ndarray:
        """Slope in degrees by central differences of ``step_m`` metres."""
        dlon = step_m / (self.kx * 1000.0)
        dlat = step_m / (self.ky * 1000.0)
        gx = (self.elevation(lon + dlon, lat) - self.elevation(lon - dlon, lat)) / (2 * step_m)
        gy = (self.elevation(lon, lat + dlat) - self.elevation(lon, lat - dlat)) / (2 * step_m)
        return np.degrees(np.arctan(np.hypot(gx, gy)))


@dataclass(frozen=True)
class _Climate:
    """Monthly 2 m temperature (K) and precipitation (m) from season, elevation and gradients."""

    terrain: _Terrain
    seed: int
    south: bool
    t_mean: float  # °C at sea level
    t_amp: float  # K, seasonal half range
    t_grad: tuple[float, float]  # K per km
    p_annual: float  # m per year
    p_grad: tuple[float, float]  # relative change per km
    p_waves: np.ndarray  # (3, 4): kx, ky, phase, relative amplitude

    @classmethod
    def make(cls, terrain: _Terrain, rng: np.random.Generator, seed: int, lat: float) -> _Climate:
        a = rng.uniform(0, 2 * np.pi)
        g = rng.uniform(0.08, 0.2)  # K per km: a regional gradient of 0.8-2 K per 10 km
        b = rng.uniform(0, 2 * np.pi)
        pg = rng.uniform(0.01, 0.02)
        wl = rng.uniform(8.0, 25.0, 3)
        ang = rng.uniform(0, 2 * np.pi, 3)
        p_waves = np.column_stack(
            [2 * np.pi / wl * np.cos(ang), 2 * np.pi / wl * np.sin(ang), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.03, 0.08, 3)]
        )
        return cls(
            terrain=terrain,
            seed=seed,
            south=lat < 0,
            t_mean=30.0 - 0.38 * abs(lat) + float(rng.normal(0, 0.5)),
            t_amp=min(2.0 + 0.17 * abs(lat), 14.0),
            t_grad=(g * math.cos(a), g * math.sin(a)),
            p_annual=float(rng.uniform(0.6, 1.0)),
            p_grad=(pg * math.cos(b), pg * math.sin(b)),
            p_waves=p_waves,
        )

    def _month_anomaly(self, month: str) -> tuple[float, float]:
        """Region-wide temperature anomaly (K) and precipitation factor of one calendar month."""
        y, m = (int(v) for v in month.split("-")[:2])
        r = _rng(self.seed, "weather-month", y, m)
        return float(r.normal(0.0, 0.8)), float(r.lognormal(0.0, 0.35))

    def _doy(self, month: str) -> float:
        d = float(_month_doys([month])[0])
        return (d + 182.5) % 365.0 if self.south else d

    def annual_temperature_offset(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Spatial part of temperature (K): lapse rate on smooth terrain plus the gradient."""
        x, y = self.terrain.local_km(lon, lat)
        z = self.terrain.elevation(lon, lat, smooth=True)
        return -_LAPSE_RATE * z + self.t_grad[0] * x + self.t_grad[1] * y

    def precipitation_factor(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Spatial precipitation factor (about 1): orographic, gradient and smooth waves."""
        x, y = self.terrain.local_km(lon, lat)
        z = self.terrain.elevation(lon, lat, smooth=True)
        f = (1.0 + 0.6 * (z - 300.0) / 1000.0) * (1.0 + self.p_grad[0] * x + self.p_grad[1] * y)
        for kx, ky, ph, amp in self.p_waves:
            f = f * (1.0 + amp * np.sin(kx * x + ky * y + ph))
        return np.clip(f, 0.2, 3.0)

    def temperature(self, lon: np.ndarray, lat: np.ndarray, month: str) -> np.ndarray:
        """Monthly mean 2 m temperature in kelvin."""
        d = self._doy(month)
        season = self.t_mean + self.t_amp * math.cos(2 * math.pi * (d - 200.0) / 365.0)
        t_anom, _ = self._month_anomaly(month)
        return 273.15 + season + t_anom + self.annual_temperature_offset(lon, lat)

    def precipitation(self, lon: np.ndarray, lat: np.ndarray, month: str) -> np.ndarray:
        """Monthly total precipitation in metres."""
        d = self._doy(month)
        clim = self.p_annual / 12.0 * (1.0 + 0.25 * math.cos(2 * math.pi * (d - 290.0) / 365.0))
        _, p_fac = self._month_anomaly(month)
        return clim * p_fac * self.precipitation_factor(lon, lat)


# --------------------------------------------------------------------------------------------
# fields


def _parcels(grid: Grid, rng: np.random.Generator):
    """Rotated recursive split of a square covering the grid, clipped to the grid."""
    import shapely

    w_m, h_m = grid.width * grid.res, grid.height * grid.res
    x0g, y0g, x1g, y1g = grid.bounds
    cx, cy = (x0g + x1g) / 2, (y0g + y1g) / 2
    half = 0.5 * math.hypot(w_m, h_m) + 50.0
    rects: list[tuple[float, float, float, float]] = []
    stack = [(-half, -half, half, half, 0)]
    while stack:
        x0, y0, x1, y1, depth = stack.pop()
        w, h = x1 - x0, y1 - y0
        area_ha = w * h / 1e4
        target = math.exp(rng.uniform(math.log(2.0), math.log(30.0)))
        if area_ha > _MAX_HA or (area_ha >= 2.6 and area_ha > target):
            f = rng.uniform(0.3, 0.7)
            road = 6.0 if depth < 4 else 0.0  # main roads: 12 m plus the parcel margins
            if w >= h:
                xs = x0 + f * w
                stack += [(x0, y0, xs - road, y1, depth + 1), (xs + road, y0, x1, y1, depth + 1)]
            else:
                ys = y0 + f * h
                stack += [(x0, y0, x1, ys - road, depth + 1), (x0, ys + road, x1, y1, depth + 1)]
        else:
            rects.append((x0, y0, x1, y1))
    r = np.asarray(rects)
    shrink = rng.uniform(2.5, 6.0, len(r))  # hedges and tracks between parcels
    r = r + np.column_stack([shrink, shrink, -shrink, -shrink])
    corners = np.stack(
        [r[:, [0, 1]], r[:, [2, 1]], r[:, [2, 3]], r[:, [0, 3]], r[:, [0, 1]]], axis=1
    )  # (n, 5, 2)
    theta = rng.uniform(0, np.pi / 2)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.empty_like(corners)
    rot[..., 0] = cx + c * corners[..., 0] - s * corners[..., 1]
    rot[..., 1] = cy + s * corners[..., 0] + c * corners[..., 1]
    polys = shapely.polygons(rot)
    clipped = shapely.intersection(polys, shapely.box(x0g, y0g, x1g, y1g))
    area = shapely.area(clipped) / 1e4
    keep = (area >= _MIN_HA) & (area <= _MAX_HA) & (shapely.get_type_id(clipped) == 3)
    return clipped[keep]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _make_fields(
    grid: Grid, names: list[str], terrain: _Terrain, climate: _Climate, rng: np.random.Generator
) -> dict:
    """Parcels, their terrain/climate covariates and their classes."""
    import shapely

    geoms = _parcels(grid, rng)
    n = len(geoms)
    cent = shapely.centroid(geoms)
    lon, lat = _to_lonlat(grid, shapely.get_x(cent), shapely.get_y(cent))
    elev = terrain.elevation(lon, lat)
    slope = terrain.slope(lon, lat)
    t_off = climate.annual_temperature_offset(lon, lat)
    p_fac = climate.precipitation_factor(lon, lat)
    # standardised covariates with fixed physical scales (meaningful on tiny regions too)
    z = np.column_stack(
        [
            (elev - elev.mean()) / 150.0 if n else elev,
            (slope - 4.0) / 3.0,
            (t_off - t_off.mean()) / 1.0 if n else t_off,
            (p_fac - p_fac.mean()) / 0.08 if n else p_fac,
        ]
    )
    crops = [c for c in names if c != "non_crop"]
    labels = np.empty(n, dtype=object)
    nc_logit = 0.8 * z[:, 0] + 1.0 * z[:, 1]
    if "non_crop" in names and crops and n:
        lo, hi = -20.0, 20.0  # intercept so that the expected non-crop share is 30 %
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(mid + nc_logit).mean() < _NON_CROP_SHARE else (lo, mid)
        nc_logit = nc_logit + (lo + hi) / 2
        is_nc = rng.random(n) < _sigmoid(nc_logit)
    else:
        is_nc = np.full(n, "non_crop" in names)
        rng.random(n)
    logits = np.zeros((n, max(len(crops), 1)))
    if crops and n:
        share = np.array([_CROP_SHARE[c] for c in crops])
        share /= share.sum()
        logits = z @ np.array([_PRIORS[c] for c in crops]).T
        sub = logits[~is_nc] if (~is_nc).any() else logits
        bias = np.log(share)
        for _ in range(30):  # intercepts so that the expected crop shares are _CROP_SHARE
            e = np.exp(sub + bias - (sub + bias).max(axis=1, keepdims=True))
            bias += np.log(share / (e / e.sum(axis=1, keepdims=True)).mean(axis=0))
        logits = logits + bias
    gumbel = rng.gumbel(size=logits.shape)
    if crops:
        labels[:] = np.asarray(crops, dtype=object)[np.argmax(logits + gumbel, axis=1)]
    labels[is_nc] = "non_crop"
    # make sure every class occurs when there are enough parcels (tiny regions, rare classes)
    if n >= 2 * len(names):
        score = {c: logits[:, k] for k, c in enumerate(crops)}
        score["non_crop"] = nc_logit
        for c in names:
            if np.any(labels == c):
                continue
            values, counts = np.unique(labels.astype(str), return_counts=True)
            spare = np.isin(labels.astype(str), values[counts > 1])
            idx = int(np.argmax(np.where(spare, score[c], -np.inf)))
            labels[idx] = c
    return {
        "geometry": geoms,
        "code": labels.astype(str),
        "field_id": np.arange(1, n + 1, dtype=np.int64),
        "z": z,
    }


def _field_params(fields: dict, names: list[str], climate: _Climate, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-field phenology, spectra and S1 structure; index 0 is the gap between parcels."""
    codes = np.concatenate([["gap"], fields["code"]])
    n = len(codes)
    t_anom = np.concatenate([[0.0], fields["z"][:, 2]])  # K, the z scale of temperature is 1 K
    p = {k: np.zeros(n) for k in ("soil", "winter", "w_end", "sow", "sos", "eos", "amp", "r_up", "r_down", "struct", "mow", "mow_depth", "flower", "flower_amp")}
    kind = codes.copy()
    u = rng.random((n, 16))  # fixed number of draws per field: stable streams
    g = rng.standard_normal((n, 6))
    jitter = np.clip(g * 7.0, -14.0, 14.0)  # days, about +-2 weeks
    for i, c in enumerate(codes):
        if c in _CROPS:
            cp = _CROPS[c]
            soil = 0.13 + 0.05 * u[i, 0]
            peak = cp["peak"] * (0.9 + 0.14 * u[i, 1])
            sos = cp["sos"] + jitter[i, 0] - 4.0 * t_anom[i]
            eos = max(cp["eos"] + jitter[i, 1] - 3.0 * t_anom[i], sos + 40.0)
            if cp["winter"] > 0:
                winter = cp["winter"] * (0.8 + 0.4 * u[i, 2])
                w_end, sow, amp = eos, cp["sow"] + jitter[i, 2], peak - soil - winter
            elif u[i, 3] < 0.25:  # summer crop after a winter cover crop
                winter = 0.25 + 0.2 * u[i, 2]
                w_end, sow, amp = sos - 30.0 - 20.0 * u[i, 4], 240.0 + 30.0 * u[i, 5], peak - soil
            else:
                winter, w_end, sow, amp = 0.0, 0.0, 1e4, peak - soil
            vals = {"soil": soil, "winter": winter, "w_end": w_end, "sow": sow, "sos": sos, "eos": eos, "amp": amp,
                    "r_up": cp["r_up"] * (0.8 + 0.45 * u[i, 6]), "r_down": cp["r_down"] * (0.8 + 0.45 * u[i, 7]),
                    "struct": cp["struct"] * (0.85 + 0.3 * u[i, 8]), "mow": 0.0, "mow_depth": 0.0}
            if "flower" in cp:
                vals["flower"] = cp["flower"] + 0.5 * jitter[i, 3]
                vals["flower_amp"] = 0.6 + 0.4 * u[i, 9]
        elif c == "non_crop":
            forest = u[i, 10] < 0.4 * (1.0 + np.tanh(fields["z"][i - 1, 1]))
            kind[i] = "forest" if forest else "grass"
            if forest:
                base, peak, sos, eos, r, struct = 0.42 + 0.08 * u[i, 0], 0.84 + 0.06 * u[i, 1], 110.0, 295.0, 8.0, 1.8
            else:
                base, peak, sos, eos, r, struct = 0.40 + 0.15 * u[i, 0], 0.75 + 0.1 * u[i, 1], 70.0, 300.0, 15.0, 0.5
            mown = (not forest) and u[i, 11] < 0.5
            vals = {"soil": base, "winter": 0.0, "w_end": 0.0, "sow": 1e4, "sos": sos + jitter[i, 0],
                    "eos": eos + jitter[i, 1], "amp": peak - base, "r_up": r, "r_down": r,
                    "struct": struct * (0.85 + 0.3 * u[i, 8]),
                    "mow": 140.0 + 60.0 * u[i, 12] if mown else 0.0,
                    "mow_depth": 0.15 + 0.15 * u[i, 13] if mown else 0.0}
        else:  # gap: roads, tracks, hedges
            vals = {"soil": 0.2, "winter": 0.0, "w_end": 0.0, "sow": 1e4, "sos": 100.0, "eos": 280.0,
                    "amp": 0.12, "r_up": 15.0, "r_down": 15.0, "struct": 0.4, "mow": 0.0, "mow_depth": 0.0}
        for k, v in vals.items():
            p[k][i] = v
    veg = np.stack([_VEG * _VEG_MULT[k] for k in kind]) * (1.0 + 0.03 * rng.standard_normal((n, 10)))
    bright = 0.8 + 0.45 * rng.random(n)
    dark = np.where(np.isin(kind, ["forest", "grass"]), 0.7, 1.0)  # litter darker than tilled soil
    soil = np.outer(bright * dark, _SOIL)
    p["veg"] = veg
    p["soil_refl"] = soil
    p["rough_db"] = np.clip(rng.normal(0.0, 1.0, n), -2.5, 2.5)
    return p


def _rasterize_fields(grid: Grid, geoms) -> np.ndarray:
    from rasterio.features import rasterize

    if len(geoms) == 0:
        return np.zeros(grid.shape, dtype=np.int32)
    return rasterize(
        zip(geoms, range(1, len(geoms) + 1), strict=True),
        out_shape=grid.shape,
        transform=grid.transform,
        fill=0,
        dtype="int32",
    )


# --------------------------------------------------------------------------------------------
# phenology


def _logistic(d: np.ndarray, mid: np.ndarray, rate: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip((d - mid) / rate, -60.0, 60.0)))


def _ndvi_curves(p: dict[str, np.ndarray], doy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NDVI ``[N+1, T]`` and flowering intensity ``[N+1, T]`` of every field."""
    d = doy[None, :]
    col = {k: v[:, None] for k, v in p.items() if v.ndim == 1}
    ndvi = (
        col["soil"]
        + col["winter"] * (1.0 - _logistic(d, col["w_end"], 8.0))
        + col["winter"] * _logistic(d, col["sow"] + 25.0, 10.0)
        + col["amp"] * (_logistic(d, col["sos"], col["r_up"]) - _logistic(d, col["eos"], col["r_down"]))
        - col["mow_depth"] * np.exp(-0.5 * ((d - col["mow"]) / 15.0) ** 2)
    )
    flower = col["flower_amp"] * np.exp(-0.5 * ((d - col["flower"]) / 12.0) ** 2)
    return np.clip(ndvi, 0.05, 0.95), flower


def _cover_fraction(ndvi: np.ndarray) -> np.ndarray:
    """Vegetation fraction whose linear soil/vegetation mixture has this NDVI (nominal spectra)."""
    nv, rv, ns, rs = _VEG[6], _VEG[2], _SOIL[6], _SOIL[2]
    a, b, c, e = nv - rv, ns - rs, nv + rv, ns + rs
    fc = (ndvi * e - b) / ((a - b) - ndvi * (c - e))
    return np.clip(fc, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# writers


def _write_raster(path: Path, data: np.ndarray, profile: dict, descriptions: Sequence[str], tags: dict) -> Path:
    """Write atomically (temporary file then rename) with band descriptions and tags."""
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(descriptions)
        dst.update_tags(**{k: str(v) for k, v in tags.items()})
    os.replace(tmp, path)
    return path


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _cloud_masks(grid: Grid, doy: np.ndarray, opts: _Options):
    """Yield a boolean cloud mask per month (True = cloudy)."""
    rng = _rng(opts.seed, "clouds")
    factor = 30  # coarse cells of 300 m
    cshape = _coarse_shape(grid.shape, factor)
    persistent = _smooth_noise(rng, cshape, 3.0)  # cloud-prone places, cloudy most months
    winter = 0.5 + 0.5 * np.cos(2 * np.pi * (doy - 15.0) / 365.0)
    jitter = rng.uniform(-0.08, 0.08, len(doy))
    for t in range(len(doy)):
        monthly = _smooth_noise(rng, cshape, 1.5)
        cover = float(np.clip(opts.cloud_cover * (0.12 + 0.33 * winter[t] + jitter[t]), 0.0, 0.6))
        if cover <= 0:
            yield np.zeros(grid.shape, dtype=bool)
            continue
        field = _upsample(0.65 * persistent + 0.75 * monthly, factor, grid.shape)
        k = min(round((1.0 - cover) * field.size), field.size - 1)
        thr = np.partition(field.ravel(), k)[k]
        yield field > thr


def _write_s2(path: Path, grid: Grid, months: Sequence[str], doy: np.ndarray, fid: np.ndarray,
              p: dict[str, np.ndarray], opts: _Options) -> Path:
    rng = _rng(opts.seed, "s2")
    ndvi_f, flower_f = _ndvi_curves(p, doy)
    nb = n_channels("s2")
    h, w = grid.shape
    het = _upsample(_smooth_noise(rng, _coarse_shape(grid.shape, 8), 1.0), 8, grid.shape)
    veg = p["veg"].astype(np.float32)
    soil = p["soil_refl"].astype(np.float32)
    cube = np.empty((len(doy) * nb, h, w), dtype=np.float32)
    for t, cloudy in enumerate(_cloud_masks(grid, doy, opts)):
        ndvi = ndvi_f[:, t].astype(np.float32)[fid]
        ndvi += 0.03 * het + 0.02 * rng.standard_normal((h, w), dtype=np.float32)
        fc = _cover_fraction(ndvi).astype(np.float32)
        bare = 1.0 - fc
        flower = flower_f[:, t].astype(np.float32)[fid] if flower_f[:, t].any() else None
        for b in range(nb):
            r = cube[t * nb + b]
            np.multiply(fc, veg[:, b][fid], out=r)
            r += bare * soil[:, b][fid]
            if flower is not None and _FLOWER[b]:
                r += np.float32(_FLOWER[b]) * flower * fc
            r *= 1.0 + 0.02 * rng.standard_normal((h, w), dtype=np.float32)
            np.clip(r, 1e-4, 1.0, out=r)
            r *= 1e4
            np.rint(r, out=r)
            r /= 1e4
            r[cloudy] = np.nan
    prof = grid.profile(cube.shape[0])
    prof.update(zlevel=1, predictor=1)  # values are quantised to 1e-4: no predictor compresses best
    return _write_raster(path, cube, prof, band_descriptions("s2", months),
                         {"source": "cropmap synthetic", "units": "surface reflectance", "seed": opts.seed})


def _write_s1(path: Path, grid: Grid, months: Sequence[str], doy: np.ndarray, fid: np.ndarray,
              p: dict[str, np.ndarray], climate: _Climate, opts: _Options) -> Path:
    rng = _rng(opts.seed, "s1")
    ndvi_f, _ = _ndvi_curves(p, doy)
    fc_f = _cover_fraction(ndvi_f)
    h, w = grid.shape
    # precipitation and temperature on a coarse version of the grid, for soil moisture
    factor = 32
    ch, cw = _coarse_shape(grid.shape, factor)
    cols = grid.xmin + (np.arange(cw) * factor + 0.5) * grid.res
    rows = grid.ymax - (np.arange(ch) * factor + 0.5) * grid.res
    xx, yy = np.meshgrid(cols, rows)
    lon, lat = _to_lonlat(grid, xx.ravel(), yy.ravel())
    lon, lat = lon.reshape(xx.shape), lat.reshape(xx.shape)
    p_ref = climate.p_annual / 12.0
    precip = [climate.precipitation(lon, lat, m) for m in months]
    struct = p["struct"].astype(np.float32)[fid]
    rough = p["rough_db"].astype(np.float32)[fid]
    theta = np.radians(rng.uniform(33.0, 43.0) + np.linspace(-0.5, 0.5, w, dtype=np.float32))[None, :]
    cos_t = np.cos(theta).astype(np.float32)
    looks = 8.0  # equivalent number of looks of a monthly GRD composite
    gap = np.zeros(w, dtype=bool)
    gap_w = max(1, round(0.15 * w))
    gap_x = int(rng.integers(0, max(1, w - gap_w + 1)))
    if opts.s1_gap:
        gap[gap_x : gap_x + gap_w] = True
    cube = np.empty((2 * len(doy), h, w), dtype=np.float32)
    for t, month in enumerate(months):
        api = 0.6 * precip[t] + 0.4 * precip[t - 1 if t else t]
        t_c = climate.temperature(lon, lat, month) - 273.15
        sm_c = np.clip(0.08 + 0.18 * api / p_ref - 0.006 * (t_c - 10.0), 0.05, 0.45)
        sm = _upsample(sm_c, factor, grid.shape)
        soil_vv_db = -21.0 + 25.0 * sm + rough
        v = struct * fc_f[:, t].astype(np.float32)[fid]
        for k, (a_coef, b_coef, pol_off) in enumerate(((0.12, 0.6, 0.0), (0.035, 0.4, -8.0))):
            tau2 = np.exp(-2.0 * b_coef * v / cos_t)
            sigma = a_coef * v * cos_t * (1.0 - tau2) + tau2 * 10.0 ** ((soil_vv_db + pol_off) / 10.0)
            sigma *= rng.standard_gamma(looks, size=(h, w), dtype=np.float32) / looks
            out = cube[2 * t + k]
            np.log10(np.maximum(sigma, 1e-4), out=out)
            out *= 10.0
            out[:, gap] = np.nan
    prof = grid.profile(cube.shape[0])
    prof.update(zlevel=1)
    return _write_raster(path, cube, prof, band_descriptions("s1", months),
                         {"source": "cropmap synthetic", "units": "dB", "seed": opts.seed,
                          "orbit_gap_columns": f"{gap_x}-{gap_x + gap_w - 1}" if opts.s1_gap else "none"})


def _write_weather(path: Path, grid: Grid, months: Sequence[str], climate: _Climate) -> Path:
    g = _geo_grid(grid, _WEATHER_RES, 1)
    lon, lat = _geo_centres(g)
    data = np.empty((2 * len(months), g.height, g.width), dtype=np.float32)
    for t, m in enumerate(months):
        data[2 * t] = climate.temperature(lon, lat, m)
        data[2 * t + 1] = climate.precipitation(lon, lat, m)
    return _write_raster(path, data, g.profile(data.shape[0]), band_descriptions("weather", months),
                         {"source": "cropmap synthetic", "temperature_2m_units": "K",
                          "total_precipitation_units": "m (monthly total)"})


def _write_dem(path: Path, grid: Grid, terrain: _Terrain) -> Path:
    g = _geo_grid(grid, _DEM_RES, _DEM_MARGIN)
    lon, lat = _geo_centres(g)
    elev = terrain.elevation(lon, lat)
    m_lon, m_lat = _metres_per_degree(lat[:, :1])
    gy, gx = np.gradient(elev)
    dzdx = gx / (g.res * m_lon)
    dzdy = gy / (g.res * m_lat)
    slope = np.degrees(np.arctan(np.hypot(dzdx, dzdy)))
    data = np.stack([elev, slope]).astype(np.float32)
    return _write_raster(path, data, g.profile(2), band_descriptions("dem", []),
                         {"source": "cropmap synthetic", "elevation_units": "m", "slope_units": "degrees"})


def _write_fields(path: Path, grid: Grid, fields: dict) -> Path:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(
        {"field_id": fields["field_id"], "code": fields["code"]},
        geometry=list(fields["geometry"]),
        crs=grid.crs,
    )
    tmp = path.with_name(f".{path.name}.tmp.gpkg")
    tmp.unlink(missing_ok=True)
    gdf.to_file(tmp, layer="fields", driver="GPKG")
    os.replace(tmp, path)
    return path
