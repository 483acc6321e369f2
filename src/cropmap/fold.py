"""Stage ``fold``: one fold of spatial cross-validation (``compare.folds``), for a region or a training set.

The spatial groups that hold labelled samples (a region's split blocks, a training set's
lat/lon cells) are dealt into ``k`` folds by the workflow's one splitter,
:func:`cropmap.splits.group_splits`; fold ``f`` takes its group of folds as the test split, so
every group is tested exactly once over the folds. The stage writes the fold's copy of what the
labels or samples stage wrote, with that split:

* a region: ``labels.tif`` and ``chips.parquet`` (:func:`write_fold`; class ids, chips and
  presence stay as they are; only band 2 of the label raster and the chips' ``split`` change);
* a training set: ``samples.npz`` (:func:`write_samples_fold`; only the ``split`` changes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import rasterio

from cropmap.errors import LabelError
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.labels import SPLITS, region_splits, split_counts

log = logging.getLogger(__name__)


def write_fold(labels_tif: Path, chips: Path, out_dir: Path, grid: Grid, *, block_size: int,
               fractions: dict[str, float], seed: int, folds: int, fold: int) -> dict[str, int]:
    """Write ``out_dir/labels.tif`` and ``out_dir/chips.parquet`` with the splits of one fold.

    Chips lie inside one split block, so a chip's split is its block's. Only labelled pixels
    inside the chips' extent count for the dealing (as in the labels stage).

    Returns:
        Labelled-pixel counts per split of this fold.
    """
    df = pd.read_parquet(chips)
    with rasterio.open(labels_tif) as src:
        prof, cls = src.profile, src.read(1)
        tags = [src.tags(i) for i in (1, 2)]
        cmap = src.colormap(1)
        desc = src.descriptions
    chip_size = int(df["size"].iloc[0]) if len(df) else None
    try:
        split = region_splits(cls, grid, block_size, fractions, seed, folds=folds, fold=fold, chip_size=chip_size)
    except LabelError as exc:
        raise LabelError(f"{labels_tif}: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "labels.tif") as tmp, rasterio.open(tmp, "w", **prof) as dst:
        dst.write(cls, 1)
        dst.write(split, 2)
        dst.descriptions = desc
        dst.write_colormap(1, cmap)
        dst.update_tags(1, **tags[0])
        dst.update_tags(2, **(tags[1] | {"fold": f"{fold} of {folds}"}))
    df["split"] = [SPLITS[split[r, c]] for r, c in zip(df["row"], df["col"], strict=True)]
    with atomic_path(out_dir / "chips.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    counts = split_counts(cls, split)
    log.info("fold %d of %d, labelled pixels per split: %s", fold, folds, counts)
    return counts


def write_samples_fold(samples: Path, out_dir: Path, *, fractions: dict[str, float], seed: int, folds: int,
                       fold: int) -> dict[str, int]:
    """Write ``out_dir/samples.npz``: a training set's samples with the split of one fold.

    Returns:
        Samples per split of this fold.
    """
    from cropmap.samples import read_samples, split_set, write_samples

    s = read_samples(samples)
    split = split_set(s.samples.y, s.group, seed=seed, fractions=fractions, folds=folds, fold=fold,
                      fix=f"lower compare.folds or training_sets.{s.name}.cell_deg")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_samples(s.with_split(split), out_dir / "samples.npz")
    counts = {name: int((split == i).sum()) for i, name in enumerate(SPLITS)}
    log.info("fold %d of %d, samples per split: %s", fold, folds, counts)
    return counts


__all__ = ["write_fold", "write_samples_fold"]
