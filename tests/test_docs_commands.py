"""Every shell command in README.md, docs/ and the example configs runs as written.

The commands are extracted from fenced ``bash`` blocks, inline code spans that start with
``snakemake`` and the comment lines of ``config/examples/*.yaml`` and the profiles. Each
``snakemake`` command runs as a dry run (``-n`` added) in a copy of the workflow's files with its
own config; the setup commands of the README (venv, pip, pytest) are recognised and not run here
(CI runs them: ``.ci/run``). ``--report`` needs a finished run: ``tests/test_workflow.py`` runs it
on one, here the rest of such a command is dry-run.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_faults import snakemake_env

pytestmark = pytest.mark.workflow

#: Documented commands that set up the environment; CI runs them (``.ci/run``), not this test.
SETUP = ("python3 -m venv ", ". .venv/bin/activate", "pip install ", "pytest")
#: Documented benchmark commands that have a dry run (``--dry-run``: their config and ``snakemake -n``).
BENCHMARKS = ("python benchmarks/compare_table.py ",)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "config" / "examples").glob("*.yaml")),
            *sorted((ROOT / "workflow" / "profiles").glob("*/config.yaml"))]


def commands(path: Path) -> list[str]:
    """The shell commands a document shows (``&&`` chains split into their commands)."""
    text = path.read_text()
    found: list[str] = []
    if path.suffix == ".md":
        for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, flags=re.M | re.S):
            block = re.sub(r"\\\n\s*", "", block)  # continuation lines
            found += [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        found += re.findall(r"`(snakemake [^`]+)`", text)
    else:  # a YAML file: commands in its comments, indented after '#'
        found += [m.group(1) for m in re.finditer(r"^#\s{2,}(snakemake .+)$", text, flags=re.M)]
    out = []
    for line in found:
        line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
        out += [part.strip() for part in line.split("&&")]
    return out


def all_commands() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), c) for p in documents() for c in commands(p)]


def test_the_documents_show_commands_and_each_is_handled() -> None:
    cmds = all_commands()
    snake = [c for _, c in cmds if c.startswith("snakemake ")]
    assert len(snake) >= 8, cmds
    assert any("--configfile config/examples/france_2023.yaml" in c for c in snake)
    other = [(doc, c) for doc, c in cmds if not c.startswith(("snakemake ", *BENCHMARKS)) and not c.startswith(SETUP)]
    assert not other, f"documented commands this test does not run: {other}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workflow's files (not data or results) in a folder of their own."""
    d = tmp_path_factory.mktemp("docs")
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(ROOT / name, d / name)
    for name in ("workflow", "config", "src", "tests/data"):  # the example configs read tests/data/realdata
        shutil.copytree(ROOT / name, d / name, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    return d


@pytest.mark.parametrize("command", sorted({c for _, c in all_commands() if c.startswith("snakemake ")}))
def test_documented_snakemake_command_runs_as_written(checkout: Path, command: str) -> None:
    argv = shlex.split(command)
    if "--report" in argv:  # a report needs a finished run (tests/test_workflow.py makes one): dry-run the rest
        i = argv.index("--report")
        del argv[i : i + 2]
        assert re.search(r'snakemake\(run, "--report"', (ROOT / "tests" / "test_workflow.py").read_text())
    res = subprocess.run([sys.executable, "-m", *argv, "-n"], cwd=checkout, capture_output=True, text=True,
                         env=snakemake_env(), timeout=300)
    assert res.returncode == 0, f"{command} -n failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.mark.parametrize("command", sorted({c for _, c in all_commands() if c.startswith(BENCHMARKS)}))
def test_documented_benchmark_command_runs_as_written(tmp_path: Path, command: str) -> None:
    argv = shlex.split(command)
    i = argv.index("--out")
    argv[i + 1] = str(tmp_path / "out")  # not /tmp/... of the machine running the tests
    res = subprocess.run([sys.executable, *argv[1:], "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         env=snakemake_env(), timeout=300)
    assert res.returncode == 0, f"{command} --dry-run failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert (tmp_path / "out" / "config.yaml").exists()
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
