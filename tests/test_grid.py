"""Region grids: UTM zone, snapping, tiles and mismatch detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from cropmap.errors import ConfigError, GridMismatchError
from cropmap.grid import Grid, season_months, tile_window, tiles, utm_epsg


def test_utm_zone_and_snapping() -> None:
    assert utm_epsg(4.85, 45.7) == 32631
    assert utm_epsg(-70.0, -33.0) == 32719
    g = Grid.from_bbox([4.80, 45.70, 4.93, 45.79])
    assert g.crs == "EPSG:32631"
    assert g.xmin % 10 == 0 and g.ymax % 10 == 0
    assert 1000 <= g.width <= 1100 and 1000 <= g.height <= 1050


def test_antimeridian_bbox_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="antimeridian"):
        Grid.from_bbox([179.9, -17.0, -179.9, -16.9])


def test_region_across_utm_zone_edge_uses_centroid_zone() -> None:
    g = Grid.from_bbox([5.99, 45.7, 6.02, 45.72])  # zone 31/32 boundary at 6°E
    assert g.crs == "EPSG:32632"
    assert g.width > 0 and g.height > 0


def test_months() -> None:
    assert season_months("2022-11", "2023-02") == ["2022-11", "2022-12", "2023-01", "2023-02"]
    with pytest.raises(ConfigError, match="YYYY-MM"):
        season_months("2023-13", "2023-12")


def test_tiles_cover_grid_exactly() -> None:
    g = Grid(crs="EPSG:32631", res=10, xmin=0, ymax=1000, width=150, height=70)
    names = tiles(g, 64)
    cover = np.zeros(g.shape, int)
    for n in names:
        w = tile_window(g, n, 64)
        cover[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert (cover == 1).all()


def test_check_detects_wrong_grid(tmp_path: Path) -> None:
    g = Grid(crs="EPSG:32631", res=10, xmin=600000, ymax=5000000, width=32, height=32)
    p = tmp_path / "a.tif"
    with rasterio.open(p, "w", **g.profile(1)) as dst:
        dst.write(np.zeros((1, 32, 32), np.float32))
    g.check(p)
    shifted = Grid(crs=g.crs, res=10, xmin=600010, ymax=5000000, width=32, height=32)
    with pytest.raises(GridMismatchError, match=str(p)):
        shifted.check(p)
