"""Stage ``stack``: align each fetched modality onto the region grid.

Reads ``raw/{modality}.tif`` (any CRS and resolution), warps it window by window through a
``WarpedVRT`` (bilinear; NaN stays NaN) and writes ``stack/{modality}.tif`` exactly on the region
grid: float32, NaN nodata, time-major band descriptions. Memory is bounded by one window.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from tqdm import tqdm

from cropmap.errors import CorruptRasterError, GridMismatchError
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.modalities import band_descriptions

log = logging.getLogger(__name__)


def stack_modality(raw: Path, out: Path, grid: Grid, modality: str, months: Sequence[str], rows: int = 256) -> Path:
    """Warp one raw modality file onto ``grid``.

    Args:
        raw: fetched GeoTIFF, bands time-major with contract descriptions.
        out: stack file to write.
        grid: the region grid.
        modality: modality name.
        months: season months (band descriptions are checked against them).
        rows: rows warped per window.

    Returns:
        ``out``.

    Raises:
        GridMismatchError: if the raw file's bands do not match the contract.
        CorruptRasterError: if the raw file cannot be read.
    """
    expected = band_descriptions(modality, months)
    try:
        with rasterio.open(raw) as src:
            if src.count != len(expected):
                raise GridMismatchError(
                    f"{raw} has {src.count} bands, expected {len(expected)} ({expected[0]} ... {expected[-1]}): "
                    "the season or modality changed since it was fetched; delete the region's raw folder and rerun"
                )
            if all(src.descriptions) and list(src.descriptions) != expected:
                raise GridMismatchError(
                    f"{raw} band names {src.descriptions[:2]}... do not match {expected[:2]}...: "
                    "delete the region's raw folder and rerun the fetch"
                )
            src_nodata = src.nodata if src.nodata is not None else np.nan
            with WarpedVRT(
                src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                resampling=Resampling.bilinear, src_nodata=src_nodata, nodata=np.nan, dtype="float32",
            ) as vrt, atomic_path(out) as tmp, rasterio.open(tmp, "w", **grid.profile(len(expected))) as dst:
                dst.descriptions = tuple(expected)
                for row in tqdm(range(0, grid.height, rows), desc=f"stack {modality}", unit="win", leave=False):
                    h = min(rows, grid.height - row)
                    win = Window(0, row, grid.width, h)
                    data = vrt.read(window=win, masked=True)
                    arr = np.ma.filled(data.astype("float32"), np.nan)
                    dst.write(arr, window=win)
    except RasterioIOError as exc:
        raise CorruptRasterError(f"{raw} is truncated or corrupt ({str(exc).splitlines()[0]}): delete it and rerun the fetch") from None
    return out


def run(raw_dir: Path, out_dir: Path, grid: Grid, months: Sequence[str], modalities: Sequence[str]) -> dict[str, Path]:
    """Stack every modality present in ``raw_dir``.

    Returns:
        ``{modality: stack path}`` for the modalities that exist.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for m in modalities:
        raw = raw_dir / f"{m}.tif"
        if not raw.exists():
            log.info("%s: no %s for this region (absent modality)", raw_dir, m)
            continue
        written[m] = stack_modality(raw, out_dir / f"{m}.tif", grid, m, months)
        grid.check(written[m])
        log.info("stacked %s -> %s", raw, written[m])
    return written
