"""Shared fixtures: tiny regions with real CRS and transforms, and a tiny workflow config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Real Earth-observation files the tests read (origin and licence: tests/data/README.md).
REALDATA = ROOT / "tests" / "data" / "realdata"

# Two cores on CI: keep every test single-threaded so parallel work does not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

RULES = ROOT / "workflow" / "rules"

TINY_BBOX = [4.80, 45.70, 4.8125, 45.7095]  # ~100 x 105 px at 10 m in EPSG:32631


def tiny_config(root: Path, **overrides: object) -> dict:
    """A complete config for a ~100 px synthetic region that trains in seconds."""
    with open(ROOT / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cfg["data_dir"] = str(root / "data")
    cfg["results_dir"] = str(root / "results")
    cfg["models_dir"] = str(root / "models")
    cfg["regions"] = {"tiny": {"source": "synthetic", "bbox": TINY_BBOX, "season": {"start": "2023-01", "end": "2023-12"},
                               "synthetic": {"seed": 3}}}
    cfg["split"] = {"block_size": 32}
    cfg["chips"] = {"size": 16}
    cfg["model"] = {"task": "classification", "method": "comiss", "hidden": 16}
    # blend: none keeps workflow tests fast (15 tree fits per pixel model); tests/test_blend.py tests the blend
    cfg["training"] = {"epochs": 2, "batch_size": 128, "pixels_per_class": 150, "patience": 2, "blend": "none",
                       "segmentation": {"epochs": 2, "patience": 2}}
    cfg["prediction"] = {"tile_size": 64, "batch_size": 4096}
    cfg["evaluation"] = {"max_pixels_per_class": 100}
    # a few cheap trees: scikit-learn's 100 rounds x 7 classes x 255 bins take ~20 s per sensor subset
    cheap = {"max_iter": 10, "max_bins": 15}
    cfg["compare"] = {"epochs": 1, "regions": ["tiny"], "options": {"trees_dedicated": cheap, "trees_nan": cheap}}
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> dict:
    """Validated tiny config (defaults filled) with data under ``tmp_path``."""
    from cropmap.config import validate

    return validate(tiny_config(tmp_path))


def rule_blocks() -> dict[str, str]:
    """Rule name -> its text; a ``use rule X as Y with:`` rule gets X's text plus its overrides."""
    blocks: dict[str, str] = {}
    uses: list[tuple[str, str, str]] = []
    for smk in sorted(RULES.glob("*.smk")):
        pattern = r"^(?:rule (\w+)|use rule (\w+) as (\w+) with):\n(.*?)(?=^\S|\Z)"
        for m in re.finditer(pattern, smk.read_text(), flags=re.M | re.S):
            if m.group(1):
                blocks[m.group(1)] = m.group(4)
            else:
                uses.append((m.group(2), m.group(3), m.group(4)))
    for parent, name, overrides in uses:
        blocks[name] = blocks[parent] + overrides
    return blocks
