"""Segmentation of a tile: overlapping chips on a lattice anchored at the grid origin, blended.

Chips (sliding windows of ``size`` px, ``overlap`` of a chip) lie on a lattice anchored at the
grid origin (not the tile) and are blended with a Hann window whose shifted copies sum to one: a
tile's pixels get exactly the chips they would get if the whole region were predicted at once,
so tiled maps have no seams. Each chip is computed once, in the read unit that holds its
(tile-clipped) top-left corner; the unit reads the halo its chips need from a small cache of
decoded cells shared by the reader threads, so a block is decoded about twice instead of once
per chip.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rasterio.windows import Window

from cropmap.availability import presence_stack
from cropmap.predict.prefetch import CellCache, counted, prefetch, progress_bar
from cropmap.predict.reading import cells, read_region, stack_info, unit_shape
from cropmap.predict.tile import Batch, TileResult, tile_result

if TYPE_CHECKING:
    from cropmap.predict.predictor import Predictor

log = logging.getLogger(__name__)


def hann(size: int) -> np.ndarray:
    """2-D Hann weights whose half-shifted copies sum to one."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


def windows(tile: Window, size: int, stride: int) -> Iterator[Window]:
    """Lattice chips (anchored at the grid origin) that intersect ``tile``."""
    def starts(lo: int, n: int) -> range:
        first = math.floor((lo - size) / stride) + 1
        last = math.floor((lo + n - 1) / stride)
        return range(first * stride, last * stride + 1, stride)

    for r in starts(int(tile.row_off), int(tile.height)):
        for c in starts(int(tile.col_off), int(tile.width)):
            yield Window(c, r, size, size)


def predict_chips(p: Predictor, stacks: dict[str, Path], tile: Window, size: int, overlap: float,
                  progress: bool = False) -> TileResult:
    """Sliding-chip segmentation of ``tile`` with Hann blending (see the module docstring)."""
    stride = max(1, round(size * (1 - overlap)))
    if overlap > 0 and size % 2 == 0 and stride != size // 2:
        log.warning("overlap %.2f: Hann weights sum to one only at 50 %% overlap; blending stays seamless but uneven", overlap)
    h, w = int(tile.height), int(tile.width)
    tr0, tc0 = int(tile.row_off), int(tile.col_off)
    info = stack_info(stacks)
    unit = unit_shape(info)
    uh, uw = unit
    acc = np.zeros((p.n_classes, h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    pres_tile = np.zeros((len(p.modalities), h, w), bool)
    weight = hann(size) if overlap > 0 else np.ones((size, size), np.float32)
    units = cells(tile, unit)
    assigned: dict[tuple[int, int], list[Window]] = {(int(c.row_off) // uh, int(c.col_off) // uw): [] for c in units}
    for win in windows(tile, size, stride):
        r, c = max(int(win.row_off), tr0), max(int(win.col_off), tc0)
        assigned[(r // uh, c // uw)].append(win)
    group = max(1, p.batch_size // (size * size))
    cache = CellCache(capacity=p.readers + 2)
    any_stack = bool(info)

    def produce(cell: Window, put: Callable[[Any], None]) -> None:
        wins = assigned[(int(cell.row_off) // uh, int(cell.col_off) // uw)]
        rows = [int(cell.row_off)] + [int(v.row_off) for v in wins]
        cols = [int(cell.col_off)] + [int(v.col_off) for v in wins]
        r_end = max([int(cell.row_off + cell.height)] + [int(v.row_off) + size for v in wins])
        c_end = max([int(cell.col_off + cell.width)] + [int(v.col_off) + size for v in wins])
        region = Window(min(cols), min(rows), c_end - min(cols), r_end - min(rows))
        rr, rc = int(region.row_off), int(region.col_off)
        arrays = read_region(info, region, unit, cache) if any_stack else {}
        pres = presence_stack(arrays, p.modalities, p.min_valid_fraction, (int(region.height), int(region.width)), p.channels)
        ch, cw = int(cell.height), int(cell.width)
        cr, cc = int(cell.row_off) - rr, int(cell.col_off) - rc
        tr, tc = int(cell.row_off) - tr0, int(cell.col_off) - tc0
        pres_tile[:, tr : tr + ch, tc : tc + cw] = pres[:, cr : cr + ch, cc : cc + cw]
        if any_stack:
            for start in range(0, len(wins), group):
                chunk = wins[start : start + group]
                offs = [(int(v.row_off) - rr, int(v.col_off) - rc) for v in chunk]
                batch: Batch = {}
                for m, a in arrays.items():
                    if m not in p.modalities:
                        continue
                    t = p.buffer((len(chunk), a.shape[0], size, size))
                    np.stack([a[:, r : r + size, c : c + size] for r, c in offs], out=t.numpy())
                    batch[m] = t
                mask = p.buffer((len(chunk), len(p.modalities), size, size), torch.bool)
                np.stack([pres[:, r : r + size, c : c + size] for r, c in offs], out=mask.numpy())
                batch["mask"] = mask
                put((chunk, batch))
        put((None, None))

    def scatter(chunk: list[Window], probs: np.ndarray) -> None:
        for prob, win in zip(probs, chunk, strict=True):
            # intersection of the chip with the tile, in tile and chip coordinates
            r0, c0 = max(int(win.row_off), tr0), max(int(win.col_off), tc0)
            r1, c1 = min(int(win.row_off) + size, tr0 + h), min(int(win.col_off) + size, tc0 + w)
            tr, tc = r0 - tr0, c0 - tc0
            wr, wc = r0 - int(win.row_off), c0 - int(win.col_off)
            ww = weight[wr : wr + r1 - r0, wc : wc + c1 - c0]
            acc[:, tr : tr + r1 - r0, tc : tc + c1 - c0] += prob[:, wr : wr + r1 - r0, wc : wc + c1 - c0] * ww
            wsum[tr : tr + r1 - r0, tc : tc + c1 - c0] += ww

    with progress_bar(len(units), progress, "predict") as bar:
        p.apply(counted(prefetch(units, produce, p.readers), bar), scatter)
    proba = acc / np.maximum(wsum, 1e-12)
    return tile_result(proba, pres_tile, p.modalities)
