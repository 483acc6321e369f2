"""Fuzz every failure into one line: the config fuzzer and the input-file fuzzer, fixed seed and budget.

    python benchmarks/fuzz_errors.py [--config-cases 220] [--file-cases 60] [--seed 14]

Config cases (``tests/fuzz_config.py``, hypothesis): mutated demo and tiny configs through load,
validation and a Snakemake dry run. File cases (``tests/fuzz_files.py``): every damage of every
input (stacks, raw files, label files, labels.tif, chips, models, maps) through every stage that
reads it once (:func:`~tests.fuzz_files.every_case`), then ``--file-cases`` more drawn by
hypothesis. Prints, per class of case, how it ended and one line the user saw, then as its last
line::

    tried=N one_line=K tracebacks=T partial_outputs=P hangs=H

(``one_line``: cases that stopped with exactly one error line naming the key or file; the other
cases were valid. ``tracebacks`` counts every failure that was not that one line.)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-cases", type=int, default=220)
    ap.add_argument("--file-cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()

    import torch
    from hypothesis import HealthCheck, given, seed, settings
    from tests.fuzz_config import config_case, run_config_case
    from tests.fuzz_files import build_base, every_case, file_case, run_file_case

    torch.set_num_threads(1)
    fuzz = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    tally: collections.Counter[str] = collections.Counter()
    classes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    example: dict[str, str] = {}
    bad: list[str] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz errors ") as tmp:
        root, n = Path(tmp), itertools.count()

        @seed(args.seed)
        @settings(fuzz, max_examples=args.config_cases)
        @given(config_case(root / "configs"))
        def config(case: tuple) -> None:
            name, cfg, mutations = case
            out = run_config_case(cfg, root / "configs" / f"c{next(n)}")
            tally[out.kind] += 1
            key = "config: " + (re.sub(r"^config key ([^:]+):.*", r"\1", out.detail).split(".")[0] if out.kind == "one_line" else out.kind)
            classes[key][out.kind] += 1
            example.setdefault(key, out.detail)
            if out.kind not in ("valid", "one_line"):
                bad.append(f"{out.kind.upper()}: {name} {mutations}: {out.detail[:500]}")

        config()
        base = build_base(root / "base")

        def files(c: object) -> None:
            kind, detail = run_file_case(base, c, root / "files" / f"f{next(n)}")  # type: ignore[arg-type]
            tally[kind] += 1
            key = f"file: {c.target} {c.damage} -> {c.stage}"  # type: ignore[attr-defined]
            classes[key][kind] += 1
            if kind == "one_line" or key not in example:
                example[key] = re.sub(r"/\S*fuzz errors [^/]+/files/f\d+", "<case>", detail)
            if kind not in ("valid", "one_line"):
                bad.append(f"{kind.upper()}: {c}: {detail[:500]}")

        sweep = every_case(args.seed)
        for c in sweep:
            files(c)
        seed(args.seed)(settings(fuzz, max_examples=args.file_cases)(given(file_case())(files)))()
    wall = time.monotonic() - start
    for key in sorted(classes):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(classes[key].items()))
        print(f"{key} [{counts}]: {example.get(key, '')[:300]}")
    for line in bad:
        print(line)
    tried = sum(tally.values())
    print(f"valid={tally['valid']} silent={tally['silent']} undetected={tally['undetected']} unnamed={tally['unnamed']} "
          f"wall={wall:.0f}s (seed {args.seed}; config {args.config_cases}, files {len(sweep)} + {args.file_cases})")
    print(f"tried={tried} one_line={tally['one_line']} tracebacks={tally['traceback']} "
          f"partial_outputs={tally['partial']} hangs={tally['hang']}")


if __name__ == "__main__":
    main()
