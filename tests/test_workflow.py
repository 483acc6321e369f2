"""A real ``snakemake`` run of the whole DAG on a tiny synthetic region."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from PIL import Image
from rio_cogeo.cogeo import cog_validate

from cropmap.modalities import MODALITIES
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.workflow

HOLE = 20  # px: a corner where no source has data


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{res.stderr[-4000:]}\n{logs}")
    return res


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole tiny workflow, in a folder whose name holds a space (every path of every rule is quoted)."""
    wd = tmp_path_factory.mktemp("wf with space")
    assert " " in str(wd)
    (wd / "config.yaml").write_text(yaml.safe_dump(tiny_config(wd)))
    snakemake(wd, str(wd / "data/tiny/stack"))
    # a corner outside every source's footprint: all modalities NaN there
    for f in (wd / "data/tiny/stack").glob("*.tif"):
        with rasterio.open(f, "r+") as dst:
            a = dst.read(window=((0, HOLE), (0, HOLE)))
            a[:] = np.nan
            dst.write(a, window=((0, HOLE), (0, HOLE)))
    snakemake(wd, "all")  # maps, metrics, expected-F1 layers and report.html
    return wd


def test_map_is_a_valid_cog_with_three_bands(run: Path) -> None:
    m = run / "results/tiny/map.tif"
    ok, errors, _ = cog_validate(str(m))
    assert ok, errors
    with rasterio.open(m) as src:
        assert src.count == 3 and src.dtypes == ("uint8",) * 3
        assert src.descriptions == ("class", "confidence", "modalities")
        assert src.nodata == 255
        assert src.overviews(1), "internal overviews expected"
        assert src.colormap(1)[1][:3] == (0xE6, 0xC2, 0x29)  # wheat colour from config
        assert src.tags(1)["class_1"] == "wheat"
        cls, conf, _bits = src.read()
    assert conf.max() <= 100
    assert set(np.unique(cls)) - {255} <= set(range(7))
    assert (run / "results/tiny/quicklook.png").stat().st_size > 1000
    assert (run / "results/tiny/map.json").exists()


def test_logs_have_concise_progress_lines_and_no_bars(run: Path) -> None:
    """Each stage writes its own log (``cropmap <stage> --log``): no progress-bar redraws, one line per epoch."""
    logs = sorted((run / "logs").rglob("*.log"))
    assert len(logs) >= 10
    for log in logs:
        text = log.read_text()
        assert "\r" not in text and "Traceback" not in text, log
    train = (run / "logs/tiny/train_classification.log").read_text()
    epochs = re.findall(r"epoch (\d+)/2: ", train)
    summary = json.loads((run / "models/tiny/classification/train_summary.json").read_text())
    assert epochs == [str(i) for i in range(1, summary["epochs"] + 1)] and epochs, train[-2000:]
    stack = (run / "logs/tiny/stack.log").read_text()
    assert "stack s2: 100 % (1/1 chunks)" in stack and len(stack.splitlines()) < 40, stack


def test_pixels_without_any_modality_are_nodata(run: Path) -> None:
    with rasterio.open(run / "results/tiny/map.tif") as src:
        cls, _conf, bits = src.read()
    assert (cls[:HOLE, :HOLE] == 255).all() and (bits[:HOLE, :HOLE] == 0).all()
    assert ((bits == 0) == (cls == 255)).all()
    assert (cls[HOLE:, HOLE:] != 255).mean() > 0.99


def test_s1_gap_strip_has_s1_bit_cleared(run: Path) -> None:
    with rasterio.open(run / "data/tiny/stack/s1.tif") as src:
        s1 = src.read()
    gap_cols = np.isnan(s1).all(axis=(0, 1))
    assert 0 < gap_cols.sum() < s1.shape[2] // 2, "the synthetic S1 orbit gap should be a strip"
    with rasterio.open(run / "results/tiny/map.tif") as src:
        bits = src.read(3)
    s1_bit = 1 << MODALITIES.index("s1")
    assert not (bits[:, gap_cols] & s1_bit).any()
    assert (bits[HOLE:, ~gap_cols] & s1_bit).mean() > 0.5


def test_metrics_have_every_subset(run: Path) -> None:
    df = pd.read_csv(run / "results/tiny/metrics.csv")
    assert len(df) == 15
    assert list(df.columns) == ["subset", "n_modalities", "n", "f1_weighted", "f1_macro", "accuracy", "ece"]
    assert df["n"].gt(0).all()
    assert df[["f1_weighted", "f1_macro", "accuracy"]].apply(lambda c: c.between(0, 100)).all().all()
    assert df["ece"].between(0, 1).all()


def test_expected_f1_layer_looks_up_each_pixels_subset(run: Path) -> None:
    exp = run / "results/tiny/expected_f1.tif"
    assert cog_validate(str(exp))[0]
    metrics = pd.read_csv(run / "results/tiny/metrics.csv")
    lut = {sum(1 << MODALITIES.index(m) for m in s.split("+")): round(v) for s, v in zip(metrics.subset, metrics.f1_weighted, strict=True)}
    with rasterio.open(exp) as e, rasterio.open(run / "results/tiny/map.tif") as m:
        ev, bits = e.read(1), m.read(3)
        mean = float(e.tags()["mean_expected"])
    for code in np.unique(bits):
        want = 255 if code == 0 else lut[int(code)]
        assert (ev[bits == code] == want).all()
    assert abs(mean - ev[ev != 255].mean()) < 0.01
    assert f"<b>{mean:.2f}</b>" in (run / "results/report.html").read_text()


def test_compare_protocol_has_every_method_and_subset(run: Path) -> None:
    snakemake(run, "compare")
    table = pd.read_csv(run / "results/compare/table.csv")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    from cropmap.config import validate

    methods = validate(cfg)["compare"]["methods"]
    assert list(table.columns) == ["region", "method", "subset", "f1_weighted", "f1_macro", "accuracy", "ece", "n"]
    assert len(table) == len(methods) * 15
    assert set(table["method"]) == set(methods)
    assert table.groupby("method")["subset"].nunique().eq(15).all()
    summary = pd.read_csv(run / "results/compare/summary.csv")
    assert set(summary["method"]) == set(methods)
    assert {"moderate", "extreme", "overall", "full", "ece"} <= set(summary.columns)
    assert {"trees_dedicated", "trees_nan"} <= set(methods)  # the tree references run beside the neural methods
    row = table[table.method == methods[0]]
    k = row.subset.str.count(r"\+") + 1
    assert abs(summary.loc[summary.method == methods[0], "extreme"].item() - row.loc[k == 1, "f1_weighted"].mean()) < 0.02
    assert (run / "results/compare/heatmap.png").stat().st_size > 1000


def test_compare_cross_validation_reports_mean_and_std_over_folds(run: Path) -> None:
    original = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(original)
    cfg["compare"] |= {"folds": 3, "methods": ["comiss", "input_fusion"]}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        snakemake(run, "compare")
    finally:
        (run / "config.yaml").write_text(original)
    table = pd.read_csv(run / "results/compare/table.csv")
    assert list(table.columns) == ["region", "fold", "method", "subset", "f1_weighted", "f1_macro", "accuracy", "ece", "n"]
    assert len(table) == 3 * 2 * 15 and sorted(table["fold"].unique()) == [0, 1, 2]
    # each fold tests other blocks: the test pixels differ between folds
    splits = []
    for f in range(3):
        with rasterio.open(run / f"data/tiny/folds/{f}/labels.tif") as src:
            splits.append(src.read(2) == 2)
    assert not (splits[0] & splits[1]).any() and not (splits[1] & splits[2]).any()
    summary = pd.read_csv(run / "results/compare/summary.csv")
    assert {"overall", "overall_std", "moderate_std", "extreme_std"} <= set(summary.columns)
    per_fold = table[table.method == "comiss"].groupby("fold")["f1_weighted"].mean()
    assert abs(summary.loc[summary.method == "comiss", "overall"].item() - per_fold.mean()) < 0.02
    assert abs(summary.loc[summary.method == "comiss", "overall_std"].item() - per_fold.std(ddof=0)) < 0.02


def test_metrics_write_the_confusion_counts_of_every_subset(run: Path) -> None:
    metrics = pd.read_csv(run / "results/tiny/metrics.csv")
    conf = pd.read_csv(run / "results/tiny/confusion.csv")
    assert list(conf.columns) == ["subset", "true", "pred", "count"]
    assert set(conf["subset"]) == set(metrics["subset"])
    for row in metrics.itertuples():
        c = conf[conf.subset == row.subset]
        assert c["count"].sum() == row.n
        assert abs(100 * c.loc[c.true == c.pred, "count"].sum() / row.n - row.accuracy) < 0.01


def test_area_is_estimated_from_the_test_pixels_under_the_map(run: Path) -> None:
    a = json.loads((run / "results/tiny/area.json").read_text())
    with rasterio.open(run / "results/tiny/map.tif") as m, rasterio.open(run / "data/tiny/labels.tif") as lab:
        cls = m.read(1)
        ref, split = lab.read()
    k = len(a["class_ids"])
    t = (split == 2) & (ref != 255) & (cls != 255)
    want = np.zeros((k, k), int)
    np.add.at(want, (cls[t], ref[t]), 1)
    assert a["error_matrix"] == want.tolist() and want.sum() > 0
    df = pd.read_csv(run / "results/tiny/area.csv")
    assert abs(df["mapped_ha"].sum() - (cls != 255).sum() * 0.01) < 1e-6
    assessed = (cls != 255).sum() - a["unassessed_px"]
    assert abs(df["area_ha"].sum() - assessed * 0.01) < 1e-3  # the estimates share out the assessed area
    assert (df["area_ci95_low_ha"].fillna(0) <= df["area_ha"].fillna(0) + 1e-9).all()


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "chromium is not installed: apt-get install chromium (CI does, see .ci/run)"
        if os.environ.get("CROPMAP_REQUIRE_CHROMIUM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_report_renders_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    """results/report.html opens from disk with no network, draws a page, and each embedded image decodes."""
    from PIL import Image

    exe = _chromium()
    snakemake(run, "--forcerun", "report", str(run / "results/report.html"))  # picks up compare's table if it ran
    page = run / "results/report.html"
    text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*['"](?!data:|#)""", text), "the report must not load anything from outside"
    for section in ("Map", "Coverage", "Sensor availability", "Accuracy per sensor subset", "Confusion and per-class scores",
                    "Area per class", "What would help", "Training"):
        assert f"<h3>{section}" in text, section
    imgs = re.findall(r"""<img[^>]*src=['"]data:image/png;base64,([^'"]+)['"]""", text)
    # quicklook, expected F1, availability, subset shares, subset scores, 1 or 2 confusions, area, what would help,
    # training; the methods x subsets heatmap once compare ran
    assert len(imgs) == text.count("<img") >= 9 + (run / "results/compare/table.csv").exists()
    assert ("alt='method comparison" in text) == (run / "results/compare/table.csv").exists()
    for b in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(b)))
        im.load()
        lo, hi = im.convert("L").getextrema()
        assert im.width > 100 and im.height > 100 and hi - lo > 50, "a blank or tiny figure"
    shot = tmp_path / "page.png"
    res = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1280,4000", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.exists(), f"chromium wrote no screenshot (exit {res.returncode}):\n{res.stderr[-3000:]}"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape == (4000, 1280, 3)
    values, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() / counts.sum() < 0.9 and len(values) > 500, "the page rendered (nearly) blank"
    header = (np.abs(px - [0x0B, 0x6E, 0x4F]).sum(axis=2) < 12).mean()
    assert header > 0.01, "the page's style (its green header) was not applied"


def test_snakemake_report_collects_the_results(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.zip"
    snakemake(run, "--report", str(out))
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        page = z.read("report/report.html").decode()
    for f in ("quicklook.png", "metrics.csv", "confusion.csv", "area.csv", "coverage.json", "report.html"):
        assert sum(n.startswith("report/data/raw/") and n.endswith(f"/{f}") for n in names) == 1, (f, names)
    # the workflow description, the categories and captions, and the rules with their runtimes
    assert "turns the regions of" in page and "3. Area" in page and "Stratified estimator with the map classes" in page
    assert all(f'"rule": "{r}"' in page for r in ("train", "mosaic", "metrics", "area", "report")) and "starttime" in page


def test_adding_a_region_runs_only_its_jobs(run: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["regions"]["tiny2"] = dict(cfg["regions"]["tiny"], synthetic={"seed": 9})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(run, "maps", "--dry-run")
    text = out.stdout + out.stderr
    assert re.search(r"region=tiny2\b", text)
    assert not re.search(r"region=tiny\b", text), "jobs of the existing region were scheduled again"


def test_train_summary_has_the_history_and_the_report_shows_it(run: Path) -> None:
    summary = json.loads((run / "models/tiny/classification/train_summary.json").read_text())
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(summary["epochs"]))
    for h in history:  # every logged loss term of comiss and the validation metrics, per epoch
        assert {"train/total", "train/main", "train/mod", "train/cont", "train/miss_ce", "train/miss_kd",
                "val_loss", "val_acc"} <= set(h), h
    page = (run / "results/report.html").read_text()
    assert "alt='training curves tiny'" in page and "No per-epoch history" not in page


def test_tree_reference_draws_the_map(run: Path) -> None:
    import torch

    original = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(original)
    cfg["model"] |= {"method": "trees_dedicated", "options": cfg["compare"]["options"]["trees_dedicated"]}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        snakemake(run, "maps")
        with rasterio.open(run / "results/tiny/map.tif") as src:
            cls, conf, bits = src.read()
            assert src.tags()["cropmap_method"] == "trees_dedicated"
        bundle = torch.load(run / "models/tiny/classification/model.ckpt", weights_only=False)
        assert bundle["summary"]["method"] == "trees_dedicated" and bundle["summary"]["epochs"] == 0
        assert len(bundle["calibration"]["temperatures"]) == 16
    finally:
        (run / "config.yaml").write_text(original)
    assert ((bits == 0) == (cls == 255)).all() and (cls != 255).mean() > 0.9
    assert conf[cls != 255].max() <= 100


def test_report_shows_the_summary_of_the_model_that_mapped_a_region(run: Path) -> None:
    original = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(original)
    # a region without labels, mapped by tiny's model (dry run: nothing is fetched)
    cfg["regions"]["borrower"] = {"source": "stac", "stac": {"preset": "earth_search"}, "bbox": cfg["regions"]["tiny"]["bbox"],
                                  "season": cfg["regions"]["tiny"]["season"], "model_from": "tiny"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    try:
        out = snakemake(run, "--dry-run", "--printshellcmds", str(run / "results/report.html"))
    finally:
        (run / "config.yaml").write_text(original)
    text = out.stdout + out.stderr
    regions = json.loads(re.search(r"cropmap report --regions '(\{.*?\})' ", text).group(1))
    assert regions["borrower"]["summary"] == f"{cfg['models_dir']}/tiny/classification/train_summary.json"
    assert f"{cfg['models_dir']}/borrower/" not in text, "a region with model_from trains no model"


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("seg")
    cfg = tiny_config(wd)
    cfg["model"].update(task="segmentation", pretrain={"enabled": True, "epochs": 1, "batch_size": 8})
    cfg["compare"]["methods"] = ["comiss", "imt", "gemmnet"]
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(wd, "maps")
    return wd


def test_segmentation_model_draws_the_map(seg_run: Path) -> None:
    tmp_path = seg_run
    assert (tmp_path / "models/tiny/segmentation/model.ckpt").exists()
    with rasterio.open(tmp_path / "results/tiny/map.tif") as src:
        cls, _, bits = src.read()
        assert src.tags()["cropmap_task"] == "segmentation"
    assert ((bits == 0) == (cls == 255)).all()
    assert (cls != 255).mean() > 0.99
    assert len(pd.read_csv(tmp_path / "results/tiny/metrics.csv")) == 15
    with Image.open(tmp_path / "results/tiny/quicklook.png") as im:
        assert im.text["Title"] == "cropmap tiny: segmentation (comiss)"


def test_segmentation_methods_imt_and_gemmnet_in_the_protocol(seg_run: Path) -> None:
    snakemake(seg_run, "compare")
    assert (seg_run / "models/tiny/pretrain/imt.ckpt").exists(), "imt fine-tunes from the pretrain rule"
    table = pd.read_csv(seg_run / "results/compare/table.csv")
    assert set(table["method"]) == {"comiss", "imt", "gemmnet"}
    assert len(table) == 3 * 15 and table["n"].gt(0).all()
