"""Stage ``labels``: rasterise labelled field polygons onto the grid and split it spatially.

``labels.tif`` has two uint8 bands: ``class`` (class id, 255 = unlabelled, with colour table)
and ``split`` (0 train, 1 val, 2 test). Splits are assigned per square block of
``block_size`` pixels, so no block (and no field inside one block) is in two splits; the blocks
are dealt by :func:`cropmap.splits.group_splits`, the splitter of training sets too (the
cross-validation folds of ``compare.folds`` are :mod:`cropmap.fold`).
``labels.gpkg`` holds the polygons reprojected to the grid CRS with ``class_id``/``class_name``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.features import rasterize

from cropmap.errors import LabelError, brief
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.splits import block_counts, group_splits

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NODATA = 255


def hex_to_rgba(colour: str) -> tuple[int, int, int, int]:
    """``#rrggbb`` -> ``(r, g, b, 255)``."""
    c = colour.lstrip("#")
    return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16), 255)


def colormap(classes: Sequence[dict]) -> dict[int, tuple[int, int, int, int]]:
    """Colour table for the class band (nodata transparent)."""
    cmap = {c["id"]: hex_to_rgba(c.get("colour", "#808080")) for c in classes}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap


def code_table(classes: Sequence[dict]) -> dict[str, int]:
    """Map every accepted code (class name, id and listed codes, as strings) to a class id."""
    table: dict[str, int] = {}
    for c in classes:
        table[str(c["name"])] = c["id"]
        for code in c.get("codes", []):
            table[str(code)] = c["id"]
    return table


def read_labels(path: Path, column: str, classes: Sequence[dict], grid: Grid, layer: str | None = None) -> gpd.GeoDataFrame:
    """Read a vector label file, reproject it to the grid CRS and map its codes to class ids.

    Raises:
        LabelError: naming the file and the fix, for a missing file or column or unknown codes.
    """
    if not Path(path).is_file():
        raise LabelError(f"{path}: no such label file; fix labels.path of the region in config.yaml "
                         "(relative paths start from the folder snakemake runs in)")
    try:
        if Path(path).suffix.lower() in (".parquet", ".geoparquet"):
            gdf = gpd.read_parquet(path)
        else:
            gdf = gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several types
        raise LabelError(f"{path}: cannot read the label file ({brief(exc)}); give a GeoPackage, GeoJSON, GeoParquet or Shapefile") from None
    if column not in gdf.columns:
        raise LabelError(f"{path}: no column {column!r} (columns: {[c for c in gdf.columns if c != 'geometry']}); set labels.column in config")
    if gdf.crs is None:
        raise LabelError(f"{path}: the file has no CRS; save it with one (e.g. EPSG:4326)")
    table = code_table(classes)
    codes = gdf[column].astype(str)
    unknown = sorted(set(codes) - set(table))
    if unknown:
        raise LabelError(
            f"{path}: {len(unknown)} unknown class code(s) in column {column!r}, e.g. {unknown[:5]}; "
            "add them to a class's codes in config.yaml (classes[].codes) or drop those features"
        )
    names = {c["id"]: c["name"] for c in classes}
    gdf = gdf.to_crs(grid.crs)
    out = gpd.GeoDataFrame(
        {"class_id": codes.map(table).astype("int64"), "code": codes},
        geometry=gdf.geometry.values, crs=gdf.crs,
    )
    out["class_name"] = out["class_id"].map(names)
    return out[~out.geometry.is_empty & out.geometry.notna()]


def block_shape(grid: Grid, block_size: int) -> tuple[int, int]:
    """Number of split blocks ``(rows, cols)`` covering ``grid`` (edge blocks are partial)."""
    return -(-grid.height // block_size), -(-grid.width // block_size)


def expand_blocks(blocks: np.ndarray, grid: Grid, block_size: int) -> np.ndarray:
    """Per-pixel ``[H, W]`` raster from per-block values ``[ceil(H/bs), ceil(W/bs)]``."""
    full = np.kron(blocks, np.ones((block_size, block_size), dtype=blocks.dtype))
    return full[: grid.height, : grid.width]


def region_splits(cls: np.ndarray, grid: Grid, block_size: int, fractions: dict[str, float], seed: int, *,
                  folds: int = 1, fold: int = 0, chip_size: int | None = None) -> np.ndarray:
    """Per-pixel split id ``[H, W]``: :func:`cropmap.splits.group_splits` over the split blocks.

    Each block's labelled pixels per class (inside the chips' extent, ``chip_size`` px chips
    from the top-left corner, where training and metrics draw their samples) are what the
    splitter deals; the same rule splits a training set's lat/lon cells.

    Args:
        cls: ``[H, W]`` class ids (``NODATA`` unlabelled).
        folds, fold: ``compare.folds`` and the cross-validation fold (``folds == 1``: the
            labels stage's own split).
    """
    extent = (grid.height // chip_size * chip_size, grid.width // chip_size * chip_size) if chip_size else None
    counts = block_counts(cls, block_size, NODATA, extent)
    ids = group_splits(counts, seed=seed, fractions=fractions, folds=folds, fold=fold, what=f"split blocks of {block_size} px",
                       fix="lower split.block_size or enlarge the region")
    return expand_blocks(ids.reshape(block_shape(grid, block_size)), grid, block_size)


def split_counts(cls: np.ndarray, split: np.ndarray) -> dict[str, int]:
    """Labelled pixels (class not nodata) per split name of a ``[H, W]`` split raster."""
    return {s: int(((cls != NODATA) & (split == i)).sum()) for i, s in enumerate(SPLITS)}


def run(
    vector: Path, out_tif: Path, out_gpkg: Path, grid: Grid, classes: Sequence[dict], *,
    column: str = "code", layer: str | None = None, block_size: int = 64,
    fractions: dict[str, float] | None = None, seed: int = 0, chip_size: int | None = None,
) -> dict[str, int]:
    """Rasterise labels and write ``labels.tif`` + ``labels.gpkg``.

    Args:
        chip_size: ``chips.size``: only labelled pixels inside the chips' extent count for the split.

    Returns:
        Labelled-pixel counts per split.
    """
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    gdf = read_labels(vector, column, classes, grid, layer)
    if not len(gdf):
        raise LabelError(f"{vector}: no fields with a geometry{f' in layer {layer!r}' if layer else ''}; "
                         "give a label file (or labels.layer) that holds the region's fields")
    cls = rasterize(
        ((g, int(c)) for g, c in zip(gdf.geometry, gdf["class_id"], strict=True)),
        out_shape=grid.shape, transform=grid.transform, fill=NODATA, dtype="uint8",
    )
    if not (cls != NODATA).any():
        raise LabelError(f"{vector}: none of its {len(gdf)} fields covers a pixel of the region's grid "
                         f"({grid.crs}, bounds {tuple(round(v) for v in grid.bounds)}); check the file covers the "
                         "region's bbox and carries the right CRS")
    try:
        split = region_splits(cls, grid, block_size, fractions, seed, chip_size=chip_size)
    except LabelError as exc:
        raise LabelError(f"{vector}: {exc}") from None
    counts = split_counts(cls, split)
    log.info("labelled pixels per split: %s", counts)
    # split of each polygon: the block of its representative point
    pts = gdf.geometry.representative_point()
    col = ((pts.x - grid.xmin) // grid.res).clip(0, grid.width - 1).astype(int)
    row = ((grid.ymax - pts.y) // grid.res).clip(0, grid.height - 1).astype(int)
    gdf = gdf.assign(split=[SPLITS[split[r, c]] for r, c in zip(row, col, strict=True)])
    prof = grid.profile(2, dtype="uint8", nodata=NODATA)
    # both files are written only once everything is known to be fine, each atomically
    with atomic_path(out_tif) as tmp_tif, atomic_path(out_gpkg) as tmp_gpkg:
        with rasterio.open(tmp_tif, "w", **prof) as dst:
            dst.write(cls, 1)
            dst.write(split, 2)
            dst.descriptions = ("class", "split")
            dst.write_colormap(1, colormap(classes))
            dst.update_tags(1, **{f"class_{c['id']}": c["name"] for c in classes})
            dst.update_tags(2, split_values="0=train,1=val,2=test")
        gdf.to_file(tmp_gpkg, driver="GPKG", layer="labels")
    return counts
