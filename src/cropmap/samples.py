"""Stage ``samples``: a training set's tables as one file of labelled pixel samples.

``training_sets.<name>`` lists sample tables (point extractions: WorldCereal, CropHarvest, or
cropmap's generic layout; :mod:`cropmap.tables.training`). This stage reads them with the
configured bands, keeps the months of the set's season by calendar month, resolves the classes
(the config's ``classes``, or the tables' own codes when it is empty), computes presence masks
(:func:`cropmap.availability.present`'s rule), groups the samples by ``cell_deg`` lat/lon cells
and splits the cells into train / val / test with the splitter of raster labels
(:func:`cropmap.splits.group_splits`). Everything goes to ``data/<name>/samples.npz``
(:func:`write_samples`): the arrays, and as JSON the class table, months, bands and modalities,
so the class table travels with the samples into the checkpoint and the maps' legends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cropmap.datasets import PixelSamples
from cropmap.errors import InputDataError
from cropmap.io import atomic_path
from cropmap.modalities import MODALITIES, resolve_bands
from cropmap.splits import group_counts, group_splits
from cropmap.tables.common import class_counts as tables_class_counts
from cropmap.tables.common import location_groups, presence_mask

log = logging.getLogger(__name__)

#: Samples file format version (``meta["version"]``).
VERSION = 1


@dataclass
class SampleSet:
    """A training set's samples with what travels with them.

    Attributes:
        name: the training set.
        samples: pixel samples (``x``, ``mask``, ``y``, ``split``, ``modalities``).
        group: int64 ``[N]`` spatial group (lat/lon cell) of each sample.
        lat, lon: ``[N]`` WGS84 degrees.
        months: the season's months (the time axis).
        bands: ``{modality: bands}`` of ``x``.
        classes: the class table ``[{id, name, colour, codes, n}]``.
    """

    name: str
    samples: PixelSamples
    group: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    months: list[str]
    bands: dict[str, list[str]]
    classes: list[dict]

    def part(self, split: int) -> PixelSamples:
        """The samples of one split (0 train, 1 val, 2 test)."""
        return self.samples.subset(np.flatnonzero(self.samples.split == split))

    def with_split(self, split: np.ndarray) -> SampleSet:
        """The same samples with another split (a cross-validation fold)."""
        s = self.samples
        return replace(self, samples=PixelSamples(s.x, s.mask, s.y, split.astype(np.uint8), s.modalities))


def split_set(y: np.ndarray, group: np.ndarray, *, seed: int, fractions: Mapping[str, float], folds: int = 1, fold: int = 0,
              what: str = "lat/lon cells", fix: str = "lower the training set's cell_deg") -> np.ndarray:
    """Split id per sample: :func:`cropmap.splits.group_splits` over the samples' groups."""
    per_group = group_splits(group_counts(y, group), seed=seed, fractions=fractions, folds=folds, fold=fold, what=what, fix=fix)
    return per_group[group]


def build(p: Mapping[str, Any]) -> SampleSet:
    """The samples of the training set described by the stage parameters ``p``
    (:func:`cropmap.config.stage_params` ``"samples"``).

    Raises:
        InputDataError: a table that cannot be read, lacks a configured band or does not cover
            the season; too few lat/lon cells for the split.
        LabelError: label values no class lists (``unknown_codes: error``).
    """
    from cropmap.tables.training import read_training_set

    ts, name = p["set"], p["name"]
    bands = resolve_bands(p.get("bands"))
    mods: list[str] = [m for m in MODALITIES if m in p["modalities"]]
    tt = read_training_set(ts["tables"], (ts["season"]["start"], ts["season"]["end"]), classes=p["classes"] or None,
                           bands=bands, min_samples=ts["min_samples"], unknown=ts["unknown_codes"], name=f"training_sets.{name}")
    keep = np.flatnonzero(tt.y >= 0)
    x: dict[str, np.ndarray] = {m: np.ascontiguousarray(tt.x[m][keep], dtype=np.float32) for m in mods}
    y, lat, lon = tt.y[keep], tt.lat[keep], tt.lon[keep]
    group = location_groups(lat, lon, float(ts["cell_deg"]))
    cells = f"lat/lon cells of {ts['cell_deg']} degrees"
    split = split_set(y, group, seed=p["seed"], fractions=p["split"], what=cells,
                      fix=f"lower training_sets.{name}.cell_deg or add samples")
    mask = presence_mask(x, mods, p["min_valid_fraction"])
    samples = PixelSamples(x, mask, y.astype(np.int64), split.astype(np.uint8), mods)
    classes = [c | {"n": int((y == c["id"]).sum())} for c in tt.classes]
    return SampleSet(name, samples, group, lat, lon, list(tt.months), {m: list(bands[m]) for m in mods}, classes)


def write_samples(s: SampleSet, out: Path) -> None:
    """Write ``samples.npz`` atomically (arrays, and the metadata as a JSON string)."""
    meta = {"version": VERSION, "name": s.name, "modalities": s.samples.modalities, "months": s.months, "bands": s.bands,
            "classes": s.classes}
    arrays: dict[str, Any] = {f"x_{m}": v for m, v in s.samples.x.items()}
    arrays |= {"mask": s.samples.mask, "y": s.samples.y, "split": s.samples.split, "group": s.group, "lat": s.lat, "lon": s.lon,
               "meta": np.array(json.dumps(meta, default=int))}
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def read_samples(path: Path) -> SampleSet:
    """Read what :func:`write_samples` wrote.

    Raises:
        InputDataError: a missing or foreign file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            mods = list(meta["modalities"])
            samples = PixelSamples({m: z[f"x_{m}"] for m in mods}, z["mask"], z["y"], z["split"], mods)
            group, lat, lon = z["group"], z["lat"], z["lon"]
    except (OSError, KeyError, ValueError) as exc:
        raise InputDataError(f"{path}: not a samples file of cropmap ({type(exc).__name__}); delete it and rerun snakemake "
                             "so the samples stage writes it again") from None
    return SampleSet(meta["name"], samples, group, lat, lon, list(meta["months"]), {k: list(v) for k, v in meta["bands"].items()},
                     list(meta["classes"]))


def class_counts(s: SampleSet) -> list[dict]:
    """Samples per class and split: ``[{id, name, train, val, test, total}]``."""
    return list(tables_class_counts(s.samples, s.classes).to_dict("records"))


def cap_per_class(s: PixelSamples, per_class: int | None, seed: int) -> PixelSamples:
    """At most ``per_class`` samples of each class (seeded choice; None keeps all)."""
    if per_class is None:
        return s
    rng = np.random.default_rng(seed)
    keep = [rng.choice(idx, size=min(per_class, len(idx)), replace=False)
            for c in np.unique(s.y) for idx in [np.flatnonzero(s.y == c)]]
    return s.subset(np.sort(np.concatenate(keep))) if keep else s


def run(p: Mapping[str, Any], out: Path) -> SampleSet:
    """Build and write a training set's samples; returns them."""
    s = build(p)
    write_samples(s, out)
    split_sizes = np.bincount(s.samples.split, minlength=3).tolist()
    log.info("%s: %d samples in %d cells, months %s .. %s, split train/val/test %s, classes %s", s.name, len(s.samples),
             len(np.unique(s.group)), s.months[0], s.months[-1], split_sizes, {c["name"]: c["n"] for c in s.classes})
    return s


__all__: Sequence[str] = ["SampleSet", "build", "cap_per_class", "class_counts", "read_samples", "run", "split_set",
                          "write_samples"]
