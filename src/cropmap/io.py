"""Small raster I/O helpers shared by the stages: atomic writes and checked reads."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import rasterio
from rasterio.errors import RasterioIOError

from cropmap.errors import CorruptRasterError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    Nothing half-written is ever left under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_readable(path: str | Path, hint: str = "delete it and rerun the stage that wrote it") -> None:
    """Read every block of a raster once; raise a one-line error naming the file if it is corrupt.

    Raises:
        CorruptRasterError: if the file is truncated or undecodable.
    """
    try:
        with rasterio.open(path) as src:
            for _, window in src.block_windows(1):
                src.read(window=window)
    except (RasterioIOError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptRasterError(f"{path} is truncated or corrupt ({first}): {hint}") from None
