"""Config fuzzer: mutated demo and tiny configs through load, validation and a Snakemake dry run.

A case starts from the shipped demo config (``config.yaml``) or the tiny test config and
applies one to three mutations: a value replaced (other types, edge numbers, NaN, CRS strings,
enum neighbours), a key renamed (typos), a value nested one level deeper or lifted out of its
block, a list emptied, shortened, lengthened or duplicated, or a key dropped. The config is
written as YAML and loaded with :func:`cropmap.config.load`; a config that loads is dry-run by
Snakemake in-process (targets ``all`` and ``compare``). The outcome is one of

* ``valid``: it loads and the dry run succeeds;
* ``one_line``: it stops with exactly one line ``config key <key>: ...`` naming a known key;
* ``traceback``: anything else (another exception, several lines, a dry run that fails);
* ``hang``: a case that takes longer than :data:`TIMEOUT` seconds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from tests.conftest import ROOT, tiny_config

TIMEOUT = 60
#: Dry-run only configs up to this many prediction tiles (a bigger DAG is valid but slow).
MAX_DRYRUN_TILES = 400

INTERESTING: list[Any] = [
    "", " ", "auto", "cpu", "cuda", "Cuda", "EPSG:4326", "EPSG:32631", "EPSG:3035", "EPSG:999999", "EPSG:3857",
    "+proj=utm +zone=31 +datum=WGS84 +units=m", "+proj=longlat", "not a crs", "abc", "0,1", "-1", "[0, 1]",
    "ddp", "ddp_spawn", "ddpp", "comiss", "imt", "gemmnet", "input_fusion", "classification", "segmentation",
    "2023-13", "2023-02", "2022-12", "1990-01", "tempcnn", "unet", "smp:resnet18", "ltae", "mlp", "my data", "data{x}",
    "synthetic", "stac", "earthengine", "files", "bf16-mixed", "16-mixed", "32", "s2", "dem", "wheat", "#12345g",
    0, 1, -1, 2, 7, 8, 16, 31, 32, 64, 100, 255, 256, 10**9, 0.0, 0.5, 1.0, 1.5, -0.1, 2.0, 1e-9, 1e12,
    math.inf, -math.inf, math.nan, True, False, None, [], {}, [1, 2], [4.8, 45.7, 4.81, 45.71], {"a": 1},
    [179.95, -16.85, -179.95, -16.80], [4.8, 89.9, 4.9, 90.0], [-190, 0, 10, 10], [0, 0, 50, 50],
]
SCALARS = st.one_of(st.sampled_from(INTERESTING), st.integers(-(10**6), 10**10), st.floats(allow_nan=True),
                    st.text(max_size=10), st.booleans(), st.none())
OPS = ("replace", "typo", "nest", "unnest", "list", "drop", "swap_type", "domain", "domain", "domain", "domain")

#: Values users get wrong, per key: ``(block, key)`` where block ``region`` is every region.
METHOD_NAMES = ["comiss", "fullco", "mdico", "dsensd", "fcom_av", "moddrop", "input_fusion", "feature_fusion", "unimodal",
                "imt", "gemmnet", "CoMiss", "resnet"]
DOMAIN: dict[tuple[str, str], Any] = {
    ("region", "crs"): st.sampled_from(["EPSG:4326", "EPSG:32631", "EPSG:32632", "EPSG:3035", "EPSG:999999", "EPSG:3857",
                                       "+proj=utm +zone=31 +datum=WGS84 +units=m", "+proj=utm +zone=31 +units=us-ft",
                                       "WGS84", "not a crs", "EPSG:27700", "ESRI:54009", None]),
    ("region", "bbox"): st.one_of(st.lists(st.floats(-200, 200), min_size=4, max_size=4),
                                  st.sampled_from([[4.8, 45.7, 4.81, 45.71], [179.95, -16.85, -179.95, -16.80],
                                                   [4.8, 89.9, 4.9, 90.0], [4.8, 95, 4.9, 96], [0, 0, 50, 50],
                                                   [4.8, 45.7, 4.80001, 45.70001], [4.8, 45.7, 4.8, 45.8], [1, 2, 3]])),
    ("region", "resolution"): st.sampled_from([0, -10, 1e-6, 0.5, 10, 20, 60, 1e6, "10m"]),
    ("region", "season"): st.fixed_dictionaries({"start": st.sampled_from(["2023-01", "2023-04", "2023-13", "2020-01", "23-01"]),
                                                 "end": st.sampled_from(["2023-12", "2023-03", "2025-12", "2023-1"])}),
    ("region", "source"): st.sampled_from(["synthetic", "stac", "earthengine", "files", "sentinelhub"]),
    ("region", "model_from"): st.sampled_from(["demo", "tiny", "other", None]),
    ("region", "labels"): st.sampled_from([None, {"path": "fields.gpkg"}, {"path": "f.gpkg", "column": "crop"}, {"column": "x"}]),
    ("model", "method"): st.sampled_from(METHOD_NAMES),
    ("model", "task"): st.sampled_from(["classification", "segmentation", "regression"]),
    ("model", "hidden"): st.sampled_from([1, 8, 9, 16, 128, 0, -8]),
    ("model", "options"): st.dictionaries(st.sampled_from(["tau", "alpha", "gamma", "temperature", "dropout", "preset",
                                                           "patch", "head", "generator", "foo", "hidden", "pretrained", "contrast_pixels"]),
                                          SCALARS, max_size=2),
    ("model", "encoders"): st.dictionaries(st.sampled_from(["s2", "s1", "weather", "dem", "input", "s3"]),
                                           st.sampled_from(["tempcnn", "ltae", "gru", "mlp", "unet", "smp:resnet18", "smp:", "lstm"]),
                                           max_size=2),
    ("training", "devices"): st.sampled_from([1, 2, 0, -1, "abc", "2", "0,1", "[0,1]", "auto", "-1", 1.5, ""]),
    ("training", "device"): st.sampled_from(["auto", "cpu", "cuda", "gpu", "cuda:0"]),
    ("training", "strategy"): st.sampled_from(["auto", "ddp", "ddp_spawn", "fsdp", "dp", "horovod", ""]),
    ("training", "precision"): st.sampled_from(["auto", "32", "bf16-mixed", "16-mixed", "64", 32]),
    ("training", "batch_size"): st.sampled_from([1, 2, 256, 0, -1, 2.0]),
    ("compare", "methods"): st.lists(st.sampled_from(METHOD_NAMES), max_size=3),
    ("compare", "task"): st.sampled_from([None, "classification", "segmentation", "both"]),
    ("compare", "folds"): st.sampled_from([1, 2, 3, 0, 21, 2.0, "3"]),
    ("compare", "regions"): st.sampled_from([None, [], ["demo"], ["tiny"], ["nowhere"], "demo"]),
    ("prediction", "tile_size"): st.sampled_from([16, 32, 64, 100, 512, 10**6, 64.0]),
    ("prediction", "device"): st.sampled_from(["auto", "cpu", "cuda", "mps"]),
    ("chips", "size"): st.sampled_from([8, 16, 24, 32, 64, 7, 1024]),
    ("split", "block_size"): st.sampled_from([8, 16, 32, 48, 64, 4, 10**6]),
    ("split", "fractions"): st.fixed_dictionaries({"train": st.sampled_from([0.7, 0, 1, -0.1]),
                                                   "val": st.sampled_from([0.15, 0, 0.5]),
                                                   "test": st.sampled_from([0.15, 0, 2])}),
    ("dask", "scheduler"): st.sampled_from([None, "tcp://127.0.0.1:1", "", "localhost"]),
    ("top", "modalities"): st.lists(st.sampled_from(["s2", "s1", "weather", "dem", "s3"]), max_size=5),
    ("top", "data_dir"): st.sampled_from(["data", "my data", "", " ", "data{x}", "dätä", "a/b/c"]),
}


def seeds(root: Path) -> dict[str, dict]:
    """The configs cases start from: the demo and the tiny config, data under ``root``."""
    demo = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key in ("data_dir", "results_dir", "models_dir"):
        demo[key] = str(root / key.split("_")[0])
    return {"demo": demo, "tiny": tiny_config(root)}


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) inside ``node``, parents before children."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


def _parent(cfg: Any, path: tuple) -> Any:
    node = cfg
    for k in path[:-1]:
        node = node[k]
    return node


def typo(key: str, data: st.DataObject) -> str:
    """A misspelling of ``key``: a letter dropped, doubled, swapped or upper-cased, or a suffix."""
    if not key:
        return "x"
    i = data.draw(st.integers(0, len(key) - 1))
    kind = data.draw(st.sampled_from(["drop", "double", "swap", "upper", "suffix", "dash"]))
    if kind == "drop" and len(key) > 1:
        return key[:i] + key[i + 1 :]
    if kind == "double":
        return key[: i + 1] + key[i:]
    if kind == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    if kind == "upper":
        return key.upper()
    if kind == "dash":
        return key.replace("_", "-") if "_" in key else key + "-"
    return key + "s"


def mutate(cfg: dict, data: st.DataObject) -> list[str]:
    """Apply one mutation to ``cfg`` in place; returns a description of it."""
    op = data.draw(st.sampled_from(OPS))
    if op == "domain" and isinstance(cfg, dict):
        return domain(cfg, data)
    options = paths(cfg)
    if not options:
        return ["(nothing left to mutate)"]
    # a top-level key first, then a path under it: the long class table does not take every case
    top = data.draw(st.sampled_from(sorted({p[0] for p in options}, key=str)))
    path = data.draw(st.sampled_from([p for p in options if p[0] == top]))
    parent, key = _parent(cfg, path), path[-1]
    value = parent[key]
    where = ".".join(map(str, path))
    if op == "replace":
        parent[key] = data.draw(SCALARS)
    elif op == "swap_type":
        parent[key] = str(value) if not isinstance(value, str) else [value]
    elif op == "typo" and isinstance(parent, dict):
        new = typo(str(key), data)
        parent[new] = parent.pop(key)
        where += f" -> {new}"
    elif op == "nest":
        parent[key] = {data.draw(st.sampled_from(["value", str(key), "x"])): value}
    elif op == "unnest" and isinstance(value, dict) and value:
        inner = data.draw(st.sampled_from(sorted(map(str, value))))
        parent[key] = value.get(inner, value)
    elif op == "list" and isinstance(value, list):
        kind = data.draw(st.sampled_from(["empty", "drop", "dup", "add"]))
        if kind == "empty":
            value.clear()
        elif kind == "drop" and value:
            value.pop()
        elif kind == "dup" and value:
            value.append(copy.deepcopy(value[0]))
        else:
            value.append(data.draw(SCALARS))
        op += f" {kind}"
    elif op == "drop" and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = data.draw(SCALARS)
        op = "replace"
    return [f"{op} {where}"]


def domain(cfg: dict, data: st.DataObject) -> list[str]:
    """Set a key users get wrong (:data:`DOMAIN`) to one of its tricky values."""
    block, key = data.draw(st.sampled_from(sorted(DOMAIN)))
    value = data.draw(DOMAIN[(block, key)])
    if block == "top":
        cfg[key] = value
        return [f"domain {key}={value!r}"]
    if block == "region":
        regions = cfg.get("regions")
        if not isinstance(regions, dict) or not regions or not isinstance(next(iter(regions.values())), dict):
            return ["(no region)"]
        name = data.draw(st.sampled_from(sorted(regions)))
        regions[name][key] = value
        return [f"domain regions.{name}.{key}={value!r}"]
    if not isinstance(cfg.get(block, {}), dict):
        return [f"({block} is not a mapping)"]
    cfg.setdefault(block, {})[key] = value
    return [f"domain {block}.{key}={value!r}"]


@st.composite
def config_case(draw: Any, root: Path) -> tuple[str, dict, list[str]]:
    """A mutated config: ``(seed name, config, mutations)``."""
    data = draw(st.data())
    name = draw(st.sampled_from(["demo", "tiny"]))
    cfg = copy.deepcopy(seeds(root)[name])
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        done += mutate(cfg, data)
    return name, cfg, done


@dataclass
class Outcome:
    """What a case ended as (``valid``, ``one_line``, ``traceback`` or ``hang``) and the line or detail."""

    kind: str
    detail: str = ""


class Hang(BaseException):
    """Raised by the alarm of a case that runs too long (a BaseException: no stage catches it)."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Any:
    """Raise :class:`Hang` in the main thread after ``seconds``."""
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


KEY_LINE = re.compile(r"^config key ([^\s:]+):")


def names_a_key(line: str, cfg: Any) -> bool:
    """Whether ``line`` is ``config key <k>: ...`` with ``<k>`` starting at a top-level key."""
    from cropmap.config import load_schema

    m = KEY_LINE.match(line)
    if not m:
        return False
    top = m.group(1).split(".")[0]
    return top in load_schema()["properties"] or (isinstance(cfg, dict) and top in cfg)


def dry_run(workdir: Path, configfile: Path) -> str | None:
    """Snakemake dry run of ``all`` and ``compare`` in-process; ``None`` when it succeeds, else what it said."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    logging.getLogger("snakemake").addHandler(handler)
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink), \
                SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(configfiles=[configfile]),
                              snakefile=ROOT / "Snakefile", workdir=workdir)
            wf.dag(DAGSettings(targets=["all", "compare"])).execute_workflow(executor="dryrun")
    except SystemExit as exc:
        return f"exit: {exc.code}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        logging.getLogger("snakemake").removeHandler(handler)
    return None


def n_tiles(cfg: dict) -> int:
    """Prediction tiles of a validated config, over every region."""
    from cropmap.config import region_grid
    from cropmap.grid import tiles

    return sum(len(tiles(region_grid(r), cfg["prediction"]["tile_size"])) for r in cfg["regions"].values())


def run_config_case(cfg: Any, workdir: Path) -> Outcome:
    """Write ``cfg`` as YAML in ``workdir``, load it and, when it loads, dry-run the workflow on it."""
    from cropmap.config import load
    from cropmap.errors import ConfigError

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    try:
        with time_limit(TIMEOUT):
            try:
                loaded = load(path)
            except ConfigError as exc:
                line = str(exc)
                if "\n" in line or not names_a_key(line, cfg):
                    return Outcome("traceback", f"not one line naming a key: {line!r}")
                return Outcome("one_line", line)
            if n_tiles(loaded) > MAX_DRYRUN_TILES:
                return Outcome("valid", "(large: no dry run)")
            said = dry_run(workdir, path)
    except Hang as exc:
        return Outcome("hang", str(exc))
    except Exception as exc:
        return Outcome("traceback", f"{type(exc).__name__}: {exc}")
    if said is not None:
        return Outcome("traceback", f"valid config, the dry run failed: {said[:2000]}")
    return Outcome("valid")
