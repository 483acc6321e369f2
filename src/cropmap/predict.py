"""Stage ``predict``: run a trained model over one tile of a region.

Per pixel, the modalities present are detected from the stacks (a modality with too few valid
months counts as missing) and passed to the model as its mask, so one tile can use S2+S1+DEM on
one side and DEM+weather on the other. Pixels with no modality are nodata, never a guess.

Classification models run on pixel time series. Segmentation models run on sliding windows on a
lattice anchored at the grid origin (not the tile), blended with a Hann window whose shifted
copies sum to one: a tile's pixels get exactly the windows they would get if the whole region
were predicted at once, so tiled maps have no seams.

Tile files: uint8 bands ``class`` (255 nodata), ``confidence`` (0-100), ``modalities``
(bitmask), then optionally one band per class with its probability in percent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from tqdm import tqdm

from cropmap.availability import bitmask, presence_stack
from cropmap.grid import Grid, tile_window
from cropmap.io import atomic_path
from cropmap.labels import NODATA
from cropmap.tiles import to_time_series
from cropmap.train import load_bundle

log = logging.getLogger(__name__)


def read_window(path: Path, window: Window) -> np.ndarray:
    """Read a (possibly out-of-bounds) window, NaN outside the raster."""
    with rasterio.open(path) as src:
        return src.read(window=window, boundless=True, fill_value=np.nan, out_dtype="float32")


def hann(size: int) -> np.ndarray:
    """2-D Hann weights whose half-shifted copies sum to one."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


@dataclass
class TileResult:
    """Per-pixel outputs of a tile."""

    cls: np.ndarray  # uint8 [h, w]
    confidence: np.ndarray  # uint8 [h, w]
    bits: np.ndarray  # uint8 [h, w]
    proba: np.ndarray  # float32 [K, h, w]


class Predictor:
    """A loaded model plus everything needed to apply it to stack windows."""

    def __init__(self, ckpt: Path, device: str = "auto", batch_size: int = 8192) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.norm, self.bundle = load_bundle(ckpt, self.device)
        self.modalities: list[str] = self.bundle["modalities"]
        self.task: str = self.bundle["task"]
        self.min_valid_fraction: float = self.bundle["min_valid_fraction"]
        self.n_classes: int = self.bundle["model_kwargs"]["n_classes"]
        self.batch_size = batch_size
        self.autocast = self.device.type == "cuda"

    @torch.no_grad()
    def _proba(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(self.norm(batch))
        return torch.softmax(out["logits"].float(), dim=1)

    def predict_pixels(self, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> TileResult:
        """Classify every pixel of a window from ``{m: [bands, h, w]}`` arrays."""
        pres = presence_stack(arrays, self.modalities, self.min_valid_fraction, shape)
        any_mod = pres.any(axis=0)
        idx = np.flatnonzero(any_mod)
        proba = np.zeros((self.n_classes, shape[0] * shape[1]), np.float32)
        series = {m: to_time_series(a, m).reshape(shape[0] * shape[1], *to_time_series(a, m).shape[2:]) for m, a in arrays.items()}
        mask_flat = pres.reshape(len(self.modalities), -1).T
        for start in range(0, len(idx), self.batch_size):
            sel = idx[start : start + self.batch_size]
            batch = {m: torch.from_numpy(np.ascontiguousarray(series[m][sel])) for m in series}
            for m in self.modalities:  # modalities absent from the region: NaN, masked out
                if m not in batch:
                    batch[m] = torch.full((len(sel), *self._shape(m)), float("nan"))
            batch["mask"] = torch.from_numpy(mask_flat[sel])
            proba[:, sel] = self._proba(batch).cpu().numpy().T
        return self._finish(proba.reshape(self.n_classes, *shape), pres, any_mod)

    def _shape(self, m: str) -> tuple[int, ...]:
        c = self.bundle["model_kwargs"]["in_channels"][m]
        t = self.bundle["model_kwargs"]["n_steps"]
        return (t, c) if self.bundle["temporal"][m] else (c,)

    def _finish(self, proba: np.ndarray, pres: np.ndarray, any_mod: np.ndarray) -> TileResult:
        cls = proba.argmax(axis=0).astype(np.uint8)
        conf = np.round(proba.max(axis=0) * 100).astype(np.uint8)
        cls[~any_mod] = NODATA
        conf[~any_mod] = 0
        proba[:, ~any_mod] = 0
        return TileResult(cls, conf, bitmask(pres, self.modalities), proba)

    def windows(self, tile: Window, size: int, stride: int) -> Iterator[Window]:
        """Lattice windows (anchored at the grid origin) that intersect ``tile``."""
        def starts(lo: int, n: int) -> range:
            first = math.floor((lo - size) / stride) + 1
            last = math.floor((lo + n - 1) / stride)
            return range(first * stride, last * stride + 1, stride)

        for r in starts(int(tile.row_off), int(tile.height)):
            for c in starts(int(tile.col_off), int(tile.width)):
                yield Window(c, r, size, size)

    def predict_segmentation(self, stacks: dict[str, Path], tile: Window, size: int, overlap: float) -> TileResult:
        """Sliding-window segmentation of ``tile`` with Hann blending (see module docstring)."""
        stride = max(1, round(size * (1 - overlap)))
        if overlap > 0 and size % 2 == 0 and stride != size // 2:
            log.warning("overlap %.2f: Hann weights sum to one only at 50 %% overlap; blending stays seamless but uneven", overlap)
        h, w = int(tile.height), int(tile.width)
        halo = Window(tile.col_off - size, tile.row_off - size, w + 2 * size, h + 2 * size)
        arrays = {m: read_window(p, halo) for m, p in stacks.items()}
        pres_full = presence_stack(arrays, self.modalities, self.min_valid_fraction, arrays[next(iter(arrays))].shape[1:])
        acc = np.zeros((self.n_classes, h, w), np.float32)
        wsum = np.zeros((h, w), np.float32)
        weight = hann(size) if overlap > 0 else np.ones((size, size), np.float32)
        wins = list(self.windows(tile, size, stride))
        for start in range(0, len(wins), max(1, self.batch_size // (size * size) or 1)):
            group = wins[start : start + max(1, self.batch_size // (size * size))]
            offs = [(int(win.row_off - halo.row_off), int(win.col_off - halo.col_off)) for win in group]
            batch = {m: torch.from_numpy(np.stack([a[:, r : r + size, c : c + size] for r, c in offs])) for m, a in arrays.items()}
            for m in self.modalities:
                if m not in batch:
                    c = self.bundle["model_kwargs"]["in_channels"][m] * (self.bundle["model_kwargs"]["n_steps"] if self.bundle["temporal"][m] else 1)
                    batch[m] = torch.full((len(group), c, size, size), float("nan"))
            batch["mask"] = torch.from_numpy(np.stack([pres_full[:, r : r + size, c : c + size] for r, c in offs]))
            probs = self._proba(batch).cpu().numpy()
            for p, win in zip(probs, group, strict=True):
                # intersection of the window with the tile, in tile and window coordinates
                r0, c0 = int(max(win.row_off, tile.row_off)), int(max(win.col_off, tile.col_off))
                r1 = int(min(win.row_off + size, tile.row_off + h))
                c1 = int(min(win.col_off + size, tile.col_off + w))
                tr, tc = r0 - int(tile.row_off), c0 - int(tile.col_off)
                wr, wc = r0 - int(win.row_off), c0 - int(win.col_off)
                ww = weight[wr : wr + r1 - r0, wc : wc + c1 - c0]
                acc[:, tr : tr + r1 - r0, tc : tc + c1 - c0] += p[:, wr : wr + r1 - r0, wc : wc + c1 - c0] * ww
                wsum[tr : tr + r1 - r0, tc : tc + c1 - c0] += ww
        proba = acc / np.maximum(wsum, 1e-12)
        pres = pres_full[:, size : size + h, size : size + w]
        return self._finish(proba, pres, pres.any(axis=0))

    def predict_tile(self, stacks: dict[str, Path], tile: Window, size: int = 32, overlap: float = 0.5) -> TileResult:
        """Predict one tile window from the stack files."""
        if self.task == "segmentation":
            return self.predict_segmentation(stacks, tile, size, overlap)
        arrays = {m: read_window(p, tile) for m, p in stacks.items()}
        return self.predict_pixels(arrays, (int(tile.height), int(tile.width)))


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


def run(ckpt: Path, stack_dir: Path, grid: Grid, name: str, out: Path, *, tile_size: int, modalities: Sequence[str],
        chip_size: int = 32, overlap: float = 0.5, batch_size: int = 8192, device: str = "auto",
        probabilities: bool = False) -> TileResult:
    """Predict tile ``name`` and write it to ``out``."""
    predictor = Predictor(ckpt, device, batch_size)
    stacks = {m: stack_dir / f"{m}.tif" for m in modalities if (stack_dir / f"{m}.tif").exists()}
    window = tile_window(grid, name, tile_size)
    with tqdm(total=1, desc=f"predict {name}", unit="tile") as bar:
        res = predictor.predict_tile(stacks, window, chip_size, overlap)
        bar.update()
    write_tile(res, out, grid, window, probabilities)
    return res
