"""Missing-sensor comparison of the pixel methods on one labelled sample table, through the workflow.

A thin wrapper: it writes a config with the table as the only training set
(``<out>/config.yaml``) and runs ``snakemake compare`` on it in ``<out>``, then prints the
summary (moderate / extreme / overall / full weighted F1 per method; ``*_std`` over folds with
``--folds`` > 1). ``<out>/results/compare/`` holds ``table.csv``, ``summary.csv`` and
``heatmap.png``; the samples with their classes and split are ``<out>/data/table/samples.npz``.

Default: the real WorldCereal Uganda 2017 extractions the tests carry
(``tests/data/realdata/worldcereal_uganda_2017_extractions.parquet``, wide layout, 12 months
from 2016-12). Usage::

    python benchmarks/compare_table.py [--out /tmp/uganda] [--folds 7] [--epochs 50] [--cores 2]
    python benchmarks/compare_table.py --path flanders.parquet --format worldcereal_long \\
        --season 2020-10 2021-09 --min-samples 10 --out /tmp/flanders

Rerunning with the same ``--out`` reruns only what changed (Snakemake); delete it to start over.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "tests" / "data" / "realdata" / "worldcereal_uganda_2017_extractions.parquet"


def config(a: argparse.Namespace) -> dict:
    """The workflow config of the comparison: one training set, no region."""
    from cropmap.models import methods_for

    table: dict = {"path": str(a.path.resolve()), "format": a.format}
    if a.label:
        table["label"] = a.label
    if a.start:
        table["start"] = a.start
    return {
        "seed": a.seed, "data_dir": "data", "results_dir": "results", "models_dir": "models",
        "classes": [],  # from the table's codes
        "training_sets": {"table": {"tables": [table], "season": {"start": a.season[0], "end": a.season[1]},
                                    "cell_deg": a.cell_deg, "min_samples": a.min_samples}},
        "model": {"task": "classification", "hidden": a.hidden},
        "training": {"epochs": a.epochs, "patience": a.patience, "batch_size": a.batch_size, "device": "cpu"},
        "compare": {"methods": a.methods or list(methods_for("classification")), "folds": a.folds, "epochs": a.epochs},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=DEFAULT)
    ap.add_argument("--format", default="worldcereal_wide", choices=["worldcereal_long", "worldcereal_wide", "cropharvest", "generic"])
    ap.add_argument("--season", nargs=2, metavar=("START", "END"), default=["2016-12", "2017-11"], help="YYYY-MM YYYY-MM")
    ap.add_argument("--label", default=None, help="generic tables: the label column")
    ap.add_argument("--start", default=None, help="first month of a table without dates (YYYY-MM)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/uganda"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--folds", type=int, default=1, help="compare.folds: k-fold spatial cross-validation")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cell-deg", type=float, default=0.1)
    ap.add_argument("--min-samples", type=int, default=20)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every method that classifies pixels")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="write the config and dry-run snakemake (-n) only")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = a.out / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(a), sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(a.out), "--cores", str(a.cores),
           "compare", "--configfile", str(cfg), *(["-n"] if a.dry_run else [])]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True)
    if a.dry_run:
        return
    print(f"done in {time.time() - t0:.0f} s")
    print((a.out / "results" / "compare" / "summary.csv").read_text())


if __name__ == "__main__":
    main()
