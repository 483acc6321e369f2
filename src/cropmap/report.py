"""Stage ``report``: held-out metrics for every non-empty subset of modalities, and the HTML report.

The protocol of seed 000 (Table 1): test-split pixels where every modality of the region is
present are evaluated once per subset, with the other modalities masked as missing. For 4
modalities that is 15 rows: weighted F1, macro F1 and overall accuracy, with the pixel count.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm

from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.predict import Predictor
from cropmap.tiles import IGNORE_INDEX, ChipDataset, PixelSamples, sample_pixels

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
    preds = []
    keep_t = torch.tensor(list(keep), dtype=torch.bool)
    for b in batches:
        b = dict(b)
        m = b["mask"]
        b["mask"] = m & keep_t.view(1, -1, *([1] * (m.dim() - 2)))
        preds.append(predictor._proba({k: v for k, v in b.items() if k != "y"}).argmax(1).cpu().numpy())
    return np.concatenate([p.reshape(len(p), -1) if p.ndim > 1 else p for p in preds], axis=0)


def evaluate(ckpt: Path, stack_dir: Path, labels_tif: Path, chips_parquet: Path, grid: Grid, *,
             max_pixels_per_class: int, seed: int, device: str = "auto", batch_size: int = 8192) -> pd.DataFrame:
    """Metrics per modality subset on the test split (pixels where every region modality is present).

    Returns:
        One row per subset: ``subset, n_modalities, n, f1_weighted, f1_macro, accuracy``.
    """
    predictor = Predictor(ckpt, device, batch_size)
    mods = predictor.modalities
    months = predictor.bundle["months"]
    mvf = predictor.min_valid_fraction
    chips = pd.read_parquet(chips_parquet)
    region_mods = [m for m in mods if (stack_dir / f"{m}.tif").exists()]
    full = torch.tensor([m in region_mods for m in mods])
    batches: list[dict[str, torch.Tensor]] = []
    if predictor.task == "classification":
        s = sample_pixels(stack_dir, labels_tif, chips[chips.split == "test"], grid, months, mods,
                          max_pixels_per_class, mvf, seed, splits=("test",))
        return evaluate_samples(predictor, s, region_mods, batch_size)
    te = chips[(chips.split == "test") & (chips.n_labelled > 0)]
    ds = ChipDataset(stack_dir, labels_tif, te, grid, months, mods, mvf)
    ys = []
    for i in range(len(ds)):
        it = ds[i]
        complete = it["mask"][full].all(dim=0)
        it["y"] = torch.where(complete, it["y"], torch.full_like(it["y"], IGNORE_INDEX))
        ys.append(it["y"].numpy().ravel())
        batches.append({k: v.unsqueeze(0) for k, v in it.items()})
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    return subset_table(predictor, batches, y, region_mods)


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
    """Score ``batches`` once per non-empty subset of ``region_mods`` (others masked as missing)."""
    mods = predictor.modalities
    valid = y != IGNORE_INDEX
    rows = []
    for sub in tqdm(subsets(region_mods), desc="subsets", unit="subset"):
        keep = [m in sub for m in mods]
        pred = _predict_batches(predictor, batches, keep).ravel() if batches else np.zeros(0, np.int64)
        rows.append({"subset": subset_name(sub), "n_modalities": len(sub), "n": int(valid.sum()),
                     **scores(y[valid], pred[valid])})
    return pd.DataFrame(rows)


def write_metrics(df: pd.DataFrame, out: Path) -> None:
    """Write metrics CSV (rounded to 2 decimals)."""
    with atomic_path(out) as tmp:
        df.round(2).to_csv(tmp, index=False)


def html_report(regions: dict[str, dict[str, Path]], out: Path) -> None:
    """A self-contained HTML page: per region its metrics table, quicklook and availability."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>cropmap report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             "<h1>cropmap report</h1>"]
    import base64

    for name, files in regions.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if files.get("metrics") and Path(files["metrics"]).exists():
            parts.append("<h3>Held-out metrics per sensor subset (test split)</h3>")
            parts.append(pd.read_csv(files["metrics"]).to_html(index=False, float_format=lambda v: f"{v:.1f}"))
        if files.get("expected") and Path(files["expected"]).exists():
            import rasterio

            with rasterio.open(files["expected"]) as src:
                mean = src.tags().get("mean_expected", "n/a")
            parts.append(f"<p>Mean expected weighted F1 over mapped pixels (expected_f1.tif): <b>{html.escape(mean)}</b></p>")
        if files.get("summary") and Path(files["summary"]).exists():
            s = json.loads(Path(files["summary"]).read_text())
            parts.append(f"<p>Training: {html.escape(json.dumps(s))}</p>")
        if files.get("availability") and Path(files["availability"]).exists():
            av = json.loads(Path(files["availability"]).read_text())
            df = pd.DataFrame({m: v for m, v in av.items() if v}).T
            parts.append("<h3>Valid-pixel fraction per month</h3>" + df.to_html(float_format=lambda v: f"{v:.2f}"))
        if files.get("coverage") and Path(files["coverage"]).exists():
            cov = json.loads(Path(files["coverage"]).read_text())
            empty = ", ".join(cov["empty_tiles"]) or "none"
            parts.append(
                "<h3>Coverage</h3><p>"
                f"Nodata pixels (no sensor at all): <b>{100 * cov['nodata_share']:.2f} %</b> ({cov['nodata_pixels']} of {cov['pixels']}); "
                f"tiles without any sensor: <b>{len(cov['empty_tiles'])}</b> of {cov['tiles']} ({html.escape(empty)}); "
                f"months without data in any sensor: <b>{html.escape(', '.join(cov['months_without_data']) or 'none')}</b>.</p>"
            )
        if files.get("quicklook") and Path(files["quicklook"]).exists():
            b64 = base64.b64encode(Path(files["quicklook"]).read_bytes()).decode()
            parts.append(f"<img alt='quicklook of {html.escape(name)}' src='data:image/png;base64,{b64}'/>")
    parts.append("</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
