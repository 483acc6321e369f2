"""Checks of a config that the JSON schema cannot express, run when the config is loaded.

Each raises one :class:`~cropmap.errors.ConfigError` line naming the key and the fix, before any
job runs: CRS strings (pyproj), bbox ranges and the size of the grid they make, model options
against the method's signature, encoder names, device counts and strategies, and what depends
on another key (a ``model_from`` region's season, methods and tasks). What can only be known
where the jobs run (whether CUDA is there) is :func:`check_local_devices`, which the workflow
calls when its jobs run on this machine, and :func:`cropmap.device.resolve_device` in every job.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any

from cropmap.errors import ConfigError, brief
from cropmap.grid import Grid

#: The most prediction tiles one region may have (more is a typo in bbox or resolution).
MAX_TILES = 100_000

#: The longest season (months): every month is a band group of every temporal stack.
MAX_MONTHS = 36

#: Keyword arguments of the model factory that the config sets through other keys.
SET_ELSEWHERE = {"task": "model.task", "modalities": "modalities", "in_channels": "modalities",
                 "n_steps": "regions.<name>.season", "n_classes": "classes", "hidden": "model.hidden",
                 "encoders": "model.encoders", "class_weights": "(computed from the labels)"}

#: Value ranges of method options (the signature gives the types).
OPTION_RANGES: dict[str, tuple[float, float, str]] = {
    "dropout": (0.0, 1.0, "in [0, 1)"), "alpha": (0.0, 1.0, "in [0, 1]"), "keep_prob": (0.0, 1.0, "in [0, 1]"),
    "tau": (1e-12, math.inf, "> 0"), "learning_rate": (1e-12, math.inf, "> 0"),
    "max_bins": (2, 255, "in [2, 255]"), "l2_regularization": (0.0, math.inf, ">= 0"), "gamma": (1e-12, math.inf, "> 0"), "temperature": (1e-12, math.inf, "> 0"),
}

_TYPES: dict[str, tuple[type, ...]] = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,),
                                       "Path": (str,), "None": (type(None),)}
_DEVICE_LIST = re.compile(r"^\[?\s*\d+(\s*,\s*\d+)*\s*,?\s*\]?$")


def check(config: dict) -> None:
    """The checks of this module that are not per region (:func:`check_region` runs in
    :func:`cropmap.config.validate` with the other checks of each region) on a schema-valid config.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    for key in ("data_dir", "results_dir", "models_dir"):
        if re.search(r"[{}]", config[key]) or not config[key].strip():
            raise ConfigError(f"config key {key}: {config[key]!r} is not a usable folder name (empty, or braces, "
                              "which Snakemake reads as wildcards); name a folder, e.g. data")
    check_model(config)
    check_training(config)


def check_crs(value: str, key: str, projected: bool = True) -> None:
    """A CRS string that pyproj knows (and, for a grid, a projected CRS in metres).

    Raises:
        ConfigError: naming ``key``.
    """
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        crs = CRS.from_user_input(value)
    except CRSError as exc:
        raise ConfigError(f"config key {key}: {value!r} is not a CRS pyproj knows ({brief(exc)}); "
                          "give one like EPSG:32631 (or leave it out: the UTM zone of the bbox)") from None
    if projected and not (crs.is_projected and crs.axis_info and crs.axis_info[0].unit_name in ("metre", "meter")):
        raise ConfigError(f"config key {key}: {value!r} is not a projected CRS in metres (regions.<name>.resolution is "
                          "metres); give one like EPSG:32631 (UTM) or EPSG:3035, or leave it out: the UTM zone of the bbox")


def check_region(config: dict, name: str, region: dict) -> None:
    """CRS, season length, ``model_from`` season, bbox and grid size of one region."""
    from cropmap.config import region_months

    key = f"regions.{name}"
    if region.get("crs") is not None:
        check_crs(region["crs"], f"{key}.crs")
    for m, spec in (region.get("files") or {}).items():
        if isinstance(spec, dict) and spec.get("crs") is not None:
            check_crs(spec["crs"], f"{key}.files.{m}.crs", projected=False)
    n = len(region_months(region))
    if n > MAX_MONTHS:
        raise ConfigError(f"config key {key}.season: {n} months, at most {MAX_MONTHS}; "
                          "a season is the months of one crop cycle (e.g. {start: 2023-01, end: 2023-12})")
    if region.get("bbox") is None:
        return  # the grid is the files' footprint, read by cropmap.config
    try:
        grid = Grid.from_bbox(region["bbox"], res=float(region.get("resolution", 10)), crs=region.get("crs"))
    except ConfigError as exc:
        raise ConfigError(f"config key {key}.bbox: {exc}") from None
    except (OverflowError, ValueError, ArithmeticError) as exc:  # projected to infinity (pyproj's errors are ValueErrors)
        raise ConfigError(f"config key {key}.bbox: {region['bbox']} cannot be projected onto "
                          f"{region.get('crs') or 'its UTM zone'} ({type(exc).__name__}); check the bbox is lon/lat in "
                          "degrees inside the CRS's area of use (or remove crs)") from None
    check_grid(config, key, grid, region)


def check_grid(config: dict, key: str, grid: Grid, region: dict) -> None:
    """The grid of a bbox: finite, at least one chip wide for a region that trains, not absurdly large."""
    from cropmap.config import has_labels

    values = (grid.xmin, grid.ymax, grid.width, grid.height)
    if not all(math.isfinite(v) for v in values) or grid.width < 1 or grid.height < 1:
        raise ConfigError(f"config key {key}.bbox: {region['bbox']} cannot be projected onto {grid.crs}; "
                          "check the bbox is lon/lat in degrees inside the CRS's area of use (or remove crs)")
    size = config["prediction"]["tile_size"]
    n_tiles = math.ceil(grid.width / size) * math.ceil(grid.height / size)
    if n_tiles > MAX_TILES:
        raise ConfigError(f"config key {key}.bbox: the region is {grid.width} x {grid.height} px at {grid.res:g} m "
                          f"({n_tiles} tiles of prediction.tile_size {size}, at most {MAX_TILES}); check the bbox and "
                          "resolution, or split the region")
    chip = config["chips"]["size"]
    name = key.split(".", 1)[1]
    if has_labels(config, name) and min(grid.width, grid.height) < chip:
        raise ConfigError(f"config key {key}.bbox: the region is {grid.width} x {grid.height} px, smaller than one "
                          f"chip (chips.size {chip}); enlarge the bbox or lower chips.size")


def method_options(method: str) -> dict[str, inspect.Parameter]:
    """Keyword arguments a method takes from ``model.options``: its class's ``__init__`` and
    those of its bases (as far as they pass ``**kw`` on) plus the factory's own keywords, minus
    what the config sets through other keys (:data:`SET_ELSEWHERE`)."""
    from cropmap.models import build_model
    from cropmap.models.registry import method_class

    found: dict[str, inspect.Parameter] = {}

    def add(fn: Callable[..., Any]) -> bool:
        params = inspect.signature(fn).parameters.values()
        for p in params:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                found.setdefault(p.name, p)
        return any(p.kind == p.VAR_KEYWORD for p in params)

    for klass in method_class(method).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and not add(init):
            break
    add(build_model)
    return {k: v for k, v in found.items() if k not in SET_ELSEWHERE and k != "method"}


def _accepts(annotation: Any, value: Any) -> bool | None:
    """Whether ``value`` fits a (string) annotation; ``None`` when the annotation names no
    config-representable type."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [_TYPES.get(part.strip()) for part in text.split("|")]
    known = [k for k in kinds if k is not None]
    if not known or (all(k == (type(None),) for k in known) and len(known) < len(kinds)):
        return None
    ok = any(isinstance(value, k) for k in known)
    if isinstance(value, bool) and not any(bool in k for k in known):
        ok = False
    return ok


def check_options(options: dict, method: str, key: str = "model.options") -> None:
    """``model.options`` against the keyword arguments of ``method`` (:func:`method_options`).

    Raises:
        ConfigError: an unknown option (listing the valid ones), a value of the wrong type or
            out of range.
    """
    from cropmap.models.registry import method_class

    valid = method_options(method)
    for name, value in options.items():
        if name in SET_ELSEWHERE:
            raise ConfigError(f"config key {key}.{name}: set it with {SET_ELSEWHERE[name]}, not in {key}")
        if name not in valid:
            settable = sorted(n for n, q in valid.items() if _accepts(q.annotation, None) is not None)
            raise ConfigError(f"config key {key}.{name}: method {method} takes no option {name!r}; "
                              f"valid: {', '.join(settable)}")
        p = valid[name]
        fits = _accepts(p.annotation, value)
        if fits is None and value is not None:
            raise ConfigError(f"config key {key}.{name}: {name} of {method} cannot be set from the config; remove it")
        if fits is False:
            raise ConfigError(f"config key {key}.{name}: {value!r} should be {p.annotation} (default {p.default!r})")
        if name in OPTION_RANGES and isinstance(value, int | float) and not isinstance(value, bool):
            lo, hi, text = OPTION_RANGES[name]
            if not lo <= value <= hi or (name == "dropout" and value >= 1):
                raise ConfigError(f"config key {key}.{name}: {value!r} should be {text}")
        if isinstance(value, int) and not isinstance(value, bool) and str(p.annotation).startswith("int") and value < 1:
            raise ConfigError(f"config key {key}.{name}: {value!r} should be a positive integer")
        if name == "head" and value != "multiclass":
            raise ConfigError(f"config key {key}.head: {value!r}: the maps, metrics and areas of cropmap need the "
                              "multiclass head; remove the option")
        if name == "preset":
            import sys

            presets = getattr(sys.modules[method_class(method).__module__], "PRESETS", None)
            if presets is not None and value not in presets:
                raise ConfigError(f"config key {key}.preset: {value!r} is not a {method} preset; use one of {', '.join(presets)}")


def check_model(config: dict) -> None:
    """Method/task pairs, encoders per task, ``model.options`` and ``compare.options``."""
    from cropmap.config import compare_task
    from cropmap.modalities import TEMPORAL
    from cropmap.models.encoders import ENCODERS
    from cropmap.models.registry import method_class, methods_for

    model = config["model"]
    pairs = [("model.method", model["method"], model["task"], "model.task")]
    pairs += [("compare.methods", m, compare_task(config), "compare.task") for m in config["compare"]["methods"]]
    for key, method, task, task_key in pairs:
        if task not in method_class(method).tasks:
            raise ConfigError(f"config key {key}: {method} does not do {task} ({task_key}); "
                              f"for {task} use one of {', '.join(methods_for(task))}")
    for task in {model["task"], compare_task(config)}:
        for m, name in model["encoders"].items():
            valid = ENCODERS[(task, TEMPORAL[m])]
            ok = name in valid or (task == "segmentation" and name.startswith("smp:") and len(name) > 4)
            if not ok:
                raise ConfigError(f"config key model.encoders.{m}: {name!r} is not a {task} encoder of a "
                                  f"{'temporal' if TEMPORAL[m] else 'static'} modality; use one of {', '.join(valid)}")
    check_options(model["options"], model["method"])
    for method, options in config["compare"]["options"].items():
        check_options(options, method, f"compare.options.{method}")


def check_training(config: dict) -> None:
    """``training.devices`` and ``training.strategy`` as Lightning takes them, and
    ``training.blend_options`` as the blend's tree method takes them."""
    from cropmap.blend import TREES

    t = config["training"]
    check_options(t["blend_options"], TREES, "training.blend_options")
    devices = t["devices"]
    if isinstance(devices, int):
        ok = devices >= 1 or (devices == -1 and t["device"] == "cuda")
    else:
        text = devices.strip()
        ok = (text.isdigit() and int(text) >= 1) or (t["device"] != "cpu" and (text in ("auto", "-1") or bool(_DEVICE_LIST.match(text))))
    if not ok:
        raise ConfigError(f"config key training.devices: {devices!r} is not a device count; give the number of "
                          "processes or GPUs (e.g. 2), or with device: cuda a list of GPU ids such as \"0,1\"")
    if t["strategy"] != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        known = StrategyRegistry.available_strategies()
        if t["strategy"] not in known:
            raise ConfigError(f"config key training.strategy: {t['strategy']!r} is not a Lightning strategy; "
                              "use auto, ddp, ddp_spawn or fsdp")


def check_local_devices(config: dict) -> None:
    """Where the jobs run on this machine: a ``device: cuda`` needs a visible GPU, and enough
    of them for ``training.devices``.

    Raises:
        ConfigError: naming the key and the fix.
    """
    from cropmap.device import check_devices, resolve_device

    for key in ("training", "prediction"):
        if config[key]["device"] == "cuda":
            resolve_device("cuda", f"{key}.device")
    if config["training"]["device"] == "cuda":
        check_devices(config["training"]["devices"], on_gpu=True)
