"""The ``predict`` stage: one tile of a region through a trained model, written as a GeoTIFF."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio

from cropmap.errors import InputDataError
from cropmap.grid import Grid, tile_window
from cropmap.predict.predictor import Predictor
from cropmap.predict.tile import TileResult, write_tile


def run(ckpt: Path, stack_dir: Path, grid: Grid, name: str, out: Path, *, tile_size: int, modalities: Sequence[str],
        chip_size: int = 32, overlap: float = 0.5, batch_size: int = 8192, device: str = "auto",
        probabilities: bool = False, predictor: Predictor | None = None, threads: int | None = None) -> TileResult:
    """Predict tile ``name`` (:func:`cropmap.grid.tiles`) and write it to ``out``.

    Args:
        ckpt: the ``model.ckpt`` bundle.
        stack_dir: the region's stacks (a missing file is a missing modality).
        grid: the region grid.
        name: the tile, ``r000000_c000512``.
        out: the tile GeoTIFF (:func:`cropmap.predict.tile.write_tile`).
        tile_size, chip_size, overlap, batch_size, device, probabilities: the ``prediction``
            config block (``chip_size`` is ``chips.size``).
        predictor: reuse a loaded model (else one is loaded from ``ckpt``).
        threads: CPU model threads (:class:`Predictor`).
    """
    predictor = predictor or Predictor(ckpt, device, batch_size, threads=threads)
    stacks = {m: stack_dir / f"{m}.tif" for m in modalities if (stack_dir / f"{m}.tif").exists()}
    check_model_inputs(predictor, ckpt, stacks)
    window = tile_window(grid, name, tile_size)
    res = predictor.predict_tile(stacks, window, chip_size, overlap, progress=True)
    write_tile(res, out, grid, window, probabilities)
    return res


def check_model_inputs(predictor: Predictor, ckpt: Path, stacks: dict[str, Path]) -> None:
    """Each stack has the bands the model takes (its channels x months), e.g. not another season's.

    Raises:
        InputDataError: naming the stack, the model, both band counts and the fix.
    """
    for m, path in stacks.items():
        if m not in predictor.modalities:
            continue
        want = int(np.prod(predictor.input_shape(m)))
        with rasterio.open(path) as src:
            have = src.count
        if have != want:
            shape = " x ".join(map(str, predictor.input_shape(m)))
            raise InputDataError(f"{path} has {have} bands, the model {ckpt} takes {want} ({shape}: months x bands) of {m}; "
                                 "a model predicts stacks of its own bands and season length (model_from: a region with "
                                 "the same season and bands)")
