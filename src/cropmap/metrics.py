"""Stage ``metrics``: held-out metrics for every non-empty subset of modalities.

The missing-sensor protocol of Mena, Ienco, Dantas & Interdonato (2025, Table 1): test-split
pixels where every modality of the region is present are evaluated once per subset, with the
other modalities masked as missing. For 4 modalities that is 15 rows: weighted F1, macro F1,
overall accuracy and the expected calibration error of the map's confidence (``ece``, 10 bins,
a fraction: :func:`cropmap.calibration.ece`), with the pixel count.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score

from cropmap.area import confusion_long
from cropmap.datasets import IGNORE_INDEX, ChipDataset, PixelSamples, sample_pixels
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.predict import Predictor
from cropmap.predict.bundle import bundle_bands
from cropmap.progress import progress

log = logging.getLogger(__name__)


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, largest first, in modality order."""
    out: list[tuple[str, ...]] = []
    for k in range(len(modalities), 0, -1):
        out.extend(itertools.combinations(modalities, k))
    return out


def subset_name(sub: Sequence[str]) -> str:
    """``s2+s1`` style name."""
    return "+".join(sub)


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Weighted F1, macro F1 and accuracy in percent."""
    if len(y) == 0:
        return {"f1_weighted": float("nan"), "f1_macro": float("nan"), "accuracy": float("nan")}
    return {
        "f1_weighted": 100 * f1_score(y, pred, average="weighted", zero_division=0),
        "f1_macro": 100 * f1_score(y, pred, average="macro", zero_division=0),
        "accuracy": 100 * accuracy_score(y, pred),
    }


def _predict_batches(predictor: Predictor, batches: list[dict[str, torch.Tensor]], keep: Sequence[bool]) -> np.ndarray:
    """Class probabilities ``[N, K]`` (pixels of chips flattened into N) with only ``keep``'s modalities."""
    preds = []
    keep_t = torch.tensor(list(keep), dtype=torch.bool)
    for b in batches:
        b = dict(b)
        m = b["mask"]
        b["mask"] = m & keep_t.view(1, -1, *([1] * (m.dim() - 2)))
        p = predictor.proba({k: v for k, v in b.items() if k != "y"}).float().cpu().numpy()
        preds.append(np.moveaxis(p, 1, -1).reshape(-1, p.shape[1]))  # [B, K(, H, W)] -> [B(*H*W), K]
    return np.concatenate(preds, axis=0)


def evaluate(ckpt: Path, stack_dir: Path, labels_tif: Path, chips_parquet: Path, grid: Grid, *,
             max_pixels_per_class: int, seed: int, device: str = "auto", batch_size: int = 8192,
             precision: str = "auto") -> pd.DataFrame:
    """Metrics per modality subset on the test split (pixels where every region modality is present).

    The model is applied as the ``predict`` stage applies it (:class:`~cropmap.predict.Predictor`,
    same ``device`` and ``precision``), so the scores are those of the map's model.

    Returns:
        One row per subset: ``subset, n_modalities, n, f1_weighted, f1_macro, accuracy, ece``.
    """
    predictor = Predictor(ckpt, device, batch_size, precision=precision)
    mods = predictor.modalities
    months = predictor.bundle["months"]
    mvf = predictor.min_valid_fraction
    chips = pd.read_parquet(chips_parquet)
    region_mods = [m for m in mods if (stack_dir / f"{m}.tif").exists()]
    full = torch.tensor([m in region_mods for m in mods])
    batches: list[dict[str, torch.Tensor]] = []
    bands = bundle_bands(predictor.bundle)
    if predictor.task == "classification":
        s = sample_pixels(stack_dir, labels_tif, chips[chips.split == "test"], grid, months, mods,
                          max_pixels_per_class, mvf, seed, splits=("test",), bands=bands)
        return evaluate_samples(predictor, s, region_mods, batch_size)
    te = chips[(chips.split == "test") & (chips.n_labelled > 0)]
    ds = ChipDataset(stack_dir, labels_tif, te, grid, months, mods, mvf, bands)
    ys = []
    for i in range(len(ds)):
        it = ds[i]
        complete = it["mask"][full].all(dim=0)
        it["y"] = torch.where(complete, it["y"], torch.full_like(it["y"], IGNORE_INDEX))
        ys.append(it["y"].numpy().ravel())
        batches.append({k: v.unsqueeze(0) for k, v in it.items()})
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    return subset_table(predictor, batches, y, region_mods)


def evaluate_set(ckpt: Path, samples_npz: Path, *, max_pixels_per_class: int, seed: int, device: str = "auto",
                 batch_size: int = 8192, precision: str = "auto") -> pd.DataFrame:
    """Metrics per modality subset on a training set's test split (``samples.npz``).

    As for a region: up to ``max_pixels_per_class`` test samples per class (seeded), scored
    where every modality the training set has (present for some sample) is present, once per
    non-empty subset with the others masked as missing.

    Returns:
        One row per subset: ``subset, n_modalities, n, f1_weighted, f1_macro, accuracy, ece``.
    """
    from cropmap.samples import cap_per_class, read_samples

    predictor = Predictor(ckpt, device, batch_size, precision=precision)
    s = read_samples(samples_npz)
    test = cap_per_class(s.part(2), max_pixels_per_class, seed)
    has = [m for i, m in enumerate(s.samples.modalities) if s.samples.mask[:, i].any()]
    return evaluate_samples(predictor, test, [m for m in predictor.modalities if m in has], batch_size)


def evaluate_samples(predictor: Predictor, s: PixelSamples, region_mods: Sequence[str] | None = None,
                     batch_size: int = 8192) -> pd.DataFrame:
    """Subset metrics on in-memory pixel samples (a region's test pixels or a sample table).

    Only samples where every modality of ``region_mods`` is present are scored, so each subset
    is evaluated on the same pixels with the other modalities masked.
    """
    mods = predictor.modalities
    region_mods = list(region_mods or mods)
    full = np.array([m in region_mods for m in mods])
    s = s.subset(np.flatnonzero(s.mask[:, full].all(axis=1)))
    batches = []
    for i in range(0, len(s), batch_size):
        b = {m: torch.from_numpy(v[i : i + batch_size]) for m, v in s.x.items()}
        b["mask"] = torch.from_numpy(s.mask[i : i + batch_size])
        batches.append(b)
    return subset_table(predictor, batches, s.y, region_mods)


def subset_table(predictor: Predictor, batches: list[dict[str, torch.Tensor]], y: np.ndarray,
                 region_mods: Sequence[str]) -> pd.DataFrame:
    """Score ``batches`` once per non-empty subset of ``region_mods`` (others masked as missing).

    The confusion counts of every subset ride along in ``attrs["confusion"]``, its scored
    probabilities and labels in ``attrs["proba"]`` (``{subset: (proba [n, K], y [n])}``: pooled
    over cross-validation folds they give one ECE on every test sample).
    """
    from cropmap.calibration import ece

    mods = predictor.modalities
    valid = y != IGNORE_INDEX
    rows = []
    confusion: list[tuple] = []
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sub in progress(subsets(region_mods), "subsets", "subset"):
        keep = [m in sub for m in mods]
        proba = _predict_batches(predictor, batches, keep) if batches else np.zeros((0, predictor.n_classes))
        pred = proba.argmax(1)
        rows.append({"subset": subset_name(sub), "n_modalities": len(sub), "n": int(valid.sum()),
                     **scores(y[valid], pred[valid]), "ece": ece(proba[valid], y[valid])})
        confusion.extend(confusion_long(y[valid], pred[valid], subset_name(sub)).itertuples(index=False, name=None))
        scored[subset_name(sub)] = (proba[valid], y[valid])
    df = pd.DataFrame(rows)
    df.attrs["confusion"] = confusion  # (subset, true, pred, count) records: area.write_confusion
    df.attrs["proba"] = scored
    return df


def write_metrics(df: pd.DataFrame, out: Path) -> None:
    """Write metrics CSV (rounded to 2 decimals; ``ece``, a fraction, to 4)."""
    with atomic_path(out) as tmp:
        df.round(2).assign(**({"ece": df["ece"].round(4)} if "ece" in df.columns else {})).to_csv(tmp, index=False)
