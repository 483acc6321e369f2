"""fetch_stac against a loopback STAC API serving COGs cut from the real Mol cubes."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import rasterio
from sources_fixtures import DEM_GX, DEM_GY, Faults, mol_grid, pc_options, serve_catalog

from cropmap.errors import ConfigError, SourceError
from cropmap.grid import window_key
from cropmap.modalities import BANDS, band_descriptions
from cropmap.sources import _blocks
from cropmap.sources.stac import StacConfig, fetch_stac
from cropmap.sources.stac_reader import slope_degrees

MONTHS = ["2023-03", "2023-04", "2023-05"]
APRIL = slice(10, 20)  # s2 bands of 2023-04
SCL_VALID = (4, 5, 6, 7)


def read(path):
    with rasterio.open(path) as src:
        return src.read(), list(src.descriptions), src.profile, src.tags()


def s2_expected(cat, dates: list[int]) -> dict[str, np.ndarray]:
    """April median reflectance computed straight from the cube (harmonised DN / 10000)."""
    valid = np.isin(cat.s2["SCL"][dates], SCL_VALID)
    out = {}
    for b in ("B04", "B08", "B11"):
        v = np.where(valid, cat.s2[b][dates].astype(np.float32) / np.float32(10000), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
            out[b] = np.nanmedian(v, axis=0)
    return out


def s2_band(arr: np.ndarray, month: str, band: str) -> np.ndarray:
    return arr[band_descriptions("s2", MONTHS).index(f"{band}_{month}")]


def test_fetch_stac_writes_stacks_on_the_grid(stac_server, mol_catalog, tmp_path):
    cat = mol_catalog
    cat.require_token = True  # assets answer 403 unless signed
    grid = mol_grid(cat)
    out = fetch_stac(grid, MONTHS, tmp_path, modalities=["s2", "s1", "weather", "dem"], options=pc_options(stac_server))
    assert set(out) == {"s2", "s1", "dem"}  # no weather in a STAC catalogue: simply absent
    assert not (tmp_path / "weather.tif").exists()
    for m, p in out.items():
        assert p == tmp_path / f"{m}.tif"
        grid.check(p)
        _, desc, prof, tags = read(p)
        assert desc == band_descriptions(m, MONTHS)
        assert prof["dtype"] == "float32" and math.isnan(prof["nodata"])
        assert tags["source"] == "stac"

    s2, _, _, _ = read(out["s2"])
    assert np.isnan(s2[:10]).all() and np.isnan(s2[20:]).all()  # March and May: no scene -> NaN, not 0
    valid_dates = [1, 5]  # the April dates with clear pixels (SCL)
    exp = s2_expected(cat, valid_dates)
    for b in ("B04", "B08", "B11"):
        np.testing.assert_allclose(s2_band(s2, "2023-04", b), exp[b], rtol=1e-6)
    for b in set(BANDS["s2"]) - {"B04", "B08", "B11"}:  # bands the cube lacks
        assert np.isnan(s2_band(s2, "2023-04", b)).all()
    assert 0.0 < np.nanmean(s2_band(s2, "2023-04", "B04")) < 0.2  # reflectance, offset removed

    s1, _, _, _ = read(out["s1"])
    assert np.isnan(s1[[0, 1, 4, 5]]).all()
    for i, b in enumerate(("VV", "VH")):
        dn = cat.s1_dn[b].astype(np.float64)
        db = np.where(dn > 0, 20 * np.log10(np.maximum(dn, 1)) - 83, np.nan)
        np.testing.assert_allclose(s1[2 + i], np.nanmedian(db, axis=0), atol=2e-3)
    assert -25 < np.nanmean(s1[2]) < -5

    dem, _, _, _ = read(out["dem"])
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.transform * (cols, rows)
    from sources_fixtures import DEM_Z0

    np.testing.assert_allclose(dem[0], DEM_Z0 + DEM_GX * xs + DEM_GY * ys, atol=0.05)
    np.testing.assert_allclose(dem[1], math.degrees(math.atan(math.hypot(DEM_GX, DEM_GY))), atol=0.01)

    cogs = stac_server.requests("/cogs/", answered=None)
    assert cogs and all(r.query.get("sig") == ["loopback-signature"] for r in cogs)
    assert any(r.headers.get("range") for r in cogs)  # read by HTTP range requests
    assert len(stac_server.requests("/search", method="POST")) >= 3  # 12 S2 items, 5 per page
    assert len(stac_server.requests("/sas/token/")) == 3  # one token per collection, cached
    assert not (tmp_path / ".parts").exists()

    # A rerun finds complete stacks and downloads nothing.
    n = len(stac_server.log)
    assert fetch_stac(grid, MONTHS, tmp_path, modalities=["s2", "s1", "dem"], options=pc_options(stac_server)) == out
    assert not any("/cogs/" in r.path for r in stac_server.log[n:])


def test_cloudy_pixels_and_months_are_nan(stac_server, mol_catalog, tmp_path):
    cat = mol_catalog
    grid = mol_grid(cat)
    ids = [it["id"] for it in cat.items["sentinel-2-l2a"]]
    # Without the 2023-04-15 scene, April rests on 2023-04-05, where SCL marks 52 px cirrus.
    cat.hidden_dates = {ids[5]}
    out = fetch_stac(grid, MONTHS, tmp_path / "a", modalities=["s2"], options=pc_options(stac_server, search_method="GET"))
    s2, _, _, _ = read(out["s2"])
    cloudy = ~np.isin(cat.s2["SCL"][1], SCL_VALID)
    assert cloudy.sum() == 52
    for b in ("B04", "B08", "B11"):
        got = s2_band(s2, "2023-04", b)
        assert np.array_equal(np.isnan(got), cloudy)
        np.testing.assert_allclose(got[~cloudy], cat.s2[b][1][~cloudy] / 10000.0, rtol=1e-6)
    assert stac_server.requests("/search", method="GET") and not stac_server.requests("/search", method="POST")
    assert any("token" in r.query for r in stac_server.requests("/search"))  # GET paging via next link

    # Only scenes that SCL marks cloudy (8, 9, 10) in April: the month is NaN, the stack still
    # written, whether the scenes are read (max_cloud 100) or skipped by their cloud cover.
    cat.hidden_dates = {ids[1], ids[5]}
    for max_cloud in (100, 90):
        n0 = len(stac_server.log)
        out = fetch_stac(grid, MONTHS, tmp_path / f"b{max_cloud}", modalities=["s2"], options=pc_options(stac_server, max_cloud=max_cloud))
        s2, desc, _, _ = read(out["s2"])
        assert len(desc) == 30 and np.isnan(s2).all()
        assert any("/cogs/" in r.path for r in stac_server.log[n0:]) == (max_cloud == 100)


def test_broken_assets_become_nan_not_a_failed_region(stac_server, mol_catalog, tmp_path, caplog):
    cat = mol_catalog
    cat.require_token = True
    grid = mol_grid(cat)
    ids = [it["id"] for it in cat.items["sentinel-2-l2a"]]
    cat.broken = {f"cogs/{ids[1]}/B04.tif"}  # HTTP 404
    cat.corrupt = {f"cogs/{ids[5]}/B08.tif"}  # not a TIFF
    out = fetch_stac(grid, MONTHS, tmp_path, modalities=["s2"], options=pc_options(stac_server))
    s2, _, _, tags = read(out["s2"])
    assert tags["broken_assets"] == "2"
    only = {"B04": 5, "B08": 1}
    for b, d in only.items():
        ok = np.isin(cat.s2["SCL"][d], SCL_VALID)
        got = s2_band(s2, "2023-04", b)
        assert np.array_equal(np.isnan(got), ~ok)
        np.testing.assert_allclose(got[ok], cat.s2[b][d][ok] / 10000.0, rtol=1e-6)
    np.testing.assert_allclose(s2_band(s2, "2023-04", "B11"), s2_expected(cat, [1, 5])["B11"], rtol=1e-6)
    assert f"{ids[1]}/B04.tif" in caplog.text and "is broken (HTTP 404)" in caplog.text
    assert "loopback-signature" not in caplog.text  # signed URLs are redacted in every log line


def test_dropped_and_rate_limited_requests_give_an_identical_stack(stac_server, mol_catalog, tmp_path):
    grid = mol_grid(mol_catalog)
    mods = ["s2", "s1", "dem"]
    ref = fetch_stac(grid, MONTHS, tmp_path / "ref", modalities=mods, options=pc_options(stac_server))
    flaky = serve_catalog(mol_catalog, Faults(drop_every=3, status_every=5))
    try:
        got = fetch_stac(grid, MONTHS, tmp_path / "flaky", modalities=mods, options=pc_options(flaky, retries=10, backoff=0.002))
        dropped = [r for r in flaky.log if r.answered is None]
        limited = [r for r in flaky.log if r.answered == 429]
    finally:
        flaky.close()
    assert dropped and limited
    assert any("/search" in r.path for r in dropped + limited)
    for m in mods:
        a, _, _, _ = read(ref[m])
        b, _, _, tags = read(got[m])
        assert np.array_equal(a, b, equal_nan=True), m
        assert "broken_assets" not in tags


def test_interrupted_fetch_resumes_without_refetching_finished_blocks(stac_server, mol_catalog, tmp_path, monkeypatch):
    cat = mol_catalog
    grid = mol_grid(cat)
    saved: list[str] = []
    real_save = _blocks.PartStore.save

    def spy(self, key, array):
        saved.append(key)
        real_save(self, key, array)

    monkeypatch.setattr(_blocks.PartStore, "save", spy)
    opts = pc_options(stac_server, block_size=48, retries=1)  # 2 x 2 blocks per month
    stac_server.faults.fail_after, stac_server.faults.fail_match = 40, r"^/cogs/"  # then HTTP 503 for good
    with pytest.raises(SourceError, match="503"):
        fetch_stac(grid, MONTHS, tmp_path, modalities=["s2"], options=opts)
    kept = sorted(p.stem for p in (tmp_path / ".parts" / "s2").glob("*.npy"))
    assert sorted(saved) == kept
    assert any(k.startswith("2023-04") for k in kept)  # some April blocks were finished
    assert not (tmp_path / "s2.tif").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written

    stac_server.faults.fail_after = None
    first_run = list(saved)
    saved.clear()
    out = fetch_stac(grid, MONTHS, tmp_path, modalities=["s2"], options=opts)
    assert not set(first_run) & set(saved)  # finished blocks were not fetched again
    assert sorted(first_run + saved) == sorted(f"{m}_{window_key(r, c)}" for m in MONTHS for r in (0, 48) for c in (0, 48))
    s2 = read(out["s2"])[0]
    exp = s2_expected(cat, [1, 5])
    for b in ("B04", "B08", "B11"):
        np.testing.assert_allclose(s2_band(s2, "2023-04", b), exp[b], rtol=1e-6)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="preset"):
        StacConfig.from_options({"preset": "nasa"})
    with pytest.raises(ConfigError, match=r"stac\.url"):
        StacConfig.from_options({})
    with pytest.raises(ConfigError, match="weather"):
        StacConfig.from_options({"url": "http://127.0.0.1:1", "collections": {"weather": "era5"}})
    es = StacConfig.from_options({"preset": "earth_search"})
    assert es.assets["s2"]["B8A"] == "nir08" and "s1" not in es.collections and es.sign is False
    pc = StacConfig.from_options({"preset": "planetary_computer", "collections": {"s1": None}})
    assert "s1" not in pc.collections and pc.sign == "auto"


def test_slope_of_a_plane():
    yy, xx = np.mgrid[0:5, 0:6] * 10.0
    elev = 3.0 + 0.1 * xx - 0.2 * yy
    s = slope_degrees(elev, 10.0)
    assert s.shape == (3, 4)
    np.testing.assert_allclose(s, math.degrees(math.atan(math.hypot(0.1, 0.2))), rtol=1e-6)
