"""The ``predict`` stage: one tile of a region through a trained model, written as a GeoTIFF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cropmap.grid import Grid, tile_window
from cropmap.predict.bundle import check_stacks
from cropmap.predict.predictor import Predictor
from cropmap.predict.tile import TileResult, write_tile


def run(ckpt: Path, stack_dir: Path, grid: Grid, name: str, out: Path, *, tile_size: int, modalities: Sequence[str],
        chip_size: int = 32, overlap: float = 0.5, batch_size: int = 8192, device: str = "auto",
        probabilities: bool = False, predictor: Predictor | None = None, threads: int | None = None,
        season_key: str = "the region's season", precision: str = "auto") -> TileResult:
    """Predict tile ``name`` (:func:`cropmap.grid.tiles`) and write it to ``out``.

    Args:
        ckpt: the ``model.ckpt`` bundle.
        stack_dir: the region's stacks (a missing file is a missing modality).
        grid: the region grid.
        name: the tile, ``r000000_c000512``.
        out: the tile GeoTIFF (:func:`cropmap.predict.tile.write_tile`).
        tile_size, chip_size, overlap, batch_size, device, probabilities, precision: the
            ``prediction`` config block (``chip_size`` is ``chips.size``).
        predictor: reuse a loaded model (else one is loaded from ``ckpt``).
        threads: CPU model threads (:class:`Predictor`).
        season_key: the config key of the region's season, for the message when the stacks'
            months do not align with the model's (:func:`cropmap.predict.bundle.check_stacks`).

    Raises:
        GridMismatchError: the stacks' bands or months are not the model's (one line).
    """
    predictor = predictor or Predictor(ckpt, device, batch_size, threads=threads, precision=precision)
    stacks = {m: stack_dir / f"{m}.tif" for m in modalities if (stack_dir / f"{m}.tif").exists()}
    check_stacks(predictor.bundle, ckpt, stacks, season_key=season_key)
    window = tile_window(grid, name, tile_size)
    res = predictor.predict_tile(stacks, window, chip_size, overlap, progress=True)
    write_tile(res, out, grid, window, probabilities)
    return res
