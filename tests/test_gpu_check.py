"""``benchmarks/gpu_check.py --device cpu --quick``: the GPU check's code paths, run on the CPU so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def test_gpu_check_quick_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    env = dict(os.environ, CROPMAP_BENCH_DIR=str(tmp_path / "bench"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = res.stdout
    for task in ("classification", "segmentation"):
        train = re.search(rf"^train +task={task} batch=\d+ precision=32-true: +([0-9.]+) samples/s", out, re.M)
        assert train and float(train.group(1)) > 0, out
        pred = re.search(rf"^predict task={task} precision=\w+: model +([0-9.]+) Mpx/s +pipeline +([0-9.]+) Mpx/s +"
                         r"pipeline_vs_model=([0-9.]+) peak_rss=\d+MB", out, re.M)
        assert pred and min(float(v) for v in pred.groups()) > 0, out
    maps = re.search(r"^maps .*maps \(region quick, device cpu, from scratch\): ([0-9.]+) s wall", out, re.M)
    assert maps and float(maps.group(1)) > 0, out
    assert re.search(r"^total [0-9.]+ s$", out, re.M), out
