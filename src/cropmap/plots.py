"""Figures of the report (matplotlib, Agg backend): each function returns a PNG as bytes.

One look for every figure: white background, light grid, values printed in heatmap cells,
colour bars labelled with their unit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110
#: colour of each sensor in the report's figures
SENSOR_COLOURS = {"s2": "#2e7d32", "s1": "#1565c0", "weather": "#ef6c00", "dem": "#6d4c41"}
GREY = "#d9d9d9"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return buf.getvalue()


def heatmap(values: pd.DataFrame, *, title: str, cbar_label: str, cmap: str = "viridis", vmin: float = 0,
            vmax: float = 100, fmt: str = "{:.0f}", mark_best: Literal["column", "row"] | None = None,
            xlabel: str = "", ylabel: str = "", cell: tuple[float, float] = (0.55, 0.36)) -> Figure:
    """A labelled heatmap of ``values`` (rows x columns), each cell's value printed in it.

    ``mark_best``: outline the highest value of every column (or row) and print it in bold.
    """
    plt = _plt()
    v = values.to_numpy(dtype=float)
    h, w = v.shape
    fig, ax = plt.subplots(figsize=(max(4.5, cell[0] * w + 2.8), max(2.2, cell[1] * h + 1.6)))
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(w), [str(c) for c in values.columns], rotation=45 if w > 4 else 0,
                  ha="right" if w > 4 else "center")
    ax.set_yticks(range(h), [str(i) for i in values.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    best = np.zeros_like(v, bool)
    if mark_best and np.isfinite(v).any():
        axis = 0 if mark_best == "column" else 1
        top = np.nanmax(np.where(np.isfinite(v), v, -np.inf), axis=axis, keepdims=True)
        best = np.isfinite(v) & (v == top)
    cm = im.cmap
    norm = im.norm
    for i in range(h):
        for j in range(w):
            if not np.isfinite(v[i, j]):
                continue
            r, g, b, _ = cm(norm(v[i, j]))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
            ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black", fontweight="bold" if best[i, j] else "normal")
            if best[i, j]:
                ax.add_patch(plt.Rectangle((j - 0.46, i - 0.44), 0.92, 0.88, fill=False, lw=2, ec="#d62728"))
    fig.colorbar(im, ax=ax, label=cbar_label, fraction=0.05, pad=0.02)
    ax.set_title(title)
    return fig


def raster(arr: np.ndarray, *, title: str, cbar_label: str, cmap: str = "RdYlGn", vmin: float = 0,
           vmax: float = 100, nodata_label: str = "no value") -> Figure:
    """A continuous raster (masked cells white) with a colour bar."""
    plt = _plt()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.03)
    if np.isnan(arr).any():
        ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label=nodata_label)],
                  loc="upper center", bbox_to_anchor=(0.5, -0.01), frameon=False)
    return fig


def categorical_raster(ax: object, codes: np.ndarray, colours: Sequence[str]) -> None:
    """Draw ``codes`` (0..len(colours)-1, NaN/-1 = white) on ``ax`` with one colour per code."""
    from matplotlib.colors import ListedColormap

    a = np.ma.masked_less(np.nan_to_num(codes.astype(float), nan=-1), 0)
    ax.imshow(a, cmap=ListedColormap(list(colours)), vmin=-0.5, vmax=len(colours) - 0.5,  # type: ignore[attr-defined]
              interpolation="nearest")
    ax.set_axis_off()  # type: ignore[attr-defined]


def gain_maps(best: np.ndarray, gain: np.ndarray, labels: Sequence[str], colours: Sequence[str],
              title: str = "What would help") -> Figure:
    """Two maps: the missing sensor that matters most (categorical) and its gain in score points."""
    plt = _plt()
    from matplotlib.patches import Patch

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    categorical_raster(a0, best, colours)
    a0.set_title("sensor whose addition helps most")
    present = set(np.unique(best[np.isfinite(best)]).astype(int)) if np.isfinite(best).any() else set()
    a0.legend(handles=[Patch(facecolor=c, label=lab) for i, (c, lab) in enumerate(zip(colours, labels, strict=True)) if i in present],
              loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False)
    im = a1.imshow(np.ma.masked_invalid(gain), cmap="magma_r", vmin=0, vmax=max(1.0, float(np.nanmax(gain)) if np.isfinite(gain).any() else 1.0),
                   interpolation="nearest")
    a1.set_axis_off()
    a1.set_title("expected gain (weighted F1 points)")
    fig.colorbar(im, ax=a1, fraction=0.046, pad=0.03, label="weighted F1 points")
    fig.suptitle(title, fontweight="bold")
    return fig


def barh(values: pd.Series, *, title: str, xlabel: str, colour: str = "#4c72b0", fmt: str = "{:.1f}",
         xmax: float | None = None) -> Figure:
    """Horizontal bars, largest on top, each labelled with its value."""
    plt = _plt()
    v = values.sort_values()
    fig, ax = plt.subplots(figsize=(6.2, max(1.6, 0.32 * len(v) + 1.0)))
    ax.barh(range(len(v)), v.to_numpy(float), color=colour)
    ax.set_yticks(range(len(v)), [str(i) for i in v.index])
    top = xmax if xmax is not None else float(v.max()) * 1.15 if len(v) else 1.0
    ax.set_xlim(0, top)
    for i, x in enumerate(v.to_numpy(float)):
        ax.text(x + top * 0.01, i, fmt.format(x), va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)
    return fig


def confusion(m: np.ndarray, names: Sequence[str], *, title: str) -> Figure:
    """Confusion matrix side by side: counts, and row-normalised (recall per true class, %)."""
    plt = _plt()
    k = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.3 * k + 4), max(3.6, 0.5 * k + 1.8)), layout="constrained")
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = 100 * m / m.sum(axis=1, keepdims=True)
    for ax, vals, sub, cmap, fmt in ((axes[0], m.astype(float), "pixels", "Blues", "{:.0f}"),
                                     (axes[1], rows, "% of the true class (row)", "Greens", "{:.0f}")):
        vmax = float(np.nanmax(vals)) if np.isfinite(vals).any() and np.nanmax(vals) > 0 else 1.0
        im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=0, vmax=vmax if sub == "pixels" else 100)
        ax.set_xticks(range(k), list(names), rotation=45, ha="right")
        ax.set_yticks(range(k), list(names))
        ax.set_xlabel("predicted class")
        if ax is axes[0]:
            ax.set_ylabel("true class (reference)")
        ax.tick_params(length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        for i in range(k):
            for j in range(k):
                if np.isfinite(vals[i, j]) and (vals[i, j] > 0 or i == j):
                    dark = vals[i, j] > 0.55 * (vmax if sub == "pixels" else 100)
                    ax.text(j, i, fmt.format(vals[i, j]), ha="center", va="center", fontsize=7.5,
                            color="white" if dark else "black")
        ax.set_title(sub)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle(title, fontweight="bold")
    return fig


def area_chart(df: pd.DataFrame, *, title: str) -> Figure:
    """Per class: mapped area and the error-adjusted estimate with its 95 % CI (ha)."""
    plt = _plt()
    d = df.iloc[::-1]
    y = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.48 * len(d) + 1.2)))
    ax.barh(y + 0.2, d["mapped_ha"], height=0.38, color="#9ecae1", label="mapped (pixel count)")
    err = np.vstack([d["area_ha"] - d["area_ci95_low_ha"], d["area_ci95_high_ha"] - d["area_ha"]])
    ax.barh(y - 0.2, d["area_ha"].fillna(0), height=0.38, color="#08519c", label="error-adjusted estimate",
            xerr=np.nan_to_num(err), error_kw={"ecolor": "#d62728", "capsize": 3, "lw": 1.4})
    ax.set_yticks(y, list(d["class"]))
    ax.set_xlabel("area (ha); red: 95 % confidence interval")
    ax.set_xlim(left=0)
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", frameon=False)
    ax.set_title(title)
    return fig


def training_curves(hist: pd.DataFrame, *, title: str) -> Figure:
    """Losses per epoch (training terms and validation loss) and validation F1 (or accuracy)."""
    plt = _plt()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    ep = hist["epoch"].to_numpy() + 1
    terms = [c for c in hist.columns if c.startswith("train/")]
    for c in terms:
        lw, alpha = (2.2, 1.0) if c in ("train/total",) else (1.0, 0.7)
        a0.plot(ep, hist[c], marker="o", ms=3, lw=lw, alpha=alpha, label=c)
    if "val_loss" in hist:
        a0.plot(ep, hist["val_loss"], marker="s", ms=4, lw=2.2, color="black", label="val_loss")
    vals = hist[[c for c in (*terms, "val_loss") if c in hist]].to_numpy(float)
    if np.isfinite(vals).any() and np.nanmin(vals) > 0 and np.nanmax(vals) / np.nanmin(vals) > 20:
        a0.set_yscale("log")
    a0.set_xlabel("epoch")
    a0.set_ylabel("loss")
    a0.set_title("losses")
    a0.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    a0.grid(color="#eeeeee")
    for col, lab, colour in (("val_f1", "validation F1", "#2ca02c"), ("val_acc", "validation accuracy", "#1f77b4")):
        if col in hist and hist[col].notna().any():
            s = hist[col].astype(float)
            s = s * 100 if s.max() <= 1.0 else s
            a1.plot(ep, s, marker="o", ms=4, lw=2, color=colour, label=lab)
    a1.set_ylim(0, 100)
    a1.set_xlabel("epoch")
    a1.set_ylabel("%")
    a1.set_title("validation scores")
    a1.legend(frameon=False)
    a1.grid(color="#eeeeee")
    for a in (a0, a1):
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontweight="bold")
    return fig
