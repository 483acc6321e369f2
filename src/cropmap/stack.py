"""Stage ``stack``: align each fetched modality onto the region grid.

Reads ``raw/{modality}.tif`` (any CRS and resolution), resamples it bilinearly (NaN stays NaN;
see :func:`warp_window`) and writes ``stack/{modality}.tif`` exactly on the region grid:
float32, NaN nodata, time-major band descriptions.

Large regions are warped as a :mod:`dask.array` of ``chunk`` x ``chunk`` pixel chunks (all
bands): on local threads by default, or on an existing ``dask.distributed`` cluster when
``dask.scheduler`` is set (its workers need cropmap and the raw files on a shared path). The
chunks are written in row-major order as they come back, with a bounded number in flight, so
memory stays bounded, and every pixel is computed independently of its chunk: any chunk size,
with or without dask, gives the same stack (``use_dask=False`` is the sequential reference).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from cropmap.errors import ConfigError, CorruptRasterError, GridMismatchError, brief
from cropmap.grid import Grid, pixel_windows
from cropmap.io import atomic_path
from cropmap.modalities import TEMPORAL, band_descriptions
from cropmap.progress import progress

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 512
MAX_IN_FLIGHT = 8  # chunks computed ahead of the writer: bounds memory (s2, 512 px: ~125 MB each)


@functools.lru_cache(maxsize=64)
def _transformer(dst_crs: str, src_crs: str, thread: int) -> Transformer:
    """One transformer per CRS pair and thread (PROJ objects are not shared across threads)."""
    return Transformer.from_crs(dst_crs, src_crs, always_xy=True)


def warp_window(raw: str, grid: dict, row: int, col: int, height: int, width: int,
                indexes: tuple[int, ...] | None = None) -> np.ndarray:
    """Resample one window of the region grid from ``raw``: float32 ``[bands, height, width]``, NaN nodata.

    ``indexes``: the raw file's bands to read (1-based; default every band).

    Every output pixel is computed on its own: its centre is projected exactly into the source
    (PROJ, no approximation) and interpolated bilinearly from the four nearest source pixels,
    renormalised over the valid ones (NaN when they carry less than half the weight, or outside
    the source). So a pixel's value does not depend on the window it is computed in, and any
    chunking gives the same stack. A source already on the grid is copied exactly.

    A plain function of paths and numbers, so dask workers (threads or remote processes) can run it.
    """
    g = Grid(**grid)
    dst_tr = g.transform * Affine.translation(col, row)
    try:
        with rasterio.open(raw) as src:
            nodata = src.nodata
            if src.crs is None:
                raise GridMismatchError(f"{raw} has no CRS: the source wrote it without georeferencing; delete it and rerun the fetch")
            same_crs = CRS.from_user_input(src.crs) == CRS.from_user_input(g.crs)
            if same_crs and src.transform.almost_equals(g.transform, precision=1e-9) and (src.width, src.height) == (g.width, g.height):
                out = src.read(indexes=list(indexes) if indexes else None, window=Window(col, row, width, height),
                               out_dtype="float64")
                return _to_nan(out, nodata).astype("float32")
            xs = dst_tr.c + (np.arange(width) + 0.5) * dst_tr.a
            ys = dst_tr.f + (np.arange(height) + 0.5) * dst_tr.e
            gx, gy = np.meshgrid(xs, ys)
            if not same_crs:
                gx, gy = _transformer(g.crs, src.crs.to_wkt(), threading.get_ident()).transform(gx, gy)
            inv = ~src.transform
            u = inv.a * gx + inv.b * gy + inv.c - 0.5  # source column, pixel centres at integers
            v = inv.d * gx + inv.e * gy + inv.f - 0.5
            inside = np.isfinite(u) & np.isfinite(v) & (u >= -0.5) & (u <= src.width - 0.5) & (v >= -0.5) & (v <= src.height - 0.5)
            out = np.full((len(indexes) if indexes else src.count, height, width), np.nan, np.float64)
            if not inside.any():
                return out.astype("float32")
            i0 = np.floor(np.where(inside, u, 0)).astype(np.int64)
            j0 = np.floor(np.where(inside, v, 0)).astype(np.int64)
            fu, fv = np.where(inside, u, 0) - i0, np.where(inside, v, 0) - j0
            c0, c1 = max(0, int(i0[inside].min())), min(src.width - 1, int(i0[inside].max()) + 1)
            r0, r1 = max(0, int(j0[inside].min())), min(src.height - 1, int(j0[inside].max()) + 1)
            block = _to_nan(src.read(indexes=list(indexes) if indexes else None, window=Window(c0, r0, c1 - c0 + 1, r1 - r0 + 1),
                                     out_dtype="float64"), nodata)
    except RasterioIOError as exc:
        raise CorruptRasterError(f"{raw} is truncated or corrupt ({brief(exc)}): delete it and rerun the fetch") from None
    num = np.zeros_like(out)
    wsum = np.zeros(out.shape, np.float64)
    for di, dj, w in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        ii = np.clip(i0 + di, 0, src.width - 1) - c0
        jj = np.clip(j0 + dj, 0, src.height - 1) - r0
        vals = block[:, np.clip(jj, 0, block.shape[1] - 1), np.clip(ii, 0, block.shape[2] - 1)]
        ok = np.isfinite(vals)
        num += np.where(ok, vals, 0.0) * w
        wsum += ok * w
    good = (wsum >= 0.5) & inside
    out[good] = num[good] / wsum[good]
    return out.astype("float32")


def _to_nan(a: np.ndarray, nodata: float | None) -> np.ndarray:
    if nodata is not None and not np.isnan(nodata):
        a[a == nodata] = np.nan
    return a


def aligned_chunk(grid: Grid, chunk: int, n_bands: int) -> int:
    """``chunk`` rounded up to a multiple of the output's internal block size (each block written once)."""
    block = int(grid.profile(n_bands).get("blockysize", 0)) or 1
    return max(block, math.ceil(chunk / block) * block)


def lazy_stack(raw: Path, grid: Grid, n_bands: int, chunk: int, indexes: tuple[int, ...] | None = None) -> Any:
    """The warped stack as a lazy :mod:`dask.array` ``[bands, H, W]`` chunked ``(bands, chunk, chunk)``."""
    import dask
    import dask.array as da

    rows = [[da.from_delayed(dask.delayed(warp_window, pure=True)(str(raw), grid.to_dict(), r, c, h, w, indexes),
                             shape=(n_bands, h, w), dtype="float32")
             for (r, c, h, w) in pixel_windows(grid, chunk) if r == r0]
            for r0 in range(0, grid.height, chunk)]
    return da.block([rows]) if rows else da.zeros((n_bands, 0, 0), dtype="float32")


def connect(scheduler: str) -> Any:
    """A ``dask.distributed`` client of the cluster at ``scheduler`` (one-line error if unreachable)."""
    try:
        from distributed import Client

        return Client(scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            f"config key dask.scheduler: cannot connect to {scheduler} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "start the dask cluster (dask scheduler / dask worker) or remove dask.scheduler to stack on local threads"
        ) from None


def _computed_blocks(arr: Any, windows: list[tuple[int, int, int, int]], chunk: int, client: Any,
                     threads: int) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Compute the chunks of ``arr`` (at most ``2 * workers``, capped, in flight), yielding them in row-major order."""
    if client is not None:
        workers = max(1, sum(client.nthreads().values()))
        pool = None

        def submit(block: Any) -> Any:
            return client.compute(block)
    else:
        workers = max(1, threads)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="cropmap-stack")

        def submit(block: Any) -> Any:
            return pool.submit(block.compute, scheduler="sync")

    inflight: collections.deque = collections.deque()
    try:
        for win in windows:
            r, c = win[0] // chunk, win[1] // chunk
            inflight.append((win, submit(arr.blocks[0, r, c])))
            if len(inflight) >= min(2 * workers, MAX_IN_FLIGHT):
                w, fut = inflight.popleft()
                yield w, fut.result()
        while inflight:
            w, fut = inflight.popleft()
            yield w, fut.result()
    finally:
        for _, fut in inflight:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def stack_modality(raw: Path, out: Path, grid: Grid, modality: str, months: Sequence[str], *,
                   chunk: int = DEFAULT_CHUNK, use_dask: bool = True, client: Any = None, threads: int = 1,
                   bands: Sequence[str] | None = None) -> Path:
    """Warp one raw modality file onto ``grid``, keeping the configured bands.

    A raw file with more bands than configured (a source that fetches every band) is narrowed
    to ``bands`` by its band descriptions.

    Args:
        raw: fetched GeoTIFF, bands time-major with contract descriptions.
        out: stack file to write (atomically).
        grid: the region grid.
        modality: modality name.
        months: season months (band descriptions are checked against them).
        chunk: side of the chunks (px), rounded up to the output's block size.
        use_dask: warp through a dask array (``False``: the same windows, one after another).
        client: a ``dask.distributed`` client to compute the chunks on (else local threads).
        threads: local threads when there is no client.
        bands: the modality's bands (default every band of :data:`cropmap.modalities.BANDS`).

    Returns:
        ``out``.

    Raises:
        GridMismatchError: if the raw file's bands do not match the contract (one line listing
            the bands found and expected).
        CorruptRasterError: if the raw file cannot be read.
    """
    expected = band_descriptions(modality, months, bands)
    try:
        with rasterio.open(raw) as src:
            indexes = raw_band_indexes(raw, list(src.descriptions), src.count, expected, modality)
    except RasterioIOError as exc:
        raise CorruptRasterError(f"{raw} is truncated or corrupt ({brief(exc)}): delete it and rerun the fetch") from None
    n = len(expected)
    chunk = aligned_chunk(grid, chunk, n)
    windows = pixel_windows(grid, chunk)
    if use_dask:
        blocks = _computed_blocks(lazy_stack(raw, grid, n, chunk, indexes), windows, chunk, client, threads)
    else:
        blocks = ((w, warp_window(str(raw), grid.to_dict(), *w, indexes)) for w in windows)
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **grid.profile(n)) as dst:
        dst.descriptions = tuple(expected)
        for (r, c, h, w), arr in progress(blocks, f"stack {modality}", "chunk", total=len(windows)):
            dst.write(arr, window=Window(c, r, w, h))
    return out


def raw_band_indexes(raw: Path, descriptions: Sequence[str | None], count: int, expected: Sequence[str],
                     modality: str) -> tuple[int, ...] | None:
    """The raw file's bands (1-based) that make the stack, or None for all of them, in order.

    Raises:
        GridMismatchError: the raw file lacks a band or month of ``expected`` (one line listing
            the bands found and expected).
    """
    if list(descriptions) == list(expected):
        return None
    if not all(descriptions):
        if count == len(expected):
            return None
        raise GridMismatchError(
            f"{raw} has {count} bands, expected {len(expected)} ({expected[0]} ... {expected[-1]}): "
            "the season or modality changed since it was fetched; delete the region's raw folder and rerun"
        )
    pos = {d: i + 1 for i, d in enumerate(descriptions)}
    missing = [d for d in expected if d not in pos]
    if missing:
        found = sorted({str(d).rsplit("_", 1)[0] for d in descriptions}) if TEMPORAL[modality] else list(descriptions)
        want = sorted({d.rsplit("_", 1)[0] for d in expected}) if TEMPORAL[modality] else list(expected)
        span = (f", months {str(descriptions[0]).rsplit('_', 1)[-1]} .. {str(descriptions[-1]).rsplit('_', 1)[-1]}"
                if TEMPORAL[modality] else "")
        raise GridMismatchError(
            f"{raw} lacks {len(missing)} of the {modality} bands and months asked for, e.g. {missing[0]} (found bands {found}"
            f"{span}; expected {want}): "
            "the bands, season or source changed since it was fetched; delete the region's raw folder and rerun"
        )
    return tuple(pos[d] for d in expected)


def run(raw_dir: Path, out_dir: Path, grid: Grid, months: Sequence[str], modalities: Sequence[str], *,
        chunk: int = DEFAULT_CHUNK, scheduler: str | None = None, threads: int = 1, use_dask: bool = True,
        bands: dict[str, Sequence[str]] | None = None) -> dict[str, Path]:
    """Stack every modality present in ``raw_dir``.

    Args:
        chunk: chunk side in pixels (``dask.chunk_size``).
        bands: ``{modality: bands}`` for modalities narrowed to a band subset (others: every band).
        scheduler: address of a running ``dask.distributed`` scheduler (``dask.scheduler``); ``None``
            computes the chunks on ``threads`` local threads.
        use_dask: ``False`` warps the same chunks sequentially without dask (identical output).

    Returns:
        ``{modality: stack path}`` for the modalities that exist.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = {m: raw_dir / f"{m}.tif" for m in modalities if (raw_dir / f"{m}.tif").exists()}
    for m in modalities:
        if m not in todo:
            log.info("%s: no %s for this region (absent modality)", raw_dir, m)
    client = connect(scheduler) if scheduler and use_dask and todo else None
    if client is not None:
        log.info("stacking on the dask cluster at %s (%d worker threads)", scheduler, sum(client.nthreads().values()))
    written = {}
    try:
        for m, raw in todo.items():
            written[m] = stack_modality(raw, out_dir / f"{m}.tif", grid, m, months, chunk=chunk, use_dask=use_dask,
                                        client=client, threads=threads, bands=(bands or {}).get(m))
            grid.check(written[m])
            log.info("stacked %s -> %s", raw, written[m])
    finally:
        if client is not None:
            client.close()
    return written
