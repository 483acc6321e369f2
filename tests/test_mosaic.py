"""Maps: a valid COG with mode overviews, a palette GDAL reads, names in metadata, a STAC item."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from cropmap import mosaic
from cropmap.grid import Grid, tile_window, tiles
from cropmap.labels import NODATA
from cropmap.predict import TileResult, write_tile

CLASSES = [
    {"id": 0, "name": "non_crop", "colour": "#9e9e9e"},
    {"id": 1, "name": "wheat", "colour": "#e6c229"},
    {"id": 2, "name": "barley", "colour": "#f1a208"},
    {"id": 3, "name": "maize", "colour": "#3f8f29"},
    {"id": 4, "name": "rapeseed", "colour": "#f7f052"},
    {"id": 5, "name": "sunflower", "colour": "#d1495b"},
]
K = len(CLASSES)
SIZE, TILE = 1024, 512


@pytest.fixture(scope="module")
def grid() -> Grid:
    return Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """Classes 1 and 5 in a checkerboard of 100 px squares (not aligned to any overview), a nodata corner."""
    r, c = np.indices((SIZE, SIZE))
    cls = np.where((r // 100 + c // 100) % 2 == 0, 1, 5).astype(np.uint8)
    cls[900:, 880:] = NODATA
    return cls


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory, grid: Grid, truth: np.ndarray) -> tuple[Path, Path]:
    """Tiles (with probability bands) mosaicked into ``map.tif`` and ``probabilities.tif``."""
    d = tmp_path_factory.mktemp("maps")
    paths = []
    for name in tiles(grid, TILE):
        w = tile_window(grid, name, TILE)
        cls = truth[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width]
        valid = cls != NODATA
        proba = np.full((K, *cls.shape), 0.02, np.float32)
        for k in range(K):
            proba[k][cls == k] = 0.9
        proba[:, ~valid] = 0
        res = TileResult(cls.copy(), np.where(valid, 90, 0).astype(np.uint8), np.where(valid, 0b1011, 0).astype(np.uint8), proba)
        paths.append(d / "tiles" / f"{name}.tif")
        paths[-1].parent.mkdir(exist_ok=True)
        write_tile(res, paths[-1], grid, w, probabilities=True)
    out, proba_out = d / "map.tif", d / "probabilities.tif"
    mosaic.mosaic_to_cog(paths, out, grid, CLASSES, tags={"cropmap_region": "test"}, proba_out=proba_out)
    return out, proba_out


def test_map_is_a_valid_cog_with_the_mosaicked_pixels(mapped: tuple[Path, Path], truth: np.ndarray) -> None:
    ok, errors, _ = cog_validate(str(mapped[0]))
    assert ok, errors
    with rasterio.open(mapped[0]) as src:
        assert src.count == 3 and src.dtypes[0] == "uint8" and src.nodata == NODATA
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        assert src.descriptions == ("class", "confidence", "modalities")
        assert (src.read(1) == truth).all()
        assert (src.read(3)[truth != NODATA] == 0b1011).all()


def test_overviews_use_mode_and_never_invent_a_class(mapped: tuple[Path, Path], truth: np.ndarray) -> None:
    with rasterio.open(mapped[0]) as src:
        factors = src.overviews(1)
    assert factors, "no internal overviews"
    for level, f in enumerate(factors):
        with rasterio.open(mapped[0], overview_level=level) as ov:
            arr = ov.read(1)
        assert set(np.unique(arr).tolist()) <= {1, 5, NODATA}  # an average of 1 and 5 would give 3
        # every overview pixel holds a class present in its full-resolution footprint
        n = SIZE // f
        blocks = truth[: n * f, : n * f].reshape(n, f, n, f)
        for k in (1, 5):
            present = (blocks == k).any(axis=(1, 3))
            assert not (arr[:n, :n] == k)[~present].any(), f"class {k} in an overview cell without it (x{f})"


def test_colour_table_and_class_names_are_read_back(mapped: tuple[Path, Path]) -> None:
    assert mapped[0].with_name("map.tif.aux.xml").exists() and mapped[0].with_suffix(".qml").exists()
    with rasterio.open(mapped[0]) as src:
        cmap = src.colormap(1)
        tags = src.tags(1)
        assert src.tags()["cropmap_region"] == "test"
    for c in CLASSES:
        rgb = tuple(int(c["colour"][i : i + 2], 16) for i in (1, 3, 5))
        assert cmap[c["id"]][:3] == rgb
    assert json.loads(tags["class_names"]) == {str(c["id"]): c["name"] for c in CLASSES}
    assert tags["class_1"] == "wheat"


def test_probability_cog_validates_and_sums_to_about_100(mapped: tuple[Path, Path], truth: np.ndarray) -> None:
    ok, errors, _ = cog_validate(str(mapped[1]))
    assert ok, errors
    with rasterio.open(mapped[1]) as src:
        assert src.count == K and src.overviews(1)
        assert src.descriptions == tuple(f"proba_{c['name']}" for c in CLASSES)
        p = src.read(window=Window(0, 0, 300, 300)).astype(int)
    assert (np.abs(p.sum(axis=0) - 100) <= K).all()
    assert (p.argmax(axis=0) == truth[:300, :300]).all()


def test_stac_item_describes_bands_classes_dates(mapped: tuple[Path, Path], tmp_path: Path) -> None:
    item = mosaic.stac_item(mapped[0], tmp_path / "map.json", "test", CLASSES, bbox=[4.8, 45.7, 4.93, 45.79],
                          months=["2023-01", "2023-12"], sources={"s2": "synthetic"}, model={"method": "comiss"},
                          proba_tif=mapped[1])
    assert json.loads((tmp_path / "map.json").read_text()) == item
    props = item["properties"]
    assert props["start_datetime"].startswith("2023-01") and props["end_datetime"].startswith("2023-12")
    assert props["proj:shape"] == [SIZE, SIZE] and props["proj:code"] == "EPSG:32631"
    bands = item["assets"]["map"]["raster:bands"]
    assert [b["name"] for b in bands] == ["class", "confidence", "modalities"]
    assert [c["value"] for c in bands[0]["classification:classes"]] == [c["id"] for c in CLASSES]
    assert props["cropmap:sources"] == {"s2": "synthetic"} and props["cropmap:model"] == {"method": "comiss"}
    proba = item["assets"]["probabilities"]
    assert proba["href"] == "./probabilities.tif"
    assert [b["name"] for b in proba["raster:bands"]] == [f"proba_{c['name']}" for c in CLASSES]


def test_quicklook_png_is_written(mapped: tuple[Path, Path], tmp_path: Path) -> None:
    png = tmp_path / "quicklook.png"
    mosaic.quicklook(mapped[0], png, CLASSES, max_px=256)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quicklook_title_names_the_task_and_method(mapped: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    title = mosaic.map_title("demo", {"task": "segmentation", "method": "comiss", "trained_on": "demo"})
    assert title == "cropmap demo: segmentation (comiss)"
    assert mosaic.map_title("b", {"task": "classification", "method": "imt", "trained_on": "a"}) == (
        "cropmap b: classification (imt), model of a")
    png = tmp_path / "quicklook.png"
    mosaic.quicklook(mapped[0], png, CLASSES, max_px=256, title=title)
    with Image.open(png) as im:
        assert im.text["Title"] == title
