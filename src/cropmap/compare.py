"""Stage ``compare``: the missing-sensor protocol across methods (Mena, Ienco, Dantas & Interdonato
2025, Table 1).

Every method is trained on the same splits with the same seed and evaluated on every non-empty
subset of modalities. ``summarise`` reports per method the average weighted F1 over
'moderate' subsets (exactly one modality missing), 'extreme' subsets (exactly one present) and
all subsets ('overall'), as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cropmap.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TABLE_COLUMNS = ["method", "subset", "f1_weighted", "f1_macro", "accuracy", "ece", "n"]


def summarise(table: pd.DataFrame, metric: str = "f1_weighted") -> pd.DataFrame:
    """Moderate / extreme / overall averages of ``metric`` per method (and per other key columns).

    Args:
        table: rows of (``method``, ``subset``, metrics ...); optional ``region``/``fold`` columns.
        metric: the column to average.

    Returns:
        One row per method (per region when present): ``moderate, extreme, overall, full``
        (``full`` = all modalities present), ``ece`` (the expected calibration error averaged
        over subsets, when the table has it), plus ``*_std`` over folds when a ``fold`` column
        exists.
    """
    t = table.copy()
    t["k"] = t["subset"].str.count(r"\+") + 1
    keys = [c for c in ("region", "method") if c in t.columns]
    rows = []
    for key, g in t.groupby(keys + (["fold"] if "fold" in t.columns else []), sort=False):
        m = int(g["k"].max())
        key = key if isinstance(key, tuple) else (key,)
        rows.append(dict(zip(keys + (["fold"] if "fold" in t.columns else []), key, strict=True)) | {
            "moderate": g.loc[g.k == m - 1, metric].mean() if m > 1 else np.nan,
            "extreme": g.loc[g.k == 1, metric].mean(),
            "overall": g[metric].mean(),
            "full": g.loc[g.k == m, metric].mean(),
            **({"ece": g["ece"].mean()} if "ece" in g.columns else {}),
        })
    s = pd.DataFrame(rows)
    if "fold" in s.columns:
        agg = s.drop(columns="fold").groupby(keys, sort=False)
        s = agg.mean().join(agg.std(ddof=0).add_suffix("_std")).reset_index()
    return s


def _rounded(df: pd.DataFrame) -> pd.DataFrame:
    """F1 and accuracy (percent) to 2 decimals, the ECE columns (fractions) to 4."""
    out = df.round(2)
    for c in df.columns:
        if c.startswith("ece"):
            out[c] = df[c].round(4)
    return out


def heatmap_figure(table: pd.DataFrame, metric: str = "f1_weighted", title: str = "") -> Figure:
    """Method x subset heatmap of ``metric`` (mean over folds/regions), the best of each subset outlined."""
    from cropmap import plots

    piv = table.pivot_table(index="method", columns="subset", values=metric, aggfunc="mean", sort=False)
    piv = piv[sorted(piv.columns, key=lambda s: (-(s.count("+") + 1), s))]
    return plots.heatmap(piv, title=title or f"{metric} per method and sensor subset", cbar_label=f"{metric} (%)",
                         mark_best="column", xlabel="sensors available")


def heatmap(table: pd.DataFrame, out_png: Path, metric: str = "f1_weighted", title: str = "") -> None:
    """Write :func:`heatmap_figure` as a PNG."""
    from cropmap import plots

    with atomic_path(out_png) as tmp:
        tmp.write_bytes(plots.png(heatmap_figure(table, metric, title)))


def collect(parts: Sequence[Path], out_table: Path, out_summary: Path, out_png: Path | None = None) -> pd.DataFrame:
    """Concatenate per-method subset tables and write ``table.csv``, ``summary.csv`` and the heatmap."""
    table = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
    if "fold" in table.columns and table["fold"].nunique() == 1:  # no cross-validation: no fold column
        table = table.drop(columns="fold")
    extra = [c for c in ("region", "fold") if c in table.columns]
    table = table[extra + [c for c in TABLE_COLUMNS if c in table.columns]]
    with atomic_path(out_table) as tmp:
        _rounded(table).to_csv(tmp, index=False)
    with atomic_path(out_summary) as tmp:
        _rounded(summarise(table)).to_csv(tmp, index=False)
    if out_png is not None:
        heatmap(table, out_png)
    return table
