"""One vocabulary: every rule runs the ``cropmap`` command of its name, implemented by the module of that name."""

from __future__ import annotations

import importlib.util
import re

import pytest

from cropmap.cli import STAGES, build_parser
from tests.conftest import rule_blocks


def test_every_rule_runs_the_command_and_module_of_its_name() -> None:
    jobs = {name: body for name, body in rule_blocks().items() if "shell:" in body}
    assert set(STAGES) <= set(jobs), sorted(set(STAGES) - set(jobs))
    for name, body in jobs.items():
        commands = re.findall(r"python -m cropmap (\w+)", body)
        assert len(commands) == 1, (name, commands)
        # the comparison's copies of a stage (use rule X as X_compare) run that stage
        assert commands[0] in (name, name.removesuffix("_compare")), (name, commands[0])
        assert commands[0] in STAGES, commands[0]
    for stage in STAGES:
        assert importlib.util.find_spec(f"cropmap.{stage}") is not None, f"no module cropmap.{stage}"


def test_help_lists_every_stage_and_each_stage_has_its_own(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    top = capsys.readouterr().out
    for stage, line in STAGES.items():
        assert re.search(rf"^\s+{stage}\s+\S", top, re.M), stage
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([stage, "--help"])
        assert exit_.value.code == 0
        assert line in " ".join(capsys.readouterr().out.split())
