"""Helpers for the real-data source tests: loopback STAC API and Earth Engine servers.

The STAC catalogue is built at test time from the real openEO GFMap cubes near Mol (Belgium) in
``tests/data/realdata`` (origin and licence in ``tests/data/README.md``): one Cloud-Optimized
GeoTIFF per date and band, written with rasterio and served with HTTP range requests.
"""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform, transform_bounds
from sources_loopback import Faults, Handler, Loopback, Request, json_response, range_response

from tests.conftest import REALDATA

S2_NC = REALDATA / "gfmap_mol_s2_l2a.nc"
S1_NC = REALDATA / "gfmap_mol_s1_grd.nc"
TOGO_TIF = REALDATA / "cropharvest_togo_ee_export.tif"

#: Sentinel-2 bands present in the GFMap cube (the others are absent from its items).
S2_CUBE_BANDS = ("B04", "B08", "B11")
SAS_TOKEN = "st=2023-01-01&se=2099-01-01&sig=loopback-signature"
#: A plane DEM (metres): elevation = DEM_Z0 + DEM_GX * easting + DEM_GY * northing (grid CRS).
DEM_Z0, DEM_GX, DEM_GY = -69600.0, 0.02, 0.01


def _open_nc(path: Path):
    import xarray as xr

    return xr.open_dataset(path, engine="h5netcdf")


def _cog_bytes(array: np.ndarray, crs: str, tf: Affine, nodata: float | None) -> bytes:
    """A tiled GeoTIFF (32 px tiles, header first, so read by range requests) as bytes."""
    mem = rasterio.io.MemoryFile()
    with mem.open(
        driver="GTiff", width=array.shape[1], height=array.shape[0], count=1, dtype=array.dtype.name,
        crs=crs, transform=tf, nodata=nodata, tiled=True, blockxsize=32, blockysize=32, compress="DEFLATE",
    ) as dst:
        dst.write(array, 1)
    return mem.read()


class MolCatalog:
    """A STAC catalogue over the real Mol cubes, in the Planetary Computer layout.

    Collections ``sentinel-2-l2a`` (assets B04 B08 B11 SCL, uint16 DN with the +1000 offset of
    processing baseline 05.09), ``sentinel-1-rtc`` (assets vv vh, linear power float32, derived from
    the cube's compressed dB: dB = 20 log10(DN) - 83) and ``cop-dem-glo-30`` (asset data: a plane in
    EPSG:4326, the only synthetic layer, so that the slope is known exactly).
    """

    def __init__(self) -> None:
        s2 = _open_nc(S2_NC)
        s1 = _open_nc(S1_NC)
        crs_wkt = s2["crs"].attrs["crs_wkt"]
        self.crs = "EPSG:32631"
        assert rasterio.crs.CRS.from_wkt(crs_wkt).to_epsg() == 32631
        x, y = s2.x.values, s2.y.values
        self.res = float(x[1] - x[0])
        self.transform = Affine(self.res, 0, float(x[0]) - self.res / 2, 0, -self.res, float(y[0]) + self.res / 2)
        self.shape = (len(y), len(x))
        self.s2_dates = [datetime.fromtimestamp(t.astype("datetime64[s]").astype(int), UTC) for t in s2.t.values]
        self.s1_dates = [datetime.fromtimestamp(t.astype("datetime64[s]").astype(int), UTC) for t in s1.t.values]
        self.s2 = {b: s2[f"S2-L2A-{b}"].values.astype(np.uint16) for b in (*S2_CUBE_BANDS, "SCL")}
        self.s1_dn = {b: s1[f"S1-SIGMA0-{b}"].values for b in ("VV", "VH")}
        self.files: dict[str, bytes] = {}
        self.items: dict[str, list[dict]] = {"sentinel-2-l2a": [], "sentinel-1-rtc": [], "cop-dem-glo-30": []}
        self.broken: set[str] = set()  # asset paths answered 404
        self.corrupt: set[str] = set()  # asset paths answered with garbage
        self.hidden_dates: set[str] = set()  # item ids left out of searches
        self.require_token = False
        self.base = ""
        self._build()

    # -- items -------------------------------------------------------------------------------
    def _footprint(self, crs: str, tf: Affine, shape: tuple[int, int]) -> tuple[list, list]:
        h, w = shape
        x0, y1 = tf.c, tf.f
        x1, y0 = x0 + w * tf.a, y1 + h * tf.e
        lon0, lat0, lon1, lat1 = transform_bounds(crs, "EPSG:4326", x0, y0, x1, y1, densify_pts=21)
        poly = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]
        return [lon0, lat0, lon1, lat1], poly

    def _item(self, collection: str, item_id: str, dt: datetime, props: dict, assets: dict) -> dict:
        bbox, poly = self._footprint(self.crs, self.transform, self.shape)
        return {
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection,
            "stac_extensions": [
                "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
                "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            ],
            "bbox": props.pop("_bbox", bbox),
            "geometry": {"type": "Polygon", "coordinates": [props.pop("_poly", poly)]},
            "properties": {"datetime": dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), **props},
            "assets": assets, "links": [],
        }

    def _asset(self, path: str, array: np.ndarray, nodata, crs=None, tf=None) -> dict:
        crs = crs or self.crs
        tf = tf or self.transform
        self.files[path] = _cog_bytes(array, crs, tf, nodata)
        return {
            "href": f"{{base}}/{path}", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"], "proj:epsg": int(crs.split(":")[1]), "proj:shape": list(array.shape),
            "proj:transform": list(tf)[:6],
            "raster:bands": [{"data_type": array.dtype.name, "nodata": nodata if nodata is None or math.isfinite(nodata) else "nan"}],
        }

    def _build(self) -> None:
        for i, dt in enumerate(self.s2_dates):
            iid = f"S2B_MSIL2A_{dt:%Y%m%dT%H%M%S}_R008_T31UFS"
            scl = self.s2["SCL"][i]
            cloud = float(np.isin(scl, (3, 8, 9, 10)).mean() * 100)
            # The cube holds harmonised DN; the archive serves DN + 1000 for baseline >= 04.00.
            assets = {b: self._asset(f"cogs/{iid}/{b}.tif", np.where(self.s2[b][i] > 0, self.s2[b][i] + 1000, 0).astype(np.uint16), 0) for b in S2_CUBE_BANDS}
            assets["SCL"] = self._asset(f"cogs/{iid}/SCL.tif", scl.astype(np.uint8), 0)
            self.items["sentinel-2-l2a"].append(self._item(
                "sentinel-2-l2a", iid, dt,
                {"eo:cloud_cover": cloud, "s2:processing_baseline": "05.09", "platform": "Sentinel-2B", "proj:epsg": 32631},
                assets,
            ))
        for i, dt in enumerate(self.s1_dates):
            iid = f"S1A_IW_GRDH_1SDV_{dt:%Y%m%dT%H%M%S}_rtc"
            assets = {}
            for b in ("VV", "VH"):
                dn = self.s1_dn[b][i].astype(np.float64)
                lin = np.where(dn > 0, 10 ** ((20 * np.log10(np.maximum(dn, 1)) - 83) / 10), -32768).astype(np.float32)
                assets[b.lower()] = self._asset(f"cogs/{iid}/{b.lower()}.tif", lin, -32768.0)
            self.items["sentinel-1-rtc"].append(self._item(
                "sentinel-1-rtc", iid, dt,
                {"sat:orbit_state": "ascending" if i % 2 else "descending", "sar:polarizations": ["VV", "VH"], "platform": "SENTINEL-1A"},
                assets,
            ))
        # DEM: a 1 arc-second plane in EPSG:4326 covering the area with a margin.
        lon0, lat0, lon1, lat1 = self._footprint(self.crs, self.transform, self.shape)[0]
        step = 1 / 3600
        west, north = math.floor(lon0 / step) * step - 10 * step, math.ceil(lat1 / step) * step + 10 * step
        w, h = int((lon1 - west) / step) + 20, int((north - lat0) / step) + 20
        tf = Affine(step, 0, west, 0, -step, north)
        cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        lons, lats = tf * (cols, rows)
        ex, ny = transform("EPSG:4326", self.crs, lons.ravel(), lats.ravel())
        elev = (DEM_Z0 + DEM_GX * np.asarray(ex) + DEM_GY * np.asarray(ny)).reshape(h, w).astype(np.float32)
        dem_asset = self._asset("cogs/Copernicus_DSM_COG_10_N51_00_E005_00_DEM/data.tif", elev, -32767.0, "EPSG:4326", tf)
        bbox = [west, north - h * step, west + w * step, north]
        poly = [[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]], [bbox[0], bbox[3]], [bbox[0], bbox[1]]]
        self.items["cop-dem-glo-30"].append(self._item(
            "cop-dem-glo-30", "Copernicus_DSM_COG_10_N51_00_E005_00_DEM", datetime(2021, 4, 22, tzinfo=UTC),
            {"_bbox": bbox, "_poly": poly, "gsd": 30}, {"data": dem_asset},
        ))

    # -- search --------------------------------------------------------------------------------
    def search(self, params: dict) -> list[dict]:
        cols = params.get("collections") or list(self.items)
        if isinstance(cols, str):
            cols = cols.split(",")
        bbox = params.get("bbox")
        if isinstance(bbox, str):
            bbox = [float(v) for v in bbox.split(",")]
        dt = params.get("datetime")
        lo = hi = None
        if dt:
            a, _, b = dt.partition("/")
            lo = None if a in ("", "..") else datetime.fromisoformat(a.replace("Z", "+00:00"))
            hi = None if b in ("", "..") else datetime.fromisoformat(b.replace("Z", "+00:00"))
        out = []
        for c in cols:
            for it in self.items.get(c, []):
                if it["id"] in self.hidden_dates:
                    continue
                if bbox:
                    ib = it["bbox"]
                    if ib[2] < bbox[0] or ib[0] > bbox[2] or ib[3] < bbox[1] or ib[1] > bbox[3]:
                        continue
                t = datetime.fromisoformat(it["properties"]["datetime"].replace("Z", "+00:00"))
                if (lo and t < lo) or (hi and t > hi):
                    continue
                out.append(json.loads(json.dumps(it).replace("{base}", self.base)))
        return out


def serve_catalog(cat: MolCatalog, faults: Faults | None = None, page_size_cap: int = 5) -> Loopback:
    """A STAC API (landing page, /search GET+POST with ``next`` paging, SAS tokens, COGs)."""
    srv = Loopback(faults=faults or Faults())
    cat.base = srv.url

    def landing(h: Handler, r: Request):
        return json_response({
            "type": "Catalog", "id": "loopback", "stac_version": "1.0.0", "description": "loopback STAC API",
            "conformsTo": [
                "https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search",
                "https://api.stacspec.org/v1.0.0/collections",
            ],
            "links": [
                {"rel": "self", "href": srv.url + "/", "type": "application/json"},
                {"rel": "root", "href": srv.url + "/", "type": "application/json"},
                {"rel": "search", "href": srv.url + "/search", "type": "application/geo+json", "method": "GET"},
                {"rel": "search", "href": srv.url + "/search", "type": "application/geo+json", "method": "POST"},
            ],
        })

    def search(h: Handler, r: Request):
        if r.method == "POST":
            params = json.loads(r.body or b"{}")
        else:
            params = {k: v[0] for k, v in r.query.items()}
        items = cat.search(params)
        limit = min(int(params.get("limit") or 10), page_size_cap)
        start = int(params.get("token") or 0)
        page = items[start : start + limit]
        links = []
        if start + limit < len(items):
            if r.method == "POST":
                links.append({"rel": "next", "href": srv.url + "/search", "method": "POST", "type": "application/geo+json", "body": {"token": str(start + limit)}, "merge": True})
            else:
                q = "&".join(f"{k}={v}" for k, v in params.items() if k != "token")
                links.append({"rel": "next", "href": f"{srv.url}/search?{q}&token={start + limit}", "method": "GET", "type": "application/geo+json"})
        return 200, {"Content-Type": "application/geo+json"}, json.dumps({"type": "FeatureCollection", "features": page, "links": links, "numberReturned": len(page)}).encode()

    def token(h: Handler, r: Request):
        return json_response({"msft:expiry": "2099-01-01T00:00:00Z", "token": SAS_TOKEN})

    def cog(h: Handler, r: Request):
        path = r.path.lstrip("/")
        if path in cat.broken or path not in cat.files:
            return 404, {"Content-Type": "text/plain"}, b"BlobNotFound"
        if cat.require_token and r.query.get("sig", [""])[0] != "loopback-signature":
            return 403, {"Content-Type": "text/plain"}, b"AuthenticationFailed: missing SAS token"
        data = cat.files[path]
        if path in cat.corrupt:
            data = b"<html>not a tiff</html>" + bytes(len(data))
        return range_response(h, data)

    srv.route("GET", "/", landing)
    srv.route("GET", "/search", search)
    srv.route("POST", "/search", search)
    srv.route("GET", r"/sas/token/[\w-]+", token)
    srv.route("GET", r"/cogs/.+", cog)
    return srv


def mol_grid(cat: MolCatalog):
    from cropmap.grid import Grid

    tf = cat.transform
    return Grid(crs=cat.crs, res=cat.res, xmin=tf.c, ymax=tf.f, width=cat.shape[1], height=cat.shape[0])


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def pc_options(srv: Loopback, **kw) -> dict:
    """Planetary Computer preset pointed at the loopback API and its SAS token endpoint."""
    return {"preset": "planetary_computer", "url": srv.url, "sas_url": srv.url + "/sas/token", "sign": True,
            "backoff": 0.01, "retries": 3, "workers": 2, **kw}


# ------------------------------------------------------------------------------------------------
# Earth Engine
# ------------------------------------------------------------------------------------------------
EE_FILL = -32768.0
FAKE_TOKEN = "fake-access-token-not-a-secret"


def ee_recorded(name: str) -> Path:
    """A recorded-format payload shipped with earthengine-api (its own test data)."""
    import ee

    p = Path(ee.__file__).parent / "tests" / name
    assert p.exists(), f"earthengine-api {ee.__version__} does not ship tests/{name} (recorded discovery document / algorithm list)"
    return p


def ee_pixel_values(name: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """What the loopback Earth Engine answers for band ``name`` at pixel centres (xs, ys).

    A deterministic function of the band name and the map position, so the test can check every
    block landed in its place; pixels on every 11th diagonal are masked (answered with FILL).
    """
    import zlib

    base = zlib.crc32(name.encode()) % 997
    v = base + ((xs - 600000.0) / 10.0 % 1000.0) * 1e-3 + ((ys - 5600000.0) / 10.0 % 1000.0) * 1e-6
    masked = (np.floor(xs / 10.0) + np.floor(ys / 10.0)) % 11 == 0
    return np.where(masked, EE_FILL, v).astype(np.float32)


def expected_ee_stack(grid, names: list[str]) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols, rows)
    out = np.stack([ee_pixel_values(n, np.asarray(xs), np.asarray(ys)) for n in names])
    out[out == EE_FILL] = np.nan
    return out


def serve_earthengine(faults: Faults | None = None) -> Loopback:
    """Answers what earthengine-api asks: discovery document, algorithm list, computePixels,
    and an OAuth token endpoint for service-account keys. Decoded computePixels bodies are kept
    in ``srv.pixels``."""
    discovery = ee_recorded("cloud_api_discovery_document.json").read_bytes()
    algorithms = ee_recorded("algorithms.json").read_bytes()
    srv = Loopback(faults=faults or Faults())
    srv.pixels = []  # type: ignore[attr-defined]
    srv.tokens = []  # type: ignore[attr-defined]

    def authorised(r: Request) -> bool:
        return r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}"

    def disco(h: Handler, r: Request):
        return 200, {"Content-Type": "application/json"}, discovery

    def algs(h: Handler, r: Request):
        if not authorised(r):
            return json_response({"error": {"code": 401, "message": "unauthenticated", "status": "UNAUTHENTICATED"}}, 401)
        return 200, {"Content-Type": "application/json"}, algorithms

    def pixels(h: Handler, r: Request):
        if not authorised(r):
            return json_response({"error": {"code": 401, "message": "unauthenticated", "status": "UNAUTHENTICATED"}}, 401)
        body = json.loads(r.body)
        srv.pixels.append(body)
        g = body["grid"]
        w, hgt = g["dimensions"]["width"], g["dimensions"]["height"]
        a = g["affineTransform"]
        cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(hgt) + 0.5)
        xs = a["translateX"] + cols * a["scaleX"]
        ys = a["translateY"] + rows * a["scaleY"]
        names = body["bandIds"]
        arr = np.zeros((hgt, w), dtype=[(n, "<f4") for n in names])
        for n in names:
            arr[n] = ee_pixel_values(n, xs, ys)
        return 200, {"Content-Type": "application/octet-stream"}, npy_bytes(arr)

    def token(h: Handler, r: Request):
        srv.tokens.append(r.body.decode())
        return json_response({"access_token": FAKE_TOKEN, "expires_in": 3600, "token_type": "Bearer"})

    srv.route("GET", r"/\$discovery/rest", disco)
    srv.route("GET", r"/v1\w*/projects/[^/]+/algorithms", algs)
    srv.route("POST", r"/v1\w*/projects/[^/]+/image:computePixels", pixels)
    srv.route("POST", r"/token", token)
    return srv


class FakeCredentials:
    """Stands in for google.auth credentials: a fixed, non-secret bearer token."""

    def __new__(cls):
        from google.auth import credentials

        class _Fake(credentials.Credentials):
            def __init__(self) -> None:
                super().__init__()
                self.token = FAKE_TOKEN

            def refresh(self, request) -> None:
                self.token = FAKE_TOKEN

        return _Fake()





def ee_options(srv: Loopback, **kw) -> dict:
    return {"project": "cropmap-test", "api_url": srv.url, "credentials": FakeCredentials(), "backoff": 0.01, "workers": 2, **kw}


def expression_strings(body: dict) -> tuple[set[str], list]:
    """Function names and constants in a serialised Earth Engine expression."""
    funcs: set[str] = set()
    consts: list = []

    def walk(node):
        if isinstance(node, dict):
            if "functionName" in node:
                funcs.add(node["functionName"])
            if "constantValue" in node:
                consts.append(node["constantValue"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(body["expression"])
    return funcs, consts
