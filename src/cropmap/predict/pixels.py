"""Classification of a tile: every pixel's time series through the model, streamed unit by unit.

Per pixel, the modalities present are detected from the stacks (a modality with too few valid
months counts as missing) and passed to the model as its mask, so one tile can use S2+S1+DEM on
one side and DEM+weather on the other. Pixels with no modality are nodata, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rasterio.windows import Window

from cropmap.availability import presence_stack
from cropmap.predict.prefetch import counted, prefetch, progress_bar
from cropmap.predict.reading import cells, read_unit, stack_info, unit_shape
from cropmap.predict.tile import Batch, TileResult, tile_result

if TYPE_CHECKING:
    from cropmap.predict.predictor import Predictor


def pixel_batches(p: Predictor, arrays: dict[str, np.ndarray], pres: np.ndarray) -> Iterator[tuple[np.ndarray, Batch]]:
    """``(flat pixel indices, batch)`` for every pixel of ``arrays`` with at least one modality.

    Each batch (at most ``p.batch_size`` pixels) is gathered straight into a contiguous
    ``[n, T, C]`` (pinned on CUDA) by the calling (reader) thread. Modalities absent from the
    files are left out of the batch (the model treats them as unavailable, exactly as a
    NaN-filled, masked input).
    """
    h, w = pres.shape[1:]
    pres_flat = pres.reshape(len(p.modalities), h * w)
    idx = np.flatnonzero(pres_flat.any(axis=0))
    full = len(idx) == h * w
    flat = {m: a.reshape(a.shape[0], h * w) for m, a in arrays.items() if m in p.modalities}
    for start in range(0, len(idx), p.batch_size):
        sel = idx[start : start + p.batch_size]
        n = len(sel)
        batch: Batch = {}
        for m, a in flat.items():
            t = p.buffer((n, a.shape[0]))
            np.copyto(t.numpy(), (a[:, start : start + n] if full else np.take(a, sel, axis=1)).T)
            batch[m] = t.view(n, *p.input_shape(m))
        mask = p.buffer((n, len(p.modalities)), torch.bool)
        np.copyto(mask.numpy(), pres_flat[:, sel].T)
        batch["mask"] = mask
        yield sel, batch


def predict_pixels(p: Predictor, stacks: dict[str, Path], tile: Window, progress: bool = False) -> TileResult:
    """Per-pixel classification of ``tile``, streamed read unit by read unit.

    Reader threads (``p.readers``) read and decode units ahead of the model and cut them into
    batches; the model thread scatters the probabilities into the tile.
    """
    h, w = int(tile.height), int(tile.width)
    info = stack_info(stacks)
    proba = np.zeros((p.n_classes, h * w), np.float32)
    pres_tile = np.zeros((len(p.modalities), h, w), bool)
    units = cells(tile, unit_shape(info))

    def produce(cell: Window, put: Callable[[Any], None]) -> None:
        arrays = read_unit(info, cell)
        ch, cw = int(cell.height), int(cell.width)
        pres = presence_stack(arrays, p.modalities, p.min_valid_fraction, (ch, cw), p.channels)
        r0, c0 = int(cell.row_off - tile.row_off), int(cell.col_off - tile.col_off)
        pres_tile[:, r0 : r0 + ch, c0 : c0 + cw] = pres
        for sel, batch in pixel_batches(p, arrays, pres):
            put(((r0 + sel // cw) * w + c0 + sel % cw, batch))
        put((None, None))  # end of block (progress)

    with progress_bar(len(units), progress, "predict") as bar:
        def scatter(flat_idx: np.ndarray, probs: np.ndarray) -> None:
            proba[:, flat_idx] = probs.T

        p.apply(counted(prefetch(units, produce, p.readers), bar), scatter)
    return tile_result(proba.reshape(p.n_classes, h, w), pres_tile, p.modalities)
