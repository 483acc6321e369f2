"""A long run survives crashes and bad inputs, and never leaks credentials (issue 7).

Every test here works on the tiny synthetic region of ``tests/conftest.py``. One uninterrupted
``snakemake all`` run (:func:`baseline`, cached for the whole session and shared with
``tests/test_slurm.py``) is the reference: its config carries an Earth Engine service-account
key path whose file holds :data:`MARKER`, and every fault run must end with its exact map.

* SIGKILL in the middle of ``train`` and of ``predict``; ``snakemake --unlock`` and rerun:
  training resumes from ``last.ckpt``, finished tiles are not predicted again, and the map is
  byte-identical to the uninterrupted run.
* A truncated or corrupt stack GeoTIFF, a stack on the wrong grid, a label file with an unknown
  class code, a bbox across the antimeridian: one line ``cropmap <stage>: error: ...`` naming
  the file or key and the fix, and nothing half-written. A bbox across a UTM zone edge is
  handled (one grid in the zone of the centroid, covering the whole bbox).
* A tile where every modality is missing and a month missing from every modality: nodata (never
  a guess) and counted in ``results/{region}/coverage.json`` and the HTML report.
* Determinism: the same config and seed twice gives byte-identical ``map.tif``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from shapely.geometry import box

from cropmap.cli import main as cropmap_main
from cropmap.config import dumps, stage_params, validate
from cropmap.grid import Grid
from tests.conftest import ROOT, tiny_config

pytestmark = pytest.mark.workflow

MARKER = "CROPMAP-SECRET-7f3a9c-do-not-log"  # inside the fake service-account key
REGION = "tiny"
MAP = f"results/{REGION}/map.tif"
_CACHE: dict[str, Path] = {}


# ------------------------------------------------------------------------------------------
# helpers shared with test_slurm.py
# ------------------------------------------------------------------------------------------
def secret_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake service-account JSON key (outside every work dir) holding :data:`MARKER`."""
    if "key" not in _CACHE:
        d = tmp_path_factory.mktemp("secrets")
        key = d / "ee-key.json"
        key.write_text(json.dumps({
            "type": "service_account", "project_id": "cropmap-test", "private_key_id": MARKER,
            "private_key": f"-----BEGIN PRIVATE KEY-----\n{MARKER}\n-----END PRIVATE KEY-----\n",
            "client_email": "runner@cropmap-test.iam.gserviceaccount.com", "client_id": "1",
        }))
        key.chmod(0o600)
        _CACHE["key"] = key
    return _CACHE["key"]


def fault_config(root: Path, key: Path, tile_size: int = 128) -> dict:
    """The tiny config: 3 epochs (room to kill one), one 128 px tile, credentials path in config."""
    cfg = tiny_config(root)
    cfg["training"].update(epochs=3, patience=3)
    cfg["prediction"]["tile_size"] = tile_size
    cfg["regions"][REGION]["earthengine"] = {"service_account_key": str(key), "project": "cropmap-test"}
    return cfg


def write_config(wd: Path, key: Path, tile_size: int = 128) -> dict:
    wd.mkdir(parents=True, exist_ok=True)
    cfg = fault_config(wd, key, tile_size)
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    return validate(cfg)


def snakemake_cmd(wd: Path, *args: str, cores: int = 2) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
            "--cores", str(cores), "--rerun-incomplete", "--printshellcmds", *args]


def snakemake_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def job_logs(wd: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((wd / "logs").rglob("*.log")))


def snakemake(wd: Path, *args: str, cores: int = 2, check: bool = True, cmd: list[str] | None = None,
              timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run snakemake in ``wd``; its output is kept as ``wd/snakemake-N.out`` (scanned for secrets)."""
    res = subprocess.run(cmd or snakemake_cmd(wd, *args, cores=cores), capture_output=True, text=True,
                         timeout=timeout, env=env or snakemake_env())
    n = len(list(wd.glob("snakemake-*.out")))
    (wd / f"snakemake-{n}.out").write_text(res.stdout + res.stderr)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{res.stderr[-4000:]}\n{job_logs(wd)}")
    return res


def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run (``snakemake all``), once per session."""
    if "base" not in _CACHE:
        wd = tmp_path_factory.mktemp("base")
        write_config(wd, secret_key(tmp_path_factory))
        snakemake(wd, "all")
        _CACHE["base"] = wd
    return _CACHE["base"]


def map_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (a run started with ``start_new_session``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def run_until_then_kill(wd: Path, args: list[str], kill_when: Callable[[Path], bool], timeout: float = 600) -> str:
    """Start snakemake, SIGKILL it and every job (its whole session) once ``kill_when(wd)``."""
    out = wd / "killed-run.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen(snakemake_cmd(wd, *args), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=snakemake_env())
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_when(wd):
                for pid in session_pids(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.wait()
                return out.read_text()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            for pid in session_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    raise AssertionError(f"the run ended before the kill point:\n{out.read_text()[-3000:]}\n{job_logs(wd)}")


def copy_from(base: Path, wd: Path, *folders: str) -> None:
    """Copy finished outputs (mtimes kept, so snakemake sees them as up to date)."""
    for f in folders:
        shutil.copytree(base / f, wd / f, copy_function=shutil.copy2)


def leftovers(folder: Path) -> list[Path]:
    """Half-written temporary files (``atomic_path``/``atomic_dir`` use ``.name.*.part``)."""
    return sorted(p for p in folder.rglob("*") if ".part" in p.name)


def one_line_error(capsys: pytest.CaptureFixture, stage: str, argv: list[str]) -> str:
    """Run ``cropmap <stage>`` in-process; it must fail with exactly one ``error:`` line on stderr."""
    capsys.readouterr()
    rc = cropmap_main([stage, *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("\r", "stack ", "chips"))]
    assert rc == 1, err
    errors = [ln for ln in lines if ln.startswith(f"cropmap {stage}: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ------------------------------------------------------------------------------------------
# kills
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return baseline(tmp_path_factory)


def test_same_config_and_seed_twice_gives_a_byte_identical_map(base: Path, tmp_path: Path) -> None:
    write_config(tmp_path, secret_key_path(base))
    snakemake(tmp_path, str(tmp_path / MAP))
    assert (tmp_path / MAP).read_bytes() == (base / MAP).read_bytes()


def secret_key_path(base: Path) -> Path:
    return Path(yaml.safe_load((base / "config.yaml").read_text())["regions"][REGION]["earthengine"]["service_account_key"])


def test_sigkill_during_train_resumes_from_last_checkpoint(base: Path, tmp_path: Path) -> None:
    write_config(tmp_path, secret_key_path(base))
    copy_from(base, tmp_path, "data")  # fetch .. chips done: the run starts with train
    work = tmp_path / "models" / REGION / "classification" / "lightning"
    model = work.parent / "model.ckpt"
    run_until_then_kill(tmp_path, [str(tmp_path / MAP)], lambda wd: (work / "last.ckpt").exists() and not model.exists())
    assert not model.exists() and (work / "last.ckpt").exists()
    import torch

    killed_at = torch.load(work / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert killed_at < 2, "killed after the last epoch: nothing left to resume"
    assert snakemake(tmp_path, "--unlock").returncode == 0
    snakemake(tmp_path, str(tmp_path / MAP))
    log = (tmp_path / "logs" / REGION / "train_classification.log").read_text()
    assert f"resuming from {work / 'last.ckpt'}" in log
    summary = json.loads((model.parent / "train_summary.json").read_text())
    assert summary["resumed"] is True and summary["epochs"] == 3
    # the history of the epochs before the kill came back with last.ckpt
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert all({"train/total", "val_loss", "val_acc"} <= set(h) for h in summary["history"])
    assert not list(work.glob("*.ckpt")), "checkpoints are removed once model.ckpt is written"
    assert (tmp_path / MAP).read_bytes() == (base / MAP).read_bytes()


def finished_tiles(log: str) -> set[str]:
    """Tiles whose predict job snakemake reported finished (``Finished jobid: N (Rule: predict)``)."""
    tile_of = {m.group(1): m.group(2) for m in re.finditer(r"rule predict:\n(?:\s+.*\n)*?\s+jobid: (\d+)\n(?:\s+.*\n)*?\s+wildcards: region=\w+, tile=(\w+)", log)}
    return {tile_of[j] for j in re.findall(r"Finished jobid: (\d+) \(Rule: predict\)", log)}


def test_sigkill_during_predict_skips_finished_tiles(base: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    write_config(tmp_path, secret_key_path(base), tile_size=104)  # 2 tiles (rows 0-103, 104-107)
    copy_from(base, tmp_path, "data", "models")  # the run starts with predict
    tiles = tmp_path / "results" / REGION / "tiles"
    log = run_until_then_kill(tmp_path, [str(tmp_path / MAP), "--cores", "1"],
                              lambda wd: bool(finished_tiles((wd / "killed-run.out").read_text())))
    done = finished_tiles(log)
    assert len(done) == 1 and not (tmp_path / MAP).exists(), log[-3000:]
    mtimes = {t: (tiles / f"{t}.tif").stat().st_mtime_ns for t in done}
    assert snakemake(tmp_path, "--unlock").returncode == 0
    res = snakemake(tmp_path, str(tmp_path / MAP))
    rerun = re.findall(r"wildcards: region=tiny, tile=(\w+)", res.stdout + res.stderr)
    assert rerun == sorted({"r000000_c000000", "r000104_c000000"} - done), rerun
    for t, mtime in mtimes.items():
        assert (tiles / f"{t}.tif").stat().st_mtime_ns == mtime, f"{t} was predicted again"
    # the same config run without a kill writes the very same bytes
    ref = tmp_path_factory.mktemp("predict-ref")
    write_config(ref, secret_key_path(base), tile_size=104)
    copy_from(base, ref, "data", "models")
    snakemake(ref, str(ref / MAP))
    assert (tmp_path / MAP).read_bytes() == (ref / MAP).read_bytes()
    # 104 px tiles instead of one 128 px tile: per-pixel classification, the same pixels
    assert np.array_equal(map_pixels(tmp_path / MAP), map_pixels(base / MAP))


# ------------------------------------------------------------------------------------------
# bad inputs: one line naming the file or key and the fix, nothing half-written
# ------------------------------------------------------------------------------------------
def _stage_args(base: Path, stack: Path, stage: str, out: Path) -> list[str]:
    cfg = validate(yaml.safe_load((base / "config.yaml").read_text()))
    p = dumps(stage_params(cfg, "train" if stage == "train" else stage, REGION))
    data = base / "data" / REGION
    if stage == "chips":
        return ["--params", p, "--stack-dir", str(stack), "--labels", str(data / "labels.tif"), "--out", str(out / "chips.parquet")]
    if stage == "train":
        return ["--params", p, "--task", "classification", "--stack-dir", str(stack), "--labels", str(data / "labels.tif"),
                "--chips", str(data / "chips.parquet"), "--out", str(out / "model.ckpt"), "--work-dir", str(out / "work")]
    if stage == "predict":
        return ["--params", p, "--model", str(base / "models" / REGION / "classification" / "model.ckpt"),
                "--stack-dir", str(stack), "--tile", "r000000_c000000", "--out", str(out / "tile.tif")]
    raise ValueError(stage)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_stack_geotiff_stops_each_reader_with_one_line(base: Path, tmp_path: Path, damage: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    stack = tmp_path / "stack"
    shutil.copytree(base / "data" / REGION / "stack", stack)
    f = stack / "s2.tif"
    raw = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(raw[: len(raw) * 6 // 10])
    else:  # a run of garbage in the compressed tiles (header intact)
        mid = len(raw) // 2
        f.write_bytes(raw[:mid] + bytes(range(256)) * 64 + raw[mid + 256 * 64 :])
    for stage in ("chips", "train", "predict"):
        out = tmp_path / f"out-{stage}"
        line = one_line_error(capsys, stage, _stage_args(base, stack, stage, out))
        assert f"{f} is truncated or corrupt" in line, line
        assert f"delete the folder {stack} and rerun snakemake" in line, line
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], "nothing may be written"


def test_stack_on_the_wrong_grid_stops_each_reader_with_one_line(base: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    stack = tmp_path / "stack"
    shutil.copytree(base / "data" / REGION / "stack", stack)
    f = stack / "s1.tif"
    with rasterio.open(f) as src:
        prof, data = src.profile, src.read()
    t = prof["transform"]
    prof["transform"] = rasterio.Affine(t.a, t.b, t.c + 5, t.d, t.e, t.f)  # half a pixel east
    with rasterio.open(f, "w", **prof) as dst:
        dst.write(data)
    for stage in ("chips", "train", "predict"):
        out = tmp_path / f"out-{stage}"
        line = one_line_error(capsys, stage, _stage_args(base, stack, stage, out))
        assert f"{f} is not on its region's grid" in line and "delete the folder" in line, line
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_label_file_with_an_unknown_class_code(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = validate(yaml.safe_load((base / "config.yaml").read_text()))
    grid = Grid(**stage_params(cfg, "labels", REGION)["grid"])
    x0, _, _, y1 = grid.bounds
    vec = tmp_path / "fields.geojson"
    gpd.GeoDataFrame({"crop": ["wheat", "maize", "WHT-2023"]},
                     geometry=[box(x0 + 20 + 150 * i, y1 - 300, x0 + 150 * (i + 1), y1 - 20) for i in range(3)],
                     crs=grid.crs).to_crs("EPSG:4326").to_file(vec)
    cfg["regions"][REGION]["labels"] = {"path": str(vec), "column": "crop"}
    p = stage_params(validate(cfg), "labels", REGION)
    out = tmp_path / "out"
    line = one_line_error(capsys, "labels", ["--params", dumps(p), "--raw-dir", str(base / "data" / REGION / "raw"),
                                             "--out-tif", str(out / "labels.tif"), "--out-gpkg", str(out / "labels.gpkg")])
    assert f"{vec}: 1 unknown class code(s) in column 'crop'" in line and "'WHT-2023'" in line, line
    assert "classes[].codes" in line
    assert not (out / "labels.tif").exists() and not (out / "labels.gpkg").exists()
    assert not out.exists() or not leftovers(out)


def test_a_failing_job_shows_its_one_line_on_the_snakemake_terminal(base: Path, tmp_path: Path) -> None:
    """The stage's error line reaches the terminal of ``snakemake`` (and its log), next to
    Snakemake's pointer to the log; the failed job leaves no output."""
    cfg = write_config(tmp_path, secret_key_path(base))
    copy_from(base, tmp_path, "data")
    for f in ("labels.tif", "labels.gpkg"):
        (tmp_path / "data" / REGION / f).unlink()
    vec = tmp_path / "fields with space.geojson"
    grid = Grid(**stage_params(cfg, "labels", REGION)["grid"])
    x0, _, _, y1 = grid.bounds
    gpd.GeoDataFrame({"code": ["wheat", "WHT-2023"]}, geometry=[box(x0 + 20, y1 - 300, x0 + 150, y1 - 20),
                                                                 box(x0 + 170, y1 - 300, x0 + 300, y1 - 20)],
                     crs=grid.crs).to_file(vec)
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["regions"][REGION]["labels"] = {"path": str(vec)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    res = snakemake(tmp_path, str(tmp_path / "data" / REGION / "labels.tif"), check=False)
    assert res.returncode != 0
    terminal = res.stdout + res.stderr
    lines = [ln for ln in terminal.splitlines() if "cropmap labels: error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("cropmap labels: error: "), terminal[-3000:]
    assert f"{vec}: 1 unknown class code(s) in column 'code'" in lines[0] and "classes[].codes" in lines[0]
    assert "Traceback" not in terminal
    assert "log: logs/tiny/labels.log" in terminal  # Snakemake's own pointer
    log = (tmp_path / "logs" / REGION / "labels.log").read_text()
    assert log.splitlines()[-1] == lines[0]
    assert not (tmp_path / "data" / REGION / "labels.tif").exists() and not leftovers(tmp_path / "data")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_stops_a_local_run_before_any_job(tmp_path: Path, base: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    cfg = fault_config(tmp_path, secret_key_path(base))
    cfg["training"]["device"] = "cuda"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert snakemake(tmp_path, "-n", "maps").returncode == 0  # parsing (e.g. on a cluster's login node) is fine
    res = snakemake(tmp_path, "maps", check=False)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "cropmap: invalid config" in ln]
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-3000:]
    assert "config key training.device is 'cuda' but no CUDA device is visible; set it to auto or cpu" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()
    # a job that runs anyway (on a cluster node without a GPU) says the same in one line
    p = json.loads(_stage_args(base, base / "data" / REGION / "stack", "train", tmp_path / "out")[1])
    p["training"]["device"] = "cuda"
    argv = _stage_args(base, base / "data" / REGION / "stack", "train", tmp_path / "out")
    argv[1] = dumps(p)
    line = one_line_error(capsys, "train", argv)
    assert "config key training.device is 'cuda' but no CUDA device is visible" in line
    assert not (tmp_path / "out").exists() or not [f for f in (tmp_path / "out").rglob("*") if f.is_file()]


@pytest.mark.parametrize("change", ["drop_bands", "other_months"])
def test_stack_with_other_bands_on_the_same_grid_stops_each_reader_with_one_line(
        base: Path, tmp_path: Path, change: str, capsys: pytest.CaptureFixture) -> None:
    stack = tmp_path / "stack"
    shutil.copytree(base / "data" / REGION / "stack", stack)
    f = stack / "s1.tif"
    with rasterio.open(f) as src:
        prof, data, desc = src.profile, src.read(), list(src.descriptions)
    if change == "drop_bands":  # a stack of 11 months where the season has 12
        data, desc = data[:-2], desc[:-2]
        want = "has 22 bands, expected 24 (<band>_<YYYY-MM> for the 12 month(s) 2023-01..2023-12; band 23 should be VV_2023-12, found nothing)"
    else:  # the same count, another season
        desc = [d.replace("2023-", "2022-") for d in desc]
        want = "has the 24 bands expected but other band names (<band>_<YYYY-MM> for the 12 month(s) 2023-01..2023-12; band 1 should be VV_2023-01, found VV_2022-01)"
    prof["count"] = len(data)
    f.unlink()
    with rasterio.open(f, "w", **prof) as dst:
        dst.write(data)
        dst.descriptions = tuple(desc)
    for stage in ("chips", "train", "predict"):
        out = tmp_path / f"out-{stage}"
        line = one_line_error(capsys, stage, _stage_args(base, stack, stage, out))
        assert f"{f} {want}: delete the folder {stack} and rerun snakemake" in line, line
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_bbox_across_the_antimeridian_stops_the_workflow_with_one_line(base: Path, tmp_path: Path) -> None:
    cfg = fault_config(tmp_path, secret_key_path(base))
    cfg["regions"] = {"fiji": {"bbox": [179.95, -16.85, -179.95, -16.80], "season": {"start": "2023-01", "end": "2023-12"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, "-n", "maps", check=False)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "cropmap: invalid config" in ln]
    assert len(lines) == 1, res.stderr
    assert "config key regions.fiji.bbox" in lines[0] and "antimeridian" in lines[0] and "split it into two regions" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_bbox_across_a_utm_zone_edge_is_stacked_on_one_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """6°E is the edge of UTM zones 31 and 32: one grid (zone of the centroid) covers the whole bbox."""
    from pyproj import Transformer

    from cropmap.grid import utm_epsg

    bbox = [5.990, 45.70, 6.0025, 45.7095]  # centroid 5.996°E: zone 31; the east edge is in zone 32
    cfg = tiny_config(tmp_path)
    cfg["regions"] = {"edge": {"bbox": bbox, "season": {"start": "2023-04", "end": "2023-06"}, "synthetic": {"seed": 5}}}
    cfg["compare"]["regions"] = None
    cfg = validate(cfg)
    p = stage_params(cfg, "fetch", "edge")
    grid = Grid(**p["grid"])
    assert grid.crs == "EPSG:32631" and utm_epsg(bbox[2], bbox[1]) == 32632
    to_grid = Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True)
    xmin, ymin, xmax, ymax = grid.bounds
    for lon in np.linspace(bbox[0], bbox[2], 5):
        for lat in np.linspace(bbox[1], bbox[3], 5):
            x, y = to_grid.transform(lon, lat)
            assert xmin <= x <= xmax and ymin <= y <= ymax, (lon, lat)
    d = tmp_path / "data" / "edge"
    assert cropmap_main(["fetch", "--params", dumps(p), "--raw-dir", str(d / "raw"), "--cache-dir", str(d / ".fetch"),
                         "--availability", str(d / "availability.json")]) == 0
    assert cropmap_main(["stack", "--params", dumps(stage_params(cfg, "stack", "edge")), "--raw-dir", str(d / "raw"),
                         "--out-dir", str(d / "stack")]) == 0
    for m in ("s2", "s1", "weather", "dem"):
        grid.check(d / "stack" / f"{m}.tif")
        with rasterio.open(d / "stack" / f"{m}.tif") as src:
            assert np.isfinite(src.read()).any(axis=0).mean() > 0.5, m  # data on both sides of 6°E
    assert not leftovers(d)


# ------------------------------------------------------------------------------------------
# missing data is nodata, counted in the report
# ------------------------------------------------------------------------------------------
def test_tile_without_any_modality_and_month_without_data_are_counted(base: Path, tmp_path: Path) -> None:
    key = secret_key_path(base)
    cfg = validate(fault_config(base, key, tile_size=64))  # base's data and model, 4 tiles of 64 px
    stack = tmp_path / "stack"
    shutil.copytree(base / "data" / REGION / "stack", stack)
    for f in stack.glob("*.tif"):
        with rasterio.open(f, "r+") as dst:
            a = dst.read()
            a[:, :64, :64] = np.nan  # tile r000000_c000000: every modality missing
            for i, desc in enumerate(dst.descriptions):
                if desc.endswith("_2023-06"):
                    a[i] = np.nan  # June: missing from every modality
            dst.write(a)
    grid = Grid(**cfg_grid(cfg))
    model = base / "models" / REGION / "classification" / "model.ckpt"
    tiles = tmp_path / "tiles"
    from cropmap.grid import tiles as tile_names

    names = tile_names(grid, 64)
    for name in names:
        assert cropmap_main(["predict", "--params", dumps(stage_params(cfg, "predict", REGION)), "--model", str(model),
                             "--stack-dir", str(stack), "--tile", name, "--out", str(tiles / f"{name}.tif")]) == 0
    res = tmp_path / "results" / REGION
    res.mkdir(parents=True)  # snakemake creates output folders
    assert cropmap_main(["mosaic", "--params", dumps(stage_params(cfg, "mosaic", REGION)), "--tiles",
                         *[str(tiles / f"{n}.tif") for n in names], "--out", str(res / "map.tif"),
                         "--quicklook", str(res / "quicklook.png"), "--stac", str(res / "map.json")]) == 0
    assert cropmap_main(["coverage", "--params", dumps(stage_params(cfg, "coverage", REGION)), "--map", str(res / "map.tif"),
                         "--stack-dir", str(stack), "--out", str(res / "coverage.json")]) == 0
    cls, conf, bits = map_pixels(res / "map.tif")
    assert (cls[:64, :64] == 255).all() and (bits[:64, :64] == 0).all() and (conf[:64, :64] == 0).all()
    rest = np.ones_like(cls, bool)
    rest[:64, :64] = False
    assert (cls[rest] != 255).mean() > 0.99, "a month missing everywhere must not blank the map"
    base_cls = map_pixels(base / MAP)[0]
    assert (cls[rest] == base_cls[rest]).mean() > 0.5, "the other months still carry the classes"
    cov = json.loads((res / "coverage.json").read_text())
    assert cov["empty_tiles"] == ["r000000_c000000"] and cov["tiles"] == 4
    assert cov["nodata_pixels"] == int((cls == 255).sum()) >= 64 * 64
    assert cov["months_without_data"] == ["2023-06"]
    assert all(v == 0 for v in cov["months"]["2023-06"].values())
    regions = {REGION: {"coverage": str(res / "coverage.json"), "quicklook": str(res / "quicklook.png")}}
    assert cropmap_main(["report", "--regions", json.dumps(regions), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "tiles without any sensor: <b>1</b> of 4 (r000000_c000000)" in page
    assert "months without data in any sensor: <b>2023-06</b>" in page


def cfg_grid(cfg: dict) -> dict:
    return stage_params(cfg, "stack", REGION)["grid"]


def test_workflow_reports_coverage(base: Path) -> None:
    cov = json.loads((base / f"results/{REGION}/coverage.json").read_text())
    assert cov["tiles"] == 1 and cov["empty_tiles"] == [] and cov["months_without_data"] == []
    assert 0 <= cov["nodata_share"] < 0.01
    assert "<h3>Coverage</h3>" in (base / "results/report.html").read_text()


# ------------------------------------------------------------------------------------------
# secrets
# ------------------------------------------------------------------------------------------
def test_credentials_never_reach_logs_reports_or_map_metadata(base: Path) -> None:
    key = secret_key_path(base)
    files = [p for p in base.rglob("*") if p.is_file()]
    assert any(str(key).encode() in p.read_bytes() for p in files), "the key path should be in the run's config/logs"
    leaks = [p for p in files if MARKER.encode() in p.read_bytes()]
    assert not leaks, f"key contents leaked into {leaks}"
    with rasterio.open(base / MAP) as src:
        meta = json.dumps([src.tags(), *[src.tags(i) for i in range(1, src.count + 1)]])
    assert MARKER not in meta and "service_account_key" not in meta
    for f in ("map.json", "coverage.json", "metrics.csv"):
        assert MARKER not in (base / "results" / REGION / f).read_text()


def test_invalid_service_account_key_is_named_not_echoed(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    key = secret_key_path(base)
    cfg = fault_config(tmp_path, key)
    cfg["regions"][REGION]["source"] = "earthengine"
    cfg["regions"][REGION]["labels"] = {"path": str(tmp_path / "fields.gpkg")}
    p = stage_params(validate(cfg), "fetch", REGION)
    d = tmp_path / "data"
    line = one_line_error(capsys, "fetch", ["--params", dumps(p), "--raw-dir", str(d / "raw"), "--cache-dir", str(d / ".fetch"),
                                            "--availability", str(d / "availability.json")])
    assert f"earthengine.service_account_key {key} is not a valid service account key" in line, line
    assert MARKER not in line and MARKER not in caplog.text
    assert not (d / "raw").exists() and not (d / "availability.json").exists()


# ------------------------------------------------------------------------------------------
# resume bookkeeping (no training needed)
# ------------------------------------------------------------------------------------------
def test_resume_only_from_a_checkpoint_of_the_same_settings_and_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cropmap.train import TrainSettings, fingerprint, resume_checkpoint

    monkeypatch.delenv("CROPMAP_RESUME_FROM", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    s = TrainSettings(task="classification", method="comiss", modalities=["s2"], months=["2023-01"],
                      classes=[{"id": 0, "name": "a"}, {"id": 1, "name": "b"}])
    chips = tmp_path / "chips.parquet"
    chips.write_bytes(b"v1")
    work = tmp_path / "work"

    def leave_checkpoint(digest: str, payload: bytes | None = None) -> None:
        work.mkdir(exist_ok=True)
        if payload is None:
            torch.save({"epoch": 0}, work / "last.ckpt")
        else:
            (work / "last.ckpt").write_bytes(payload)
        (work / "resume.json").write_text(json.dumps({"fingerprint": digest}))

    digest = fingerprint(s, [chips])
    leave_checkpoint(digest)
    assert resume_checkpoint(work, digest) == work / "last.ckpt"
    assert os.environ["CROPMAP_RESUME_FROM"] == str(work / "last.ckpt")  # what DDP children inherit
    s.lr = 0.5  # other settings: discarded
    assert resume_checkpoint(work, fingerprint(s, [chips])) is None and not (work / "last.ckpt").exists()
    leave_checkpoint(fingerprint(s, [chips]))
    time.sleep(0.01)
    chips.write_bytes(b"v2 -- rebuilt")  # other inputs: discarded
    assert resume_checkpoint(work, fingerprint(s, [chips])) is None and not (work / "last.ckpt").exists()
    leave_checkpoint(fingerprint(s, [chips]), payload=b"cut short")  # unreadable: from scratch
    assert resume_checkpoint(work, fingerprint(s, [chips])) is None and not (work / "last.ckpt").exists()


def test_epoch_order_depends_only_on_seed_and_epoch_and_ranks_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cropmap.loop import EpochShuffleSampler

    def order(seed: int, epoch: int) -> list[int]:
        s = EpochShuffleSampler(10, seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(7, 3) == order(7, 3) and order(7, 3) != order(7, 4) and sorted(order(7, 3)) == list(range(10))
    s = EpochShuffleSampler(10, 7)
    s.set_epoch(3)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(EpochShuffleSampler, "_rank_world", staticmethod(lambda rank=rank: (rank, 3)))
        assert len(s) == 4
        parts += list(s)
    assert sorted(set(parts)) == list(range(10)) and len(parts) == 12


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    """Atomic writes go through private temporaries; the published map must not stay 0600."""
    from cropmap.io import atomic_dir, atomic_path, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_path(tmp_path / "map.tif") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "stack") as tmp:
            (tmp / "s2.tif").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "map.tif").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "stack").stat().st_mode & 0o777 == 0o777 & ~umask
    assert not leftovers(tmp_path)
