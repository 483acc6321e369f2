"""The bf16 model step (``prediction.precision: auto`` on CPUs with bf16) keeps the map honest.

A model trained by the workflow on a small synthetic region is applied with the fp32 and the bf16
model step by ``benchmarks/predict_precision.py`` (the script that gives the demo's figures):
>= 99.5 % of the mapped pixels must get the fp32 model's class and the held-out weighted F1 (all
sensors) must stay within 0.5 points. bf16 is forced, so the check runs (slower, emulated) on
CPUs without bf16 arithmetic too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_config
from tests.test_workflow import snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

#: ~200 x 210 px: enough held-out pixels that one flipped pixel moves a weighted F1 by < 0.1 point.
BBOX = [4.80, 45.70, 4.825, 45.719]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("precision")
    cfg = tiny_config(wd, model={"task": "classification", "method": "comiss", "hidden": 32},
                      training={"epochs": 6, "batch_size": 128, "pixels_per_class": 400, "patience": 3, "blend": "none"},
                      evaluation={"max_pixels_per_class": 400})
    cfg["regions"]["tiny"]["bbox"] = BBOX
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, str(wd / "models/tiny/classification/model.ckpt"))
    return wd


def test_bf16_model_step_draws_the_fp32_map(trained: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks/predict_precision.py"), "--workdir", str(trained), "--region", "tiny",
           "--precision", "bf16", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    f1 = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) +n= *\d+ wF1 fp32= *([0-9.]+)", out, re.M)}
    assert len(f1) == 15 and f1["s2+s1+weather+dem"] > 60, out  # a model that learned: the check means something
    check = {k: float(v) for k, v in re.findall(r"(agreement|dF1_all)=([0-9.]+)", out.splitlines()[-1])}
    assert check["agreement"] >= 99.5 and check["dF1_all"] <= 0.5, out
