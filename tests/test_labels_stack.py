"""Stages stack and labels on small generated rasters and vectors with real CRS."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from shapely.geometry import box

from cropmap import fold, labels, stack
from cropmap.errors import GridMismatchError, LabelError
from cropmap.grid import Grid
from cropmap.modalities import band_descriptions

CLASSES = [{"id": 0, "name": "non_crop", "colour": "#000000", "codes": ["NC"]},
           {"id": 1, "name": "wheat", "colour": "#ffff00", "codes": ["BTH", 1110]}]
MONTHS = ["2023-05", "2023-06"]


@pytest.fixture
def grid() -> Grid:
    return Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=40, height=30)


def test_stack_warps_coarse_lonlat_weather_onto_grid_keeping_nan(tmp_path: Path, grid: Grid) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    # 0.01 degree lon/lat raster covering the grid with margin; one month all NaN
    lon0, lat0 = 4.78, 45.71
    h, w = 6, 6
    data = np.stack([np.full((h, w), 280.0 + i, np.float32) for i in range(4)])
    data[2:4] = np.nan  # month 2023-06 missing
    prof = {"driver": "GTiff", "width": w, "height": h, "count": 4, "dtype": "float32", "crs": "EPSG:4326",
            "transform": Affine(0.01, 0, lon0, 0, -0.01, lat0), "nodata": np.nan}
    with rasterio.open(raw / "weather.tif", "w", **prof) as dst:
        dst.write(data)
        dst.descriptions = tuple(band_descriptions("weather", MONTHS))
    out = stack.run(raw, tmp_path / "stack", grid, MONTHS, ["s2", "weather"])
    assert set(out) == {"weather"}, "absent modalities are simply absent"
    grid.check(out["weather"])
    with rasterio.open(out["weather"]) as src:
        assert src.descriptions == tuple(band_descriptions("weather", MONTHS))
        a = src.read()
    assert np.allclose(a[0], 280.0) and np.allclose(a[1], 281.0)
    assert np.isnan(a[2:]).all()


def test_stack_refuses_wrong_band_count(tmp_path: Path, grid: Grid) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with rasterio.open(raw / "dem.tif", "w", **grid.profile(3)) as dst:
        dst.write(np.zeros((3, grid.height, grid.width), np.float32))
    with pytest.raises(GridMismatchError, match=r"dem\.tif has 3 bands, expected 2"):
        stack.run(raw, tmp_path / "stack", grid, MONTHS, ["dem"])


def _fields(path: Path, grid: Grid, codes: list) -> Path:
    x0, _, _, y1 = grid.bounds
    geoms = [box(x0 + 10 + 60 * i, y1 - 250, x0 + 60 * (i + 1), y1 - 10) for i in range(len(codes))]
    gpd.GeoDataFrame({"crop": codes}, geometry=geoms, crs=grid.crs).to_crs("EPSG:4326").to_file(path)
    return path


def test_labels_rasterise_codes_and_split_by_blocks(tmp_path: Path, grid: Grid) -> None:
    vec = _fields(tmp_path / "f.geojson", grid, ["NC", "BTH", "1110", "wheat"])
    counts = labels.run(vec, tmp_path / "labels.tif", tmp_path / "labels.gpkg", grid, CLASSES, column="crop",
                        block_size=8, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    with rasterio.open(tmp_path / "labels.tif") as src:
        cls, split = src.read()
        assert src.colormap(1)[1][:3] == (255, 255, 0)
    assert set(np.unique(cls)) == {0, 1, 255}
    assert sum(counts.values()) == int((cls != 255).sum())
    # every 8x8 block has one split value, and all three splits exist
    for r in range(0, grid.height, 8):
        for c in range(0, grid.width, 8):
            assert len(np.unique(split[r : r + 8, c : c + 8])) == 1
    assert set(np.unique(split)) == {0, 1, 2}
    out = gpd.read_file(tmp_path / "labels.gpkg")
    assert out.crs.to_epsg() == 32631 and set(out["class_name"]) == {"non_crop", "wheat"}


def test_unknown_label_code_names_file_and_fix(tmp_path: Path, grid: Grid) -> None:
    vec = _fields(tmp_path / "f.gpkg", grid, ["NC", "XYZ"])
    with pytest.raises(LabelError, match=r"f\.gpkg: 1 unknown class code.*'XYZ'.*classes\[\]\.codes"):
        labels.run(vec, tmp_path / "l.tif", tmp_path / "l.gpkg", grid, CLASSES, column="crop")
    assert not (tmp_path / "l.tif").exists(), "nothing half-written"


def test_missing_label_file_names_it_and_the_config_key(tmp_path: Path, grid: Grid) -> None:
    with pytest.raises(LabelError, match=r"fields\.gpkg: no such label file; fix labels\.path"):
        labels.run(tmp_path / "fields.gpkg", tmp_path / "l.tif", tmp_path / "l.gpkg", grid, CLASSES, column="crop")
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".parquet", ".shp"])
def test_user_label_formats(tmp_path: Path, grid: Grid, suffix: str) -> None:
    x0, _, _, y1 = grid.bounds
    gdf = gpd.GeoDataFrame({"crop": ["BTH", "NC"]}, geometry=[box(x0, y1 - 100, x0 + 100, y1), box(x0 + 200, y1 - 100, x0 + 300, y1)], crs=grid.crs)
    path = tmp_path / f"fields{suffix}"
    gdf.to_parquet(path) if suffix == ".parquet" else gdf.to_file(path)
    labels.run(path, tmp_path / "l.tif", tmp_path / "l.gpkg", grid, CLASSES, column="crop", block_size=8)
    with rasterio.open(tmp_path / "l.tif") as src:
        cls = src.read(1)
    assert (cls[:10, :10] == 1).all() and (cls[:10, 20:30] == 0).all()


def test_cross_validation_folds_test_every_block_once() -> None:
    g = Grid(crs="EPSG:32636", xmin=500000, ymax=100000, width=200, height=160, res=10)
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    cls = np.full(g.shape, 255, np.uint8)
    cls[:128, :] = (np.arange(200) // 32 % 3).astype(np.uint8)[None]  # 3 classes in stripes; the last block row unlabelled
    folds = [labels.region_splits(cls, g, 32, fractions, seed=4, folds=3, fold=f) for f in range(3)]
    blocks = [f[::32, ::32] for f in folds]
    tested = np.stack([b == 2 for b in blocks])
    assert tested.shape == (3, 5, 7)
    assert (tested[:, :4].sum(axis=0) == 1).all()  # each of the 28 labelled blocks is tested in exactly one fold
    assert not tested[:, 4].any() and all((b[4] == 0).all() for b in blocks)  # unlabelled blocks only train
    per_fold = [int(((f == 2) & (cls != 255)).sum()) for f in folds]  # dealt evenly by labelled pixels
    assert sum(per_fold) == int((cls != 255).sum()) and max(per_fold) / min(per_fold) < 1.25, per_fold
    for f, b in zip(folds, blocks, strict=True):
        assert 0 < (b[:4] == 1).sum() < (b[:4] == 0).sum()  # validation: a share of the non-test blocks
        assert set(np.unique(cls[(f == 2) & (cls != 255)])) == {0, 1, 2}  # every class in every test fold
    own = labels.region_splits(cls, g, 32, fractions, seed=4)  # compare.folds 1: the labels stage's split
    assert set(np.unique(own[cls != 255])) == {0, 1, 2}
    with pytest.raises(LabelError, match=r"compare\.folds 40"):
        labels.region_splits(cls, g, 32, fractions, 4, folds=40, fold=0)


def test_one_splitter_for_blocks_and_cells() -> None:
    """Blocks of a region and lat/lon cells of a table are dealt by the same function."""
    from cropmap.splits import block_counts, group_counts, group_splits

    rng = np.random.default_rng(1)
    g = Grid(crs="EPSG:32631", xmin=600000, ymax=5000000, width=96, height=96, res=10)
    cls = rng.integers(0, 3, g.shape).astype(np.uint8)
    counts = block_counts(cls, 16, 255)
    assert counts.shape == (36, 256) and counts[:, :3].sum() == 96 * 96
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    per_block = group_splits(counts, seed=3, fractions=fr)
    # the same counts as a table: one sample per pixel, its block as its group
    y, groups = cls.ravel().astype(np.int64), (np.arange(96)[:, None] // 16 * 6 + np.arange(96)[None] // 16).ravel()
    assert (group_counts(y, groups)[:, :3] == counts[:, :3]).all()
    np.testing.assert_array_equal(group_splits(group_counts(y, groups), seed=3, fractions=fr), per_block)
    np.testing.assert_array_equal(labels.region_splits(cls, g, 16, fr, 3)[::16, ::16].ravel(), per_block)
    assert (per_block == 2).sum() in (5, 6) and (per_block == 1).sum() in (5, 6)  # 36 blocks: ~1/7 test, ~1/7 val


def test_write_fold_keeps_classes_and_moves_chip_splits(tmp_path: Path, grid: Grid) -> None:
    import pandas as pd

    x0, y0, x1, y1 = grid.bounds
    xm = (x0 + x1) / 2
    gdf = gpd.GeoDataFrame({"code": ["1", "2"]}, geometry=[box(x0, y0, xm, y1), box(xm, y0, x1, y1)], crs=grid.crs)
    gdf.to_file(tmp_path / "f.gpkg")
    classes = [{"id": 1, "name": "a", "colour": "#ff0000", "codes": ["1"]}, {"id": 2, "name": "b", "colour": "#00ff00", "codes": ["2"]}]
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    labels.run(tmp_path / "f.gpkg", tmp_path / "l.tif", tmp_path / "l.gpkg", grid, classes, block_size=8, fractions=fr, seed=1,
               chip_size=8)
    # 8 px chips tile 40 x 24 px of the 40 x 30 px grid: the last, partial block row has no chip
    chips = pd.DataFrame([{"row": r, "col": c, "size": 8, "split": "x", "n_labelled": 64}
                          for r in range(0, 24, 8) for c in range(0, grid.width, 8)])
    chips.to_parquet(tmp_path / "c.parquet")
    fold.write_fold(tmp_path / "l.tif", tmp_path / "c.parquet", tmp_path / "f1", grid, block_size=8, fractions=fr, seed=1,
                    folds=2, fold=1)
    with rasterio.open(tmp_path / "l.tif") as a, rasterio.open(tmp_path / "f1" / "labels.tif") as b:
        cls = a.read(1)
        assert (cls == b.read(1)).all() and b.colormap(1)[1][:3] == (255, 0, 0)
        split = b.read(2)
    assert (split == labels.region_splits(cls, grid, 8, fr, 1, folds=2, fold=1, chip_size=8)).all()
    assert (split[24:] == 0).all()  # blocks without chips are never test or validation
    assert (split[:24] == 2).any() and (split[:24] == 1).any()
    out = pd.read_parquet(tmp_path / "f1" / "chips.parquet")
    assert [labels.SPLITS[split[r, c]] for r, c in zip(out.row, out.col, strict=True)] == out.split.tolist()

