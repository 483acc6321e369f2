"""fetch_earthengine with the real earthengine-api client against a loopback Earth Engine."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import rasterio
from sources_fixtures import (
    EE_FILL,
    FAKE_TOKEN,
    TOGO_TIF,
    Faults,
    ee_options,
    expected_ee_stack,
    expression_strings,
    serve_earthengine,
)

from cropmap.errors import ConfigError, SourceError
from cropmap.grid import Grid
from cropmap.modalities import band_descriptions, n_channels
from cropmap.sources.earthengine import (
    CROPHARVEST_BANDS,
    FILL,
    EEConfig,
    block_side,
    decode_cropharvest_export,
    fetch_earthengine,
)

MONTHS = ["2023-04", "2023-05"]
# The 64 x 66 px Mol grid (UTM 31N); 32 px blocks -> 3 x 2 blocks.
GRID = Grid(crs="EPSG:32631", res=10.0, xmin=643260.0, ymax=5676480.0, width=64, height=66)
ALL = ["s2", "s1", "weather", "dem"]


def read(path):
    with rasterio.open(path) as src:
        return src.read(), list(src.descriptions), src.profile, src.tags()


def group_of(body: dict) -> str:
    return body["bandIds"][0].split("_", 1)[-1] if "_" in body["bandIds"][0] else "static"


def test_fetch_sends_expected_expressions_and_writes_stacks(ee_server, tmp_path):
    assert FILL == EE_FILL
    opts = ee_options(ee_server, block_size=32, orbit="DESCENDING", cloud_score_threshold=0.65)
    out = fetch_earthengine(GRID, MONTHS, tmp_path, modalities=ALL, options=opts)
    assert set(out) == set(ALL)
    for m, p in out.items():
        GRID.check(p)
        arr, desc, prof, tags = read(p)
        assert desc == band_descriptions(m, MONTHS)
        assert prof["dtype"] == "float32" and math.isnan(prof["nodata"])
        assert tags["source"] == "earthengine"
        exp = expected_ee_stack(GRID, desc)
        assert np.isnan(exp).any() and not (arr == 0).any()
        assert np.array_equal(arr, exp, equal_nan=True), m  # every block in its place, FILL -> NaN
    assert not (tmp_path / ".parts").exists()

    reqs = ee_server.pixels
    assert len(reqs) == 6 * (2 + 2 + 2 + 1)  # blocks x (months per temporal modality + DEM)
    origins = {(x, y) for x in (643260.0, 643580.0) for y in (5676480.0, 5676160.0, 5675840.0)}
    for body in reqs:
        assert body["fileFormat"] == "NPY"
        g = body["grid"]
        assert g["crsCode"] == "EPSG:32631"
        a = g["affineTransform"]
        assert (a["scaleX"], a["scaleY"], a["shearX"], a["shearY"]) == (10.0, -10.0, 0.0, 0.0)
        assert (a["translateX"], a["translateY"]) in origins
        assert g["dimensions"]["width"] <= 32 and g["dimensions"]["height"] <= 32
    by_band = {}
    for body in reqs:
        by_band.setdefault(body["bandIds"][0], []).append(body)
    assert set(by_band) == {"B02_2023-04", "B02_2023-05", "VV_2023-04", "VV_2023-05",
                            "temperature_2m_2023-04", "temperature_2m_2023-05", "elevation"}

    funcs, consts = expression_strings(by_band["B02_2023-05"][0])
    assert {"ImageCollection.load", "Image.linkCollection", "reduce.median", "Image.unmask",
            "Filter.dateRangeContains", "Image.updateMask", "Image.gte"} <= funcs
    assert {"COPERNICUS/S2_SR_HARMONIZED", "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED", "2023-05-01", "2023-06-01",
            "CLOUDY_PIXEL_PERCENTAGE"} <= {c for c in consts if isinstance(c, str)}
    assert 0.65 in consts and 10000 in consts and FILL in consts and ["cs"] in consts
    assert ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"] in consts
    assert band_descriptions("s2", ["2023-05"]) in consts
    assert by_band["B02_2023-05"][0]["bandIds"] == band_descriptions("s2", ["2023-05"])

    funcs, consts = expression_strings(by_band["VV_2023-04"][0])
    assert {"COPERNICUS/S1_GRD", "IW", "VV", "VH", "DESCENDING", "instrumentMode",
            "transmitterReceiverPolarisation", "orbitProperties_pass", "2023-04-01", "2023-05-01"} <= {c for c in consts if isinstance(c, str)}

    funcs, consts = expression_strings(by_band["temperature_2m_2023-04"][0])
    assert "ECMWF/ERA5_LAND/MONTHLY_AGGR" in consts and ["temperature_2m", "total_precipitation_sum"] in consts
    assert ["temperature_2m_2023-04", "total_precipitation_2023-04"] in consts

    funcs, consts = expression_strings(by_band["elevation"][0])
    assert {"Terrain.slope", "ImageCollection.mosaic", "Image.setDefaultProjection", "Image.resample"} <= funcs
    assert {"COPERNICUS/DEM/GLO30", "bilinear"} <= {c for c in consts if isinstance(c, str)} and ["DEM"] in consts
    assert "2023-04-01" not in consts  # static: no date filter

    for r in ee_server.log:
        if "/projects/" in r.path:
            assert "/projects/cropmap-test/" in r.path
            assert r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}"


def test_service_account_key_is_used_and_never_logged(ee_server, tmp_path, caplog):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = {
        "type": "service_account", "project_id": "cropmap-test", "private_key_id": "0123456789abcdef-key-id",
        "private_key": pem, "client_email": "fetcher@cropmap-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": ee_server.url + "/token",
    }
    key_path = tmp_path / "sa-key.json"
    key_path.write_text(json.dumps(key))
    opts = ee_options(ee_server, service_account_key=str(key_path))
    del opts["credentials"]
    caplog.set_level(logging.DEBUG)
    out = fetch_earthengine(GRID, MONTHS, tmp_path / "raw", modalities=["weather"], options=opts)
    assert set(out) == {"weather"}
    assert ee_server.tokens and "jwt-bearer" in ee_server.tokens[0]  # signed JWT grant against token_uri
    assert str(key_path) in caplog.text
    secret_bits = [pem.splitlines()[1], "0123456789abcdef-key-id"]
    written = out["weather"].read_bytes() + b"".join(p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file())
    for s in secret_bits:
        assert s not in caplog.text and s.encode() not in written


def test_dropped_and_rate_limited_requests_give_an_identical_stack(ee_server, tmp_path):
    ref = fetch_earthengine(GRID, MONTHS, tmp_path / "ref", modalities=ALL, options=ee_options(ee_server, block_size=32))
    flaky = serve_earthengine(Faults(drop_every=3, status_every=5))
    import ee

    ee.Reset()  # initialise from scratch through the faulty server too
    try:
        got = fetch_earthengine(GRID, MONTHS, tmp_path / "flaky", modalities=ALL, options=ee_options(flaky, block_size=32, retries=10, backoff=0.002))
        assert [r for r in flaky.log if r.answered is None and "computePixels" in r.path]
        assert [r for r in flaky.log if r.answered == 429 and "computePixels" in r.path]
        assert [r for r in flaky.log if r.answered in (None, 429) and ("discovery" in r.path or "algorithms" in r.path)]
    finally:
        flaky.close()
    for m in ALL:
        assert np.array_equal(read(ref[m])[0], read(got[m])[0], equal_nan=True), m


def test_killed_fetch_resumes_without_downloading_finished_blocks(ee_server, tmp_path):
    opts = ee_options(ee_server, block_size=32, retries=1)
    total = 6 * 2  # s2: 2 months x 6 blocks
    ee_server.faults.fail_after, ee_server.faults.fail_match = 5, "computePixels"  # then 503 for good
    with pytest.raises(SourceError, match="rerun to resume"):
        fetch_earthengine(GRID, MONTHS, tmp_path, modalities=["s2"], options=opts)
    parts = list((tmp_path / ".parts" / "s2").glob("*.npy"))
    assert len(parts) == 5 and not (tmp_path / "s2.tif").exists()
    assert not list(tmp_path.rglob("*.tmp"))

    ee_server.faults.fail_after = None
    n0 = len(ee_server.pixels)
    out = fetch_earthengine(GRID, MONTHS, tmp_path, modalities=["s2"], options=opts)
    assert len(ee_server.pixels) - n0 == total - 5  # only the missing blocks
    arr, desc, _, _ = read(out["s2"])
    assert np.array_equal(arr, expected_ee_stack(GRID, desc), equal_nan=True)
    n1 = len(ee_server.log)
    assert fetch_earthengine(GRID, MONTHS, tmp_path, modalities=["s2"], options=opts) == out
    assert len(ee_server.log) == n1  # complete stack: not even an ee.Initialize


def test_bad_credentials_and_options_fail_clearly(ee_server, tmp_path):
    class Wrong(type(ee_options(ee_server)["credentials"])):
        def refresh(self, request):
            self.token = "expired"

    bad = ee_options(ee_server, credentials=Wrong())
    bad["credentials"].token = "expired"
    with pytest.raises(SourceError, match="earthengine authenticate"):
        fetch_earthengine(GRID, MONTHS, tmp_path, modalities=["weather"], options=bad)
    with pytest.raises(ConfigError, match="service_account_key"):
        fetch_earthengine(GRID, MONTHS, tmp_path, modalities=["weather"],
                          options={"project": "p", "service_account_key": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="cloud_score_threshold"):
        EEConfig.from_options({"cloud_score_threshold": 1.5})
    with pytest.raises(ConfigError, match="orbit"):
        EEConfig.from_options({"orbit": "north"})


def test_block_side_respects_request_limits():
    cfg = EEConfig.from_options({})
    for bands in (2, 10, 120, 1000):
        side = block_side(bands, cfg)
        assert side % 16 == 0 and 16 <= side <= 512
        assert side * side * bands * 4 <= 48 * 1024 * 1024
    assert block_side(10, EEConfig.from_options({"block_size": 4096})) == 912  # 912 * 912 * 10 * 4 B <= 32 MiB default budget


def test_decode_cropharvest_export():
    out = decode_cropharvest_export(TOGO_TIF)
    months = [f"2019-{m:02d}" for m in range(2, 13)] + ["2020-01"]  # 12 steps from 2019-02-06
    with rasterio.open(TOGO_TIF) as src:
        names = list(src.descriptions)
        raw = src.read()
    for m, arr in out.items():
        desc = band_descriptions(m, months)
        assert arr.shape == (len(desc), 17, 17) and arr.dtype == np.float32
        for i, d in enumerate(desc):  # each band traced back to its export band
            band, t = (d.rsplit("_", 1)[0], months.index(d.rsplit("_", 1)[1])) if m != "dem" else (d, 0)
            src_name = CROPHARVEST_BANDS[m][band]
            src_name = src_name if t == 0 else f"{src_name}_{t}"
            expect = raw[names.index(src_name)].astype(np.float32) / (10000.0 if m == "s2" else 1.0)
            np.testing.assert_allclose(arr[i], expect.astype(np.float32), rtol=1e-6, equal_nan=True)
    assert out["s2"].shape[0] == 12 * n_channels("s2")
    assert 0.1 < np.nanmean(out["s2"]) < 0.4  # reflectance
    assert -30 < np.nanmean(out["s1"]) < 0  # dB
    assert 280 < np.nanmean(out["weather"][0::2]) < 320  # K
    assert 200 < np.nanmean(out["dem"][0]) < 220 and np.isnan(out["dem"][1]).sum() == 109
