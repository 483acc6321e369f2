"""Resumable block downloads and atomic stack writes, shared by the real-data sources.

A fetch splits a modality into parts: one *step* (a month, or ``static``) x one spatial *block*
of the grid (:class:`Block`). Each finished part is saved atomically as
``raw_dir/.parts/{modality}/{step}_{block key}.npy`` and skipped on a rerun; a manifest with a
fingerprint of the request (grid, months, source options) makes sure parts of a different
request are never mixed in. When every part is there the stack is written to a temporary file
and renamed to ``raw_dir/{modality}.tif``, so a half-written stack never exists.
:func:`fetch_stack` is that loop (:func:`fetch_parts`, then :func:`write_parts`); a source only
says how to fetch one part.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from cropmap.errors import SourceError
from cropmap.grid import Grid, pixel_windows, window_key
from cropmap.io import atomic_path, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """A fetch block: a window of the grid, top-left ``(row, col)`` and size in pixels."""

    row: int
    col: int
    height: int
    width: int

    @property
    def key(self) -> str:
        """``r000123_c000456`` (:func:`cropmap.grid.window_key`)."""
        return window_key(self.row, self.col)

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.width, self.height)

    def bounds(self, grid: Grid, halo: int = 0) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the block in grid CRS units, grown by ``halo`` pixels."""
        x0 = grid.xmin + (self.col - halo) * grid.res
        y1 = grid.ymax - (self.row - halo) * grid.res
        return (x0, y1 - (self.height + 2 * halo) * grid.res, x0 + (self.width + 2 * halo) * grid.res, y1)


def iter_blocks(grid: Grid, size: int) -> list[Block]:
    """Blocks of at most ``size`` x ``size`` pixels covering the grid, row-major."""
    return [Block(*w) for w in pixel_windows(grid, max(1, int(size)))]


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
    blocks: Iterable[tuple[int, Block, np.ndarray]],
    tags: dict[str, str] | None = None,
) -> None:
    """Write a float32 NaN-nodata stack on ``grid`` atomically, block by block.

    Args:
        path: the stack to write.
        grid: the region grid.
        descriptions: band descriptions, in band order.
        blocks: ``(first_band_index, block, array[bands, h, w])``; together they cover every
            band and pixel.
        tags: dataset tags (source, collections); never secrets.
    """
    prof = grid.profile(len(descriptions))
    with atomic_path(Path(path)) as tmp, rasterio.open(tmp, "w", **prof) as dst:
        for first, block, arr in blocks:
            arr = np.asarray(arr, dtype=np.float32)
            idx = list(range(first + 1, first + 1 + arr.shape[0]))
            dst.write(arr, idx, window=block.window)
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)


def part_key(step: str, block: Block) -> str:
    """Name of one part: ``{step}_{block key}``, e.g. ``2023-05_r000000_c000512``."""
    return f"{step}_{block.key}"


def fetch_parts(
    steps: Sequence[str],
    blocks: Sequence[Block],
    parts: PartStore,
    fetch: Callable[[str, Block], np.ndarray],
    *,
    source: str,
    workers: int = 1,
) -> None:
    """Fetch every (step, block) part that ``parts`` lacks (the loop of every remote source).

    Args:
        steps: the time steps (months, or ``["static"]``).
        blocks: the spatial blocks (:func:`iter_blocks`).
        parts: where finished parts are kept (:class:`PartStore` of this request).
        fetch: ``fetch(step, block)`` -> ``float32 [bands, h, w]`` of one part (NaN = no data).
        source: the source's name, for logs and errors.
        workers: parts fetched at once (threads).

    Raises:
        SourceError: a part failed; the parts finished so far are kept, so a rerun resumes.
    """
    modality = parts.root.name
    pending = [(s, b) for s in steps for b in blocks if not parts.done(part_key(s, b))]
    total = len(steps) * len(blocks)
    log.info("%s: %s: %d blocks, %d to fetch, %d kept from an earlier run",
             source, modality, total, len(pending), total - len(pending))

    def job(step: str, block: Block) -> None:
        parts.save(part_key(step, block), fetch(step, block))

    error: BaseException | None = None
    if workers <= 1:
        for step, block in pending:
            try:
                job(step, block)
            except Exception as exc:
                error = exc
                break
    elif pending:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{source}-block") as pool:
            futures = [pool.submit(job, *p) for p in pending]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                for f in futures:
                    f.cancel()
                wait(futures)
                error = errors[0]
    if error is not None:
        kept = sum(parts.done(part_key(s, b)) for s in steps for b in blocks)
        raise SourceError(f"{source} {modality}: {error} ({kept}/{total} blocks kept in {parts.root}; "
                          "rerun to resume)") from error


def write_parts(path: Path, grid: Grid, descriptions: list[str], steps: Sequence[str], blocks: Sequence[Block],
                parts: PartStore, tags: dict[str, str] | None = None) -> None:
    """Write the stack from the parts :func:`fetch_parts` finished (atomic), then drop the parts.

    Args:
        path: the stack (``raw_dir/{modality}.tif``).
        grid: the region grid.
        descriptions: band descriptions, time-major: ``len(descriptions) / len(steps)`` per step.
        steps, blocks, parts: as given to :func:`fetch_parts`.
        tags: dataset tags (never secrets).
    """
    n_bands = len(descriptions) // len(steps)

    def assembled() -> Iterable[tuple[int, Block, np.ndarray]]:
        for i, step in enumerate(steps):
            for block in blocks:
                yield i * n_bands, block, parts.load(part_key(step, block))

    write_stack(path, grid, descriptions, assembled(), tags)
    parts.remove()


def fetch_stack(
    path: Path,
    grid: Grid,
    descriptions: list[str],
    steps: Sequence[str],
    block_size: int,
    request: dict,
    fetch: Callable[[str, Block], np.ndarray],
    *,
    source: str,
    workers: int = 1,
    tags: dict[str, str] | Callable[[], dict[str, str]] | None = None,
) -> None:
    """Fetch a modality's stack block by block, resumably, and write it atomically.

    Args:
        path: the stack, ``raw_dir/{modality}.tif``; finished parts are kept under
            ``raw_dir/.parts/{modality}/`` until it is written.
        grid: the region grid.
        descriptions: band descriptions, time-major.
        steps: the time steps (months, or ``["static"]``).
        block_size: side of the spatial blocks (pixels).
        request: what is fetched (grid, months, source options); parts of another request are
            discarded.
        fetch: ``fetch(step, block)`` -> ``float32 [bands, h, w]`` of one part (NaN = no data).
        source: the source's name, for logs and errors.
        workers: parts fetched at once (threads).
        tags: the stack's tags, or a function giving them once every part is fetched.

    Raises:
        SourceError: a part failed; the parts finished so far are kept, so a rerun resumes.
    """
    blocks = iter_blocks(grid, block_size)
    parts = PartStore(path.parent, path.stem, request)
    fetch_parts(steps, blocks, parts, fetch, source=source, workers=workers)
    write_parts(path, grid, descriptions, steps, blocks, parts, tags() if callable(tags) else tags)
