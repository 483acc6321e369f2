"""Missing-sensor comparison of every pixel method on a labelled sample table.

Default: the real WorldCereal Uganda 2017 extractions the tests carry
(``tests/data/realdata/worldcereal_uganda_2017_extractions.parquet``). Prints the summary
(moderate / extreme / overall / full weighted F1 per method) and writes ``table.csv``,
``summary.csv``, ``classes.csv`` and ``heatmap.png`` to the output folder.

Usage::

    python benchmarks/compare_table.py [--out /tmp/uganda] [--seed 42] [--path TABLE.parquet]

The seed also picks the spatial test fold (``seed % 7``). Use a fresh ``--out`` to retrain:
an existing ``last.ckpt`` makes training resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

DEFAULT = Path(__file__).resolve().parents[1] / "tests" / "data" / "realdata" / "worldcereal_uganda_2017_extractions.parquet"


def main() -> None:
    import torch

    from cropmap.compare import heatmap, summarise
    from cropmap.models import methods_for
    from cropmap.tables import class_counts, compare_table, load_worldcereal, worldcereal_months

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=DEFAULT)
    ap.add_argument("--out", type=Path, default=Path("/tmp/uganda"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    samples, classes = load_worldcereal(a.path, seed=a.seed)
    class_counts(samples, classes).to_csv(a.out / "classes.csv", index=False)
    t0 = time.time()
    table = compare_table(samples, classes, methods_for("classification"), a.out / "runs", seed=a.seed, epochs=a.epochs,
                          patience=10, hidden=64, batch_size=64, device="cpu", months=worldcereal_months(a.path))
    table.round(2).to_csv(a.out / "table.csv", index=False)
    summarise(table).round(2).to_csv(a.out / "summary.csv", index=False)
    heatmap(table, a.out / "heatmap.png", title=f"{a.path.stem}, weighted F1")
    print(f"done in {time.time() - t0:.0f} s")
    print(summarise(table).round(1).to_string(index=False))


if __name__ == "__main__":
    main()
