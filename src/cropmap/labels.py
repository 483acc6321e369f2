"""Stage ``labels``: rasterise labelled field polygons onto the grid and split it spatially.

``labels.tif`` has two uint8 bands: ``class`` (class id, 255 = unlabelled, with colour table)
and ``split`` (0 train, 1 val, 2 test). Splits are assigned per square block of
``block_size`` pixels, so no block (and no field inside one block) is in two splits.
``labels.gpkg`` holds the polygons reprojected to the grid CRS with ``class_id``/``class_name``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from rasterio.features import rasterize

from cropmap.errors import LabelError
from cropmap.grid import Grid
from cropmap.io import atomic_path

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
        raise LabelError(f"{path}: cannot read the label file ({str(exc).splitlines()[0]}); give a GeoPackage, GeoJSON, GeoParquet or Shapefile") from None
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


def block_splits(grid: Grid, block_size: int, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split id per block: ``[ceil(H/bs), ceil(W/bs)]`` uint8 with values 0/1/2.

    Every split gets at least one block when there are three or more blocks.
    """
    nby, nbx = block_shape(grid, block_size)
    n = nby * nbx
    total = sum(fractions[s] for s in SPLITS)
    n_val = round(fractions["val"] / total * n)
    n_test = round(fractions["test"] / total * n)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
        n_val = min(n_val, n - 2)
        n_test = min(n_test, n - 1 - n_val)
    ids = np.zeros(n, dtype=np.uint8)
    order = np.random.default_rng(seed).permutation(n)
    ids[order[:n_val]] = 1
    ids[order[n_val : n_val + n_test]] = 2
    return ids.reshape(nby, nbx)


def fold_splits(grid: Grid, block_size: int, fractions: dict[str, float], seed: int, folds: int, fold: int,
                usable: np.ndarray | None = None) -> np.ndarray:
    """Split id per block for fold ``fold`` of ``folds``-fold spatial cross-validation.

    The blocks are shuffled once (``seed``) and dealt into ``folds`` groups of equal size
    (+-1); group ``fold`` is the test split, so every block is tested exactly once over the
    folds. Of the other blocks, the share ``val / (train + val)`` of ``fractions`` (at least
    one) becomes the validation split, the rest trains. ``folds == 1`` is :func:`block_splits`.

    Args:
        usable: optional bool ``[ceil(H/bs), ceil(W/bs)]``: blocks that hold labelled chips. Only
            these are dealt (others stay train and hold no sample), so no fold gets an empty
            test or validation split from edge blocks without chips.

    Raises:
        LabelError: if the region has fewer blocks than ``folds + 2`` (a fold needs test,
            validation and training blocks).
    """
    if folds == 1:
        return block_splits(grid, block_size, fractions, seed)
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is not in 0..{folds - 1}")
    nby, nbx = block_shape(grid, block_size)
    ok = np.ones(nby * nbx, dtype=bool) if usable is None else np.asarray(usable, dtype=bool).reshape(-1)
    cand = np.flatnonzero(ok)
    n = len(cand)
    if n < folds + 2:
        raise LabelError(f"compare.folds {folds}: the region has only {n} split blocks of {block_size} px with labelled chips; "
                         f"lower compare.folds to at most {max(n - 2, 1)} or lower split.block_size")
    order = cand[np.random.default_rng(seed).permutation(n)]
    group = np.full(nby * nbx, -1, dtype=np.int64)
    group[order] = np.arange(n) % folds
    ids = np.zeros(nby * nbx, dtype=np.uint8)
    ids[group == fold] = 2
    rest = order[group[order] != fold]  # non-test blocks in shuffled order
    n_val = max(1, round(fractions["val"] / (fractions["train"] + fractions["val"]) * len(rest)))
    ids[rest[: min(n_val, len(rest) - 1)]] = 1
    return ids.reshape(nby, nbx)


def split_raster(grid: Grid, block_size: int, fractions: dict[str, float], seed: int,
                 folds: int = 1, fold: int = 0, usable: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel split id ``[H, W]`` expanded from :func:`fold_splits`."""
    blocks = fold_splits(grid, block_size, fractions, seed, folds, fold, usable)
    full = np.kron(blocks, np.ones((block_size, block_size), dtype=np.uint8))
    return full[: grid.height, : grid.width]


def split_counts(cls: np.ndarray, split: np.ndarray) -> dict[str, int]:
    """Labelled pixels (class not nodata) per split name of a ``[H, W]`` split raster."""
    return {s: int(((cls != NODATA) & (split == i)).sum()) for i, s in enumerate(SPLITS)}


def write_fold(labels_tif: Path, chips: Path, out_tif: Path, out_chips: Path, grid: Grid, *, block_size: int,
               fractions: dict[str, float], seed: int, folds: int, fold: int) -> dict[str, int]:
    """Copy ``labels.tif`` and ``chips.parquet`` with the splits of one cross-validation fold.

    Class ids, chips and presence stay as they are; only band 2 of the label raster and the
    ``split`` column of the chip table change (chips lie inside one block, so a chip's split is
    its block's).

    Returns:
        Labelled-pixel counts per split of this fold.
    """
    df = pd.read_parquet(chips)
    usable = np.zeros(block_shape(grid, block_size), dtype=bool)
    lab = df[df["n_labelled"] > 0]
    usable[lab["row"] // block_size, lab["col"] // block_size] = True
    split = split_raster(grid, block_size, fractions, seed, folds, fold, usable)
    with rasterio.open(labels_tif) as src:
        prof, cls = src.profile, src.read(1)
        tags = [src.tags(i) for i in (1, 2)]
        cmap = src.colormap(1)
        desc = src.descriptions
    with atomic_path(out_tif) as tmp, rasterio.open(tmp, "w", **prof) as dst:
        dst.write(cls, 1)
        dst.write(split, 2)
        dst.descriptions = desc
        dst.write_colormap(1, cmap)
        dst.update_tags(1, **tags[0])
        dst.update_tags(2, **(tags[1] | {"fold": f"{fold} of {folds}"}))
    df["split"] = [SPLITS[split[r, c]] for r, c in zip(df["row"], df["col"], strict=True)]
    with atomic_path(out_chips) as tmp:
        df.to_parquet(tmp, index=False)
    counts = split_counts(cls, split)
    log.info("fold %d of %d, labelled pixels per split: %s", fold, folds, counts)
    if counts["train"] == 0 or counts["test"] == 0:
        raise LabelError(f"{labels_tif}: fold {fold} of compare.folds {folds} has no labelled pixel in its "
                         f"{'training' if counts['train'] == 0 else 'test'} split; lower compare.folds or split.block_size")
    return counts


def run(
    vector: Path, out_tif: Path, out_gpkg: Path, grid: Grid, classes: Sequence[dict], *,
    column: str = "code", layer: str | None = None, block_size: int = 64,
    fractions: dict[str, float] | None = None, seed: int = 0,
) -> dict[str, int]:
    """Rasterise labels and write ``labels.tif`` + ``labels.gpkg``.

    Returns:
        Labelled-pixel counts per split.
    """
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    gdf = read_labels(vector, column, classes, grid, layer)
    cls = rasterize(
        ((g, int(c)) for g, c in zip(gdf.geometry, gdf["class_id"], strict=True)),
        out_shape=grid.shape, transform=grid.transform, fill=NODATA, dtype="uint8",
    ) if len(gdf) else np.full(grid.shape, NODATA, np.uint8)
    split = split_raster(grid, block_size, fractions, seed)
    prof = grid.profile(2, dtype="uint8", nodata=NODATA)
    with atomic_path(out_tif) as tmp, rasterio.open(tmp, "w", **prof) as dst:
        dst.write(cls, 1)
        dst.write(split, 2)
        dst.descriptions = ("class", "split")
        dst.write_colormap(1, colormap(classes))
        dst.update_tags(1, **{f"class_{c['id']}": c["name"] for c in classes})
        dst.update_tags(2, split_values="0=train,1=val,2=test")
    # split of each polygon: the block of its representative point
    pts = gdf.geometry.representative_point()
    col = ((pts.x - grid.xmin) // grid.res).clip(0, grid.width - 1).astype(int)
    row = ((grid.ymax - pts.y) // grid.res).clip(0, grid.height - 1).astype(int)
    gdf = gdf.assign(split=[SPLITS[split[r, c]] for r, c in zip(row, col, strict=True)])
    with atomic_path(out_gpkg) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="labels")
    counts = split_counts(cls, split)
    log.info("labelled pixels per split: %s", counts)
    if counts["train"] == 0:
        raise LabelError(f"{vector}: no labelled pixel falls in the training split of this region; check the file covers the bbox")
    return counts
