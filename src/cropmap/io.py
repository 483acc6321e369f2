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

from cropmap.errors import CorruptRasterError, GridMismatchError, InputDataError, brief
from cropmap.grid import Grid
from cropmap.modalities import BANDS, TEMPORAL, band_descriptions


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
        raise CorruptRasterError(f"{path} is truncated or corrupt ({brief(exc)}): {hint}") from None


def check_raster(path: str | Path, grid: Grid | None, fix: str, window: Window | None = None) -> None:
    """Check a raster a stage reads: it opens, lies on ``grid`` (when given) and every block (or
    ``window``) decodes.

    Raises:
        GridMismatchError: naming the file, what differs and ``fix``.
        CorruptRasterError: naming the file and ``fix``.
    """
    try:
        if grid is not None:
            grid.check(path, fix=fix)
    except (RasterioIOError, OSError) as exc:  # not even the header opens
        raise CorruptRasterError(f"{path} is truncated or corrupt ({brief(exc)}): {fix}") from None
    check_readable(path, hint=fix, window=window)


def expected_bands(path: str | Path, modality: str, months: Sequence[str], found: Sequence[str | None],
                   bands: Sequence[str] | None = None) -> list[str]:
    """The band descriptions the stack contract asks of a ``modality`` stack with ``found`` descriptions.

    With ``bands`` (the config's band subset) exactly ``band_descriptions(modality, months, bands)``;
    without, the file's own bands (a subset of :data:`~cropmap.modalities.BANDS`, in that order)
    for every month of the season, time-major.

    Raises:
        GridMismatchError: a band has no description or is not a band of ``modality``.
    """
    if bands is not None:
        return band_descriptions(modality, months, bands)
    known = BANDS[modality]
    names: list[str] = []
    for i, d in enumerate(found, start=1):
        if not d:
            raise GridMismatchError(f"{path}: band {i} has no description; stack bands are named <band>_<YYYY-MM> "
                                    f"({band_descriptions(modality, months)[0]}, ...)")
        name = str(d).rsplit("_", 1)[0] if TEMPORAL[modality] else str(d)
        if name not in known:
            raise GridMismatchError(f"{path}: band {i} is {d!r}, but {name!r} is not a {modality} band "
                                    f"({', '.join(known)})")
        names.append(name)
    return band_descriptions(modality, months, [b for b in known if b in names])


def check_stack_bands(path: str | Path, modality: str, months: Sequence[str], fix: str,
                      bands: Sequence[str] | None = None) -> None:
    """Check a stack's band count and descriptions against the contract
    (:func:`expected_bands`): ``<band>_<YYYY-MM>`` for every month of the season, time-major.

    Raises:
        GridMismatchError: naming the file, what was expected and found, and ``fix``.
    """
    with rasterio.open(path) as src:
        found = list(src.descriptions)
    try:
        expected = expected_bands(path, modality, months, found, bands)
    except GridMismatchError as exc:
        raise GridMismatchError(f"{exc}: {fix}") from None
    if found != expected:
        i = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b), min(len(found), len(expected)))
        seen = found[i] if i < len(found) else "nothing"
        want = expected[i] if i < len(expected) else "nothing"
        span = (f"<band>_<YYYY-MM> for the {len(months)} month(s) {months[0]}..{months[-1]}" if TEMPORAL[modality]
                else f"{modality} bands, no months")
        count = f"has {len(found)} bands, expected {len(expected)}" if len(found) != len(expected) else \
            f"has the {len(found)} bands expected but other band names"
        raise GridMismatchError(f"{path} {count} ({span}; band {i + 1} should be {want}, found {seen}): {fix}")


def check_stacks(stack_dir: str | Path, grid: Grid, modalities: list[str] | tuple[str, ...],
                 window: Window | None = None, months: Sequence[str] | None = None,
                 bands: Mapping[str, Sequence[str]] | None = None) -> dict[str, Path]:
    """Check a region's stack files before a stage reads them: on ``grid``, readable and, when
    ``months`` is given, with the bands of the stack contract (:func:`check_stack_bands`).

    Args:
        stack_dir: the region's ``stack`` folder.
        grid: the region grid.
        modalities: modalities to look for (absent files are absent modalities).
        window: read only this window (a prediction tile) instead of every block.
        months: the region's season months.
        bands: ``{modality: bands}`` of modalities narrowed to a band subset by the config.

    Returns:
        ``{modality: path}`` of the stack files present.

    Raises:
        GridMismatchError: naming the file, what differs and the fix.
        CorruptRasterError: naming the file and the fix.
    """
    stack_dir = Path(stack_dir)
    if not stack_dir.is_dir():
        raise InputDataError(f"{stack_dir}: no such stack folder; run the stack stage first (snakemake does) or fix --stack-dir")
    fix = f"delete the folder {stack_dir} and rerun snakemake so the stack stage rebuilds it"
    found = {m: stack_dir / f"{m}.tif" for m in modalities if (stack_dir / f"{m}.tif").exists()}
    for m, path in found.items():
        check_raster(path, grid, fix, window=window)
        if months is not None:
            check_stack_bands(path, m, months, fix, (bands or {}).get(m))
    return found


def check_table(path: str | Path, fix: str, min_rows: int = 0) -> None:
    """Check a Parquet table a stage reads (``chips.parquet``): its footer and schema read, and
    it has at least ``min_rows`` rows.

    Raises:
        CorruptRasterError: naming the file and ``fix``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CorruptRasterError(f"{path} is truncated or corrupt ({brief(exc)}): {fix}") from None
    if rows < min_rows:
        raise InputDataError(f"{path} has {rows} rows, at least {min_rows} needed: {fix}")
