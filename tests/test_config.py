"""Config validation: one line naming the key and the fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cropmap.config import load, stage_params, validate
from cropmap.errors import ConfigError
from tests.conftest import ROOT, tiny_config


def test_shipped_config_is_valid_and_filled_with_defaults() -> None:
    cfg = load(ROOT / "config.yaml")
    assert cfg["regions"]["demo"]["resolution"] == 10
    assert cfg["availability"]["min_valid_fraction"] == 0.5
    assert cfg["prediction"]["tile_size"] == 512


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda c: c.update(colour_scheme="x"), "config key colour_scheme: unknown key"),
        (lambda c: c["training"].update(epohcs=3), "config key training.epohcs: unknown key; did you mean 'epochs'?"),
        (lambda c: c["regions"].update({"Bad Name": c["regions"]["tiny"]}), "'Bad Name' is not a slug"),
        (lambda c: c["regions"]["tiny"].update(bbox=[5.0, 45.7, 4.9, 45.8]), "regions.tiny.bbox"),
        (lambda c: c["regions"]["tiny"].update(season={"start": "2023-09", "end": "2023-03"}), "season.end 2023-03 is before season.start 2023-09"),
        (lambda c: c.update(seed="x"), "config key seed: 'x' should be of type integer"),
        (lambda c: c["regions"]["tiny"].update(source="sentinelhub"), "not one of ['synthetic', 'earthengine', 'stac', 'files']"),
        (lambda c: c["chips"].update(size=24), "chips.size: 24 must divide split.block_size 32"),
        (lambda c: c["classes"].append({"id": 1, "name": "dup"}), "duplicate class id"),
    ],
)
def test_bad_values_stop_with_one_line(tmp_path: Path, mutate, fragment: str) -> None:
    cfg = tiny_config(tmp_path)
    mutate(cfg)
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    msg = str(exc.value)
    assert fragment in msg
    assert "\n" not in msg


def test_stage_params_of_a_region_ignore_other_regions(tmp_path: Path) -> None:
    cfg = validate(tiny_config(tmp_path))
    before = {s: stage_params(cfg, s, "tiny") for s in ("fetch", "stack", "labels", "chips", "train", "predict", "mosaic", "metrics")}
    cfg2 = copy.deepcopy(cfg)
    cfg2["regions"]["other"] = dict(cfg["regions"]["tiny"], bbox=[4.9, 45.7, 4.91, 45.71])
    after = {s: stage_params(validate(cfg2), s, "tiny") for s in before}
    assert before == after


def test_yaml_roundtrip_of_example(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert load(p)["regions"]["tiny"]["source"] == "synthetic"
