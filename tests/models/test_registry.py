"""The method registry is the one list of methods: the docs, the schema and the CLI follow it."""

from __future__ import annotations

import pytest

from cropmap.cli import build_parser
from cropmap.config import load_schema
from cropmap.models import METHODS, methods_for
from cropmap.models.registry import TASKS, method_class, methods_table, register_method
from tests.conftest import ROOT


def test_docs_methods_page_holds_the_registry_table() -> None:
    page = (ROOT / "docs" / "methods.md").read_text()
    assert methods_table() in page, (
        "docs/methods.md is out of date: paste the output of\n"
        "python -c 'from cropmap.models.registry import methods_table; print(methods_table())'"
    )
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    for name in METHODS:
        assert any(f"`{name}`" in h for h in headings), f"docs/methods.md has no section for {name}"


def test_schema_and_cli_list_the_registered_methods(capsys: pytest.CaptureFixture) -> None:
    schema = load_schema()
    assert schema["definitions"]["method"]["enum"] == list(METHODS)
    assert schema["properties"]["compare"]["properties"]["methods"]["default"] == list(methods_for("classification"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


def test_registration_sets_name_and_tasks_and_refuses_duplicates() -> None:
    assert set(methods_for("classification")) | set(methods_for("segmentation")) == set(METHODS)
    assert method_class("comiss").tasks == TASKS and method_class("imt").tasks == ("segmentation",)
    with pytest.raises(ValueError, match="registered twice"):
        register_method("comiss")(type("Other", (method_class("fullco"),), {}))
    with pytest.raises(ValueError, match="tasks"):
        register_method("x", tasks=("detection",))  # type: ignore[arg-type]
