"""Stage ``chips``: the table of segmentation chips of a region, with split and sensor presence.

Chips of ``chips.size`` px tile the grid from its top-left corner
(:func:`cropmap.datasets.aligned_chips`, TorchGeo's ``GridGeoSampler``), so every chip lies inside
one split block. ``chips.parquet`` lists every chip with its split, labelled-pixel count and
per-modality presence; training, pretraining and the metrics read their samples through it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cropmap.availability import presence_stack
from cropmap.datasets import LabelRaster, aligned_chips, open_stacks, read_query
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.labels import NODATA, SPLITS
from cropmap.modalities import channels_per_step
from cropmap.progress import progress

log = logging.getLogger(__name__)


def chip_table(stack_dir: Path, labels_tif: Path, grid: Grid, months: Sequence[str], modalities: Sequence[str],
               size: int, min_valid_fraction: float, bands: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Enumerate chips with split, labelled pixels and per-modality presence (share of pixels).

    ``bands``: the stacks' bands per modality (the config's ``bands``; default every band).
    """
    stacks = open_stacks(stack_dir, months, modalities, bands)
    channels = channels_per_step(bands, modalities)
    labels = LabelRaster(labels_tif)
    rows = []
    chips = list(aligned_chips(labels, grid, size))
    for row0, col0, q in progress(chips, "chips", "chip"):
        lab = read_query(labels, q)
        arrays = {m: read_query(ds, q) for m, ds in stacks.items()}
        pres = presence_stack(arrays, modalities, min_valid_fraction, lab.shape[1:], channels)
        split_vals = np.unique(lab[1])
        rec: dict[str, Any] = {
            "row": row0, "col": col0, "size": size,
            "xmin": q[0].start, "xmax": q[0].stop, "ymin": q[1].start, "ymax": q[1].stop,
            "split": SPLITS[int(split_vals[0])] if len(split_vals) == 1 else "mixed",
            "n_labelled": int((lab[0] != NODATA).sum()),
        }
        for i, m in enumerate(modalities):
            rec[f"present_{m}"] = float(pres[i].mean())
        rows.append(rec)
    return pd.DataFrame(rows)


def write_chips(df: pd.DataFrame, out: Path) -> None:
    """Write the chip table atomically."""
    with atomic_path(out) as tmp:
        df.to_parquet(tmp, index=False)


def run(stack_dir: Path, labels_tif: Path, out: Path, grid: Grid, months: Sequence[str], modalities: Sequence[str],
        size: int, min_valid_fraction: float, bands: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Write ``chips.parquet`` and return it."""
    df = chip_table(stack_dir, labels_tif, grid, months, modalities, size, min_valid_fraction, bands)
    write_chips(df, out)
    log.info("%d chips: %s", len(df), df["split"].value_counts().to_dict())
    return df
