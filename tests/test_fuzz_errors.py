"""Property-based fuzzers (hypothesis): whatever the config or the input files, the result is
valid or one line naming the key or the file, never a traceback, a partial output or a hang.

The same fuzzers run with a larger budget and a fixed seed in ``benchmarks/fuzz_errors.py``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_config import config_case, run_config_case
from tests.fuzz_files import Base, build_base, file_case, run_file_case

CONFIG_CASES = 40
FILE_CASES = 30
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def test_config_fuzz_gives_a_valid_config_or_one_line_naming_a_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("fuzz config")
    seen: dict[str, int] = {}
    n = itertools.count()

    @settings(FUZZ, max_examples=CONFIG_CASES)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        seed, cfg, mutations = data.draw(config_case(root))
        out = run_config_case(cfg, root / f"case{next(n)}")
        seen[out.kind] = seen.get(out.kind, 0) + 1
        assert out.kind in ("valid", "one_line"), f"{seed} config, {mutations}: {out.kind}: {out.detail}"

    case()
    assert seen.get("one_line", 0) >= CONFIG_CASES // 2 and sum(seen.values()) >= CONFIG_CASES, seen


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return build_base(tmp_path_factory.mktemp("fuzz base"))


def test_file_fuzz_gives_one_line_naming_the_file_and_nothing_partial(fuzz_base: Base,
                                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("fuzz files")
    seen: dict[str, int] = {}
    n = itertools.count()

    @settings(FUZZ, max_examples=FILE_CASES)
    @given(file_case())
    def case(c: object) -> None:
        kind, detail = run_file_case(fuzz_base, c, root / f"case{next(n)}")  # type: ignore[arg-type]
        seen[kind] = seen.get(kind, 0) + 1
        assert kind in ("valid", "one_line", "undetected"), f"{c}: {kind}: {detail}"

    case()
    assert seen.get("one_line", 0) >= FILE_CASES // 2, seen
