"""What a prediction tile holds (:class:`TileResult`) and its GeoTIFF (:func:`write_tile`).

Tile files: uint8 bands ``class`` (255 nodata), ``confidence`` (0-100), ``modalities``
(bitmask, bit order :data:`cropmap.modalities.MODALITIES`), then optionally one band per class
with its probability in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from cropmap.availability import bitmask
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.labels import NODATA

#: A model input: ``{modality: tensor, "mask": tensor}``.
Batch = dict[str, torch.Tensor]


@dataclass
class TileResult:
    """Per-pixel outputs of a tile."""

    cls: np.ndarray  # uint8 [h, w]
    confidence: np.ndarray  # uint8 [h, w]
    bits: np.ndarray  # uint8 [h, w]
    proba: np.ndarray  # float32 [K, h, w]


def tile_result(proba: np.ndarray, pres: np.ndarray, modalities: list[str]) -> TileResult:
    """Class, confidence and bitmask from probabilities ``[K, h, w]``; nodata where ``pres`` has no modality."""
    any_mod = np.asarray(pres.any(axis=0))
    cls = proba.argmax(axis=0).astype(np.uint8)
    conf = np.round(proba.max(axis=0) * 100).astype(np.uint8)
    cls[~any_mod] = NODATA
    conf[~any_mod] = 0
    proba[:, ~any_mod] = 0
    return TileResult(cls, conf, bitmask(pres, modalities), proba)


def write_tile(res: TileResult, out: Path, grid: Grid, window: Window, probabilities: bool) -> None:
    """Write a tile GeoTIFF (atomic)."""
    bands = [res.cls, res.confidence, res.bits]
    names = ["class", "confidence", "modalities"]
    if probabilities:
        bands += list(np.round(res.proba * 100).astype(np.uint8))
        names += [f"proba_{k}" for k in range(res.proba.shape[0])]
    prof = {
        "driver": "GTiff", "width": int(window.width), "height": int(window.height), "count": len(bands),
        "dtype": "uint8", "crs": grid.crs, "transform": rasterio.windows.transform(window, grid.transform),
        "compress": "deflate", "nodata": NODATA,
    }
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **prof) as dst:
        dst.write(np.stack(bands))
        dst.descriptions = tuple(names)
