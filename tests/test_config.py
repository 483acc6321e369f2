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
        # checked at load (issue 14): each names the key and the fix
        (lambda c: c["regions"]["tiny"].update(crs="EPSG:999999"),
         "config key regions.tiny.crs: 'EPSG:999999' is not a CRS pyproj knows"),
        (lambda c: c["regions"]["tiny"].update(crs="EPSG:4326"),
         "config key regions.tiny.crs: 'EPSG:4326' is not a projected CRS in metres"),
        (lambda c: c["regions"]["tiny"].update(bbox=[4.8, 45.7, 4.81, 95.0]),
         "config key regions.tiny.bbox: bbox [4.8, 45.7, 4.81, 95.0] is outside [-180, -90, 180, 90]"),
        (lambda c: c["regions"]["tiny"].update(bbox=[0, 0, 50, 50]), "tiles of prediction.tile_size 64, at most 100000"),
        (lambda c: c["regions"]["tiny"].update(bbox=[4.8, 45.7, 4.8001, 45.7001]), "smaller than one chip (chips.size 16)"),
        (lambda c: c["regions"]["tiny"].update(season={"start": "2020-01", "end": "2023-12"}),
         "config key regions.tiny.season: 48 months, at most 36"),
        (lambda c: c["model"].update(options={"foo": 1}),
         "config key model.options.foo: method comiss takes no option 'foo'; valid: alpha, contrast_pixels, dropout, gamma, head, tau"),
        (lambda c: c["model"].update(options={"tau": "x"}), "config key model.options.tau: 'x' should be float (default 0.5)"),
        (lambda c: c["model"].update(options={"alpha": 1.5}), "config key model.options.alpha: 1.5 should be in [0, 1]"),
        (lambda c: c["model"].update(options={"hidden": 8}), "config key model.options.hidden: set it with model.hidden"),
        (lambda c: c["model"].update(method="imt"), "config key model.method: imt does not do classification (model.task)"),
        (lambda c: c["model"].update(encoders={"s2": "unet"}),
         "config key model.encoders.s2: 'unet' is not a classification encoder of a temporal modality; use one of tempcnn, ltae, gru"),
        (lambda c: c["training"].update(devices="abc"), "config key training.devices: 'abc' is not a device count"),
        (lambda c: c["training"].update(device="cpu", devices="0,1"), "config key training.devices: '0,1' is not a device count"),
        (lambda c: c["training"].update(strategy="dpp"), "config key training.strategy: 'dpp' is not a Lightning strategy"),
        (lambda c: c["training"].update(batch_size=1), "config key training.batch_size: 1 is less than the minimum of 2"),
        (lambda c: c["compare"].update(folds=2.0), "config key compare.folds: 2.0 should be of type integer"),
        (lambda c: c["compare"].update(methods=[]), "config key compare.methods: [] should be non-empty"),
        (lambda c: c["compare"].update(options={"trees_dedicated": {"max_depth": 3}}),
         "config key compare.options.trees_dedicated.max_depth: method trees_dedicated takes no option 'max_depth'"),
        (lambda c: c["compare"].update(options={"comiss": {"alpha": 2.0}}), "config key compare.options.comiss.alpha: 2.0 should be in [0, 1]"),
        (lambda c: c["compare"].update(options={"nope": {}}), "config key compare.options: 'nope' is not one of"),
        (lambda c: c.update(seed=-1), "config key seed: -1 is less than the minimum of 0"),
        (lambda c: c.update(data_dir="data{x}"), "config key data_dir: 'data{x}' is not a usable folder name"),
        (lambda c: c["regions"].update(other=dict(c["regions"]["tiny"], season={"start": "2023-04", "end": "2023-09"},
                                                  model_from="tiny", source="stac")),
         "config key regions.other.season: regions.other and its model tiny: the season 2023-04 .. 2023-09 (6 months)"),
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


def test_options_of_model_method_the_comparison_methods_do_not_take_are_left_out(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    cfg["model"]["options"] = {"tau": 0.3, "alpha": 0.4}
    cfg = validate(cfg)
    assert stage_params(cfg, "train", "tiny")["model"]["options"] == {"tau": 0.3, "alpha": 0.4}
    assert stage_params(cfg, "train", "tiny", method="moddrop")["model"]["options"] == {"alpha": 0.4}
    assert stage_params(cfg, "train", "tiny", method="input_fusion")["model"]["options"] == {}


@pytest.mark.parametrize(("text", "fragment"), [
    ("regions:\n  tiny: {bbox: [1, 2\n", "not valid YAML at line 3, column 1"),
    ("regions:\n\tdemo: {}\n", "not valid YAML at line 2, column 1"),
])
def test_a_config_that_is_not_yaml_is_one_line_with_the_place(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(p)
    assert str(exc.value).startswith(f"{p}: {fragment}") and "\n" not in str(exc.value), str(exc.value)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load(tmp_path / "missing.yaml")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_is_checked_where_the_jobs_run(tmp_path: Path) -> None:
    from cropmap.config_checks import check_local_devices

    cfg = tiny_config(tmp_path)
    cfg["prediction"]["device"] = "cuda"
    cfg = validate(cfg)  # loads: the jobs may run on GPU nodes
    with pytest.raises(ConfigError, match=r"^config key prediction.device is 'cuda' but no CUDA device is visible; set it to auto or cpu$"):
        check_local_devices(cfg)


def test_segmentation_trains_with_its_own_recipe(tmp_path: Path) -> None:
    from cropmap.train import TrainSettings

    cfg = load(ROOT / "config.yaml")
    months = ["2023-01", "2023-02"]
    cls = TrainSettings.from_config(cfg, "classification", months)
    seg = TrainSettings.from_config(cfg, "segmentation", months)
    recipe = cfg["training"]["segmentation"]
    assert (cls.epochs, cls.batch_size, cls.lr) == (cfg["training"]["epochs"], cfg["training"]["batch_size"], cfg["training"]["lr"])
    assert (seg.epochs, seg.patience, seg.batch_size, seg.lr) == (recipe["epochs"], recipe["patience"], recipe["batch_size"], recipe["lr"])
    assert seg.batch_size < cls.batch_size and seg.device == cls.device and seg.hidden == cls.hidden
    assert (seg.windows_per_epoch, seg.window_augment, seg.cache_mb) == (None, True, recipe["cache_mb"])
    cfg = validate(tiny_config(tmp_path, compare={"epochs": 3, "regions": ["tiny"], "options": {"trees_nan": {"max_iter": 7}}},
                               model={"task": "classification", "method": "comiss", "options": {"alpha": 0.5}}))
    # compare.options of a method go over the model.options it takes; other methods keep theirs
    assert stage_params(cfg, "train", "tiny", method="trees_nan")["model"]["options"] == {"max_iter": 7}
    assert stage_params(cfg, "train", "tiny", method="moddrop")["model"]["options"] == {"alpha": 0.5}
    assert stage_params(cfg, "train", "tiny")["model"]["options"] == {"alpha": 0.5}  # the map's model: model.options
    p = stage_params(cfg, "train", "tiny", method="imt")
    assert p["training"]["epochs"] == p["training"]["segmentation"]["epochs"] == 3
    assert TrainSettings.from_config(p, "segmentation", months).epochs == 3
