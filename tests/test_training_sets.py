"""Training sets: the samples stage, its folds, training and scoring from samples, band subsets, config checks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from cropmap import fold, samples, stack
from cropmap.config import load, stage_params, validate
from cropmap.errors import ConfigError, GridMismatchError, InputDataError, LabelError
from cropmap.grid import Grid
from cropmap.modalities import BANDS, band_descriptions
from tests.conftest import REALDATA, ROOT, tiny_config
from tests.test_tables import cropharvest_npz, wide_table
from tests.test_tables_generic import point_table

FLANDERS = REALDATA / "worldcereal_flanders_2021_extractions_long.parquet"
SUBSET = {"s2": ["B04", "B08", "B11"]}


def set_config(tmp_path: Path, tables: list[dict], season: tuple[str, str], **ts: object) -> dict:
    """A validated config with one training set ``fields`` (and the tiny synthetic region)."""
    cfg = tiny_config(tmp_path)
    cfg["bands"] = SUBSET
    cfg["training_sets"] = {"fields": {"tables": tables, "season": {"start": season[0], "end": season[1]}, **ts}}
    return validate(cfg)


def build(cfg: dict, classes: list | None = None) -> samples.SampleSet:
    p = stage_params(cfg, "samples", "fields")
    if classes is not None:
        p["classes"] = classes
    return samples.build(p)


def test_flanders_samples_on_the_season_with_classes_cells_and_split(tmp_path: Path) -> None:
    cfg = set_config(tmp_path, [{"path": str(FLANDERS), "format": "worldcereal_long"}], ("2021-01", "2021-11"), min_samples=10)
    s = build(cfg, classes=[])  # classes from the table's ewoc codes
    assert len(s.samples) == 100 and s.months == [f"2021-{m:02d}" for m in range(1, 12)]
    assert s.samples.x["s2"].shape == (100, 11, 3) and s.samples.x["s1"].shape == (100, 11, 2) and s.samples.x["dem"].shape == (100, 2)
    assert s.bands["s2"] == SUBSET["s2"] and s.bands["s1"] == ["VV", "VH"]
    assert [(c["name"], c["n"]) for c in s.classes][:2] == [("ewoc_1600000000", 30), ("ewoc_2001020000", 28)]
    assert sum(c["n"] for c in s.classes) == 100 and s.classes[-1]["name"] == "other"
    for g in np.unique(s.group):  # whole cells in one split
        assert len(np.unique(s.samples.split[s.group == g])) == 1
    assert set(np.unique(s.samples.split)) == {0, 1, 2} and 0.08 < (s.samples.split == 2).mean() < 0.25
    out = tmp_path / "samples.npz"
    samples.write_samples(s, out)
    back = samples.read_samples(out)
    assert back.classes == s.classes and back.months == s.months and back.bands == s.bands
    for m in s.samples.modalities:
        np.testing.assert_array_equal(back.samples.x[m], s.samples.x[m])
    np.testing.assert_array_equal(back.samples.split, s.samples.split)
    np.testing.assert_array_equal(back.group, s.group)
    counts = samples.class_counts(back)
    assert sum(r["total"] for r in counts) == 100 and sum(r["test"] for r in counts) == int((s.samples.split == 2).sum())


def test_config_classes_take_ewoc_codes_and_unknown_codes_stop_or_are_left_out(tmp_path: Path) -> None:
    classes = [{"id": 0, "name": "grass", "codes": [2001020000]}, {"id": 4, "name": "maize", "colour": "#3f8f29", "codes": ["1101060000"]}]
    cfg = set_config(tmp_path, [{"path": str(FLANDERS), "format": "worldcereal_long"}], ("2021-04", "2021-06"))
    with pytest.raises(LabelError) as err:
        build(cfg, classes)
    msg = str(err.value)
    assert FLANDERS.name in msg and "14 label value(s)" in msg and "unknown_codes: ignore" in msg and "\n" not in msg
    cfg["training_sets"]["fields"]["unknown_codes"] = "ignore"
    s = build(cfg, classes)
    assert len(s.samples) == 28 + 12 and sorted(np.unique(s.samples.y).tolist()) == [0, 4]
    assert [(c["name"], c["n"]) for c in s.classes] == [("grass", 28), ("maize", 12)]


def test_tables_of_every_format_pool_by_calendar_month(tmp_path: Path) -> None:
    point_table().to_csv(tmp_path / "fields.csv", index=False)  # 2023-04 .. 2023-07, s2 B04 B08 B11
    cropharvest_npz(tmp_path / "ch.npz")  # 12 months from the start given in the config
    wide = wide_table(n=28, t=12)  # start_date 2016-12-01: 2016-12 .. 2017-11
    wide["lat"] = 1.0 + 0.3 * np.arange(28)
    wide.to_parquet(tmp_path / "wide.parquet")
    tables = [{"path": str(tmp_path / "fields.csv"), "format": "generic", "label": "crop"},
              {"path": str(tmp_path / "ch.npz"), "format": "cropharvest", "start": "2023-02"}]
    cfg = set_config(tmp_path, tables, ("2023-05", "2023-06"), min_samples=5, cell_deg=0.25)
    s = build(cfg, classes=[])
    assert len(s.samples) == 42 + 28 and s.months == ["2023-05", "2023-06"]
    # CropHarvest month t holds 100 t + band: May 2023 is its step 3
    assert s.samples.x["s1"][42, 0, 0] == pytest.approx(301.0)
    assert s.samples.x["s2"][7, 0, 0] == pytest.approx(0.01 + 0.001 + 0.0007)  # the generic table's May
    assert {c["name"] for c in s.classes} == {"wheat", "maize", "rapeseed", "non_crop", "crop"}
    wide_cfg = set_config(tmp_path, [{"path": str(tmp_path / "wide.parquet"), "format": "worldcereal_wide"}], ("2017-01", "2017-06"),
                          min_samples=3)
    w = build(wide_cfg, classes=[])
    assert w.months[0] == "2017-01" and w.samples.x["s2"].shape == (28, 6, 3)
    # OPTICAL-B04 of step ts1 (2017-01) is 1000 + 10 * 2 + 1 DN
    assert w.samples.x["s2"][5, 0, 0] == pytest.approx((1000 + 20 + 1) / 10000)
    late = set_config(tmp_path, [{"path": str(tmp_path / "ch.npz"), "format": "cropharvest", "start": "2023-06"}], ("2023-05", "2023-06"))
    with pytest.raises(InputDataError) as err:  # the table starts after the season does
        build(late, classes=[])
    assert "ch.npz" in str(err.value) and "2023-06 .. 2024-05" in str(err.value)


def test_a_table_without_a_configured_band_is_one_line(tmp_path: Path) -> None:
    df = wide_table()
    df = df.drop(columns=[c for c in df.columns if c.startswith("OPTICAL-B11")])
    df.to_parquet(tmp_path / "wide.parquet")
    cfg = set_config(tmp_path, [{"path": str(tmp_path / "wide.parquet"), "format": "worldcereal_wide"}], ("2016-12", "2017-02"))
    with pytest.raises(InputDataError) as err:
        build(cfg, classes=[])
    msg = str(err.value)
    assert "wide.parquet" in msg and "OPTICAL-B11" in msg and "'B12'" in msg and "expected ['B04', 'B08', 'B11']" in msg
    assert "\n" not in msg


def test_fold_of_a_training_set_tests_every_cell_once(tmp_path: Path) -> None:
    cfg = set_config(tmp_path, [{"path": str(FLANDERS), "format": "worldcereal_long"}], ("2021-01", "2021-11"), min_samples=10)
    s = build(cfg, classes=[])
    samples.write_samples(s, tmp_path / "samples.npz")
    tested = []
    for f in range(3):
        fold.write_samples_fold(tmp_path / "samples.npz", tmp_path / f"f{f}", fractions=cfg["split"]["fractions"], seed=42,
                                folds=3, fold=f)
        back = samples.read_samples(tmp_path / f"f{f}" / "samples.npz")
        np.testing.assert_array_equal(back.samples.y, s.samples.y)
        assert (back.samples.split == 1).any() and (back.samples.split == 0).any()
        tested.append(back.samples.split == 2)
    assert (np.sum(tested, axis=0) == 1).all()  # every sample (every cell) is tested in exactly one fold


def test_train_and_score_a_training_set(tmp_path: Path) -> None:
    from cropmap.metrics import evaluate_set
    from cropmap.train import TrainSettings, run_samples

    cfg = set_config(tmp_path, [{"path": str(FLANDERS), "format": "worldcereal_long"}], ("2021-04", "2021-05"), min_samples=10)
    s = build(cfg, classes=[])
    samples.write_samples(s, tmp_path / "samples.npz")
    p = stage_params(cfg, "train", "fields")
    p["training"] |= {"epochs": 1, "batch_size": 32}
    p["model"] |= {"hidden": 8, "method": "input_fusion"}
    settings = TrainSettings.from_config(p, "classification", p["months"])
    summary = run_samples(settings, tmp_path / "samples.npz", tmp_path / "model.ckpt", tmp_path / "work")
    assert summary["n_train"] == int((s.samples.split == 0).sum()) and summary["n_val"] == int((s.samples.split == 1).sum())
    bundle = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=False)
    assert bundle["classes"] == s.classes and bundle["months"] == ["2021-04", "2021-05"]
    assert bundle["bands"]["s2"] == SUBSET["s2"] and bundle["model_kwargs"]["in_channels"] == {"s2": 3, "s1": 2, "weather": 2, "dem": 2}
    df = evaluate_set(tmp_path / "model.ckpt", tmp_path / "samples.npz", max_pixels_per_class=1000, seed=42, device="cpu")
    assert len(df) == 15 and df["n"].nunique() == 1 and 0 < df["n"].iloc[0] <= int((s.samples.split == 2).sum())
    assert df["f1_weighted"].between(0, 100).all()


def test_stack_keeps_the_configured_bands_of_a_raw_file_with_more(tmp_path: Path) -> None:
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=20, height=12)
    months = ["2023-05", "2023-06"]
    raw = tmp_path / "raw"
    raw.mkdir()
    desc = band_descriptions("s2", months)
    data = np.stack([np.full(grid.shape, i, np.float32) for i in range(len(desc))])
    with rasterio.open(raw / "s2.tif", "w", **grid.profile(len(desc))) as dst:
        dst.write(data)
        dst.descriptions = tuple(desc)
    out = stack.run(raw, tmp_path / "stack", grid, months, ["s2"], bands=SUBSET, use_dask=False)
    with rasterio.open(out["s2"]) as src:
        assert src.descriptions == ("B04_2023-05", "B08_2023-05", "B11_2023-05", "B04_2023-06", "B08_2023-06", "B11_2023-06")
        got = src.read()
    want = [desc.index(d) for d in ("B04_2023-05", "B08_2023-05", "B11_2023-05", "B04_2023-06", "B08_2023-06", "B11_2023-06")]
    np.testing.assert_array_equal(got[:, 0, 0], want)
    with pytest.raises(GridMismatchError) as err:  # a raw file of three bands cannot serve a config asking for B05
        stack.run(tmp_path / "stack", tmp_path / "again", grid, months, ["s2"], bands={"s2": ["B04", "B05"]}, use_dask=False)
    msg = str(err.value)
    assert "B05_2023-05" in msg and "found bands ['B04', 'B08', 'B11']" in msg and "expected ['B04', 'B05']" in msg


def test_region_samples_and_chips_with_a_band_subset(tmp_path: Path) -> None:
    """A region's pixel samples, chips and normalisation take their channels from the bands (3 of S2)."""
    from cropmap.chips import chip_table
    from cropmap.datasets import ChipDataset, sample_pixels
    from cropmap.normalize import fit_stats

    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=32, height=32)
    months = ["2023-05", "2023-06"]
    rng = np.random.default_rng(0)
    (tmp_path / "stack").mkdir()
    for m, bands in (("s2", SUBSET["s2"]), ("s1", BANDS["s1"])):
        desc = band_descriptions(m, months, bands)
        with rasterio.open(tmp_path / "stack" / f"{m}.tif", "w", **grid.profile(len(desc))) as dst:
            dst.write(rng.normal(size=(len(desc), 32, 32)).astype(np.float32))
            dst.descriptions = tuple(desc)
    with rasterio.open(tmp_path / "labels.tif", "w", **grid.profile(2, dtype="uint8", nodata=255)) as dst:
        dst.write(np.stack([np.arange(32 * 32).reshape(32, 32) % 2, np.zeros((32, 32))]).astype(np.uint8))
        dst.descriptions = ("class", "split")
    mods = ["s2", "s1", "weather"]
    chips = chip_table(tmp_path / "stack", tmp_path / "labels.tif", grid, months, mods, 16, 0.5, bands=SUBSET)
    assert len(chips) == 4 and (chips["present_s2"] == 1).all() and (chips["present_weather"] == 0).all()
    s = sample_pixels(tmp_path / "stack", tmp_path / "labels.tif", chips, grid, months, mods, 10, 0.5, 0, bands=SUBSET)
    assert s.x["s2"].shape == (20, 2, 3) and s.x["weather"].shape == (20, 2, 2) and s.mask[:, :2].all()
    ds = ChipDataset(tmp_path / "stack", tmp_path / "labels.tif", chips, grid, months, mods, 0.5, SUBSET)
    item = ds[0]
    assert item["s2"].shape == (6, 16, 16) and ds.channels == {"s2": 3, "s1": 2, "weather": 2}
    stats = fit_stats({m: item[m][None].numpy() for m in mods}, "chips", ds.channels)
    assert len(stats["s2"][0]) == 3


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # its paths start from the repository root
    cfg = load(ROOT / "config" / "examples" / "own_data_mol.yaml")
    assert cfg["regions"]["mol"]["model_from"] == "flanders" and cfg["bands"]["s2"] == SUBSET["s2"]
    assert stage_params(cfg, "predict", "mol")["grid"]["width"] == 64


def _ok(tmp_path: Path) -> dict:
    cfg = tiny_config(tmp_path)
    cfg["training_sets"] = {"fields": {"tables": [{"path": str(FLANDERS), "format": "worldcereal_long"}],
                                       "season": {"start": "2021-01", "end": "2021-11"}}}
    cfg["regions"]["borrow"] = {"source": "stac", "bbox": cfg["regions"]["tiny"]["bbox"], "model_from": "fields",
                                "season": {"start": "2023-01", "end": "2023-11"}}
    return cfg


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda c: c["regions"].update(fields=c["regions"]["tiny"]), "training_sets.fields: 'fields' is also a region"),
        (lambda c: c["regions"]["borrow"].update(model_from="nope"), "regions.borrow.model_from: 'nope' is neither a region nor a training set"),
        (lambda c: c["regions"]["borrow"].update(season={"start": "2023-02", "end": "2023-12"}),
         "regions.borrow.season: regions.borrow and its model fields: the season 2023-02 .. 2023-12 (11 months)"),
        (lambda c: c.update(bands={"s2": ["B04", "B4"]}), "config key bands.s2: ['B4'] is not a subset of the s2 bands"),
        (lambda c: c.update(bands={"ndvi": ["x"]}), "config key bands: 'ndvi' is not one of"),
        (lambda c: c.update(classes=[]), "config key classes: the regions ['tiny'] have labels"),
        (lambda c: c["training_sets"]["fields"]["tables"].append({"path": "x.csv", "format": "generic"}), "config key training_sets.fields.tables.1.label: missing"),
        (lambda c: c["training_sets"]["fields"]["tables"].append({"path": "x.npz", "format": "cropharvest"}), "config key training_sets.fields.tables.1.start: missing"),
        (lambda c: c["training_sets"]["fields"]["tables"].append({"path": "x.csv", "format": "excel"}), "is not one of ['worldcereal_long'"),
        (lambda c: c["training_sets"]["fields"].update(season={"start": "2021-05", "end": "2021-01"}), "training_sets.fields.season"),
        (lambda c: c["compare"].update(methods=["comiss", "imt"]), "config key compare.methods: ['imt'] cannot do classification"),
        (lambda c: c["compare"].update(regions=["fields"], task="segmentation", methods=["imt"]),
         "compare.regions: training set 'fields' trains pixel classifiers only"),
        (lambda c: c["model"].update(task="segmentation"), "regions.borrow.model_from: training set 'fields' trains a pixel classifier only"),
        (lambda c: c.update(regions={}, training_sets={}), "no regions and no training_sets"),
    ],
)
def test_bad_training_set_configs_stop_with_one_line(tmp_path: Path, mutate, fragment: str) -> None:
    cfg = _ok(tmp_path)
    validate(copy.deepcopy(cfg))  # the starting point is valid
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_training_sets_in_the_comparison_and_stage_params(tmp_path: Path) -> None:
    from cropmap.config import compare_regions, model_region

    cfg = _ok(tmp_path)
    cfg["compare"]["regions"] = None  # default: every region with labels and every training set
    cfg = validate(cfg)
    assert compare_regions(cfg) == ["tiny", "fields"] and model_region(cfg, "borrow") == "fields"
    p = stage_params(cfg, "samples", "fields")
    assert p["months"][0] == "2021-01" and p["set"]["cell_deg"] == 0.1 and p["set"]["unknown_codes"] == "error"
    with pytest.raises(ValueError, match="does not apply to the training set"):
        stage_params(cfg, "predict", "fields")
    pd.testing.assert_series_equal(pd.Series(stage_params(cfg, "train", "fields")["bands"]["s2"]), pd.Series(list(BANDS["s2"])))
