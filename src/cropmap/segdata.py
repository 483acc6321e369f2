"""Segmentation training data: labelled chips read once into memory, random windows per step.

Why not read every chip through :class:`~cropmap.datasets.ChipDataset` each epoch: a TorchGeo
query decodes every compressed 256 px block a 32 px chip touches, ~50 ms per chip and modality
set on one core, so on the demo region every epoch of 732 chips cost ~40 s of reading. Here the
labelled chips of the train and validation splits are read once, unit by unit (each block decoded
once), and kept as float16 (half the memory; z-scored later, so the rounding is far below the
signal).

Training then draws **random windows** rather than the fixed chip lattice: a window of the chip
size at a random offset from a random training chip, taking the rest from its right, lower and
diagonal neighbours when those are training chips too (so a window never crosses into a
validation or test chip: windows live on the union of training chips, as TorchGeo's
``RandomGeoSampler`` would sample inside a region of interest), plus a random rotation by a
multiple of 90 degrees and a random flip. The draws come from ``(seed, epoch)``
(:class:`RandomWindowSampler`), so a resumed run sees the same windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

from cropmap.availability import presence_stack
from cropmap.datasets import IGNORE_INDEX, open_stacks
from cropmap.errors import InputDataError
from cropmap.labels import NODATA
from cropmap.loop import EpochShuffleSampler
from cropmap.modalities import band_descriptions, channels_per_step, resolve_bands
from cropmap.progress import progress as show_progress

#: Side (pixels) of the read units; the stacks' blocks are 256 px (:meth:`cropmap.grid.Grid.profile`).
READ_UNIT = 256

#: A window draw: ``(chip index, row offset, column offset, quarter turns, flip)``.
WindowKey = tuple[int, int, int, int, int]


@dataclass
class ChipCache:
    """Labelled chips of one region in memory, on the chip lattice.

    Attributes:
        x: ``{m: float16 [N, bands, s, s]}`` for the modalities whose stack exists (NaN invalid).
        mask: bool ``[N, M, s, s]``, per-pixel presence of each configured modality.
        y: int16 ``[N, s, s]`` class ids, :data:`~cropmap.datasets.IGNORE_INDEX` where unlabelled.
        rows, cols: int ``[N]`` pixel offsets of the chips on the grid.
        size: chip side ``s``.
        modalities: the configured modalities (order of ``mask``).
        bands: ``{m: number of stack bands}`` for every configured modality.
        channels: ``{m: channels per time step}`` for every configured modality (fewer than
            every band when the config's ``bands`` narrows a modality).
    """

    x: dict[str, np.ndarray]
    mask: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    size: int
    modalities: list[str]
    bands: dict[str, int]
    channels: dict[str, int]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return sum(a.nbytes for a in self.x.values()) + self.mask.nbytes + self.y.nbytes

    def neighbours(self) -> np.ndarray:
        """int ``[N, 3]``: index of the right, lower and lower-right neighbour chip, -1 when not cached."""
        index = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(self.rows, self.cols, strict=True))}
        s = self.size
        steps = ((0, s), (s, 0), (s, s))
        return np.array([[index.get((int(r) + dr, int(c) + dc), -1) for dr, dc in steps]
                         for r, c in zip(self.rows, self.cols, strict=True)], dtype=np.int64).reshape(-1, 3)

    def window(self, i: int, dr: int, dc: int, nbr: np.ndarray) -> dict[str, np.ndarray]:
        """The ``s x s`` window whose top-left pixel is ``(dr, dc)`` inside chip ``i``.

        ``nbr`` is :meth:`neighbours`; the offsets must be 0 along a side without neighbour.
        """
        if dr == 0 and dc == 0:
            return {**{m: a[i] for m, a in self.x.items()}, "mask": self.mask[i], "y": self.y[i]}
        s = self.size
        right, down, diag = (int(j) for j in nbr[i])
        parts = [(i, 0, 0, dr, dc, s - dr, s - dc)]
        if dc:
            parts.append((right, 0, s - dc, dr, 0, s - dr, dc))
        if dr:
            parts.append((down, s - dr, 0, 0, dc, dr, s - dc))
        if dr and dc:
            parts.append((diag, s - dr, s - dc, 0, 0, dr, dc))
        out: dict[str, np.ndarray] = {}
        for key, arr in (*self.x.items(), ("mask", self.mask), ("y", self.y)):
            w = np.empty((*arr.shape[1:-2], s, s), arr.dtype)
            for j, r0, c0, sr, sc, h, ww in parts:
                w[..., r0 : r0 + h, c0 : c0 + ww] = arr[j, ..., sr : sr + h, sc : sc + ww]
            out[key] = w
        return out


def chip_bytes(size: int, months: Sequence[str], modalities: Sequence[str],
               bands: Mapping[str, Sequence[str]] | None = None) -> int:
    """Memory of one cached chip of side ``size``: float16 bands, the presence mask, int16 labels.

    ``bands``: the stacks' bands per modality (the config's ``bands``; default every band).
    """
    full = resolve_bands(bands)
    n_bands = sum(len(band_descriptions(m, months, full[m])) for m in modalities)
    return size * size * (2 * n_bands + len(modalities) + 2)


def read_chips(stack_dir: Path, labels_tif: Path, chips: pd.DataFrame, months: Sequence[str],
               modalities: Sequence[str], min_valid_fraction: float, progress: bool = True,
               bands: Mapping[str, Sequence[str]] | None = None) -> ChipCache:
    """Read the chips listed in ``chips`` (rows of ``chips.parquet``, one chip size) into memory.

    The stacks are read in :data:`READ_UNIT` windows aligned to their blocks, so each compressed
    block is decoded once whatever the number of chips in it; only the chips are kept.
    ``bands``: the stacks' bands per modality (the config's ``bands``; default every band).

    Raises:
        InputDataError: a stack has other bands than the configured ones
            (:func:`cropmap.datasets.open_stacks`), or the chip table mixes chip sizes.
    """
    mods = list(modalities)
    full = resolve_bands(bands)
    n_bands = {m: len(band_descriptions(m, months, full[m])) for m in mods}
    channels = channels_per_step(bands, mods)
    # the stacks that exist, their bands checked as every chip reader checks them
    files = {m: stack_dir / f"{m}.tif" for m in open_stacks(stack_dir, months, mods, bands)}
    sizes = chips["size"].unique() if len(chips) else np.array([0])
    if len(sizes) != 1:
        raise InputDataError(f"the chip table of {stack_dir} lists chips of several sizes {sorted(int(v) for v in sizes)} "
                             "(config key chips.size changed since the chips stage ran); rerun the chips stage")
    s = int(sizes[0])
    n = len(chips)
    rows = chips["row"].to_numpy(np.int64)
    cols = chips["col"].to_numpy(np.int64)
    x = {m: np.empty((n, n_bands[m], s, s), np.float16) for m in files}
    mask = np.zeros((n, len(mods), s, s), bool)
    y = np.empty((n, s, s), np.int16)
    unit = (rows // READ_UNIT) * (int(cols.max(initial=0)) // READ_UNIT + 1) + cols // READ_UNIT
    groups = [np.flatnonzero(unit == u) for u in np.unique(unit)]
    srcs = {m: rasterio.open(p) for m, p in files.items()}
    try:
        with rasterio.open(labels_tif) as lab_src:
            for idx in (show_progress(groups, "chips in memory", "unit") if progress else groups):
                r0, c0 = int(rows[idx].min()), int(cols[idx].min())
                win = Window(c0, r0, int(cols[idx].max()) + s - c0, int(rows[idx].max()) + s - r0)
                arrays = {m: src.read(window=win, out_dtype="float32") for m, src in srcs.items()}
                pres = presence_stack(arrays, mods, min_valid_fraction, (int(win.height), int(win.width)), channels)
                cls = lab_src.read(1, window=win)
                for i in idx:
                    rr, cc = int(rows[i]) - r0, int(cols[i]) - c0
                    for m, a in arrays.items():
                        x[m][i] = a[:, rr : rr + s, cc : cc + s]
                    mask[i] = pres[:, rr : rr + s, cc : cc + s]
                    c = cls[rr : rr + s, cc : cc + s]
                    y[i] = np.where(c == NODATA, IGNORE_INDEX, c.astype(np.int16))
    finally:
        for src in srcs.values():
            src.close()
    return ChipCache(x, mask, y, rows, cols, s, mods, n_bands, channels)


class CachedChips(Dataset):
    """Chips of a :class:`ChipCache` as items of the :class:`~cropmap.datasets.ChipDataset` layout.

    Index ``i`` is chip ``i`` as stored; a :data:`WindowKey` tuple is a window draw of
    :class:`RandomWindowSampler` (offset into the neighbours, quarter turns, flip). Modalities
    without a stack come as NaN (missing everywhere), as from ``ChipDataset``.
    """

    def __init__(self, cache: ChipCache) -> None:
        self.cache = cache
        self.modalities = cache.modalities
        self.channels = cache.channels
        self.nbr = cache.neighbours()

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: int | WindowKey) -> dict[str, torch.Tensor]:
        i, dr, dc, turns, flip = (int(key), 0, 0, 0, 0) if isinstance(key, int | np.integer) else key
        arrays = self.cache.window(int(i), int(dr), int(dc), self.nbr)
        s = self.cache.size
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            a = arrays.get(m)
            out[m] = torch.from_numpy(a.astype(np.float32)) if a is not None else torch.full(
                (self.cache.bands[m], s, s), float("nan"))
        out["mask"] = torch.from_numpy(np.ascontiguousarray(arrays["mask"]))
        out["y"] = torch.from_numpy(arrays["y"].astype(np.int64))
        if turns or flip:
            for k, v in out.items():
                v = torch.rot90(v, int(turns), (-2, -1))
                out[k] = (v.flip(-1) if flip else v).contiguous()
        return out


class RandomWindowSampler(EpochShuffleSampler):
    """Random windows over the training chips, drawn from ``(seed, epoch)``; Lightning calls :meth:`set_epoch`.

    Each epoch yields ``n`` draws: a chip (every training chip once per pass, in a random
    order), an offset that is 0 along a side without a cached neighbour, a number of quarter
    turns and a flip. Several processes (DDP) shard the draws as :class:`EpochShuffleSampler`.

    Args:
        nbr: :meth:`ChipCache.neighbours` of the training chips.
        size: chip side.
        n: windows per epoch.
        seed: base seed.
        augment: draw rotations and flips (else windows keep their orientation).
    """

    def __init__(self, nbr: np.ndarray, size: int, n: int, seed: int, augment: bool = True) -> None:
        super().__init__(n, seed)
        self.nbr, self.size, self.augment = nbr, size, augment

    def draws(self) -> list[WindowKey]:
        """This epoch's draws, before sharding."""
        g = np.random.default_rng([self.seed, self.epoch])
        n_chips = len(self.nbr)
        chip = np.concatenate([g.permutation(n_chips) for _ in range(math.ceil(self.n / n_chips))])[: self.n]
        dr = g.integers(0, self.size, self.n) * (self.nbr[chip, 1] >= 0)
        dc = g.integers(0, self.size, self.n) * (self.nbr[chip, 0] >= 0)
        dc = np.where((dr > 0) & (self.nbr[chip, 2] < 0), 0, dc)  # no diagonal chip: shift one way only
        turns = g.integers(0, 4, self.n) * self.augment
        flip = g.integers(0, 2, self.n) * self.augment
        return [(int(a), int(b), int(c), int(d), int(e)) for a, b, c, d, e in zip(chip, dr, dc, turns, flip, strict=True)]

    def __iter__(self) -> Iterator[WindowKey]:
        return iter(self.shard(self.draws()))
