"""One spatial splitter for raster labels and sample tables (:func:`group_splits`).

Labelled samples are grouped spatially: a region's labelled pixels by split block
(``split.block_size`` px squares, :func:`block_counts`), a training set's samples by lat/lon
cell (``cell_deg``, :func:`cropmap.tables.common.location_groups`). Whole groups are dealt into
folds, keeping each fold's class proportions as close to the whole's as whole groups allow:
the greedy of scikit-learn's ``StratifiedGroupKFold`` (:func:`deal`), run on per-group class
counts, so a region's millions of pixels cost one count per block and class.

* ``compare.folds`` = k > 1: the groups are dealt into k folds and fold f is the test split of
  cross-validation fold f, so every group is tested exactly once over the folds.
* ``compare.folds`` = 1: the groups are dealt into ``n = round(1 / test share)`` folds (7 for the
  default 0.15; at most one per group) and fold ``seed % n`` is the test split. The dealing
  itself hardly depends on the seed (its shuffle only breaks ties), so the rotation is what makes
  another seed test other places.

Of the remaining groups, the validation share ``val / (train + val)`` is taken the same way:
they are dealt into ``m = round((train + val) / val)`` folds (6 for the defaults) and fold
``seed % m`` validates; the rest trains. Groups without labelled samples train (they hold
nothing to score).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cropmap.errors import ConfigError, LabelError

#: Split ids of :func:`group_splits` (as in ``labels.tif`` band 2 and ``chips.parquet``).
TRAIN, VAL, TEST = 0, 1, 2


def deal(counts: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Deal groups into ``k`` folds with balanced class proportions.

    The greedy of scikit-learn's ``StratifiedGroupKFold`` on class counts: the groups, shuffled
    (``seed``), are taken in order of decreasing spread of their class counts, and each goes to
    the fold where the per-class shares of the folds spread least (ties: the fold with fewer
    samples).

    Args:
        counts: ``[G, K]`` samples of each class in each group.
        k: number of folds.
        seed: seeds the shuffle.

    Returns:
        int64 ``[G]``: the fold of each group.
    """
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[:, counts.sum(axis=0) > 0]
    g = len(counts)
    perm = np.arange(g)
    np.random.RandomState(seed).shuffle(perm)
    shuffled = counts[perm]
    total = shuffled.sum(axis=0)
    order = np.argsort(-np.std(shuffled, axis=1), kind="stable")
    per_fold = np.zeros((k, counts.shape[1]))
    eye = np.eye(k)[:, :, None]
    fold_of = np.empty(g, dtype=np.int64)
    for gi in order:
        c = shuffled[gi]
        # per candidate fold i: the spread of the class shares over the folds if the group went to i
        spread = np.std((per_fold[None] + eye * c[None, None]) / total, axis=1).mean(axis=1)
        sizes = per_fold.sum(axis=1)
        best, best_spread, best_size = 0, math.inf, math.inf
        for i in range(k):
            if spread[i] < best_spread or (np.isclose(spread[i], best_spread) and sizes[i] < best_size):
                best, best_spread, best_size = i, float(spread[i]), float(sizes[i])
        per_fold[best] += c
        fold_of[perm[gi]] = best
    return fold_of


def group_splits(counts: np.ndarray, *, seed: int, fractions: Mapping[str, float], folds: int = 1, fold: int = 0,
                 what: str = "spatial groups", fix: str = "use smaller spatial groups") -> np.ndarray:
    """Split id per spatial group (0 train, 1 val, 2 test), the same rule for blocks and cells.

    Args:
        counts: ``[G, K]`` labelled samples of each class per group (:func:`block_counts`, :func:`group_counts`).
        seed: the config's seed.
        fractions: ``{train, val, test}`` shares (normalised).
        folds: ``compare.folds``; 1 is the workflow's own split.
        fold: with ``folds > 1``, the cross-validation fold whose test split this is.
        what: the groups, for messages (``"split blocks of 64 px"``).
        fix: what the user can do when there are too few groups.

    Returns:
        uint8 ``[G]``.

    Raises:
        LabelError: fewer groups with labelled samples than the split needs (one line with ``fix``).
    """
    total = sum(float(fractions[s]) for s in ("train", "val", "test"))
    f_train, f_val, f_test = (float(fractions[s]) / total for s in ("train", "val", "test"))
    counts = np.asarray(counts)
    labelled = np.flatnonzero(counts.sum(axis=1) > 0)
    n = len(labelled)
    if folds > 1:
        if not 0 <= fold < folds:
            raise ConfigError(f"--fold {fold} is not in 0..{folds - 1} (compare.folds {folds}); give one of them")
        if n < folds + 2:
            raise LabelError(f"compare.folds {folds}: only {n} {what} hold labelled samples, a fold needs test, validation and "
                             f"training groups; lower compare.folds to at most {max(n - 2, 1)} or {fix}")
        k, test = folds, fold
    else:
        if n < 3:
            raise LabelError(f"only {n} {what} hold labelled samples; a split needs at least 3 (training, validation, test): {fix}")
        k = min(max(3, round(1 / f_test)), n) if f_test > 0 else n
        test = seed % k
    split = np.zeros(len(counts), dtype=np.uint8)
    fold_of = deal(counts[labelled], k, seed)
    rest = labelled[fold_of != test]
    m = min(max(2, round((f_train + f_val) / f_val)) if f_val > 0 else 2, len(rest))
    sub = deal(counts[rest], m, seed) if m > 0 else np.zeros(0, np.int64)
    if len(rest) == n or (sub == seed % max(m, 1)).all():
        raise LabelError(f"the {n} {what} that hold labelled samples leave no {'test' if len(rest) == n else 'training'} "
                         f"group in the split; {fix}")
    split[labelled[fold_of == test]] = TEST
    split[rest[sub == seed % m]] = VAL
    return split


def group_counts(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``[G, K]`` labelled samples (``y >= 0``) of each class per group id ``0 .. G-1``."""
    y, groups = np.asarray(y), np.asarray(groups)
    g = int(groups.max()) + 1 if len(groups) else 0
    k = int(y.max()) + 1 if (y >= 0).any() else 1
    out = np.zeros((g, k), dtype=np.int64)
    ok = y >= 0
    np.add.at(out, (groups[ok], y[ok]), 1)
    return out


def block_counts(cls: np.ndarray, block_size: int, nodata: int, extent: tuple[int, int] | None = None) -> np.ndarray:
    """``[nby * nbx, 256]`` labelled pixels of each class per split block of a class raster.

    Args:
        cls: ``[H, W]`` uint8 class ids (``nodata`` unlabelled).
        block_size: side of the split blocks (px); blocks are numbered row-major.
        nodata: the unlabelled value.
        extent: ``(rows, cols)`` from the top-left corner where samples can be drawn (the
            chips' extent); pixels outside are not counted.
    """
    h, w = cls.shape
    nby, nbx = -(-h // block_size), -(-w // block_size)
    rows, cols = extent if extent is not None else (h, w)
    out = np.zeros((nby * nbx, 256), dtype=np.int64)
    col_block = np.arange(min(cols, w)) // block_size
    for by in range(nby):
        band = cls[by * block_size : min((by + 1) * block_size, rows, h), : min(cols, w)]
        ok = band != nodata
        if not ok.any():
            continue
        ids = np.broadcast_to(col_block, band.shape)[ok] * 256 + band[ok].astype(np.int64)
        out[by * nbx : (by + 1) * nbx] += np.bincount(ids, minlength=nbx * 256).reshape(nbx, 256)
    return out
