"""Every failure is one line (issue 14), unit level: the stage runner (its log, its line, its
outputs on failure), the stack band contract, labels that cover nothing, quoted rules, progress
lines in logs, device settings."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from cropmap.cli import main
from cropmap.config import dumps, stage_params, validate
from cropmap.errors import ConfigError, GridMismatchError
from cropmap.grid import Grid
from cropmap.io import check_stack_bands
from tests.conftest import rule_blocks, tiny_config

MONTHS = ["2023-04", "2023-05", "2023-06"]


# ------------------------------------------------------------------------------------------ runner
def test_log_gets_everything_and_the_terminal_only_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "logs" / "area.log"
    rc = main(["area", "--map", str(tmp_path / "map.tif"), "--labels", str(tmp_path / "labels.tif"), "--out-csv",
               str(tmp_path / "a.csv"), "--out-json", str(tmp_path / "a.json"), "--log", str(log)])
    assert rc == 1
    err = capsys.readouterr().err
    line = f"cropmap area: error: {tmp_path / 'map.tif'}: no such file or folder (--map of cropmap area); run the mosaic stage first (snakemake does) or fix the path"
    assert err == line + "\n"
    assert log.read_text().splitlines()[-1] == line


def test_output_of_libraries_and_children_lands_in_the_log(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from cropmap import cli

    def noisy(a: object, p: object) -> None:
        os.write(1, b"from fd 1\n")
        os.write(2, b"from fd 2\n")
        os.system("echo from a child process")
        logging.getLogger("cropmap.test").info("a log line")
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_report", noisy)
    log = tmp_path / "report.log"
    assert main(["report", "--regions", "{}", "--out", str(tmp_path / "r.html"), "--log", str(log)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cropmap report: internal error: ZeroDivisionError: boom (a bug in cropmap; the traceback is in ")
    text = log.read_text()
    for piece in ("from fd 1", "from fd 2", "from a child process", "a log line", "Traceback", "ZeroDivisionError: boom"):
        assert piece in text, piece


def test_a_failed_stage_leaves_none_of_its_outputs(tmp_path: Path) -> None:
    from cropmap.runner import outputs_removed_on_failure

    kept, changed, new, new_dir = (tmp_path / n for n in ("kept.csv", "changed.csv", "new.csv", "stack"))
    kept.write_text("old")
    changed.write_text("old")
    os.utime(changed, ns=(0, 0))
    with pytest.raises(RuntimeError), outputs_removed_on_failure([kept, changed, new, new_dir]):
        changed.write_text("half of the new")
        new.write_text("x")
        new_dir.mkdir()
        (new_dir / "s2.tif").write_text("x")
        raise RuntimeError
    assert kept.read_text() == "old" and not changed.exists() and not new.exists() and not new_dir.exists()


def test_params_missing_or_not_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "labels.tif").write_bytes(b"")
    (tmp_path / "stack").mkdir()
    args = ["chips", "--stack-dir", str(tmp_path / "stack"), "--labels", str(tmp_path / "labels.tif"), "--out",
            str(tmp_path / "chips.parquet")]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().endswith("--params lacks the key 'grid': pass the stage's slice of the config as JSON "
                                                    "(cropmap.config.stage_params; the Snakemake rules do this)")
    assert main([*args, "--params", "{not json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cropmap chips: error: --params is not valid JSON (")


# ------------------------------------------------------------------------------------------ stack contract
def _stack(path: Path, descriptions: list[str]) -> Path:
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=16, height=16)
    with rasterio.open(path, "w", **grid.profile(len(descriptions))) as dst:
        dst.write(np.zeros((len(descriptions), 16, 16), np.float32))
        dst.descriptions = tuple(descriptions)
    return path


def test_stack_bands_may_be_a_subset_of_the_modality_for_every_month(tmp_path: Path) -> None:
    check_stack_bands(_stack(tmp_path / "s2.tif", [f"{b}_{m}" for m in MONTHS for b in ("B04", "B08")]), "s2", MONTHS, "fix")
    check_stack_bands(_stack(tmp_path / "dem.tif", ["elevation"]), "dem", MONTHS, "fix")
    check_stack_bands(tmp_path / "s2.tif", "s2", MONTHS, "fix", bands=["B04", "B08"])


@pytest.mark.parametrize(("descriptions", "bands", "message"), [
    ([f"B04_{m}" for m in MONTHS[:2]], None, "has 2 bands, expected 3 (<band>_<YYYY-MM> for the 3 month(s) 2023-04..2023-06; band 3 should be B04_2023-06, found nothing): fix"),
    ([f"{b}_{m}" for m in MONTHS for b in ("B08", "B04")], None, "band 1 should be B04_2023-04, found B08_2023-04"),
    ([f"B99_{m}" for m in MONTHS], None, "band 1 is 'B99_2023-04', but 'B99' is not a s2 band (B02, B03, B04, B05, B06, B07, B08, B8A, B11, B12): fix"),
    (["", "", ""], None, "band 1 has no description; stack bands are named <band>_<YYYY-MM> (B02_2023-04, ...): fix"),
    ([f"B04_{m}" for m in MONTHS], ["B04", "B08"], "has 3 bands, expected 6"),
])
def test_stack_bands_against_the_contract_name_file_expected_found_and_fix(tmp_path: Path, descriptions: list[str],
                                                                           bands: list[str] | None, message: str) -> None:
    path = _stack(tmp_path / "s2.tif", descriptions)
    with pytest.raises(GridMismatchError) as exc:
        check_stack_bands(path, "s2", MONTHS, "fix", bands=bands)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value), str(exc.value)


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("kind", ["outside", "empty"])
def test_labels_that_cover_nothing_leave_nothing_when_run_by_hand(tmp_path: Path, kind: str,
                                                                  capsys: pytest.CaptureFixture) -> None:
    cfg = validate(tiny_config(tmp_path))
    grid = Grid(**stage_params(cfg, "labels", "tiny")["grid"])
    x0, _, _, y1 = grid.bounds
    shift = 5e5 if kind == "outside" else 0
    vec = tmp_path / "fields.gpkg"
    gdf = gpd.GeoDataFrame({"code": ["wheat", "maize"]}, geometry=[box(x0 + shift, y1 - 300, x0 + 150 + shift, y1),
                                                                  box(x0 + 160 + shift, y1 - 300, x0 + 300 + shift, y1)], crs=grid.crs)
    (gdf if kind == "outside" else gdf.iloc[:0]).to_file(vec, layer="fields")
    cfg["regions"]["tiny"]["labels"] = {"path": str(vec), "layer": "fields"}
    out = tmp_path / "out"
    rc = main(["labels", "--params", dumps(stage_params(validate(cfg), "labels", "tiny")), "--raw-dir", str(tmp_path),
               "--out-tif", str(out / "labels.tif"), "--out-gpkg", str(out / "labels.gpkg")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 1 and len(err) == 1, err
    want = "none of its 2 fields covers a pixel of the region's grid" if kind == "outside" else "no fields with a geometry in layer 'fields'"
    assert err[0].startswith(f"cropmap labels: error: {vec}: {want}"), err
    assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------------------------------ rules
def test_every_rule_quotes_every_path_and_writes_its_log_itself() -> None:
    """The one pattern of every rule: each placeholder of the shell command ends in ``:q`` (threads
    excepted), the command ends with ``--log {log:q}`` and nothing is redirected by the shell."""
    jobs = {name: body for name, body in rule_blocks().items() if "shell:" in body}
    fields = 0
    for name, body in jobs.items():
        after = body[body.index("shell:") + len("shell:"):].splitlines()[1:]
        shell = " ".join(ln.strip() for ln in after[: next((i for i, ln in enumerate(after) if not ln.strip().startswith('"')), len(after))])
        for field in re.findall(r"\{([^{}]+)\}", shell):
            assert field.endswith(":q") or field == "threads", (name, field)
            fields += 1
        assert "--log {log:q}" in shell and ">" not in shell and "2>&1" not in shell, (name, shell)
    assert len(jobs) >= 15 and fields >= 5 * len(jobs)


# ------------------------------------------------------------------------------------------ progress
def test_progress_in_a_log_is_a_line_per_quarter(caplog: pytest.LogCaptureFixture) -> None:
    from cropmap.progress import Progress, progress

    caplog.set_level(logging.INFO, logger="cropmap.progress")
    assert list(progress(range(40), "stack s2", "chunk")) == list(range(40))
    with Progress(3, "predict", "block") as bar:
        for _ in range(3):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["stack s2: 25 % (10/40 chunks)", "stack s2: 50 % (20/40 chunks)", "stack s2: 75 % (30/40 chunks)",
                     "stack s2: 100 % (40/40 chunks)", "predict: 33 % (1/3 blocks)", "predict: 67 % (2/3 blocks)",
                     "predict: 100 % (3/3 blocks)"]


# ------------------------------------------------------------------------------------------ devices
def test_devices_against_where_training_runs() -> None:
    from cropmap.device import check_devices

    check_devices(2, on_gpu=False)
    check_devices("3", on_gpu=False)
    with pytest.raises(ConfigError, match=r"config key training.devices: '0,1' is not a number of CPU processes"):
        check_devices("0,1", on_gpu=False)
    with pytest.raises(ConfigError, match=r"asks for 64 GPUs"):
        check_devices(64, on_gpu=True)

