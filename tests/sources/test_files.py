"""Source ``files``: the real GFMap Mol cubes (NetCDF), GeoTIFFs per date and time-major, Zarr, bad inputs,
and the ``fetch`` + ``stack`` stage commands on a files region."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine

from cropmap.availability import write_report
from cropmap.cli import main as cropmap_main
from cropmap.config import dumps, region_grid, stage_params, validate
from cropmap.errors import ConfigError, InputDataError
from cropmap.grid import Grid
from cropmap.sources.files import fetch_files, files_footprint, footprint_grid
from cropmap.sources.stac import SCL_VALID_DEFAULT
from tests.conftest import REALDATA as DATA
from tests.conftest import tiny_config

S2_NC = DATA / "gfmap_mol_s2_l2a.nc"
S1_NC = DATA / "gfmap_mol_s1_grd.nc"
MOL_GRID = Grid(crs="EPSG:32631", res=10.0, xmin=643260.0, ymax=5676480.0, width=64, height=66)
SUBSET = {"s2": ["B04", "B08", "B11"]}


def read(path: Path) -> tuple[np.ndarray, list[str]]:
    with rasterio.open(path) as src:
        return src.read(), list(src.descriptions)


def left(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# ------------------------------------------------------------------------------------------
# The real Mol cubes (openEO GFMap NetCDF: one variable per band, CRS in the grid_mapping variable)
# ------------------------------------------------------------------------------------------
def test_footprint_of_the_mol_cubes_is_their_own_grid() -> None:
    opts = {"s2": str(S2_NC), "s1": str(S1_NC)}
    assert footprint_grid(opts) == MOL_GRID
    lon0, lat0, lon1, lat1 = files_footprint(opts)
    assert 5.05 < lon0 < lon1 < 5.07 and 51.21 < lat0 < lat1 < 51.23


def test_mol_s2_band_subset_scl_masked_monthly_mean(tmp_path: Path) -> None:
    out = fetch_files(MOL_GRID, ["2023-03", "2023-04"], tmp_path, modalities=["s2", "s1", "weather", "dem"],
                      options={"s2": str(S2_NC), "s1": str(S1_NC)}, bands=SUBSET)
    assert sorted(out) == ["s1", "s2"]  # no files for weather and dem: absent
    arr, desc = read(out["s2"])
    assert desc == ["B04_2023-03", "B08_2023-03", "B11_2023-03", "B04_2023-04", "B08_2023-04", "B11_2023-04"]
    MOL_GRID.check(out["s2"])
    with rasterio.open(out["s2"]) as src:
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
    assert np.isnan(arr[:3]).all()  # no observation in March
    # independent expectation: mean over the April dates whose SCL class is kept, DN / 10000
    with xr.open_dataset(S2_NC, engine="h5netcdf") as ds:
        scl = ds["S2-L2A-SCL"].values
        keep = np.isin(scl, SCL_VALID_DEFAULT)
        for i, b in enumerate(SUBSET["s2"]):
            dn = ds[f"S2-L2A-{b}"].values.astype(np.float64)
            with np.errstate(invalid="ignore"):
                want = np.where(keep, dn, 0).sum(0) / keep.sum(0)
            want = np.where(keep.any(0), want / 10000, np.nan)
            np.testing.assert_allclose(arr[3 + i], want, rtol=1e-5, atol=1e-6)
            unmasked = dn.mean(0) / 10000
            assert abs(np.nanmean(arr[3 + i]) - unmasked.mean()) > 0.02  # clouds (SCL 8, 9, 10) were dropped
    # masked pixels -> NaN: keep only SCL 5 (not vegetated, a few hundred pixels on two dates):
    # a pixel is valid exactly where some date has class 5, and holds the mean of those dates
    out2 = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "bare", modalities=["s2"],
                       options={"s2": {"path": str(S2_NC), "mask_valid": [5]}}, bands=SUBSET)
    a2, _ = read(out2["s2"])
    five = scl == 5
    assert 0 < five.any(0).mean() < 0.2
    np.testing.assert_array_equal(np.isfinite(a2[0]), five.any(0))
    with xr.open_dataset(S2_NC, engine="h5netcdf") as ds:
        dn = ds["S2-L2A-B04"].values.astype(np.float64)
    with np.errstate(invalid="ignore"):
        want = np.where(five, dn, 0).sum(0) / five.sum(0) / 10000
    np.testing.assert_allclose(a2[0][five.any(0)], want[five.any(0)], rtol=1e-5)


def test_mol_s1_compressed_db_and_availability(tmp_path: Path) -> None:
    out = fetch_files(MOL_GRID, ["2023-04", "2023-05"], tmp_path, modalities=["s1"], options={"s1": str(S1_NC)})
    arr, desc = read(out["s1"])
    assert desc == ["VV_2023-04", "VH_2023-04", "VV_2023-05", "VH_2023-05"]
    with xr.open_dataset(S1_NC, engine="h5netcdf") as ds:
        vv = ds["S1-SIGMA0-VV"].values.astype(np.float64)
    np.testing.assert_allclose(arr[0], (20 * np.log10(vv) - 83).mean(0), rtol=1e-5)
    report = write_report(out, tmp_path / "availability.json", ["s2", "s1", "weather", "dem"])
    assert report["s1"] == {"2023-04": 1.0, "2023-05": 0.0} and report["s2"] is None
    assert json.loads((tmp_path / "availability.json").read_text()) == report
    # band subsets: availability counts the stack's own bands per month
    s2 = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "s2", modalities=["s2"], options={"s2": str(S2_NC)}, bands=SUBSET)
    rep = write_report(s2, tmp_path / "a2.json", ["s2"])
    a, _ = read(s2["s2"])
    assert rep["s2"]["2023-04"] == pytest.approx(round(float(np.isfinite(a).all(0).mean()), 4))


def test_zarr_cube_with_band_dimension_and_spatial_ref(tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    import rioxarray  # noqa: F401

    with xr.open_dataset(S1_NC, engine="h5netcdf", decode_coords="all") as ds:
        da = xr.concat([ds["S1-SIGMA0-VV"], ds["S1-SIGMA0-VH"]], dim="bands").assign_coords(bands=["vv", "vh"])
        da = da.rename({"t": "time"}).transpose("time", "bands", "y", "x").drop_vars("crs", errors="ignore")
        da.encoding = {}  # the NetCDF stores int16 + _Unsigned; keep uint16 in the Zarr
        cube = da.to_dataset(name="sigma0").rio.write_crs("EPSG:32631")
        cube = cube.sortby("y")  # south-up, as many xarray writers store it
        cube.to_zarr(tmp_path / "s1.zarr", mode="w", zarr_format=2)  # the layout most xarray writers produce today
    z = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "z", modalities=["s1"], options={"s1": str(tmp_path / "s1.zarr")})
    n = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "n", modalities=["s1"], options={"s1": str(S1_NC)})
    np.testing.assert_allclose(read(z["s1"])[0], read(n["s1"])[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# GeoTIFFs written with rasterio: one file per date, and one time-major file
# ------------------------------------------------------------------------------------------
TIF_TF = Affine(20.0, 0.0, 600000.0, 0.0, -20.0, 5000000.0)  # 20 m, EPSG:32631


def write_tif(path: Path, bands: dict[str, np.ndarray], tags: dict | None = None, descriptions: bool = True,
              crs: str | None = "EPSG:32631") -> None:
    arr = np.stack(list(bands.values())).astype("uint16")
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype="uint16", crs=crs, transform=TIF_TF, nodata=0) as dst:
        dst.write(arr)
        if descriptions:
            dst.descriptions = tuple(bands)
        if tags:
            dst.update_tags(**tags)


def per_date_tifs(folder: Path) -> None:
    """Three S2 scenes, 40 x 40 px at 20 m: May 3 (B04 1000), May 20 (B04 3000, west half cloudy),
    June 10 (B04 500, date in TIFFTAG_DATETIME only)."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (40, 40)

    def scene(b04: int, scl: np.ndarray) -> dict[str, np.ndarray]:
        return {"B04": np.full(shape, b04), "B08": np.full(shape, 2 * b04), "B11": np.full(shape, 3 * b04), "SCL": scl}

    clear = np.full(shape, 4)
    cloudy_west = clear.copy()
    cloudy_west[:, :20] = 9
    write_tif(folder / "S2_20230503_T31UFS.tif", scene(1000, clear))
    write_tif(folder / "S2_2023-05-20.tif", scene(3000, cloudy_west))
    write_tif(folder / "S2_scene_c.tif", scene(500, clear), tags={"TIFFTAG_DATETIME": "2023:06:10 10:56:21"})


def test_geotiff_per_date_reprojected_masked_composited(tmp_path: Path) -> None:
    per_date_tifs(tmp_path / "tifs")
    # a 10 m grid on another origin, inside the scenes (bilinear resampling of constant fields is exact)
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=600105.0, ymax=4999895.0, width=60, height=50)
    out = fetch_files(grid, ["2023-05", "2023-06", "2023-07"], tmp_path / "out", modalities=["s2"],
                      options={"s2": str(tmp_path / "tifs" / "S2_*.tif")}, bands=SUBSET)
    arr, desc = read(out["s2"])
    assert desc[:3] == ["B04_2023-05", "B08_2023-05", "B11_2023-05"] and len(desc) == 9
    may_b04 = arr[0]
    # west of the cloud edge (x < 600400, i.e. columns < 29) May 20 is masked: May = 1000 DN
    np.testing.assert_allclose(may_b04[:, :25], 0.1, rtol=1e-6)
    # east of it both scenes count: (1000 + 3000) / 2
    np.testing.assert_allclose(may_b04[:, 33:], 0.2, rtol=1e-6)
    np.testing.assert_allclose(arr[1][:, 33:], 0.4, rtol=1e-6)  # B08
    np.testing.assert_allclose(arr[3:6], np.array([0.05, 0.1, 0.15])[:, None, None] * np.ones((3, 50, 60)), rtol=1e-6)
    assert np.isnan(arr[6:]).all()  # July: no scene


def test_time_major_geotiff_dates_in_descriptions_or_config(tmp_path: Path) -> None:
    shape = (30, 30)
    bands = {"vv_2023-05-02": np.full(shape, 1000), "vh_2023-05-02": np.full(shape, 100),
             "vv_2023-05-14": np.full(shape, 10000), "vh_2023-05-14": np.full(shape, 1000)}
    write_tif(tmp_path / "s1_stack.tif", bands)
    grid = Grid(crs="EPSG:32631", res=20.0, xmin=600000.0, ymax=5000000.0, width=30, height=30)
    out = fetch_files(grid, ["2023-05"], tmp_path / "a", modalities=["s1"],
                      options={"s1": {"path": str(tmp_path / "s1_stack.tif"), "scale": "compressed_db"}})
    arr, desc = read(out["s1"])
    assert desc == ["VV_2023-05", "VH_2023-05"]
    np.testing.assert_allclose(arr[0], -13.0, atol=1e-5)  # mean of -23 and -3 dB
    np.testing.assert_allclose(arr[1], -33.0, atol=1e-5)  # mean of -43 and -23 dB
    # the same file without descriptions: names and dates from the config
    write_tif(tmp_path / "bare.tif", bands, descriptions=False)
    spec = {"path": str(tmp_path / "bare.tif"), "band_names": ["VV", "VH"], "dates": ["2023-05-02", "2023-05-14"],
            "scale": "compressed_db"}
    out2 = fetch_files(grid, ["2023-05"], tmp_path / "b", modalities=["s1"], options={"s1": spec})
    np.testing.assert_allclose(read(out2["s1"])[0], arr)


def test_dem_file_slope_computed_when_absent(tmp_path: Path) -> None:
    xx = np.mgrid[0:40, 0:40][1]
    elev = (100 + 0.5 * xx * 20).astype("uint16")  # rises 0.5 m per metre eastwards: slope atan(0.5)
    write_tif(tmp_path / "dem.tif", {"height": elev})
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=600100.0, ymax=4999900.0, width=40, height=40)
    out = fetch_files(grid, ["2023-05"], tmp_path / "o", modalities=["dem"], options={"dem": str(tmp_path / "dem.tif")})
    arr, desc = read(out["dem"])
    assert desc == ["elevation", "slope"]
    np.testing.assert_allclose(arr[1][2:-2, 2:-2], np.degrees(np.arctan(0.5)), rtol=1e-3)


# ------------------------------------------------------------------------------------------
# Bad inputs: one line, naming the file, found vs expected and the fix; nothing written
# ------------------------------------------------------------------------------------------
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_band_names_list_found_and_expected(tmp_path: Path) -> None:
    with pytest.raises(InputDataError) as err:
        fetch_files(MOL_GRID, ["2023-04"], tmp_path, modalities=["s1", "s2"],
                    options={"s2": str(S2_NC), "s1": str(S1_NC)})  # default bands: B02 ... are not in the cube
    msg = one_line(err)
    assert str(S2_NC) in msg and "['B02', 'B03', 'B05', 'B06', 'B07', 'B8A', 'B12']" in msg
    assert "S2-L2A-B04" in msg and "S2-L2A-SCL" in msg and "files.s2.bands" in msg
    assert left(tmp_path) == []  # s1 was fine, but nothing is written
    # an alias override fixes a name the table does not know
    with pytest.raises(InputDataError, match="not found"):
        fetch_files(MOL_GRID, ["2023-04"], tmp_path, modalities=["s2"],
                    options={"s2": {"path": str(S2_NC), "bands": {"B04": "red_edge_x"}}}, bands=SUBSET)
    ok = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "ok", modalities=["s2"],
                     options={"s2": {"path": str(S2_NC), "bands": {"B11": "S2-L2A-B11"}}}, bands=SUBSET)
    assert ok["s2"].exists()


def test_cube_without_crs(tmp_path: Path) -> None:
    with xr.open_dataset(S1_NC, engine="h5netcdf") as ds:
        bare = ds.drop_vars("crs")
        for v in bare.data_vars:
            bare[v].attrs.pop("grid_mapping", None)
            bare[v].encoding = {}  # stored int16 + _Unsigned; write plain uint16
        bare.to_netcdf(tmp_path / "nocrs.nc", engine="h5netcdf")
    with pytest.raises(InputDataError) as err:
        fetch_files(MOL_GRID, ["2023-04"], tmp_path / "o", modalities=["s1"], options={"s1": str(tmp_path / "nocrs.nc")})
    msg = one_line(err)
    assert "nocrs.nc" in msg and "no CRS" in msg and "files.s1.crs" in msg
    assert left(tmp_path / "o") == []
    out = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "o", modalities=["s1"],
                      options={"s1": {"path": str(tmp_path / "nocrs.nc"), "crs": "EPSG:32631"}})
    ref = fetch_files(MOL_GRID, ["2023-04"], tmp_path / "r", modalities=["s1"], options={"s1": str(S1_NC)})
    np.testing.assert_allclose(read(out["s1"])[0], read(ref["s1"])[0])
    write_tif(tmp_path / "nocrs.tif", {"VV": np.full((4, 4), 1000)}, crs=None)
    with pytest.raises(InputDataError, match=r"nocrs\.tif: the GeoTIFF has no CRS"):
        fetch_files(MOL_GRID, ["2023-04"], tmp_path / "o", modalities=["s1"], options={"s1": str(tmp_path / "nocrs.tif")})


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(InputDataError) as err:
        fetch_files(MOL_GRID, ["2023-04"], tmp_path / "o", modalities=["s1"], options={"s1": str(tmp_path / "gone.nc")},
                    region="mol")
    msg = one_line(err)
    assert "gone.nc" in msg and "regions.mol.files.s1" in msg and "no such file" in msg
    with pytest.raises(InputDataError) as err:
        fetch_files(MOL_GRID, ["2023-04"], tmp_path / "o", modalities=["s2"], options={"s2": str(tmp_path / "s2_*.tif")})
    msg = one_line(err)
    assert "s2_*.tif" in msg and "matches no file" in msg
    with pytest.raises(ConfigError, match="scale"):
        fetch_files(MOL_GRID, ["2023-04"], tmp_path / "o", modalities=["s1"], options={"s1": {"path": str(S1_NC), "scale": "dB"}})
    assert left(tmp_path / "o") == []


# ------------------------------------------------------------------------------------------
# Config and the stage commands
# ------------------------------------------------------------------------------------------
def files_config(root: Path) -> dict:
    cfg = tiny_config(root)
    cfg["regions"]["tiny"]["season"] = {"start": "2023-04", "end": "2023-05"}  # mol's model: the same months
    cfg["regions"]["mol"] = {"source": "files", "season": {"start": "2023-04", "end": "2023-05"}, "model_from": "tiny",
                             "files": {"s2": str(S2_NC), "s1": {"path": str(S1_NC), "scale": "compressed_db"}}}
    return validate(cfg)


def test_config_files_region_without_bbox(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    assert region_grid(cfg["regions"]["mol"]) == MOL_GRID
    assert stage_params(cfg, "mosaic", "mol")["bbox"] == pytest.approx(files_footprint(cfg["regions"]["mol"]["files"]))
    bad = tiny_config(tmp_path)
    bad["regions"]["mol"] = {"source": "files", "season": {"start": "2023-04", "end": "2023-05"}, "model_from": "tiny"}
    with pytest.raises(ConfigError, match=r"regions\.mol\.files: the region takes stacks from files but lists none"):
        validate(bad)
    bad["regions"]["mol"] = {"source": "stac", "season": {"start": "2023-04", "end": "2023-05"}, "model_from": "tiny"}
    with pytest.raises(ConfigError, match=r"regions\.mol\.bbox: missing"):
        validate(bad)
    bad["regions"]["mol"] = {"source": "files", "season": {"start": "2023-04", "end": "2023-05"}, "model_from": "tiny",
                             "files": {"s1": {"path": "x.nc", "scale": "decibel"}}}
    with pytest.raises(ConfigError, match=r"regions\.mol\.files\.s1"):
        validate(bad)
    # without a bbox the grid comes from the files: a missing one stops at config load, one line
    bad["regions"]["mol"]["files"] = {"s1": str(tmp_path / "nowhere_s1.nc")}
    with pytest.raises(ConfigError) as err:
        validate(bad)
    assert "config key regions.mol.files:" in str(err.value) and "nowhere_s1.nc" in str(err.value)


def test_fetch_and_stack_stage_commands_on_a_files_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the files live in the run folder, named relative to it (as a user's config does)
    run = tmp_path / "run"
    (run / "cubes").mkdir(parents=True)
    shutil.copy(S2_NC, run / "cubes" / S2_NC.name)
    shutil.copy(S1_NC, run / "cubes" / S1_NC.name)
    monkeypatch.chdir(run)
    cfg = files_config(tmp_path)
    cfg["regions"]["mol"]["files"] = {"s2": f"cubes/{S2_NC.name}", "s1": {"path": "cubes/*s1*.nc"}}
    p = stage_params(cfg, "fetch", "mol")
    p["bands"] = SUBSET  # what the band-subset config adds to the fetch and stack parameters
    d = tmp_path / "data" / "mol"
    assert cropmap_main(["fetch", "--params", dumps(p), "--raw-dir", str(d / "raw"), "--cache-dir", str(d / ".fetch"),
                         "--availability", str(d / "availability.json")]) == 0
    assert left(d / "raw") == ["s1.tif", "s2.tif"]
    report = json.loads((d / "availability.json").read_text())
    assert report["weather"] is None and report["dem"] is None
    assert report["s1"] == {"2023-04": 1.0, "2023-05": 0.0} and report["s2"]["2023-05"] == 0.0
    assert report["s2"]["2023-04"] > 0.99
    ps = stage_params(cfg, "stack", "mol") | {"bands": SUBSET}
    assert cropmap_main(["stack", "--params", dumps(ps), "--raw-dir", str(d / "raw"), "--out-dir", str(d / "stack")]) == 0
    for m, n in (("s2", 6), ("s1", 4)):
        MOL_GRID.check(d / "stack" / f"{m}.tif")
        arr, desc = read(d / "stack" / f"{m}.tif")
        raw, _ = read(d / "raw" / f"{m}.tif")
        assert len(desc) == n and desc[0] == ("B04_2023-04" if m == "s2" else "VV_2023-04")
        np.testing.assert_array_equal(arr, raw)  # already on the grid: the stack copies it exactly
    assert left(d / "stack") == ["s1.tif", "s2.tif"]


def test_fetch_stage_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = files_config(tmp_path)
    cfg["regions"]["mol"]["files"]["s1"] = {"path": str(tmp_path / "missing_s1.nc")}
    cfg["regions"]["mol"]["bbox"] = [5.0512, 51.2156, 5.0606, 51.2217]
    p = stage_params(cfg, "fetch", "mol") | {"bands": SUBSET}
    d = tmp_path / "data" / "mol"
    capsys.readouterr()
    rc = cropmap_main(["fetch", "--params", dumps(p), "--raw-dir", str(d / "raw"), "--cache-dir", str(d / ".fetch"),
                       "--availability", str(d / "availability.json")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cropmap fetch: error:")]
    assert rc == 1 and len(err) == 1 and "missing_s1.nc" in err[0] and "regions.mol.files.s1" in err[0]
    assert left(d / "raw") == [] and left(d / ".fetch") == []
