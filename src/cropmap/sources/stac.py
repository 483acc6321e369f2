"""STAC source: Sentinel-2 L2A, Sentinel-1 and Copernicus DEM from any STAC API.

``fetch_stac`` searches a STAC API (pystac-client), reads the Cloud-Optimized GeoTIFF assets
with odc-stac (dask-backed, GDAL ``/vsicurl/`` range requests) straight onto the region grid and
writes one stack per modality (``raw_dir/{modality}.tif``, see :mod:`cropmap.modalities` for the band layout):

- ``s2``: scene classification (SCL) mask, valid classes ``scl_valid`` (default 4 vegetation,
  5 bare soil, 6 water, 7 unclassified; so 0 nodata, 1 saturated, 2 dark/topographic shadow,
  3 cloud shadow, 8/9 cloud, 10 cirrus and 11 snow are masked), reflectance
  ``(DN + offset) / 10000`` where ``offset = -1000`` for processing baseline >= 04.00
  (``harmonize``), monthly median.
- ``s1``: VV/VH backscatter in dB (from linear power for RTC, as is for dB products, or from
  amplitude DN), monthly median in dB.
- ``dem``: elevation (m, bilinear) and slope (degrees, central differences on the grid).

A month without any valid observation is NaN. A modality the catalogue has no collection for
(weather on every preset) is not written. An asset that answers 404/403/410 or is not a TIFF is
left out (its pixels become NaN) instead of failing the region; transient failures (429, 5xx,
dropped connections) are retried with exponential backoff, and if they persist the fetch fails
with :class:`~cropmap.errors.SourceError`. Parts (one month x one grid block) are kept under
``raw_dir/.parts/`` so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from cropmap.errors import ConfigError, SourceError
from cropmap.grid import Grid
from cropmap.modalities import BANDS, band_descriptions, n_channels
from cropmap.sources._blocks import Block, fetch_stack, stack_is_complete
from cropmap.sources._http import Backoff, requests_session, retry_policy
from cropmap.sources.stac_reader import (
    AssetReader,
    block_geobox,
    dem_block,
    install_redaction,
    item_time,
    s1_block,
    s2_block,
)

log = logging.getLogger(__name__)

#: Modalities a STAC catalogue can provide (no preset has monthly weather).
STAC_MODALITIES: tuple[str, ...] = ("s2", "s1", "dem")

#: SCL classes kept by default: 4 vegetation, 5 not vegetated, 6 water, 7 unclassified.
SCL_VALID_DEFAULT: tuple[int, ...] = (4, 5, 6, 7)

_S2_PC_ASSETS = {b: b for b in BANDS["s2"]} | {"SCL": "SCL"}
_S2_ES_ASSETS = {
    "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B11": "swir16", "B12": "swir22", "SCL": "scl",
}

#: Per-catalogue defaults; every key can be overridden in ``options``.
PRESETS: dict[str, dict] = {
    "planetary_computer": {
        "url": "https://planetarycomputer.microsoft.com/api/stac/v1",
        "sas_url": "https://planetarycomputer.microsoft.com/api/sas/v1/token",
        "sign": "auto",
        "collections": {"s2": "sentinel-2-l2a", "s1": "sentinel-1-rtc", "dem": "cop-dem-glo-30"},
        "assets": {"s2": _S2_PC_ASSETS, "s1": {"VV": "vv", "VH": "vh"}, "dem": {"elevation": "data"}},
        "s1_units": "linear",
    },
    "earth_search": {
        # Earth Search's sentinel-1-grd sits in a requester-pays bucket: no S1 by default.
        "url": "https://earth-search.aws.element84.com/v1",
        "sign": False,
        "collections": {"s2": "sentinel-2-l2a", "dem": "cop-dem-glo-30"},
        "assets": {"s2": _S2_ES_ASSETS, "s1": {"VV": "vv", "VH": "vh"}, "dem": {"elevation": "data"}},
        "s1_units": "linear",
    },
}
_GENERIC_ASSETS = {"s2": _S2_PC_ASSETS, "s1": {"VV": "vv", "VH": "vh"}, "dem": {"elevation": "data"}}
_DEFAULT_RESAMPLING = {"s2": "nearest", "s1": "bilinear", "dem": "bilinear"}


@dataclass
class StacConfig:
    """Resolved ``stac`` options of a region (preset defaults + overrides)."""

    url: str
    collections: dict[str, str]
    assets: dict[str, dict[str, str]]
    sign: bool | str = False
    sas_url: str | None = None
    max_cloud: float = 90.0
    scl_valid: tuple[int, ...] = SCL_VALID_DEFAULT
    harmonize: bool = True
    s1_units: str = "linear"
    s1_db_offset: float = 0.0
    orbit: str | None = None
    block_size: int = 1024
    workers: int = 4
    backoff: Backoff = field(default_factory=Backoff)
    resampling: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_RESAMPLING))
    limit: int = 100
    search_method: str = "POST"
    timeout: float = 60.0
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: dict) -> StacConfig:
        """Merge a region's ``stac`` options over its preset.

        Raises:
            ConfigError: unknown preset, missing URL or an invalid value.
        """
        options = dict(options or {})
        preset_name = options.get("preset")
        if preset_name not in (None, *PRESETS):
            raise ConfigError(f"stac.preset = {preset_name!r} is unknown: use one of {sorted(PRESETS)} or leave it out and give stac.url")
        preset = PRESETS.get(preset_name or "", {})
        url = options.get("url") or preset.get("url")
        if not url:
            raise ConfigError("stac.url is missing: give the STAC API URL or a stac.preset (planetary_computer, earth_search)")
        collections = {**preset.get("collections", {}), **(options.get("collections") or {})}
        collections = {m: c for m, c in collections.items() if c}
        bad = sorted(set(collections) - set(STAC_MODALITIES))
        if bad:
            raise ConfigError(f"stac.collections has {bad}: the STAC source provides only {list(STAC_MODALITIES)}")
        assets = {m: dict(v) for m, v in preset.get("assets", _GENERIC_ASSETS).items()}
        for m, over in (options.get("assets") or {}).items():
            assets.setdefault(m, {}).update(over)
        s1_units = str(options.get("s1_units", preset.get("s1_units", "linear")))
        if s1_units not in ("linear", "db", "amplitude"):
            raise ConfigError(f"stac.s1_units = {s1_units!r}: use linear (RTC power), db, or amplitude (DN)")
        orbit = options.get("orbit")
        if orbit is not None and str(orbit).lower() not in ("ascending", "descending"):
            raise ConfigError(f"stac.orbit = {orbit!r}: use ascending, descending, or leave it out for both")
        sign = options.get("sign", preset.get("sign", False))
        if sign not in (True, False, "auto"):
            raise ConfigError(f"stac.sign = {sign!r}: use true, false or auto")
        block = int(options.get("block_size", 1024))
        if block < 16:
            raise ConfigError(f"stac.block_size = {block}: use at least 16 pixels")
        if str(options.get("search_method", "POST")).upper() not in ("GET", "POST"):
            raise ConfigError(f"stac.search_method = {options['search_method']!r}: use POST or GET")
        return cls(
            url=str(url).rstrip("/"),
            collections=collections,
            assets=assets,
            sign=sign,
            sas_url=(options.get("sas_url") or preset.get("sas_url") or "").rstrip("/") or None,
            max_cloud=float(options.get("max_cloud", 90.0)),
            scl_valid=tuple(int(v) for v in options.get("scl_valid", SCL_VALID_DEFAULT)),
            harmonize=bool(options.get("harmonize", True)),
            s1_units=s1_units,
            s1_db_offset=float(options.get("s1_db_offset", 0.0)),
            orbit=str(orbit).lower() if orbit else None,
            block_size=block,
            workers=max(1, int(options.get("workers", 4))),
            backoff=Backoff.from_options(options),
            resampling={**_DEFAULT_RESAMPLING, **(options.get("resampling") or {})},
            limit=int(options.get("limit", 100)),
            search_method=str(options.get("search_method", "POST")).upper(),
            timeout=float(options.get("timeout", 60.0)),
            headers=dict(options.get("headers") or {}),
        )


# --------------------------------------------------------------------------------------------
# Planetary Computer signing
# --------------------------------------------------------------------------------------------
class SasSigner:
    """Appends Planetary Computer SAS tokens to asset URLs (what ``planetary_computer.sign`` does).

    Tokens come from ``{sas_url}/{collection}`` (JSON ``{"token", "msft:expiry"}``) through the same
    retrying HTTP session as the searches, are cached per collection and renewed 5 minutes before
    they expire. With ``sign="auto"`` only Azure blob URLs are signed; ``sign=True`` signs every
    asset URL. An optional subscription key is read from ``PC_SDK_SUBSCRIPTION_KEY`` and sent as a
    header; it is never logged.
    """

    def __init__(self, sas_url: str, mode: bool | str, backoff: Backoff, timeout: float) -> None:
        import os

        key = os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
        self.sas_url = sas_url
        self.mode = mode
        self.timeout = timeout
        self.session = requests_session(backoff, {"Ocp-Apim-Subscription-Key": key} if key else None)
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._lock = threading.Lock()

    def token(self, collection: str) -> str:
        with self._lock:
            cached = self._tokens.get(collection)
            if cached and cached[1] - timedelta(minutes=5) > datetime.now(UTC):
                return cached[0]
            url = f"{self.sas_url}/{collection}"
            try:
                r = self.session.get(url, timeout=self.timeout)
            except Exception as e:
                raise SourceError(f"cannot get a SAS token from {url}: {e}") from e
            if r.status_code != 200:
                raise SourceError(f"SAS token request {url} answered HTTP {r.status_code}: check stac.sas_url")
            body = r.json()
            expiry = body.get("msft:expiry")
            try:
                exp = datetime.fromisoformat(str(expiry).replace("Z", "+00:00"))
            except ValueError:
                exp = datetime.now(UTC) + timedelta(minutes=30)
            self._tokens[collection] = (body["token"], exp)
            return body["token"]

    def sign(self, href: str, collection: str) -> str:
        parts = urlsplit(href)
        if parts.scheme not in ("http", "https") or "sig=" in parts.query:
            return href
        if self.mode == "auto" and not parts.netloc.endswith(".blob.core.windows.net"):
            return href
        return f"{href}{'&' if parts.query else '?'}{self.token(collection)}"


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------
def _month_range(months: Sequence[str]) -> tuple[datetime, datetime]:
    y0, m0 = (int(v) for v in months[0].split("-"))
    y1, m1 = (int(v) for v in months[-1].split("-"))
    start = datetime(y0, m0, 1, tzinfo=UTC)
    end = datetime(y1 + (m1 == 12), m1 % 12 + 1, 1, tzinfo=UTC) - timedelta(seconds=1)
    return start, end


def _lonlat_bbox(grid: Grid) -> list[float]:
    from rasterio.warp import transform_bounds

    return list(transform_bounds(grid.crs, "EPSG:4326", *grid.bounds, densify_pts=21))


def open_client(cfg: StacConfig):
    """A pystac-client ``Client`` whose HTTP session retries 429/5xx and dropped connections."""
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO

    io = StacApiIO(headers=cfg.headers or None, max_retries=retry_policy(cfg.backoff), timeout=cfg.timeout)
    try:
        return Client.open(cfg.url, stac_io=io)
    except Exception as e:
        raise SourceError(f"cannot open the STAC API at {cfg.url}: {e}") from e


def search_items(client, cfg: StacConfig, modality: str, grid: Grid, months: Sequence[str]) -> tuple[int, list]:
    """Items of the modality's collection over the grid (and season for temporal modalities).

    Cloud cover (``eo:cloud_cover`` <= ``max_cloud``) and orbit (``sat:orbit_state``) are
    filtered here rather than with the query extension, so any STAC API works.

    Returns:
        ``(number found before filtering, items kept sorted by time)``.
    """
    collection = cfg.collections[modality]
    kw: dict = {"collections": [collection], "bbox": _lonlat_bbox(grid), "limit": cfg.limit, "method": cfg.search_method}
    if modality != "dem":
        start, end = _month_range(months)
        kw["datetime"] = f"{start:%Y-%m-%dT%H:%M:%SZ}/{end:%Y-%m-%dT%H:%M:%SZ}"
    try:
        items = list(client.search(**kw).items())
    except Exception as e:
        raise SourceError(f"STAC search of {collection} at {cfg.url} failed: {e}") from e
    found = len(items)
    if modality == "s2":
        items = [it for it in items if float(it.properties.get("eo:cloud_cover", 0.0)) <= cfg.max_cloud]
    if modality == "s1" and cfg.orbit:
        items = [it for it in items if str(it.properties.get("sat:orbit_state", "")).lower() == cfg.orbit]
    keys = set(cfg.assets[modality].values())
    items = [it for it in items if keys & set(it.assets)]
    return found, sorted(items, key=lambda it: (item_time(it), it.id))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def fetch_stac(
    grid: Grid, months: list[str], raw_dir: Path, *, modalities: Sequence[str], options: dict
) -> dict[str, Path]:
    """Fetch ``s2``/``s1``/``dem`` stacks from a STAC API onto the region grid.

    Args:
        grid: the region grid (projected CRS, metres).
        months: season months ``YYYY-MM``.
        raw_dir: where ``{modality}.tif`` and the resumable ``.parts/`` go.
        modalities: modalities wanted; those this catalogue cannot provide are skipped.
        options: the region's ``stac`` options (see ``docs/real_data.md``).

    Returns:
        ``{modality: path}`` of the stacks written (or already complete).

    Raises:
        ConfigError: invalid options.
        SourceError: the API or its assets failed after the retries (finished blocks are kept).
    """
    cfg = StacConfig.from_options(options)
    install_redaction()
    raw_dir = Path(raw_dir)
    unknown = [m for m in modalities if m not in BANDS]
    if unknown:
        raise ConfigError(f"modalities {unknown} are unknown: use some of {list(BANDS)}")
    wanted = [m for m in modalities if m in cfg.collections]
    for m in modalities:
        if m not in wanted:
            log.info("stac: %s is not provided by %s (no collection configured): not written", m, cfg.url)
    if not wanted:
        return {}
    if "dem" in wanted:
        from pyproj import CRS

        if not CRS.from_user_input(grid.crs).is_projected:
            raise ConfigError(f"grid CRS {grid.crs} is not projected: slope needs metres (leave crs unset for UTM)")
    signer = None
    if cfg.sign:
        if not cfg.sas_url:
            raise ConfigError("stac.sign is on but stac.sas_url is empty: give the SAS token endpoint")
        signer = SasSigner(cfg.sas_url, cfg.sign, cfg.backoff, cfg.timeout)
    client = open_client(cfg)
    out: dict[str, Path] = {}
    for m in wanted:
        path = raw_dir / f"{m}.tif"
        desc = band_descriptions(m, months)
        if stack_is_complete(path, grid, desc):
            out[m] = path
            continue
        found, items = search_items(client, cfg, m, grid, months)
        if not found:
            log.warning("stac: no %s items in %s over this region and season: %s not written", m, cfg.collections[m], m)
            continue
        if not items:
            log.warning("stac: all %d %s items were filtered out (max_cloud / orbit): every month is NaN", found, m)
        _fetch_modality(cfg, signer, m, grid, months, items, path, desc)
        out[m] = path
    return out


def _fetch_modality(cfg: StacConfig, signer: SasSigner | None, modality: str, grid: Grid, months: list[str],
                    items: list, path: Path, desc: list[str]) -> None:
    reader = AssetReader(cfg, signer, modality)
    if modality == "dem":
        by_step = {"static": items}
    else:
        by_step = {mo: [] for mo in months}
        for it in items:
            key = item_time(it).strftime("%Y-%m")
            if key in by_step:
                by_step[key].append(it)
    request = {
        "source": "stac", "url": cfg.url, "collection": cfg.collections[modality], "modality": modality,
        "grid": grid.to_dict(), "months": list(months), "block": cfg.block_size,
        "assets": cfg.assets.get(modality), "scl_valid": list(cfg.scl_valid), "harmonize": cfg.harmonize,
        "s1_units": cfg.s1_units, "s1_db_offset": cfg.s1_db_offset, "resampling": cfg.resampling.get(modality),
        "items": {g: [it.id for it in its] for g, its in by_step.items()},
    }
    compose = {"s2": s2_block, "s1": s1_block, "dem": dem_block}[modality]

    def fetch(step: str, block: Block) -> np.ndarray:
        shape = (block.height, block.width)
        if not by_step[step]:
            return np.full((n_channels(modality), *shape), np.nan, np.float32)
        box = block_geobox(grid, block, halo=1 if modality == "dem" else 0)
        return compose(reader, cfg, by_step[step], box, shape)

    def tags() -> dict[str, str]:  # after fetching: how many assets were broken
        out = {"source": "stac", "stac_url": cfg.url, "collection": cfg.collections[modality]}
        if reader.broken:
            out["broken_assets"] = str(len(reader.broken))
        return out

    fetch_stack(path, grid, desc, list(by_step), cfg.block_size, request, fetch, source="stac", tags=tags)
