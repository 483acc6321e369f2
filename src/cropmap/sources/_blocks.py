"""Resumable block downloads and atomic stack writes, shared by the real-data sources.

A fetch splits a modality into blocks (one time step x one spatial tile). Each finished block is
saved atomically as ``raw_dir/.parts/{modality}/{key}.npy`` and skipped on a rerun; a manifest
with a fingerprint of the request (grid, months, source options) makes sure parts of a different
request are never mixed in. When every block is there the stack is written to a temporary file
and renamed to ``raw_dir/{modality}.tif``, so a half-written stack never exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from cropmap.grid import Grid, pixel_windows
from cropmap.io import atomic_path, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """A window of the grid: top-left ``(row, col)`` and size in pixels."""

    row: int
    col: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"r{self.row}_c{self.col}"

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.width, self.height)

    def bounds(self, grid: Grid, halo: int = 0) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the tile in grid CRS units, grown by ``halo`` pixels."""
        x0 = grid.xmin + (self.col - halo) * grid.res
        y1 = grid.ymax - (self.row - halo) * grid.res
        return (x0, y1 - (self.height + 2 * halo) * grid.res, x0 + (self.width + 2 * halo) * grid.res, y1)


def iter_tiles(grid: Grid, size: int) -> list[Tile]:
    """Tiles of at most ``size`` x ``size`` pixels covering the grid, row-major."""
    return [Tile(*w) for w in pixel_windows(grid, max(1, int(size)))]


class PartStore:
    """Finished blocks of one modality under ``raw_dir/.parts/{modality}/``.

    Args:
        raw_dir: the region's raw directory.
        modality: modality name.
        request: JSON-serialisable description of what is fetched; parts saved for a different
            request are discarded.
    """

    def __init__(self, raw_dir: Path, modality: str, request: dict) -> None:
        self.root = Path(raw_dir) / ".parts" / modality
        self.request_id = fingerprint(request)
        manifest = self.root / "manifest.json"
        if self.root.exists():
            try:
                old = json.loads(manifest.read_text()).get("request_id")
            except (OSError, ValueError):
                old = None
            if old != self.request_id:
                log.info("discarding parts of a different request in %s", self.root)
                shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps({"request_id": self.request_id, "request": request}, default=str, indent=1))

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, key: str, array: np.ndarray) -> None:
        """Save a finished block ``(bands, height, width)`` atomically."""
        with atomic_path(self.path(key)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))

    def load(self, key: str) -> np.ndarray:
        return np.load(self.path(key))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.parent.rmdir()  # only when empty


def stack_is_complete(path: Path, grid: Grid, descriptions: list[str]) -> bool:
    """Whether ``path`` is a finished stack on ``grid`` with exactly these band descriptions."""
    if not path.exists():
        return False
    try:
        grid.check(path)
        with rasterio.open(path) as src:
            return list(src.descriptions) == list(descriptions) and src.dtypes[0] == "float32"
    except Exception:  # a truncated or foreign file is simply rebuilt
        return False


def write_stack(
    path: Path,
    grid: Grid,
    descriptions: list[str],
    blocks: Iterable[tuple[int, Tile, np.ndarray]],
    tags: dict[str, str] | None = None,
) -> None:
    """Write a float32 NaN-nodata stack on ``grid`` atomically, block by block.

    Args:
        path: the stack to write.
        grid: the region grid.
        descriptions: band descriptions, in band order.
        blocks: ``(first_band_index, tile, array[bands, h, w])``; together they cover every
            band and pixel.
        tags: dataset tags (source, collections); never secrets.
    """
    prof = grid.profile(len(descriptions))
    with atomic_path(Path(path)) as tmp, rasterio.open(tmp, "w", **prof) as dst:
        for first, tile, arr in blocks:
            arr = np.asarray(arr, dtype=np.float32)
            idx = list(range(first + 1, first + 1 + arr.shape[0]))
            dst.write(arr, idx, window=tile.window)
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)
