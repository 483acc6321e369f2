"""Earth Engine source: Sentinel-2, Sentinel-1, ERA5-Land monthly weather and Copernicus DEM.

``fetch_earthengine`` builds monthly composites server-side with the real ``earthengine-api``
client and downloads them with ``ee.data.computePixels`` (NPY) straight onto the region grid
(its CRS and affine transform), one block per (month, grid block):

- ``s2``: ``COPERNICUS/S2_SR_HARMONIZED`` masked with Cloud Score+
  (``GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED``, band ``cs`` >= ``cloud_score_threshold``),
  reflectance DN / 10000 (the harmonized collection has the 04.00 offset removed), median.
- ``s1``: ``COPERNICUS/S1_GRD`` IW scenes with VV and VH (already dB), optional orbit pass, median.
- ``weather``: ``ECMWF/ERA5_LAND/MONTHLY_AGGR`` ``temperature_2m`` (K) and
  ``total_precipitation_sum`` (m per month, stored as ``total_precipitation``).
- ``dem``: ``COPERNICUS/DEM/GLO30`` mosaic (``DEM``, m) and ``ee.Terrain.slope`` (degrees).

Masked pixels are filled server-side with :data:`FILL` and become NaN here, so a month without
any valid observation is NaN, never 0. Blocks respect computePixels' limits (<= 48 MB and
<= 32768 px a side); requests run in a bounded thread pool, every HTTP call (discovery,
algorithms, computePixels) is retried with exponential backoff on 429/5xx and dropped
connections, and finished blocks are kept under ``raw_dir/.parts/`` so a rerun resumes.

Authentication: a service-account JSON key (``service_account_key``, only its path is ever
logged) or the user's persistent credentials (``earthengine authenticate`` / gcloud ADC), with
the Cloud project in ``project``.

The same band table decodes Earth Engine exports in the CropHarvest layout
(:func:`decode_cropharvest_export`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cropmap.errors import ConfigError, SourceError
from cropmap.grid import Grid
from cropmap.modalities import BANDS, TEMPORAL, band_descriptions
from cropmap.sources._blocks import Block, fetch_stack, stack_is_complete
from cropmap.sources._http import RETRY_STATUS, Backoff, retry_after_seconds

log = logging.getLogger(__name__)

#: Earth Engine collections per role (overridable with ``options["collections"]``).
EE_COLLECTIONS: dict[str, str] = {
    "s2": "COPERNICUS/S2_SR_HARMONIZED",
    "cloud_score": "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED",
    "s1": "COPERNICUS/S1_GRD",
    "weather": "ECMWF/ERA5_LAND/MONTHLY_AGGR",
    "dem": "COPERNICUS/DEM/GLO30",
}

#: cropmap band -> Earth Engine band of the source collection, per modality.
EE_BANDS: dict[str, dict[str, str]] = {
    "s2": {"B02": "B2", "B03": "B3", "B04": "B4", "B05": "B5", "B06": "B6", "B07": "B7",
           "B08": "B8", "B8A": "B8A", "B11": "B11", "B12": "B12"},
    "s1": {"VV": "VV", "VH": "VH"},
    "weather": {"temperature_2m": "temperature_2m", "total_precipitation": "total_precipitation_sum"},
    "dem": {"elevation": "DEM", "slope": "slope"},
}

#: cropmap band -> band name in CropHarvest exports (S2 L1C bands B1, B9, B10 are dropped).
CROPHARVEST_BANDS: dict[str, dict[str, str]] = {
    **EE_BANDS,
    "weather": {"temperature_2m": "temperature_2m", "total_precipitation": "total_precipitation"},
    "dem": {"elevation": "elevation", "slope": "slope"},
}

#: Value that masked pixels get server-side (no real band of any modality reaches it).
FILL = -32768.0
#: computePixels limits: bytes per response and pixels per side.
MAX_REQUEST_BYTES = 48 * 1024 * 1024
MAX_SIDE = 32768


# --------------------------------------------------------------------------------------------
# Band naming (shared by the fetch and the CropHarvest decoder)
# --------------------------------------------------------------------------------------------
def ee_source_bands(modality: str, table: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Source band names of ``modality`` in cropmap band order."""
    table = table or EE_BANDS
    return [table[modality][b] for b in BANDS[modality]]


def parse_export_band(name: str) -> tuple[str, int]:
    """``"B8A_3"`` -> ``("B8A", 3)``; ``"VV"`` -> ``("VV", 0)`` (Earth Engine ``toBands`` naming)."""
    m = re.fullmatch(r"(.+?)(?:_(\d+))?", name)
    assert m is not None
    return m.group(1), int(m.group(2) or 0)


def decode_cropharvest_export(path: str | Path) -> dict[str, np.ndarray]:
    """Decode an Earth Engine export in the CropHarvest layout into cropmap modalities.

    The export has, per monthly step ``t`` (names suffixed ``_t`` from the second step on),
    ``VV VH B1 .. B12 (incl. B8A) temperature_2m total_precipitation``, then ``elevation slope``.
    S2 bands are scaled DN / 10000 (CropHarvest exports Sentinel-2 L1C DN without offset); S1
    (dB), temperature (K), elevation (m) and slope (degrees) are kept as they are, and so is
    precipitation: CropHarvest exports the ERA5 monthly mean in m per day (not the monthly sum
    the fetch writes), so convert it if you mix both.

    Args:
        path: the GeoTIFF.

    Returns:
        ``{modality: float32 array [bands, H, W]}`` with bands ordered exactly as
        ``band_descriptions(modality, months)`` for the export's ``T`` months (time-major;
        ``dem`` has 2 bands); missing values are NaN.

    Raises:
        SourceError: when a band cropmap needs is missing or the steps are incomplete.
    """
    import rasterio

    with rasterio.open(path) as src:
        names = list(src.descriptions)
        data = src.read().astype(np.float32)
        nodata = src.nodata
    if nodata is not None and not math.isnan(nodata):
        data[data == nodata] = np.nan
    index: dict[tuple[str, int], int] = {}
    for i, n in enumerate(names):
        if n:
            index[parse_export_band(n)] = i
    steps = 1 + max((t for (_, t) in index), default=0)
    out: dict[str, np.ndarray] = {}
    for modality in BANDS:
        src_bands = ee_source_bands(modality, CROPHARVEST_BANDS)
        t_range = range(steps) if TEMPORAL[modality] else range(1)
        missing = [f"{b}_{t}" for t in t_range for b in src_bands if (b, t) not in index]
        if missing:
            raise SourceError(f"{path}: bands {missing[:5]} missing for {modality}: is it a CropHarvest export?")
        arr = np.stack([data[index[(b, t)]] for t in t_range for b in src_bands])
        if modality == "s2":
            arr = arr / 10000.0
        out[modality] = arr.astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Options, auth, HTTP transport
# --------------------------------------------------------------------------------------------
@dataclass
class EEConfig:
    """Resolved ``earthengine`` options of a region."""

    project: str | None = None
    service_account_key: str | None = None
    api_url: str | None = None
    credentials: Any = None
    collections: dict[str, str] = field(default_factory=lambda: dict(EE_COLLECTIONS))
    cloud_score_threshold: float = 0.6
    cloud_score_band: str = "cs"
    max_cloud: float = 90.0
    orbit: str | None = None
    workers: int = 4
    block_size: int = 512
    max_request_bytes: int = 32 * 1024 * 1024
    backoff: Backoff = field(default_factory=Backoff)
    timeout: float = 300.0

    @classmethod
    def from_options(cls, options: dict) -> EEConfig:
        o = dict(options or {})
        thr = float(o.get("cloud_score_threshold", 0.6))
        if not 0.0 <= thr <= 1.0:
            raise ConfigError(f"earthengine.cloud_score_threshold = {thr}: use a value in [0, 1] (0.6 is usual)")
        band = str(o.get("cloud_score_band", "cs"))
        if band not in ("cs", "cs_cdf"):
            raise ConfigError(f"earthengine.cloud_score_band = {band!r}: use cs or cs_cdf")
        orbit = o.get("orbit")
        if orbit is not None and str(orbit).upper() not in ("ASCENDING", "DESCENDING"):
            raise ConfigError(f"earthengine.orbit = {orbit!r}: use ASCENDING, DESCENDING or leave it out for both")
        mrb = int(o.get("max_request_bytes", 32 * 1024 * 1024))
        if not 0 < mrb <= MAX_REQUEST_BYTES:
            raise ConfigError(f"earthengine.max_request_bytes = {mrb}: computePixels allows at most {MAX_REQUEST_BYTES}")
        colls = {**EE_COLLECTIONS, **(o.get("collections") or {})}
        return cls(
            project=o.get("project"),
            service_account_key=o.get("service_account_key"),
            api_url=(o.get("api_url") or None),
            credentials=o.get("credentials"),
            collections=colls,
            cloud_score_threshold=thr,
            cloud_score_band=band,
            max_cloud=float(o.get("max_cloud", 90.0)),
            orbit=str(orbit).upper() if orbit else None,
            workers=max(1, int(o.get("workers", 4))),
            block_size=max(16, min(MAX_SIDE, int(o.get("block_size", 512)))),
            max_request_bytes=mrb,
            backoff=Backoff.from_options(o),
            timeout=float(o.get("timeout", 300.0)),
        )


class RetryingHttp:
    """An ``httplib2.Http``-like transport over ``requests`` that retries with backoff.

    Passed to ``ee.Initialize(http_transport=...)``, so every Earth Engine call (discovery
    document, algorithm list, computePixels) is retried on HTTP 429/5xx and on dropped or timed-out
    connections. Only the method and the URL path are logged, never headers or bodies.
    """

    def __init__(self, backoff: Backoff, timeout: float | None = None) -> None:
        import requests

        self.backoff = backoff
        self.timeout = timeout
        self.session = requests.Session()
        self.requests = 0
        self._lock = threading.Lock()

    def request(self, uri: str, method: str = "GET", body: Any = None, headers: dict | None = None,
                redirections: int | None = None, connection_type: Any = None):
        import httplib2
        import requests

        del redirections, connection_type
        short = uri.split("?")[0]
        for attempt in range(self.backoff.retries + 1):
            with self._lock:
                self.requests += 1
            last = attempt >= self.backoff.retries
            try:
                r = self.session.request(method, uri, data=body, headers=headers, timeout=self.timeout)
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.exceptions.Timeout) as e:
                if last:
                    raise ConnectionError(f"{method} {short}: {e}") from e
                wait_s = self.backoff.delay(attempt)
                log.warning("earthengine %s %s: %s; retry %d/%d in %.1f s", method, short, type(e).__name__, attempt + 1, self.backoff.retries, wait_s)
                time.sleep(wait_s)
                continue
            if r.status_code in RETRY_STATUS and not last:
                wait_s = self.backoff.delay(attempt, retry_after_seconds(r.headers.get("Retry-After")))
                log.warning("earthengine %s %s: HTTP %d; retry %d/%d in %.1f s", method, short, r.status_code, attempt + 1, self.backoff.retries, wait_s)
                time.sleep(wait_s)
                continue
            resp_headers: dict[str, Any] = dict(r.headers)
            resp_headers["status"] = r.status_code
            return httplib2.Response(resp_headers), r.content
        raise AssertionError("unreachable")  # pragma: no cover


_init_lock = threading.Lock()


def _credentials(cfg: EEConfig):
    import ee

    if cfg.credentials is not None:
        return cfg.credentials
    if cfg.service_account_key:
        key = Path(cfg.service_account_key).expanduser()
        if not key.is_file():
            raise ConfigError(f"earthengine.service_account_key {key} does not exist: give the path of the service account's JSON key")
        log.info("earthengine: service account key %s", key)
        try:
            return ee.ServiceAccountCredentials(None, key_file=str(key))
        except Exception as e:  # never echo the key file's content
            raise ConfigError(f"earthengine.service_account_key {key} is not a valid service account key ({type(e).__name__})") from None
    log.info("earthengine: persistent user credentials (earthengine authenticate / gcloud ADC)")
    return "persistent"


def initialize(cfg: EEConfig) -> RetryingHttp:
    """``ee.Initialize`` with the region's credentials, project and API URL.

    Raises:
        SourceError: when authentication or the first API calls fail.
    """
    import ee

    transport = RetryingHttp(cfg.backoff, cfg.timeout)
    creds = _credentials(cfg)
    with _init_lock:
        try:
            ee.data.setMaxRetries(0)  # RetryingHttp retries; avoid googleapiclient's second layer
            ee.Initialize(creds, url=cfg.api_url, project=cfg.project, http_transport=transport)
        except ee.EEException as e:
            raise SourceError(
                f"Earth Engine initialisation failed ({e}): run `earthengine authenticate` or set "
                "earthengine.service_account_key, and set earthengine.project to a Cloud project registered for Earth Engine"
            ) from e
        except (ConnectionError, OSError) as e:
            raise SourceError(f"Earth Engine is unreachable at {cfg.api_url or 'the default endpoint'}: {e}") from e
    return transport


# --------------------------------------------------------------------------------------------
# Server-side composites
# --------------------------------------------------------------------------------------------
def _month_bounds(month: str) -> tuple[str, str]:
    y, m = (int(v) for v in month.split("-"))
    return f"{y:04d}-{m:02d}-01", f"{y + (m == 12):04d}-{m % 12 + 1:02d}-01"


def region_geometry(grid: Grid):
    import ee

    return ee.Geometry.Rectangle(list(grid.bounds), grid.crs, False)


def _composite(col, src: list[str], names: list[str]):
    """Median of ``col`` (bands ``src``) renamed to ``names``; masked (and empty months) -> FILL."""
    import ee

    empty = ee.Image.constant([0] * len(src)).rename(src).toFloat().updateMask(ee.Image.constant(0))
    return ee.ImageCollection([empty]).merge(col.select(src)).median().rename(names).toFloat().unmask(FILL, False)


def month_image(cfg: EEConfig, modality: str, region, month: str):
    """The server-side composite of ``modality`` for ``month``, bands named like the stack."""
    import ee

    start, end = _month_bounds(month)
    src = ee_source_bands(modality)
    names = band_descriptions(modality, [month])
    c = cfg.collections
    if modality == "s2":
        score = cfg.cloud_score_band
        thr = cfg.cloud_score_threshold

        def mask(img):
            return img.updateMask(img.select(score).gte(thr)).select(src).divide(10000)

        col = (
            ee.ImageCollection(c["s2"]).filterBounds(region).filterDate(start, end)
            .filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", cfg.max_cloud))
            .linkCollection(ee.ImageCollection(c["cloud_score"]), [score])
            .map(mask)
        )
        return _composite(col, src, names)
    if modality == "s1":
        col = (
            ee.ImageCollection(c["s1"]).filterBounds(region).filterDate(start, end)
            .filter(ee.Filter.eq("instrumentMode", "IW"))
            .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
            .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH"))
        )
        if cfg.orbit:
            col = col.filter(ee.Filter.eq("orbitProperties_pass", cfg.orbit))
        return _composite(col, src, names)
    if modality == "weather":
        col = ee.ImageCollection(c["weather"]).filterBounds(region).filterDate(start, end)
        return _composite(col, src, names)
    raise ValueError(modality)


def dem_image(cfg: EEConfig, region):
    """Copernicus GLO-30 elevation (m) and ``ee.Terrain.slope`` (degrees), bilinear."""
    import ee

    col = ee.ImageCollection(cfg.collections["dem"]).filterBounds(region).select("DEM")
    dem = col.mosaic().setDefaultProjection(col.first().select(0).projection())
    img = ee.Image.cat([dem.rename("elevation"), ee.Terrain.slope(dem).rename("slope")])
    return img.resample("bilinear").toFloat().unmask(FILL, False)


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------
def block_side(n_bands: int, cfg: EEConfig) -> int:
    """Largest block side (multiple of 16) whose float32 response fits ``max_request_bytes``."""
    side = int(math.sqrt(cfg.max_request_bytes / (4.0 * max(1, n_bands))))
    side = min(side, cfg.block_size, MAX_SIDE)
    return max(16, side // 16 * 16)


def pixel_grid(grid: Grid, block: Block) -> dict:
    """computePixels ``grid`` (PixelGrid) of a block: the region grid's CRS and affine."""
    x0, _, _, y1 = block.bounds(grid)
    crs_key = "crsCode" if re.fullmatch(r"[A-Za-z]+:\d+", grid.crs) else "crsWkt"
    return {
        "dimensions": {"width": block.width, "height": block.height},
        "affineTransform": {"scaleX": grid.res, "shearX": 0.0, "translateX": x0, "shearY": 0.0, "scaleY": -grid.res, "translateY": y1},
        crs_key: grid.crs,
    }


def _compute_block(image, names: list[str], grid: Grid, block: Block) -> np.ndarray:
    import ee

    try:
        arr = ee.data.computePixels({
            "expression": image,
            "fileFormat": "NUMPY_NDARRAY",
            "bandIds": names,
            "grid": pixel_grid(grid, block),
        })
    except ee.EEException as e:
        raise SourceError(f"computePixels failed for bands {names[0]}..{names[-1]} at block {block.key}: {e}") from e
    except ConnectionError as e:
        raise SourceError(f"computePixels unreachable for block {block.key}: {e}") from e
    if arr.shape != (block.height, block.width):
        raise SourceError(f"computePixels returned {arr.shape} for a {block.height}x{block.width} block")
    out = np.stack([np.asarray(arr[n], dtype=np.float32) for n in names])
    out[out == np.float32(FILL)] = np.nan
    return out


def fetch_earthengine(
    grid: Grid, months: list[str], raw_dir: Path, *, modalities: Sequence[str], options: dict
) -> dict[str, Path]:
    """Fetch stacks from Earth Engine onto the region grid.

    Args:
        grid: the region grid.
        months: season months ``YYYY-MM``.
        raw_dir: where ``{modality}.tif`` and the resumable ``.parts/`` go.
        modalities: any of ``s2 s1 weather dem``.
        options: the region's ``earthengine`` options (see ``docs/real_data.md``); a
            ``credentials`` object may be passed programmatically instead of a key file.

    Returns:
        ``{modality: path}`` of the stacks written (or already complete).

    Raises:
        ConfigError: invalid options.
        SourceError: authentication or computation failed after the retries (finished blocks
            are kept and skipped on the next run).
    """
    cfg = EEConfig.from_options(options)
    raw_dir = Path(raw_dir)
    unknown = [m for m in modalities if m not in BANDS]
    if unknown:
        raise ConfigError(f"modalities {unknown} are unknown: use some of {list(BANDS)}")
    todo = []
    out: dict[str, Path] = {}
    for m in modalities:
        path = raw_dir / f"{m}.tif"
        if stack_is_complete(path, grid, band_descriptions(m, months)):
            out[m] = path
        else:
            todo.append(m)
    if not todo:
        return out
    initialize(cfg)
    region = region_geometry(grid)
    for m in todo:
        out[m] = _fetch_modality(cfg, m, grid, months, region, raw_dir / f"{m}.tif")
    return out


def _fetch_modality(cfg: EEConfig, modality: str, grid: Grid, months: list[str], region, path: Path) -> Path:
    desc = band_descriptions(modality, months)
    steps = list(months) if TEMPORAL[modality] else ["static"]
    side = block_side(len(desc) // len(steps), cfg)
    request = {
        "source": "earthengine", "api_url": cfg.api_url, "project": cfg.project, "modality": modality,
        "grid": grid.to_dict(), "months": list(months), "side": side,
        "collections": {k: v for k, v in cfg.collections.items()},
        "cloud_score": [cfg.cloud_score_band, cfg.cloud_score_threshold], "max_cloud": cfg.max_cloud, "orbit": cfg.orbit,
    }
    images = {s: (month_image(cfg, modality, region, s) if s != "static" else dem_image(cfg, region)) for s in steps}

    def fetch(step: str, block: Block) -> np.ndarray:
        names = band_descriptions(modality, [step]) if step != "static" else desc
        return _compute_block(images[step], names, grid, block)

    tags = {"source": "earthengine", "collections": json.dumps({k: v for k, v in cfg.collections.items() if k == modality or (modality == "s2" and k == "cloud_score")})}
    fetch_stack(path, grid, desc, steps, side, request, fetch, source="earthengine", workers=cfg.workers, tags=tags)
    return path
