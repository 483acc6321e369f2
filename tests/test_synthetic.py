"""The synthetic source writes plausible, deterministic raw inputs for a region."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from pyproj import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_bounds

from cropmap.errors import ConfigError
from cropmap.grid import Grid, season_months
from cropmap.modalities import band_descriptions
from cropmap.sources.synthetic import SUPPORTED_CLASSES, fetch_synthetic

ROOT = Path(__file__).resolve().parents[1]
BBOX = [4.80, 45.70, 4.815, 45.71]  # ~120 x 114 px at 10 m
MONTHS = season_months("2023-01", "2023-12")


def _classes() -> list[dict]:
    with open(ROOT / "config.yaml") as fh:
        return yaml.safe_load(fh)["classes"]


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def grid() -> Grid:
    return Grid.from_bbox(BBOX)


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, grid: Grid) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synthetic") / "raw"
    return fetch_synthetic(grid, MONTHS, _classes(), out, seed=7)


def test_writes_every_modality_and_the_fields(region: dict[str, Path]) -> None:
    assert list(region) == ["s2", "s1", "weather", "dem", "fields"]
    assert {p.name for p in region.values()} == {"s2.tif", "s1.tif", "weather.tif", "dem.tif", "fields.gpkg"}
    assert all(p.is_file() for p in region.values())
    assert not list(region["s2"].parent.glob(".*tmp*"))  # no temporary leftovers


@pytest.mark.parametrize("modality, n_bands", [("s2", 10), ("s1", 2)])
def test_sensor_stacks_are_on_the_grid(region: dict[str, Path], grid: Grid, modality: str, n_bands: int) -> None:
    grid.check(region[modality])
    with rasterio.open(region[modality]) as src:
        assert src.count == n_bands * len(MONTHS)
        assert list(src.descriptions) == band_descriptions(modality, MONTHS)
        assert src.dtypes[0] == "float32"
        assert np.isnan(src.nodata)


def test_s2_clouds_blank_all_bands_as_nan(region: dict[str, Path], grid: Grid) -> None:
    s2 = _read(region["s2"]).reshape(len(MONTHS), 10, *grid.shape)
    cloudy = np.isnan(s2[:, 0])
    assert (np.isnan(s2) == cloudy[:, None]).all()  # a cloudy pixel-month is NaN in every band
    cover = cloudy.mean(axis=(1, 2))
    assert (cover <= 0.65).all() and (cover > 0).sum() >= 6
    assert cover[[0, 1, 10, 11]].mean() > cover[5:8].mean()  # cloudier in winter
    valid = s2[~np.isnan(s2)]
    assert (valid > 0).all() and valid.max() < 0.7  # reflectance, never zero-filled
    assert ((~cloudy).mean(axis=0) < 1).mean() > 0.3  # many pixels miss some months


def test_s1_orbit_gap_is_nan_every_month_and_rest_is_valid(region: dict[str, Path], grid: Grid) -> None:
    s1 = _read(region["s1"]).reshape(len(MONTHS), 2, *grid.shape)
    gap_cols = np.isnan(s1).all(axis=(0, 1, 2))
    n = int(gap_cols.sum())
    assert abs(n - 0.15 * grid.width) <= 1
    cols = np.flatnonzero(gap_cols)
    assert (np.diff(cols) == 1).all()  # one contiguous vertical strip
    rest = s1[..., ~gap_cols]
    assert np.isfinite(rest).all()
    vv, vh = rest[:, 0], rest[:, 1]
    assert -22 < np.median(vv) < -5 and -30 < np.median(vh) < -12
    assert np.median(vh) < np.median(vv) - 4


def test_fields_are_labelled_parcels_of_realistic_size(region: dict[str, Path], grid: Grid) -> None:
    fields = gpd.read_file(region["fields"], layer="fields")
    assert CRS.from_user_input(fields.crs) == CRS.from_user_input(grid.crs)
    assert fields["field_id"].is_unique and np.issubdtype(fields["field_id"].dtype, np.integer)
    codes = set(fields["code"])
    assert codes <= set(SUPPORTED_CLASSES)
    assert "non_crop" in codes and len(codes - {"non_crop"}) >= 6
    area_ha = fields.area / 1e4
    assert area_ha.min() >= 0.5 - 1e-6 and area_ha.max() <= 20 + 1e-6
    x0, y0, x1, y1 = fields.total_bounds
    gx0, gy0, gx1, gy1 = grid.bounds
    assert x0 >= gx0 - 1e-6 and y0 >= gy0 - 1e-6 and x1 <= gx1 + 1e-6 and y1 <= gy1 + 1e-6
    assert not fields.union_all().contains(fields.union_all().envelope)  # gaps between parcels


def test_same_seed_same_rasters_other_seed_differs(region: dict[str, Path], grid: Grid, tmp_path: Path) -> None:
    # the region seed option overrides seed; requesting fewer modalities changes nothing
    same = fetch_synthetic(grid, MONTHS, _classes(), tmp_path / "same", seed=99, modalities=["s1"], options={"seed": 7})
    np.testing.assert_array_equal(_read(same["s1"]), _read(region["s1"]))
    other = fetch_synthetic(grid, MONTHS, _classes(), tmp_path / "other", seed=8, modalities=["s1"])
    assert not np.array_equal(_read(other["s1"]), _read(region["s1"]), equal_nan=True)
    a = gpd.read_file(same["fields"])
    b = gpd.read_file(region["fields"])
    assert a["code"].tolist() == b["code"].tolist() and a.geometry.geom_equals(b.geometry).all()


def test_weather_and_dem_are_geographic_and_cover_the_grid(region: dict[str, Path], grid: Grid) -> None:
    w, s, e, n = transform_bounds(grid.crs, "EPSG:4326", *grid.bounds)
    for name, res in (("weather", 0.01), ("dem", 1 / 3600)):
        with rasterio.open(region[name]) as src:
            assert src.crs.to_epsg() == 4326
            assert src.res == pytest.approx((res, res))
            b = src.bounds
            assert b.left < w and b.bottom < s and b.right > e and b.top > n
            data = src.read()
            assert np.isfinite(data).all()
            assert list(src.descriptions) == band_descriptions(name, MONTHS)
    weather = _read(region["weather"])
    temp, precip = weather[0::2], weather[1::2]
    assert temp.min() > 250 and temp.max() < 315  # kelvin
    assert temp[6].mean() > temp[0].mean() + 10  # July warmer than January
    assert (precip > 0).all() and precip.max() < 0.5  # metres per month
    elev, slope = _read(region["dem"])
    assert elev.min() > 50 and elev.max() < 1000
    assert slope.min() >= 0 and slope.max() < 45 and slope.mean() > 0.1


def test_classes_have_distinct_phenology(region: dict[str, Path], grid: Grid) -> None:
    fields = gpd.read_file(region["fields"], layer="fields")
    names = sorted(set(fields["code"]))
    labels = rasterize(
        zip(fields.geometry, [names.index(c) + 1 for c in fields["code"]], strict=True),
        out_shape=grid.shape, transform=grid.transform, fill=0, dtype="int32",
    )
    s2 = _read(region["s2"]).reshape(len(MONTHS), 10, *grid.shape)
    ndvi = (s2[:, 6] - s2[:, 2]) / (s2[:, 6] + s2[:, 2])

    def mean_ndvi(name: str, months: list[int]) -> float:
        return float(np.nanmean(ndvi[months][:, labels == names.index(name) + 1]))

    summer, spring = [6, 7], [3, 4]  # Jul-Aug, Apr-May
    assert mean_ndvi("maize", summer) > mean_ndvi("wheat", summer) + 0.3
    assert mean_ndvi("wheat", spring) > mean_ndvi("maize", spring) + 0.3
    assert mean_ndvi("soybean", summer) > mean_ndvi("barley", summer) + 0.3
    summer_means = [mean_ndvi(c, summer) for c in names]
    assert np.ptp(summer_means) > 0.4


def test_options_and_subsets(grid: Grid, tmp_path: Path) -> None:
    classes = [c for c in _classes() if c["name"] in ("non_crop", "wheat", "maize")]
    out = fetch_synthetic(grid, MONTHS[:6], classes, tmp_path, seed=1, modalities=["s2", "s1"],
                          options={"cloud_cover": 0, "s1_gap": False})
    assert list(out) == ["s2", "s1", "fields"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fields.gpkg", "s1.tif", "s2.tif"]
    assert np.isfinite(_read(out["s2"])).all() and np.isfinite(_read(out["s1"])).all()
    assert set(gpd.read_file(out["fields"])["code"]) == {"non_crop", "wheat", "maize"}


def test_unknown_class_or_option_is_a_config_error(grid: Grid, tmp_path: Path) -> None:
    classes = [*_classes(), {"id": 7, "name": "rice", "colour": "#000000", "codes": []}]
    with pytest.raises(ConfigError, match=r"'rice'.*non_crop.*soybean"):
        fetch_synthetic(grid, MONTHS, classes, tmp_path, seed=1)
    with pytest.raises(ConfigError, match="cloud"):
        fetch_synthetic(grid, MONTHS, _classes(), tmp_path, seed=1, options={"clouds": 2})
    assert not any(tmp_path.iterdir())  # nothing written before validation
