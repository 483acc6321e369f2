"""Reading a tile's stacks in *units*: windows aligned to the stacks' internal blocks.

A unit is a whole number of the stacks' blocks, about :data:`UNIT` px a side (256 px blocks for
the stacks of :meth:`cropmap.grid.Grid.profile`), on a lattice anchored at the grid origin, so
every compressed block is read with GDAL's aligned fast path and decoded once. Files are opened
per unit, so GDAL's block cache never outgrows one unit. Segmentation windows reach across unit
borders: :func:`read_region` assembles any window from whole, cached unit cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from cropmap.predict.prefetch import CellCache

#: Side (pixels) of a read unit when the stacks' blocks are smaller or striped.
UNIT = 256


@dataclass(frozen=True)
class StackInfo:
    """What the readers need to know of a stack file."""

    path: Path
    count: int
    width: int
    height: int
    block: tuple[int, int]


def stack_info(stacks: dict[str, Path]) -> dict[str, StackInfo]:
    """:class:`StackInfo` of each stack file."""
    info = {}
    for m, p in stacks.items():
        with rasterio.open(p) as src:
            info[m] = StackInfo(Path(p), src.count, src.width, src.height, tuple(src.block_shapes[0]))  # type: ignore[arg-type]
    return info


def unit_shape(info: dict[str, StackInfo]) -> tuple[int, int]:
    """Read unit: a whole number of the stacks' blocks, about :data:`UNIT` px (full rows if striped)."""
    if not info:
        return UNIT, UNIT
    first = next(iter(info.values()))
    bh, bw = first.block
    uh = bh * max(1, round(UNIT / bh))
    uw = first.width if bw >= first.width else bw * max(1, round(UNIT / bw))
    return uh, uw


def cells(win: Window, unit: tuple[int, int]) -> list[Window]:
    """Unit-lattice cells (anchored at the grid origin) intersected with ``win``, row-major."""
    uh, uw = unit
    r0, c0 = int(win.row_off), int(win.col_off)
    r1, c1 = r0 + int(win.height), c0 + int(win.width)
    out = []
    for r in range(r0 - r0 % uh, r1, uh):
        for c in range(c0 - c0 % uw, c1, uw):
            rr, cc = max(r, r0), max(c, c0)
            out.append(Window(cc, rr, min(c + uw, c1) - cc, min(r + uh, r1) - rr))
    return out


def read_boundless(src: Any, info: StackInfo, win: Window) -> np.ndarray:
    """Read ``win`` (any bounds) of an open raster as float32, NaN outside it, with one in-bounds read."""
    r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + h, info.height), min(c0 + w, info.width)
    if rr0 == r0 and cc0 == c0 and rr1 == r0 + h and cc1 == c0 + w:
        return src.read(window=win, out_dtype="float32")
    out = np.full((info.count, h, w), np.nan, np.float32)
    if rr1 > rr0 and cc1 > cc0:
        out[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = src.read(
            window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0), out_dtype="float32")
    return out


def read_unit(info: dict[str, StackInfo], win: Window) -> dict[str, np.ndarray]:
    """Arrays of a unit window (files opened per unit: GDAL's block cache never outgrows it)."""
    out = {}
    for m, si in info.items():
        with rasterio.open(si.path) as src:
            out[m] = read_boundless(src, si, win)
    return out


def read_region(info: dict[str, StackInfo], win: Window, unit: tuple[int, int],
                cache: CellCache) -> dict[str, np.ndarray]:
    """Arrays of ``win`` (any bounds, NaN outside) assembled from whole, cached unit cells."""
    uh, uw = unit
    r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
    arrays = {m: np.full((si.count, h, w), np.nan, np.float32) for m, si in info.items()}
    first = next(iter(info.values()))
    for r in range(max(r0, 0) - max(r0, 0) % uh, min(r0 + h, first.height), uh):
        for c in range(max(c0, 0) - max(c0, 0) % uw, min(c0 + w, first.width), uw):
            cell = Window(c, r, min(uw, first.width - c), min(uh, first.height - r))
            cell_arrays = cache.get((r, c), lambda cell=cell: read_unit(info, cell))  # type: ignore[misc]
            rr0, rr1 = max(r, r0), min(r + int(cell.height), r0 + h)
            cc0, cc1 = max(c, c0), min(c + int(cell.width), c0 + w)
            for m, a in cell_arrays.items():
                arrays[m][:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = a[:, rr0 - r : rr1 - r, cc0 - c : cc1 - c]
    return arrays
