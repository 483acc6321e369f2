"""A normal (non-editable) install of cropmap loads a config: the schema is package data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT

CHECK = """
import json, sys
import cropmap, cropmap.config
cfg = cropmap.config.load(sys.argv[1])
print(json.dumps({"package": cropmap.__file__, "schema": str(cropmap.config.schema_path()),
                  "methods": cfg["compare"]["methods"], "regions": sorted(cfg["regions"])}))
"""


def test_wheel_installed_in_a_fresh_venv_loads_the_demo_config(tmp_path: Path) -> None:
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("cropmap-*.whl")

    # a fresh venv whose third-party packages are this environment's: a path line in a .pth
    # adds that folder to sys.path without running its own .pth files, so an editable
    # cropmap there (its finder or path .pth) is not importable from the venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_cropmap_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    # --ignore-installed: the editable cropmap of this environment is visible through the .pth
    # (as metadata), and pip would call the wheel "already satisfied" without installing it
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-c", CHECK, str(ROOT / "config.yaml")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(site), out["package"]
    assert Path(out["schema"]).is_relative_to(site) and Path(out["schema"]).is_file(), out["schema"]
    assert out["regions"] == ["demo"]
    assert "comiss" in out["methods"] and "imt" not in out["methods"]  # schema defaults from the registry
