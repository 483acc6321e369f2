"""Stage ``fold``: the labels and chips of one fold of spatial cross-validation (``compare.folds``).

The split blocks that hold labelled chips are shuffled once and dealt into ``k`` groups; fold
``f`` takes group ``f`` as its test split (:func:`fold_splits`), so every block is tested exactly
once over the folds. :func:`write_fold` copies ``labels.tif`` and ``chips.parquet`` with that
split: class ids, chips and presence stay as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from cropmap.errors import ConfigError, LabelError
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.labels import SPLITS, block_shape, block_splits, expand_blocks, split_counts

log = logging.getLogger(__name__)


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
        raise ConfigError(f"--fold {fold} is not in 0..{folds - 1} (compare.folds {folds}); give one of them")
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
    split = expand_blocks(fold_splits(grid, block_size, fractions, seed, folds, fold, usable), grid, block_size)
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
