"""Real-data quality: k-fold spatial cross-validation of the pixel methods against the tree references.

Built on the workflow's own code: like ``benchmarks/compare_table.py`` (whose config it reuses)
it writes a config with the table as the only training set and runs ``snakemake compare`` on it
(``samples`` stage, the spatial folds of :mod:`cropmap.splits`, ``train`` with early stopping,
checkpoint choice and calibration on each fold's validation split only, ``metrics`` on every
non-empty sensor subset of the fold's test split). The model and training blocks are those of
the repository's ``config.yaml`` (the default method and recipe, schema defaults filled), with
the sizes of a small table: ``--epochs``, ``--patience``, ``--batch-size``.

Default table: the real WorldCereal Uganda 2017 extractions the tests carry
(``tests/data/realdata/worldcereal_uganda_2017_extractions.parquet``). Prints, per method, the
mean ± std over folds of the weighted F1 (extreme / moderate / overall / full, S2-only,
S1-only) and of the ECE (10 bins, each fold's test split, averaged over subsets), the pooled ECE
(``ece_pooled``: every test sample of the cross-validation at once, per subset, averaged over
subsets; a 70-sample fold alone gives a perfectly calibrated model an ECE of ~0.09), the
validation scores of each fold's final model (what recipes are chosen on), and as its last line::

    default_vs_trees_overall=+x.x default_vs_trees_full=+x.x worst_subset_vs_trees=+x.x default_vs_trees_nan_extreme=+x.x default_ece=0.xx

(weighted-F1 points of the default method, ``model.method`` of ``config.yaml``, against
``trees_dedicated``: overall, all sensors, and the worst sensor subset (per-subset difference of
the fold means); against ``trees_nan`` on extreme gaps; its pooled test ECE). Usage::

    python benchmarks/real_quality.py [--out /tmp/real_quality] [--folds 7] [--cores 2]
    python benchmarks/real_quality.py --methods comiss trees_dedicated trees_nan   # reduced
    python benchmarks/real_quality.py --set training.blend=none --out /tmp/rq_noblend   # an ablation
    python benchmarks/real_quality.py --pretrain   # pixel methods fine-tuned from pixel pretraining

The default runs every pixel method (``--methods`` must include the default method and both
tree references). Rerunning with the same ``--out`` reruns only what changed (Snakemake).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from compare_table import DEFAULT, ROOT
from compare_table import config as table_config

from cropmap.config import load

#: Subsets reported on their own besides the averages.
SINGLE = ("s2", "s1")
#: Keys of ``training`` that make the recipe (taken from ``config.yaml``).
RECIPE = ("lr", "weight_decay", "schedule", "balance", "monitor", "augment", "calibration", "blend", "pixels_per_class")


def workflow_config(a: argparse.Namespace) -> tuple[dict, str]:
    """The comparison config (the table as the only training set) and the default method."""
    shipped = load(ROOT / "config.yaml")
    cfg = table_config(a)
    model = shipped["model"]
    cfg["model"] = {"task": "classification", "method": model["method"], "hidden": model["hidden"],
                    "encoders": model["encoders"], "options": model["options"]}
    cfg["training"] |= {k: shipped["training"][k] for k in RECIPE}
    return cfg, model["method"]


def override(cfg: dict, assignments: list[str]) -> None:
    """Apply ``--set`` assignments ``a.b.c=value`` (YAML value) to ``cfg`` in place."""
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set {item!r}: expected KEY=VALUE, e.g. training.blend=trees_dedicated")
        *parents, leaf = key.split(".")
        node = cfg
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)


def validation(out: Path, methods: list[str], folds: int) -> pd.DataFrame:
    """Per method, mean ± std over folds of the final model's validation scores (``train_summary.json``):
    the figures recipes are chosen on (never the test folds)."""
    rows = []
    for method in methods:
        for k in range(folds):
            f = out / "models" / "table" / "compare" / f"fold{k}" / method / "classification" / "train_summary.json"
            if f.exists():
                s = json.loads(f.read_text())
                rows.append({"method": method, "fold": k, "val_f1": s.get("final_val_f1", np.nan),
                             "val_f1_full": s.get("final_val_f1_full", np.nan), "epochs": s.get("epochs", 0)})
    if not rows:
        return pd.DataFrame()
    return summary_table(pd.DataFrame(rows))


def pooled_ece(out: Path, cfg: dict, methods: list[str]) -> pd.Series:
    """Per method, the ECE (10 bins) of every test sample of the cross-validation at once, averaged
    over sensor subsets: each fold's model scores its own test split again
    (:func:`cropmap.metrics.evaluate_set`, as the metrics rule does) and the folds' probabilities
    are pooled per subset. One fold's test split (~70 samples) gives a noisy ECE (a perfectly
    calibrated model scores ~0.09 on 68 samples); pooled, ~480 samples per subset."""
    from cropmap.calibration import ece
    from cropmap.metrics import evaluate_set

    res = {}
    for method in methods:
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for k in range(cfg["compare"]["folds"]):
            ckpt = out / "models" / "table" / "compare" / f"fold{k}" / method / "classification" / "model.ckpt"
            df = evaluate_set(ckpt, out / "data" / "table" / "folds" / str(k) / "samples.npz", device="cpu",
                              max_pixels_per_class=cfg["evaluation"]["max_pixels_per_class"], seed=cfg["seed"])
            for sub, pair in df.attrs["proba"].items():
                parts.setdefault(sub, []).append(pair)
        res[method] = float(np.mean([ece(np.concatenate([p for p, _ in v]), np.concatenate([y for _, y in v]))
                                     for v in parts.values()]))
    return pd.Series(res, name="ece_pooled")


def per_fold(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method and fold: extreme / moderate / overall / full / S2-only / S1-only F1 and ECE."""
    t = table.copy()
    if "fold" not in t.columns:
        t["fold"] = 0
    t["k"] = t["subset"].str.count(r"\+") + 1
    m = int(t["k"].max())
    rows = []
    for (method, fold), g in t.groupby(["method", "fold"], sort=False):
        f1 = g.set_index("subset")["f1_weighted"]
        rows.append({"method": method, "fold": fold, "extreme": g.loc[g.k == 1, "f1_weighted"].mean(),
                     "moderate": g.loc[g.k == m - 1, "f1_weighted"].mean(), "overall": g["f1_weighted"].mean(),
                     "full": g.loc[g.k == m, "f1_weighted"].mean(),
                     **{f"{s}_only": f1.get(s, np.nan) for s in SINGLE}, "ece": g["ece"].mean()})
    return pd.DataFrame(rows)


def summary_table(folds: pd.DataFrame) -> pd.DataFrame:
    """``mean ± std`` (std over folds, ddof 0) per method."""
    cols = [c for c in folds.columns if c not in ("method", "fold")]
    g = folds.groupby("method", sort=False)[cols]
    mean, std = g.mean(), g.std(ddof=0)
    out = pd.DataFrame(index=mean.index)
    for c in cols:
        fmt = "{:.3f} ± {:.3f}" if c == "ece" else "{:.1f} ± {:.1f}"
        out[c] = [fmt.format(a, b) for a, b in zip(mean[c], std[c], strict=True)]
    out["folds"] = g.size()
    return out


def last_line(table: pd.DataFrame, folds: pd.DataFrame, default: str, ece_pooled: pd.Series) -> str:
    """The closing line of the issue: differences of ``default`` against the tree references,
    and its ECE on every test sample of the cross-validation (:func:`pooled_ece`)."""
    mean = folds.groupby("method")[["overall", "full", "extreme"]].mean()
    per_subset = table.groupby(["method", "subset"])["f1_weighted"].mean().unstack("subset")
    worst = (per_subset.loc[default] - per_subset.loc["trees_dedicated"]).min()
    d, tr, nan = mean.loc[default], mean.loc["trees_dedicated"], mean.loc["trees_nan"]
    return (f"default_vs_trees_overall={d.overall - tr.overall:+.1f} default_vs_trees_full={d.full - tr.full:+.1f} "
            f"worst_subset_vs_trees={worst:+.1f} default_vs_trees_nan_extreme={d.extreme - nan.extreme:+.1f} "
            f"default_ece={ece_pooled[default]:.2f}")


def paired(folds: pd.DataFrame, default: str, other: str) -> str:
    """Per-fold paired difference of ``default`` and ``other`` (overall): mean ± std and wins."""
    a = folds[folds.method == default].set_index("fold")["overall"]
    b = folds[folds.method == other].set_index("fold")["overall"]
    d = (a - b).dropna()
    return (f"{default} - {other} overall, paired over {len(d)} folds: {d.mean():+.1f} ± {d.std(ddof=0):.1f} "
            f"({int((d > 0).sum())} folds won)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=DEFAULT)
    ap.add_argument("--out", type=Path, default=Path("/tmp/real_quality"))
    ap.add_argument("--folds", type=int, default=7)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every method that classifies pixels")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--pretrain", action="store_true",
                    help="model.pretrain.enabled: the pixel methods fine-tune from self-supervised encoders pretrained on "
                         "each fold's train/val samples (the pretrain rule; schema defaults of model.pretrain)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep finished fold runs in --out even if the code or settings changed since (--rerun-triggers mtime)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override config keys for an ablation, e.g. training.blend=none training.balance=none")
    a = ap.parse_args()
    # the table's layout, as benchmarks/compare_table.py reads it
    a.format, a.season, a.label, a.start, a.cell_deg, a.min_samples = "worldcereal_wide", ["2016-12", "2017-11"], None, None, 0.1, 20
    a.hidden = 64  # replaced by config.yaml's model block
    cfg, default = workflow_config(a)
    override(cfg, a.set)
    if a.pretrain:
        cfg["model"]["pretrain"] = {"enabled": True}
    need = {default, "trees_dedicated", "trees_nan"}
    if not need <= set(cfg["compare"]["methods"]):
        sys.exit(f"--methods must include {sorted(need)} (the default method and both tree references)")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(a.out), "--cores", str(a.cores),
           "compare", "--configfile", str(path), "--quiet", "all",
           *(["--rerun-triggers", "mtime"] if a.reuse else [])]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"snakemake compare: {time.time() - t0:.0f} s on {a.cores} cores; default method {default}; {a.folds} folds; {a.path.name}")
    table = pd.read_csv(a.out / "results" / "compare" / "table.csv")
    folds = per_fold(table)
    methods = list(cfg["compare"]["methods"])
    ece_all = pooled_ece(a.out, load(path), methods)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary_table(folds).join(ece_all.round(3)).to_string())
        val = validation(a.out, methods, a.folds)
        if not val.empty:
            print("validation split of each fold (final model; what recipes are chosen on):")
            print(val.to_string())
    for other in ("trees_dedicated", "trees_nan"):
        print(paired(folds, default, other))
    print(last_line(table, folds, default, ece_all))


if __name__ == "__main__":
    main()
