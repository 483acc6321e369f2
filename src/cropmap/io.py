"""Small raster I/O helpers shared by the stages: atomic writes and checked reads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from cropmap.errors import CorruptRasterError, GridMismatchError
from cropmap.grid import Grid


def fingerprint(obj: object) -> str:
    """Stable short hash of a JSON-serialisable object (``str()`` for anything else)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path, mode: int) -> None:
    """Give ``tmp`` the permissions a plain ``open()`` would (``mode`` minus the umask), then
    move it to ``path``. ``mkstemp``/``mkdtemp`` create private 0600/0700 entries, which would
    hide maps from other users of a shared disk or a QGIS server."""
    os.chmod(tmp, mode & ~current_umask())
    os.replace(tmp, path)


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
        _publish(tmp_path, path, 0o666)
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
        _publish(tmp, path, 0o777)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_readable(path: str | Path, hint: str = "delete it and rerun the stage that wrote it",
                   window: Window | None = None) -> None:
    """Read every block of a raster (or only ``window``) once; raise a one-line error naming the file if it is corrupt.

    Raises:
        CorruptRasterError: if the file is truncated or undecodable.
    """
    try:
        with rasterio.open(path) as src:
            windows = [window] if window is not None else (w for _, w in src.block_windows(1))
            for win in windows:
                src.read(window=win)
    except (RasterioIOError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptRasterError(f"{path} is truncated or corrupt ({first}): {hint}") from None


def check_stacks(stack_dir: str | Path, grid: Grid, modalities: list[str] | tuple[str, ...],
                 window: Window | None = None, months: Sequence[str] | None = None,
                 bands: Mapping[str, Sequence[str]] | None = None) -> dict[str, Path]:
    """Check a region's stack files before a stage reads them: on ``grid``, readable, and (with
    ``months``) holding the configured bands and months.

    Args:
        stack_dir: the region's ``stack`` folder.
        grid: the region grid.
        modalities: modalities to look for (absent files are absent modalities).
        window: read only this window (a prediction tile) instead of every block.
        months: the season's months: the band descriptions must be
            :func:`cropmap.modalities.band_descriptions` of them and ``bands``.
        bands: the config's ``bands`` (default every band).

    Returns:
        ``{modality: path}`` of the stack files present.

    Raises:
        GridMismatchError: naming the file, what differs and the fix.
        CorruptRasterError: naming the file and the fix.
    """
    stack_dir = Path(stack_dir)
    fix = f"delete the folder {stack_dir} and rerun snakemake so the stack stage rebuilds it"
    found = {m: stack_dir / f"{m}.tif" for m in modalities if (stack_dir / f"{m}.tif").exists()}
    for path in found.values():
        try:
            grid.check(path, fix=fix)
        except (RasterioIOError, OSError) as exc:  # not even the header opens
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptRasterError(f"{path} is truncated or corrupt ({first}): {fix}") from None
        check_readable(path, hint=fix, window=window)
    if months is not None:
        from cropmap.modalities import band_descriptions

        for m, path in found.items():
            want = band_descriptions(m, months, (bands or {}).get(m))
            with rasterio.open(path) as src:
                have = list(src.descriptions)
            if have != want:
                raise GridMismatchError(f"{path} holds bands {have[:3]}... ({len(have)}), expected {want[:3]}... ({len(want)}): "
                                        f"the config's bands or season changed since it was stacked; {fix}")
    return found
