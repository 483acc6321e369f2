"""Past one machine: standard resources on every rule, Dask stacking, Lightning DDP (issue 7)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from affine import Affine
from pyproj import Transformer

from cropmap import stack
from cropmap.cli import main as cropmap_main
from cropmap.config import dumps, stage_params, validate
from cropmap.grid import Grid
from cropmap.modalities import band_descriptions
from tests.conftest import ROOT, rule_blocks, tiny_config
from tests.test_faults import REGION, baseline, snakemake_env


def test_every_job_rule_declares_standard_resources() -> None:
    blocks = rule_blocks()
    jobs = {name: body for name, body in blocks.items() if "shell:" in body}
    assert {"fetch", "stack", "train", "predict", "mosaic", "coverage", "train_compare", "metrics_compare"} <= set(jobs)
    for name, body in jobs.items():
        assert re.search(r"^\s+threads:", body, re.M), f"rule {name}: no threads"
        assert "mem_mb=" in body and "runtime=" in body, f"rule {name}: no mem_mb/runtime"
    for name in ("train", "predict", "pretrain", "train_compare"):
        assert "gpu=" in jobs[name], f"rule {name}: no gpu resource"


def test_gpu_resource_follows_device_and_devices(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    cfg["training"].update(device="cuda", devices=2, strategy="ddp")
    cfg["prediction"]["device"] = "cuda"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    target = str(tmp_path / f"results/{REGION}/tiles/r000000_c000000.tif")
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                          "-n", "--cores", "2", target], capture_output=True, text=True, env=snakemake_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", out, re.M | re.S)}
    assert re.search(r"\bgpu=2\b", blocks["train"]), blocks["train"]
    assert re.search(r"\bgpu=1\b", blocks["predict"]), blocks["predict"]
    assert "gpu=" not in blocks["stack"]


# ------------------------------------------------------------------------------------------
# Dask
# ------------------------------------------------------------------------------------------
MONTHS = ["2023-05", "2023-06", "2023-07", "2023-08"]
GRID = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=300, height=270)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw inputs on other grids: S1 at 20 m in the next UTM zone, weather in lon/lat, with NaN holes."""
    d = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    x0, y0 = Transformer.from_crs(GRID.crs, "EPSG:32632", always_xy=True).transform(GRID.xmin - 100, GRID.ymax + 100)
    for m, crs, tr, shape in (
        ("s1", "EPSG:32632", Affine(20, 0, x0 - 800, 0, -20, y0 + 800), (8, 240, 240)),
        ("weather", "EPSG:4326", Affine(0.001, 0, 4.78, 0, -0.001, 45.72), (8, 60, 70)),
    ):
        a = rng.normal(size=shape).astype("float32")
        a[:, 20:40, 30:60] = np.nan
        a[2:4] = np.where(rng.random(shape[1:]) < 0.3, np.nan, a[2:4])
        with rasterio.open(d / f"{m}.tif", "w", driver="GTiff", width=shape[2], height=shape[1], count=shape[0],
                           dtype="float32", crs=crs, transform=tr, nodata=np.nan) as dst:
            dst.write(a)
            dst.descriptions = tuple(band_descriptions(m, MONTHS))
    return d


def _stack(raw: Path, out: Path, **kw: object) -> dict[str, bytes]:
    written = stack.run(raw, out, GRID, MONTHS, ["s1", "weather"], **kw)  # type: ignore[arg-type]
    return {m: p.read_bytes() for m, p in written.items()}


def test_dask_chunks_give_the_same_stack_as_the_sequential_path(raw: Path, tmp_path: Path) -> None:
    plain = _stack(raw, tmp_path / "plain", use_dask=False, chunk=512)
    threads = _stack(raw, tmp_path / "threads", chunk=16, threads=2)  # 16 -> one 256 px block: 2x2 chunks
    assert plain == threads
    lazy = stack.lazy_stack(raw / "s1.tif", GRID, 8, 256)
    assert lazy.chunks == ((8,), (256, 14), (256, 44))
    with rasterio.open(tmp_path / "plain" / "s1.tif") as src:
        a = src.read()
    assert np.isnan(a).any() and np.isfinite(a).mean() > 0.5
    assert np.array_equal(lazy.compute(scheduler="sync"), a, equal_nan=True)


def test_stack_on_an_existing_dask_distributed_cluster(raw: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    plain = _stack(raw, tmp_path / "plain", use_dask=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://")
        cfg = validate(tiny_config(tmp_path, dask={"scheduler": address, "chunk_size": 64}))
        p = stage_params(cfg, "stack", REGION) | {"grid": GRID.to_dict(), "months": MONTHS, "modalities": ["s1", "weather"]}
        assert "dask" not in stage_params(cfg, "stack", REGION), "the scheduler must not be a rerun trigger"
        with Client(address) as client, get_task_stream(client=client) as stream:
            assert cropmap_main(["stack", "--params", dumps(p), "--raw-dir", str(raw), "--out-dir", str(tmp_path / "dist"),
                                 "--chunk", str(cfg["dask"]["chunk_size"]), "--dask-scheduler", address]) == 0
    warped = [t for t in stream.data if "warp_window" in str(t["key"])]
    assert len(warped) == 2 * 4, "each modality's 2x2 chunks are warped on the cluster's workers"
    dist = {m: (tmp_path / "dist" / f"{m}.tif").read_bytes() for m in plain}
    assert dist == plain


# ------------------------------------------------------------------------------------------
# Lightning DDP on CPU: two processes (gloo)
# ------------------------------------------------------------------------------------------
@pytest.mark.workflow
def test_ddp_two_cpu_processes_train_and_only_rank_0_writes(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    base = baseline(tmp_path_factory)
    cfg = validate(yaml.safe_load((base / "config.yaml").read_text()))
    cfg["training"].update(device="cpu", devices=2, strategy="ddp", epochs=2)
    data = base / "data" / REGION
    out = tmp_path / "model"
    shutil.copytree(data / "stack", tmp_path / "stack")
    cmd = [sys.executable, "-m", "cropmap", "train", "--params", dumps(stage_params(cfg, "train", REGION)),
           "--task", "classification", "--stack-dir", str(tmp_path / "stack"), "--labels", str(data / "labels.tif"),
           "--chips", str(data / "chips.parquet"), "--out", str(out / "model.ckpt"), "--work-dir", str(out / "work")]
    env = dict(snakemake_env(), CROPMAP_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("CROPMAP_RESUME_FROM", None)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "distributed_backend=gloo" in log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    wrote = re.findall(r"rank (\d) of (\d): wrote (\S+)", log)
    assert wrote == [("0", "2", str(out / "model.ckpt"))], wrote
    assert re.search(r"rank 1 of 2: training done; rank 0 writes", log)
    bundle = torch.load(out / "model.ckpt", map_location="cpu", weights_only=False)
    s = bundle["summary"]
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["epochs"] == 2
    assert s["best_val_loss"] is not None and np.isfinite(s["best_val_loss"])
    assert json.loads((out / "train_summary.json").read_text()) == s
    assert sorted(p.name for p in out.iterdir()) == ["model.ckpt", "train_summary.json", "work"]
    assert not list((out / "work").glob("*.ckpt")) and not [p for p in out.rglob("*") if ".part" in p.name]
    # the weights moved away from the seeded initialisation
    import lightning as L

    from cropmap.loop import CoLearningModule

    L.seed_everything(cfg["seed"])
    init = CoLearningModule(bundle["model_kwargs"], bundle["stats"], 1e-3, bundle["class_weights"]).state_dict()
    changed = [k for k, v in bundle["state_dict"].items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(changed) > len(init) // 4, changed
