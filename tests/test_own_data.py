"""Your own data through the real workflow: a model trained on a sample table maps a files region.

A training set (the real WorldCereal Flanders long table) trains a model with an S2 band subset;
the real GFMap Mol cubes (``source: files``, no bbox) are mapped with it (``model_from``);
``snakemake compare`` runs on the training set. Then bad inputs, each ending in one line with
nothing partial left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import rasterio
import yaml
from rio_cogeo.cogeo import cog_validate

from cropmap.modalities import MODALITIES
from tests.conftest import REALDATA, tiny_config
from tests.test_faults import snakemake as run_snakemake

pytestmark = pytest.mark.workflow

FLANDERS = REALDATA / "worldcereal_flanders_2021_extractions_long.parquet"
SUBSET = ["B04", "B08", "B11"]


def snakemake(workdir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """A real snakemake run in ``workdir`` (:func:`tests.test_faults.snakemake`); ``ok=False``: it must fail."""
    res = run_snakemake(workdir, *args, check=ok)
    assert ok or res.returncode != 0, f"snakemake {' '.join(args)} should have failed"
    return res


def own_config(wd: Path) -> dict:
    """Flanders samples (April) -> model with S2 B04/B08/B11 -> the Mol cubes (April 2023), tiny training."""
    cfg = tiny_config(wd)
    (wd / "cubes").mkdir(exist_ok=True)
    for f in ("gfmap_mol_s2_l2a.nc", "gfmap_mol_s1_grd.nc"):
        shutil.copy(REALDATA / f, wd / "cubes" / f)
    cfg["classes"] = []  # from the table's ewoc codes
    cfg["bands"] = {"s2": SUBSET}
    cfg["training_sets"] = {"fields": {"tables": [{"path": str(FLANDERS), "format": "worldcereal_long"}],
                                       "season": {"start": "2021-04", "end": "2021-04"}, "min_samples": 10}}
    cfg["regions"] = {"mol": {"source": "files", "season": {"start": "2023-04", "end": "2023-04"}, "model_from": "fields",
                              "files": {"s2": str(wd / "cubes/gfmap_mol_s2_l2a.nc"), "s1": str(wd / "cubes/gfmap_mol_s1_grd.nc")}}}
    cfg["compare"] = {"epochs": 1, "methods": ["comiss", "input_fusion"]}
    cfg["training"] = {"epochs": 2, "batch_size": 32, "patience": 2, "blend": "none"}
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("own")
    (wd / "config.yaml").write_text(yaml.safe_dump(own_config(wd)))
    snakemake(wd, "maps")
    snakemake(wd, "compare")
    return wd


def test_the_table_model_maps_the_cubes_as_a_valid_cog(run: Path) -> None:
    m = run / "results/mol/map.tif"
    assert cog_validate(str(m))[0], cog_validate(str(m))[1]
    with rasterio.open(m) as src:
        assert (src.count, src.width, src.height) == (3, 64, 66) and src.crs.to_epsg() == 32631  # the cubes' own grid
        assert src.descriptions == ("class", "confidence", "modalities")
        names = {k: v for k, v in src.tags(1).items() if k.startswith("class_") and k != "class_names"}
        cls, _conf, bits = src.read()
    # the legend is the class table the samples carried into the checkpoint (from the table's ewoc codes)
    import torch

    bundle = torch.load(run / "models/fields/classification/model.ckpt", map_location="cpu", weights_only=False)
    assert names == {f"class_{c['id']}": c["name"] for c in bundle["classes"]}
    assert {"ewoc_1600000000", "ewoc_2001020000"} <= set(names.values())
    assert bundle["bands"]["s2"] == SUBSET and bundle["months"] == ["2021-04"] and bundle["model_kwargs"]["in_channels"]["s2"] == 3
    s2s1 = (1 << MODALITIES.index("s2")) | (1 << MODALITIES.index("s1"))
    assert (bits == s2s1).all() and (cls != 255).all()  # every pixel mapped with S2 and S1 (no weather, no DEM files)
    with rasterio.open(run / "data/mol/stack/s2.tif") as src:
        assert src.descriptions == tuple(f"{b}_2023-04" for b in SUBSET)
    # expected F1 of a region mapped with a training set's model: that model's held-out scores
    metrics = pd.read_csv(run / "results/fields/metrics.csv")
    with rasterio.open(run / "results/mol/expected_f1.tif") as e:
        assert (e.read(1) == round(metrics.loc[metrics.subset == "s2+s1", "f1_weighted"].item())).all()
    assert (run / "results/report.html").stat().st_size > 10000


def test_training_set_metrics_and_comparison(run: Path) -> None:
    metrics = pd.read_csv(run / "results/fields/metrics.csv")
    assert len(metrics) == 15 and metrics["n"].gt(0).all() and metrics["n"].nunique() == 1
    conf = pd.read_csv(run / "results/fields/confusion.csv")
    assert conf.groupby("subset")["count"].sum().eq(metrics["n"].iloc[0]).all()
    table = pd.read_csv(run / "results/compare/table.csv")
    assert set(table["region"]) == {"fields"} and len(table) == 2 * 15
    summary = pd.read_csv(run / "results/compare/summary.csv")
    assert set(summary["method"]) == {"comiss", "input_fusion"}
    assert (run / "results/compare/heatmap.png").stat().st_size > 1000


def test_editing_a_cube_reruns_its_fetch(run: Path) -> None:
    import xarray as xr

    cube = run / "cubes/gfmap_mol_s1_grd.nc"
    with xr.open_dataset(cube, engine="h5netcdf") as ds:
        edited = ds.load()
    edited["S1-SIGMA0-VV"][0, 0, 0] = edited["S1-SIGMA0-VV"][0, 0, 0] + 1  # the user fixes one value
    for v in edited.data_vars:
        edited[v].encoding = {}
    edited.to_netcdf(run / "cubes/edited.nc", engine="h5netcdf")
    os.replace(run / "cubes/edited.nc", cube)
    out = snakemake(run, "maps", "--dry-run")
    text = out.stdout + out.stderr
    assert "rule fetch:" in text and "gfmap_mol_s1_grd.nc" in text
    assert "rule samples:" not in text, "the training set did not change"


def one_error_line(log: Path, stage: str) -> str:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith(f"cropmap {stage}: error:")]
    assert len(lines) == 1, log.read_text()[-2000:]
    return lines[0]


@pytest.fixture
def bad(run: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A fresh run folder with the same config (reusing nothing)."""
    wd = tmp_path / "bad"
    wd.mkdir()
    return wd, own_config(wd)


def test_unknown_band_name_stops_at_config_load(bad: tuple[Path, dict]) -> None:
    wd, cfg = bad
    cfg["bands"] = {"s2": ["B04", "NIR"]}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, "maps", ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("cropmap: invalid config:")]
    assert len(lines) == 1 and "bands.s2" in lines[0] and "'NIR'" in lines[0] and "B04" in lines[0], res.stderr[-2000:]
    assert not (wd / "data").exists()


def test_cube_without_crs_stops_the_fetch(bad: tuple[Path, dict]) -> None:
    import xarray as xr

    wd, cfg = bad
    with xr.open_dataset(REALDATA / "gfmap_mol_s1_grd.nc", engine="h5netcdf") as ds:
        bare = ds.drop_vars("crs")
        for v in bare.data_vars:
            bare[v].attrs.pop("grid_mapping", None)
            bare[v].encoding = {}
        bare.to_netcdf(wd / "cubes" / "s1_nocrs.nc", engine="h5netcdf")
    cfg["regions"]["mol"]["files"]["s1"] = "cubes/s1_nocrs.nc"  # relative to the run folder
    cfg["regions"]["mol"]["bbox"] = [5.0512, 51.2156, 5.0606, 51.2217]  # the cubes are read at fetch time
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, str(wd / "data/mol/stack"), ok=False)
    line = one_error_line(wd / "logs/mol/fetch.log", "fetch")
    assert "s1_nocrs.nc" in line and "no CRS" in line and "regions.mol.files.s1.crs" in line
    assert not (wd / "data/mol/raw").exists() and not list((wd / "data/mol").glob("*.json"))


def test_missing_cube_and_missing_table_are_one_line(bad: tuple[Path, dict]) -> None:
    wd, cfg = bad
    cfg["regions"]["mol"]["bbox"] = [5.0512, 51.2156, 5.0606, 51.2217]  # with a bbox the files are read at fetch time
    cfg["regions"]["mol"]["files"]["s1"] = "cubes/s1_moved.nc"
    cfg["training_sets"]["fields"]["tables"][0]["path"] = "tables/gone.parquet"
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, "--keep-going", str(wd / "data/mol/stack"), str(wd / "data/fields/samples.npz"), ok=False)
    line = one_error_line(wd / "logs/mol/fetch.log", "fetch")
    assert "s1_moved.nc" in line and "no such file" in line and "regions.mol.files.s1" in line
    line = one_error_line(wd / "logs/fields/samples.log", "samples")
    assert "gone.parquet" in line and "no such table" in line
    assert not (wd / "data/mol/raw").exists() and not (wd / "data/fields/samples.npz").exists()


def test_table_that_does_not_cover_the_season(bad: tuple[Path, dict]) -> None:
    wd, cfg = bad
    cfg["training_sets"]["fields"]["season"] = {"start": "2021-04", "end": "2021-12"}
    cfg["regions"]["mol"]["season"] = {"start": "2023-04", "end": "2023-12"}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, str(wd / "data/fields/samples.npz"), ok=False)
    line = one_error_line(wd / "logs/fields/samples.log", "samples")
    assert FLANDERS.name in line and "2020-08 .. 2021-11" in line and "2021-04 .. 2021-12" in line and "missing 2021-12" in line
    assert not list((wd / "data/fields").glob("*samples*"))


def test_region_season_not_aligned_with_its_model_stops_at_config_load(bad: tuple[Path, dict]) -> None:
    wd, cfg = bad
    cfg["regions"]["mol"]["season"] = {"start": "2023-03", "end": "2023-03"}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, "maps", ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("cropmap: invalid config:")]
    assert len(lines) == 1 and "regions.mol.season" in lines[0] and "2021-04 .. 2021-04" in lines[0], res.stderr[-2000:]


def _predict(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, months: list[str], bands: list[str]) -> tuple[int, list[str], Path]:
    """``cropmap predict`` of the Mol tile with the Flanders model on stacks of other ``months`` / s2 ``bands``
    (what another config would have stacked)."""
    from cropmap.cli import main as cropmap_main
    from cropmap.config import dumps, stage_params, validate

    cfg = validate(own_config(tmp_path))
    p = stage_params(cfg, "predict", "mol") | {"months": months}
    p["bands"]["s2"] = bands
    stack = tmp_path / "stack"
    stack.mkdir()
    with rasterio.open(run / "data/mol/stack/s2.tif") as src:
        prof, a = src.profile, src.read(list(range(1, len(bands) + 1)))
    with rasterio.open(stack / "s2.tif", "w", **(prof | {"count": len(bands)})) as dst:
        dst.write(a)
        dst.descriptions = tuple(f"{b}_{months[0]}" for b in bands)
    out = tmp_path / "tile.tif"
    capsys.readouterr()
    rc = cropmap_main(["predict", "--params", dumps(p), "--model", str(run / "models/fields/classification/model.ckpt"),
                       "--stack-dir", str(stack), "--tile", "r000000_c000000", "--out", str(out)])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cropmap predict: error:")], out


def test_stack_bands_unlike_the_models_stop_predict(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err, out = _predict(run, tmp_path, capsys, ["2023-04"], ["B04", "B08"])
    assert rc == 1 and len(err) == 1, err
    assert "s2.tif" in err[0] and "['B04', 'B08']" in err[0] and "['B04', 'B08', 'B11']" in err[0] and "bands.s2" in err[0]
    assert not out.exists()


def test_stack_months_unlike_the_models_stop_predict(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err, out = _predict(run, tmp_path, capsys, ["2023-05"], SUBSET)
    assert rc == 1 and len(err) == 1, err
    assert "s2.tif" in err[0] and "2023-05 .. 2023-05" in err[0] and "2021-04 .. 2021-04" in err[0]
    assert "same first calendar month" in err[0] and "regions.mol.season" in err[0]
    assert not out.exists()
