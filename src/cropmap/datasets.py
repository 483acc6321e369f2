"""TorchGeo declarations of a region's rasters, and the two sample kinds read through them.

Each modality stack is a :class:`~torchgeo.datasets.RasterDataset` declaration
(:class:`StackDataset` and one subclass per modality), ``labels.tif`` is :class:`LabelRaster`;
chips are enumerated with :class:`~torchgeo.samplers.GridGeoSampler` aligned to the grid's
top-left corner (:func:`aligned_chips`), so every chip lies inside one split block.

Two sample kinds come out of the same chips:

* pixel time series for classification (:func:`sample_pixels` -> :class:`PixelSamples`):
  ``{m: [N, T, C]}`` (DEM ``[N, C]``), ``mask [N, M]``, ``y [N]``;
* chips for segmentation (:class:`ChipDataset`): ``{m: [T*C, h, w]}`` (time-major channels),
  ``mask [M, h, w]``, ``y [h, w]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import rasterio
import shapely
import torch
from torch.utils.data import Dataset
from torchgeo.datasets import RasterDataset
from torchgeo.samplers import GridGeoSampler

from cropmap.availability import presence_stack
from cropmap.errors import LabelError
from cropmap.grid import Grid
from cropmap.io import check_stack_bands
from cropmap.labels import NODATA, SPLITS
from cropmap.modalities import TEMPORAL, band_descriptions, channels_per_step, resolve_bands
from cropmap.progress import progress

#: Label of pixels without a class in samples and chips (the loss ignores it).
IGNORE_INDEX = -100


class StackDataset(RasterDataset):
    """A modality stack on the region grid (one file per modality and region, ``{modality}.tif``).

    A subclass names its :attr:`modality`; the file name pattern follows from it.
    """

    modality: ClassVar[str] = ""
    is_image = True
    separate_files = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.modality:
            cls.filename_glob = f"{cls.modality}.tif"
            cls.filename_regex = rf"^{cls.modality}\.tif$"

    def __init__(self, paths: Path | str, months: Sequence[str], bands: Sequence[str] | None = None, **kwargs: Any) -> None:
        """Open the stack of :attr:`modality` under ``paths``.

        Args:
            paths: the region's ``stack`` folder or the file itself.
            months: season months, defining :attr:`all_bands`.
            bands: the stack's bands (default every band of the modality; the config's ``bands``).
            **kwargs: passed to :class:`RasterDataset` (crs, res, transforms, cache).
        """
        self.all_bands = tuple(band_descriptions(self.modality, months, bands))
        super().__init__(paths, **kwargs)


class S2Stack(StackDataset):
    """Sentinel-2 L2A monthly composites, 10 bands per month."""

    modality = "s2"
    rgb_bands = ()


class S1Stack(StackDataset):
    """Sentinel-1 VV/VH monthly composites in dB."""

    modality = "s1"


class WeatherStack(StackDataset):
    """ERA5-Land monthly 2 m temperature and total precipitation."""

    modality = "weather"


class DemStack(StackDataset):
    """Static elevation and slope."""

    modality = "dem"


class LabelRaster(RasterDataset):
    """``labels.tif``: class id and split id."""

    filename_glob = "labels.tif"
    filename_regex = r"^labels\.tif$"
    is_image = False
    all_bands = ("class", "split")


STACK_DATASETS: dict[str, type[StackDataset]] = {
    "s2": S2Stack, "s1": S1Stack, "weather": WeatherStack, "dem": DemStack,
}


def open_stacks(stack_dir: Path, months: Sequence[str], modalities: Sequence[str],
                bands: Mapping[str, Sequence[str]] | None = None) -> dict[str, StackDataset]:
    """TorchGeo datasets for the modalities whose stack exists in ``stack_dir`` (``bands``: the config's).

    Raises:
        GridMismatchError: a stack has other bands than the datasets read (the configured bands of
            its modality for every month; :func:`cropmap.io.check_stack_bands`).
    """
    full = resolve_bands(bands)
    out = {}
    for m in modalities:
        path = stack_dir / f"{m}.tif"
        if not path.exists():
            continue
        check_stack_bands(path, m, months, f"rebuild {path} with the configured bands (delete it and rerun snakemake)", full[m])
        out[m] = STACK_DATASETS[m](path, months, (bands or {}).get(m))
    return out


def aligned_chips(label_ds: LabelRaster, grid: Grid, size: int) -> Iterator[tuple[int, int, tuple[slice, slice, slice]]]:
    """Chips of ``size`` px tiling the grid from its top-left corner.

    Yields:
        ``(row0, col0, query)``: pixel offsets and the TorchGeo query slice.
    """
    ny, nx = grid.height // size, grid.width // size
    if ny == 0 or nx == 0:
        return
    xmin, _, _, ymax = grid.bounds
    roi = shapely.box(xmin, ymax - ny * size * grid.res, xmin + nx * size * grid.res, ymax)
    for x, y, t in GridGeoSampler(label_ds, size=size, stride=size, roi=roi):
        col0 = round((x.start - xmin) / grid.res)
        row0 = round((ymax - y.stop) / grid.res)
        yield row0, col0, (slice(x.start, x.stop, grid.res), slice(y.start, y.stop, grid.res), t)


def read_query(ds: RasterDataset, query: tuple[slice, slice, slice]) -> np.ndarray:
    """Read one query from a TorchGeo dataset as a numpy array ``[bands, h, w]``."""
    sample = ds[query]
    arr = sample["image"] if ds.is_image else sample["mask"]
    return arr.numpy()


def to_time_series(x: np.ndarray, modality: str, channels: int | None = None) -> np.ndarray:
    """``[T*C, ...]`` -> ``[..., T, C]`` for temporal modalities, ``[C, ...]`` -> ``[..., C]`` for static ones.

    ``channels``: channels per time step ``C`` (default every band of the modality).
    """
    c = channels or channels_per_step(None, [modality])[modality]
    if TEMPORAL[modality]:
        t = x.shape[0] // c
        y = x.reshape(t, c, *x.shape[1:])
        return np.moveaxis(y, (0, 1), (-2, -1))
    return np.moveaxis(x, 0, -1)


@dataclass
class PixelSamples:
    """Pixel time series in memory.

    Attributes:
        x: ``{m: [N, T, C]}`` (static ``[N, C]``), float32 with NaN where invalid.
        mask: bool ``[N, M]``, modality presence.
        y: int64 ``[N]``.
        split: uint8 ``[N]`` (0 train, 1 val, 2 test).
        modalities: the modality order of ``mask``.
    """

    x: dict[str, np.ndarray]
    mask: np.ndarray
    y: np.ndarray
    split: np.ndarray
    modalities: list[str]

    def subset(self, idx: np.ndarray) -> PixelSamples:
        """Samples at ``idx``."""
        return PixelSamples({m: v[idx] for m, v in self.x.items()}, self.mask[idx], self.y[idx], self.split[idx], self.modalities)

    def __len__(self) -> int:
        return len(self.y)


def sample_pixels(stack_dir: Path, labels_tif: Path, chips: pd.DataFrame, grid: Grid, months: Sequence[str],
                  modalities: Sequence[str], per_class: int, min_valid_fraction: float, seed: int,
                  splits: Sequence[str] = SPLITS, bands: Mapping[str, Sequence[str]] | None = None) -> PixelSamples:
    """Stratified pixel sample: up to ``per_class`` labelled pixels per class and split.

    Pixels are chosen from ``labels.tif`` alone (seeded), then only the chips that hold chosen
    pixels are read through the TorchGeo datasets. ``bands``: the stacks' bands per modality
    (the config's ``bands``; default every band).
    """
    channels = channels_per_step(bands, modalities)
    rng = np.random.default_rng(seed)
    with rasterio.open(labels_tif) as src:
        cls, spl = src.read(1), src.read(2)
    chosen = np.zeros(cls.shape, dtype=bool)
    for si, s in enumerate(SPLITS):
        if s not in splits:
            continue
        for c in np.unique(cls[(spl == si) & (cls != NODATA)]):
            idx = np.flatnonzero((cls == c) & (spl == si))
            pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
            chosen.flat[pick] = True
    stacks = open_stacks(stack_dir, months, modalities, bands)
    xs: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    masks, ys, sps = [], [], []
    labels_ds = LabelRaster(labels_tif)
    for r in progress(chips.itertuples(), "pixels", "chip", total=len(chips)):
        window = chosen[r.row : r.row + r.size, r.col : r.col + r.size]
        if not window.any():
            continue
        q = (slice(r.xmin, r.xmax, grid.res), slice(r.ymin, r.ymax, grid.res), slice(None))
        lab = read_query(labels_ds, q)
        arrays = {m: read_query(ds, q) for m, ds in stacks.items()}
        pres = presence_stack(arrays, modalities, min_valid_fraction, lab.shape[1:], channels)
        sel = window
        for m in modalities:
            if m in arrays:
                xs[m].append(to_time_series(arrays[m], m, channels[m])[sel])
            else:
                t = len(months) if TEMPORAL[m] else None
                shape = (int(sel.sum()), t, channels[m]) if t else (int(sel.sum()), channels[m])
                xs[m].append(np.full(shape, np.nan, np.float32))
        masks.append(pres[:, sel].T)
        ys.append(lab[0][sel].astype(np.int64))
        sps.append(lab[1][sel].astype(np.uint8))
    if not ys:
        raise LabelError(f"{labels_tif}: no labelled pixel found in the chips; check the labels cover the region")
    return PixelSamples({m: np.concatenate(v).astype(np.float32) for m, v in xs.items()},
                        np.concatenate(masks), np.concatenate(ys), np.concatenate(sps), list(modalities))


class ChipDataset(Dataset):
    """Segmentation chips read through the TorchGeo stack datasets.

    Each item: ``{m: float32 [T*C, h, w]}`` for every modality (NaN-filled when absent from
    the region), ``mask: bool [M, h, w]`` and ``y: int64 [h, w]`` (``IGNORE_INDEX`` unlabelled).
    ``bands``: the stacks' bands per modality (the config's ``bands``; default every band);
    :attr:`channels` gives the channels per time step.
    """

    def __init__(self, stack_dir: Path, labels_tif: Path, chips: pd.DataFrame, grid: Grid, months: Sequence[str],
                 modalities: Sequence[str], min_valid_fraction: float,
                 bands: Mapping[str, Sequence[str]] | None = None) -> None:
        self.stack_dir, self.labels_tif = stack_dir, labels_tif
        self.chips = chips.reset_index(drop=True)
        self.grid, self.months, self.modalities = grid, list(months), list(modalities)
        self.bands = {m: tuple(b) for m, b in resolve_bands(bands).items() if m in self.modalities}
        self.channels = {m: len(b) for m, b in self.bands.items()}
        self.min_valid_fraction = min_valid_fraction
        self._stacks: dict[str, StackDataset] | None = None
        self._labels: LabelRaster | None = None

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._stacks is None:  # opened lazily, once per DataLoader worker
            self._stacks = open_stacks(self.stack_dir, self.months, self.modalities, self.bands)
            self._labels = LabelRaster(self.labels_tif)
        assert self._labels is not None
        r = self.chips.iloc[i]
        q = (slice(r.xmin, r.xmax, self.grid.res), slice(r.ymin, r.ymax, self.grid.res), slice(None))
        lab = read_query(self._labels, q)
        arrays = {m: read_query(ds, q) for m, ds in self._stacks.items()}
        h, w = lab.shape[1:]
        out: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            n_bands = len(band_descriptions(m, self.months, self.bands[m]))
            out[m] = torch.from_numpy(arrays[m]) if m in arrays else torch.full((n_bands, h, w), float("nan"))
        out["mask"] = torch.from_numpy(presence_stack(arrays, self.modalities, self.min_valid_fraction, (h, w), self.channels))
        y = lab[0].astype(np.int64)
        y[lab[0] == NODATA] = IGNORE_INDEX
        out["y"] = torch.from_numpy(y)
        return out
