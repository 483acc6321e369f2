"""Reading STAC assets onto a block of the region grid, and the monthly composites.

The half of the STAC source (:mod:`cropmap.sources.stac`) that touches pixels: odc-stac loads
the Cloud-Optimized GeoTIFF assets of a block lazily (dask, GDAL ``/vsicurl/`` range requests)
through a rasterio driver that retries one asset at a time and reads a permanently broken asset
as NaN (:class:`AssetPolicy`); :func:`s2_block`, :func:`s1_block` and :func:`dem_block` turn the
loaded items into one block of the stack (monthly median of the valid observations; elevation
and slope). Signed URLs never reach the logs (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from cropmap.errors import SourceError
from cropmap.grid import Grid
from cropmap.modalities import BANDS, n_channels
from cropmap.sources._blocks import Block
from cropmap.sources._http import requests_session

if TYPE_CHECKING:
    from cropmap.sources.stac import SasSigner, StacConfig

log = logging.getLogger(__name__)

#: Date processing baseline 04.00 went live (used when an item lacks ``s2:processing_baseline``).
BASELINE_04_START = datetime(2022, 1, 25, tzinfo=UTC)


def item_time(item) -> datetime:
    """Acquisition time of a STAC item (``datetime``, else ``start_datetime``), timezone-aware."""
    t = item.datetime or datetime.fromisoformat(str(item.properties.get("start_datetime")).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def block_geobox(grid: Grid, block: Block, halo: int = 0):
    from affine import Affine
    from odc.geo.geobox import GeoBox

    x0, _, _, y1 = block.bounds(grid, halo)
    return GeoBox((block.height + 2 * halo, block.width + 2 * halo), Affine(grid.res, 0, x0, 0, -grid.res, y1), grid.crs)


def gdal_env(cfg: StacConfig) -> dict:
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


def install_redaction() -> None:
    """Keep signed URLs out of odc-stac's and GDAL's log records."""
    for name in ("odc.loader._rio", "rasterio._env", "urllib3.connectionpool", __name__):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _RedactFilter) for f in lg.filters):
            lg.addFilter(_RedactFilter())


class AssetPolicy:
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


def _retrying_driver(policy: AssetPolicy):
    """An odc-loader rasterio driver whose reads are retried one asset at a time.

    GDAL retries 429/5xx itself but not every dropped connection; here each asset read is
    retried with backoff (``CPL_VSIL_CURL_NON_CACHED`` makes GDAL forget the failed open), and a
    permanently broken asset reads as nodata instead of failing the block.
    """
    from odc.loader._rio import RioDriver, rio_read
    from odc.stac._mdtools import StacAuxReader, StacMDParser

    backoff = policy.cfg.backoff

    class AssetReader:
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
            return AssetReader(src, ctx)

    return _Driver(md_parser=StacMDParser({}), aux_reader=StacAuxReader())


class AssetReader:
    """Loads items onto a block with odc-stac (dask), one variable per asset key."""

    def __init__(self, cfg: StacConfig, signer: SasSigner | None, modality: str) -> None:
        self.cfg = cfg
        self.signer = signer
        self.modality = modality
        self.collection = cfg.collections[modality]
        self.policy = AssetPolicy(cfg, modality)

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
        with rasterio.Env(**gdal_env(self.cfg)):
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
            with dask.config.set(scheduler="threads", num_workers=self.cfg.workers), rasterio.Env(**gdal_env(self.cfg)):
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
        newer = item_time(item) >= BASELINE_04_START
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


def s2_block(reader: AssetReader, cfg: StacConfig, items: list, geobox, shape) -> np.ndarray:
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
    return _median(pieces, n_channels("s2"), shape)


def s1_block(reader: AssetReader, cfg: StacConfig, items: list, geobox, shape) -> np.ndarray:
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

    return _median([reader.load(items, keys, geobox, compute)], n_channels("s1"), shape)


def slope_degrees(elevation: np.ndarray, res: float) -> np.ndarray:
    """Slope (degrees) from elevation (m) on a grid of ``res`` m, central differences (4 neighbours).

    The input carries a 1-pixel halo on every side; the output is the interior.
    """
    e = elevation.astype(np.float64)
    dzdx = (e[1:-1, 2:] - e[1:-1, :-2]) / (2 * res)
    dzdy = (e[:-2, 1:-1] - e[2:, 1:-1]) / (2 * res)
    return np.degrees(np.arctan(np.hypot(dzdx, dzdy))).astype(np.float32)


def dem_block(reader: AssetReader, cfg: StacConfig, items: list, geobox, shape) -> np.ndarray:
    key = cfg.assets["dem"].get("elevation", "data")

    def compute(ds):
        with _quiet():
            return ds[key].mean("time", skipna=True).astype(np.float32).values

    elev = reader.load(items, [key], geobox, compute)
    if elev is None:
        return np.full((2, *shape), np.nan, np.float32)
    res = abs(geobox.affine.a)
    return np.stack([elev[1:-1, 1:-1].astype(np.float32), slope_degrees(elev, res)])
