"""STAC source: Sentinel-2 L2A, Sentinel-1 and Copernicus DEM from any STAC API.

``fetch_stac`` searches a STAC API (pystac-client), reads the Cloud-Optimized GeoTIFF assets
with odc-stac (dask-backed, GDAL ``/vsicurl/`` range requests) straight onto the region grid and
writes one stack per modality (``raw_dir/{modality}.tif``, see ``shared/DESIGN.md``):

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
with :class:`~cropmap.errors.SourceError`. Blocks (one month x one tile) are kept under
``raw_dir/.parts/`` so an interrupted fetch resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from cropmap.errors import ConfigError, SourceError
from cropmap.grid import Grid
from cropmap.modalities import BANDS, band_descriptions
from cropmap.sources._blocks import PartStore, Tile, iter_tiles, stack_is_complete, write_stack
from cropmap.sources._http import Backoff, requests_session, retry_policy

log = logging.getLogger(__name__)

#: Modalities a STAC catalogue can provide (no preset has monthly weather).
STAC_MODALITIES: tuple[str, ...] = ("s2", "s1", "dem")

#: SCL classes kept by default: 4 vegetation, 5 not vegetated, 6 water, 7 unclassified.
SCL_VALID_DEFAULT: tuple[int, ...] = (4, 5, 6, 7)

#: Date processing baseline 04.00 went live (used when an item lacks ``s2:processing_baseline``).
BASELINE_04_START = datetime(2022, 1, 25, tzinfo=UTC)

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


def _item_time(item) -> datetime:
    t = item.datetime or datetime.fromisoformat(str(item.properties.get("start_datetime")).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


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
    return found, sorted(items, key=lambda it: (_item_time(it), it.id))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _geobox(grid: Grid, tile: Tile, halo: int = 0):
    from affine import Affine
    from odc.geo.geobox import GeoBox

    x0, _, _, y1 = tile.bounds(grid, halo)
    return GeoBox((tile.height + 2 * halo, tile.width + 2 * halo), Affine(grid.res, 0, x0, 0, -grid.res, y1), grid.crs)


def _gdal_env(cfg: StacConfig) -> dict:
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_HTTP_MAX_RETRY": str(cfg.backoff.retries),
        "GDAL_HTTP_RETRY_DELAY": str(max(cfg.backoff.base, 0.01)),
        "GDAL_HTTP_TIMEOUT": str(int(cfg.timeout)),
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff,.TIFF",
        "CPL_VSIL_CURL_USE_HEAD": "NO",
        "VSI_CACHE": "TRUE",
        # Never remember a failed open: a dropped first request must not make a file "missing"
        # for the rest of the process (GDAL's /vsicurl/ negative cache).
        "CPL_VSIL_CURL_NON_CACHED": "/vsicurl/",
    }


_URL_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def redact(text: object) -> str:
    """``text`` with URL query strings (SAS tokens, signatures) replaced by ``<redacted>``."""
    return _URL_QUERY.sub(r"\1?<redacted>", str(text))


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "?" in msg:
            record.msg, record.args = redact(msg), ()
        return True


def _install_redaction() -> None:
    """Keep signed URLs out of odc-stac's and GDAL's log records."""
    for name in ("odc.loader._rio", "rasterio._env", "urllib3.connectionpool", __name__):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _RedactFilter) for f in lg.filters):
            lg.addFilter(_RedactFilter())


class _AssetPolicy:
    """What a failed read of one asset means: retry it, or give it up as broken (NaN).

    An asset that answers 401/403/404/410, or whose first bytes are not a TIFF, is broken for
    good; anything else (429, 5xx, dropped connections, timeouts) is transient.
    """

    def __init__(self, cfg: StacConfig, modality: str) -> None:
        self.cfg = cfg
        self.modality = modality
        self.session = requests_session(cfg.backoff, cfg.headers or None)
        self.broken: dict[str, str] = {}  # url without query -> reason
        self._lock = threading.Lock()

    def is_broken(self, uri: str) -> bool:
        with self._lock:
            return uri.split("?")[0] in self.broken

    def classify(self, uri: str) -> bool:
        """Probe ``uri``; True when it is permanently broken."""
        key = uri.split("?")[0]
        with self._lock:
            if key in self.broken:
                return True
        if urlsplit(uri).scheme not in ("http", "https"):
            return False
        try:
            r = self.session.get(uri, headers={"Range": "bytes=0-3"}, timeout=self.cfg.timeout)
        except Exception:
            return False
        reason = None
        if r.status_code in (401, 403, 404, 410):
            reason = f"HTTP {r.status_code}"
        elif r.status_code in (200, 206) and r.content[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            reason = "not a TIFF"
        if reason is None:
            return False
        with self._lock:
            self.broken[key] = reason
        log.warning("stac: %s asset %s is broken (%s): its pixels become NaN", self.modality, key, reason)
        return True


def _retrying_driver(policy: _AssetPolicy):
    """An odc-loader rasterio driver whose reads are retried one asset at a time.

    GDAL retries 429/5xx itself but not every dropped connection; here each asset read is
    retried with backoff (``CPL_VSIL_CURL_NON_CACHED`` makes GDAL forget the failed open), and a
    permanently broken asset reads as nodata instead of failing the block.
    """
    from odc.loader._rio import RioDriver, rio_read
    from odc.stac._mdtools import StacAuxReader, StacMDParser

    backoff = policy.cfg.backoff

    class _Reader:
        def __init__(self, src, ctx) -> None:
            self._src = src

        def read(self, cfg, dst_geobox, *, dst=None, selection=None):
            strict = cfg.patch(fail_on_error=True)
            for attempt in range(backoff.retries + 1):
                if policy.is_broken(self._src.uri):
                    break
                try:
                    return rio_read(self._src, strict, dst_geobox, dst=dst, selection=selection)
                except Exception as e:
                    if policy.classify(self._src.uri):
                        break
                    if attempt >= backoff.retries:
                        raise SourceError(
                            f"reading {redact(self._src.uri)} failed after {backoff.retries} retries ({redact(e)}); "
                            "rerun later: finished blocks are kept"
                        ) from None
                    time.sleep(backoff.delay(attempt))
            # Broken asset: nothing read, the destination keeps its nodata (NaN).
            out = dst[0:0, 0:0] if dst is not None else np.ndarray((0, 0), dtype=cfg.dtype)
            return np.s_[0:0, 0:0], out

    class _Driver(RioDriver):
        def open(self, src, ctx):
            return _Reader(src, ctx)

    return _Driver(md_parser=StacMDParser({}), aux_reader=StacAuxReader())


class _Reader:
    """Loads items onto a tile with odc-stac (dask), one variable per asset key."""

    def __init__(self, cfg: StacConfig, signer: SasSigner | None, modality: str) -> None:
        self.cfg = cfg
        self.signer = signer
        self.modality = modality
        self.collection = cfg.collections[modality]
        self.policy = _AssetPolicy(cfg, modality)

    @property
    def broken(self) -> dict[str, str]:
        return self.policy.broken

    def _sign(self, href: str) -> str:
        return self.signer.sign(href, self.collection) if self.signer else href

    def _load_lazy(self, items: list, keys: Sequence[str], geobox):
        """Lazy dataset of the assets ``keys`` on ``geobox``, NaN nodata, aligned on time.

        Each asset key is loaded from the items that have it (odc-stac takes a collection's
        bands from the first item); a time step missing for a key is NaN.
        """
        import odc.stac
        import rasterio
        import xarray as xr

        res = self.cfg.resampling.get(self.modality, "nearest")
        scl = self.cfg.assets.get("s2", {}).get("SCL") if self.modality == "s2" else None
        patch = partial(self.signer.sign, collection=self.collection) if self.signer else None
        parts = []
        with rasterio.Env(**_gdal_env(self.cfg)):
            for k in keys:
                its = [it for it in items if k in it.assets]
                if not its:
                    continue
                parts.append(odc.stac.load(
                    its, bands=[k], geobox=geobox, groupby="solar_day", dtype="float32",
                    chunks={"x": 512, "y": 512}, resampling="nearest" if k == scl else res,
                    patch_url=patch, driver=_retrying_driver(self.policy),
                ))
        if not parts:
            return None
        return xr.merge(parts, join="outer", compat="override", combine_attrs="drop_conflicts")

    def load(self, items: list, keys: Sequence[str], geobox, compute: Callable) -> np.ndarray | None:
        """``compute(ds)`` on the items loaded onto ``geobox`` (dask threads, ``workers``)."""
        import dask
        import rasterio

        ds = self._load_lazy(items, keys, geobox)
        if ds is None:
            return None
        try:
            with dask.config.set(scheduler="threads", num_workers=self.cfg.workers), rasterio.Env(**_gdal_env(self.cfg)):
                out = compute(ds)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"stac {self.modality}: reading a block failed: {redact(e)}") from None
        urls = {self._sign(it.assets[k].href).split("?")[0] for it in items for k in keys if k in it.assets}
        if urls and all(u in self.broken for u in urls):
            reasons = ", ".join(sorted(set(self.broken.values())))
            raise SourceError(
                f"every {self.modality} asset of a block is unreadable ({reasons}): check stac.url, "
                "signing (stac.sign / stac.sas_url) and credentials"
            )
        return out


# --------------------------------------------------------------------------------------------
# Composites (computed lazily with dask, materialised per block)
# --------------------------------------------------------------------------------------------
def _s2_offset(item, harmonize: bool) -> float:
    """DN offset of an L2A item: -1000 for processing baseline >= 04.00 unless already removed."""
    if not harmonize or item.properties.get("earthsearch:boa_offset_applied") is True:
        return 0.0
    pb = item.properties.get("s2:processing_baseline")
    try:
        newer = float(pb) >= 4.0
    except (TypeError, ValueError):
        newer = _item_time(item) >= BASELINE_04_START
    return -1000.0 if newer else 0.0


def _median(arrays: list, n_bands: int, shape: tuple[int, int]) -> np.ndarray:
    """Median over time of ``[time, band, y, x]`` pieces, NaN where no valid observation."""
    arrays = [a for a in arrays if a is not None and a.shape[0]]
    if not arrays:
        return np.full((n_bands, *shape), np.nan, np.float32)
    stack = np.concatenate(arrays, axis=0)
    with np.errstate(all="ignore"), _quiet():  # all-NaN pixels are expected
        return np.nanmedian(stack, axis=0).astype(np.float32)


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _s2_block(reader: _Reader, cfg: StacConfig, items: list, geobox, shape) -> np.ndarray:
    import xarray as xr

    amap = cfg.assets["s2"]
    keys = [amap[b] for b in BANDS["s2"] if b in amap] + [amap.get("SCL", "SCL")]
    scl_key = amap.get("SCL", "SCL")
    pieces = []
    # One load per offset group: items of baselines before and after 04.00 are scaled apart.
    groups: dict[float, list] = {}
    for it in items:
        groups.setdefault(_s2_offset(it, cfg.harmonize), []).append(it)
    for offset, its in groups.items():
        def compute(ds, offset=offset):
            if scl_key in ds:
                valid = ds[scl_key].isin(list(cfg.scl_valid))
            else:
                valid = xr.zeros_like(ds[next(iter(ds.data_vars))], dtype=bool)
            bands = []
            for b in BANDS["s2"]:
                k = amap.get(b)
                if k in ds:
                    v = ds[k]
                    bands.append(((v + offset) / 10000.0).where(valid & (v > 0)))
                else:
                    bands.append(xr.full_like(valid, np.nan, dtype=np.float32))
            arr = xr.concat(bands, dim="band").transpose("time", "band", "y", "x")
            return arr.astype(np.float32).values

        pieces.append(reader.load(its, keys, geobox, compute))
    return _median(pieces, len(BANDS["s2"]), shape)


def _s1_block(reader: _Reader, cfg: StacConfig, items: list, geobox, shape) -> np.ndarray:
    import xarray as xr

    amap = cfg.assets["s1"]
    keys = [amap[b] for b in BANDS["s1"] if b in amap]

    def compute(ds):
        bands = []
        like = ds[next(iter(ds.data_vars))]
        for b in BANDS["s1"]:
            k = amap.get(b)
            if k not in ds:
                bands.append(xr.full_like(like, np.nan, dtype=np.float32))
                continue
            v = ds[k]
            if cfg.s1_units == "linear":
                db = 10.0 * np.log10(v.where(v > 0))
            elif cfg.s1_units == "amplitude":
                db = 20.0 * np.log10(v.where(v > 0)) + cfg.s1_db_offset
            else:
                db = v
            bands.append(db)
        return xr.concat(bands, dim="band").transpose("time", "band", "y", "x").astype(np.float32).values

    return _median([reader.load(items, keys, geobox, compute)], len(BANDS["s1"]), shape)


def slope_degrees(elevation: np.ndarray, res: float) -> np.ndarray:
    """Slope (degrees) from elevation (m) on a grid of ``res`` m, central differences (4 neighbours).

    The input carries a 1-pixel halo on every side; the output is the interior.
    """
    e = elevation.astype(np.float64)
    dzdx = (e[1:-1, 2:] - e[1:-1, :-2]) / (2 * res)
    dzdy = (e[:-2, 1:-1] - e[2:, 1:-1]) / (2 * res)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)


def _dem_block(reader: _Reader, cfg: StacConfig, items: list, geobox, shape) -> np.ndarray:
    key = cfg.assets["dem"].get("elevation", "data")

    def compute(ds):
        with _quiet():
            return ds[key].mean("time", skipna=True).astype(np.float32).values

    elev = reader.load(items, [key], geobox, compute)
    if elev is None:
        return np.full((2, *shape), np.nan, np.float32)
    res = abs(geobox.affine.a)
    return np.stack([elev[1:-1, 1:-1].astype(np.float32), slope_degrees(elev, res)])


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
    _install_redaction()
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


def _fetch_modality(cfg, signer, modality, grid, months, items, path: Path, desc: list[str]) -> None:
    reader = _Reader(cfg, signer, modality)
    if modality == "dem":
        groups = [("static", items)]
    else:
        by_month: dict[str, list] = {mo: [] for mo in months}
        for it in items:
            key = _item_time(it).strftime("%Y-%m")
            if key in by_month:
                by_month[key].append(it)
        groups = list(by_month.items())
    request = {
        "source": "stac", "url": cfg.url, "collection": cfg.collections[modality], "modality": modality,
        "grid": grid.to_dict(), "months": list(months), "block": cfg.block_size,
        "assets": cfg.assets.get(modality), "scl_valid": list(cfg.scl_valid), "harmonize": cfg.harmonize,
        "s1_units": cfg.s1_units, "s1_db_offset": cfg.s1_db_offset, "resampling": cfg.resampling.get(modality),
        "items": {g: [it.id for it in its] for g, its in groups},
    }
    parts = PartStore(path.parent, modality, request)
    tiles = iter_tiles(grid, cfg.block_size)
    n_bands = len(BANDS[modality])
    block_fn = {"s2": _s2_block, "s1": _s1_block, "dem": _dem_block}[modality]
    done = 0
    for g, its in groups:
        for tile in tiles:
            key = f"{g}_{tile.key}"
            if parts.done(key):
                continue
            shape = (tile.height, tile.width)
            if not its:
                arr = np.full((n_bands, *shape), np.nan, np.float32)
            else:
                geobox = _geobox(grid, tile, halo=1 if modality == "dem" else 0)
                arr = block_fn(reader, cfg, its, geobox, shape)
            parts.save(key, arr)
            done += 1
    log.info("stac: %s: %d blocks fetched, %d kept from an earlier run", modality, done, len(groups) * len(tiles) - done)

    def blocks():
        for gi, (g, _) in enumerate(groups):
            for tile in tiles:
                yield gi * n_bands, tile, parts.load(f"{g}_{tile.key}")

    tags = {"source": "stac", "stac_url": cfg.url, "collection": cfg.collections[modality]}
    if reader.broken:
        tags["broken_assets"] = str(len(reader.broken))
    write_stack(path, grid, desc, blocks(), tags)
    parts.remove()
