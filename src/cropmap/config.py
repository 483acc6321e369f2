"""Config loading and validation: JSON schema (with defaults) plus semantic checks.

Every problem is reported as one :class:`~cropmap.errors.ConfigError` line naming the key and
the fix. The schema is package data, ``cropmap/schemas/config.schema.yaml`` (read with
:mod:`importlib.resources`, so an installed cropmap finds it; ``workflow/schemas/`` links to it
for the Snakemake-catalog layout), and is the single source of defaults and descriptions. The
method names it accepts come from the method registry (:mod:`cropmap.models.registry`).
"""

from __future__ import annotations

import copy
import difflib
import glob as globmod
import json
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cropmap.errors import ConfigError, InputDataError, UnknownNameError
from cropmap.grid import Grid, check_calendar_alignment, season_months
from cropmap.modalities import resolve_bands


def schema_path() -> Traversable:
    """The config schema shipped in the package (``cropmap/schemas/config.schema.yaml``)."""
    return resources.files("cropmap") / "schemas" / "config.schema.yaml"


def _with_defaults(cls: Any) -> Any:
    """A validator class that fills ``default`` values into the instance while validating."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: dict, instance: Any, schema: dict) -> Iterator[Any]:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    # an integer key takes integers only (JSON schema also accepts 2.0, which breaks range())
    integers = cls.TYPE_CHECKER.redefine("integer", lambda _checker, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(cls, {"properties": set_defaults}, type_checker=integers)


def _key_path(err: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in err.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _one_line(err: jsonschema.ValidationError) -> str:
    key = _key_path(err)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(map(str, set(err.instance) - set(allowed))) if isinstance(err.instance, dict) else []
        if not extra:
            return f"config key {key}: {err.message}"
        named = extra[0] if key == "(top level)" else f"{key}.{extra[0]}"
        close = difflib.get_close_matches(extra[0], allowed, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + (f"valid keys: {', '.join(allowed)}" if allowed else "remove it")
        more = f" (and {', '.join(map(repr, extra[1:]))})" if len(extra) > 1 else ""
        return f"config key {named}: unknown key{more}; {hint}"
    if err.validator == "pattern" and err.schema.get("pattern") == "^[a-z0-9_-]+$":
        return f"config key {key}: {err.instance!r} is not a slug; use lower-case letters, digits, '_' and '-' only"
    if err.validator == "propertyNames":
        return f"config key {key}: name {err.instance!r} is not allowed; {err.message}"
    if err.validator == "enum":
        return f"config key {key}: {err.instance!r} is not one of {err.validator_value}"
    if err.validator == "type":
        return f"config key {key}: {err.instance!r} should be of type {err.validator_value}"
    if err.validator == "required":
        missing = [r for r in err.validator_value if isinstance(err.instance, dict) and r not in err.instance][:1]
        named = (missing[0] if key == "(top level)" else f"{key}.{missing[0]}") if missing else key
        return f"config key {named}: missing, and it is required; add it (see cropmap/schemas/config.schema.yaml)"
    return f"config key {key}: {err.message}"


def load_schema(path: str | Path | None = None) -> dict:
    """Read the config JSON schema and fill in what the method registry decides.

    ``definitions.method.enum`` becomes every registered method and the default of
    ``compare.methods`` every method that classifies pixels (:mod:`cropmap.models.registry`).

    Args:
        path: a schema file; default :func:`schema_path` (the package's own).
    """
    from cropmap.models.registry import method_names, methods_for

    text = Path(path).read_text() if path is not None else schema_path().read_text()
    schema = yaml.safe_load(text)
    schema["definitions"]["method"]["enum"] = list(method_names())
    schema["properties"]["compare"]["properties"]["methods"]["default"] = list(methods_for("classification"))
    return schema


def validate(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place (filling defaults) and check its semantics.

    Args:
        config: the parsed config mapping.
        schema: the JSON schema; :func:`load_schema` when ``None``.

    Returns:
        The same mapping with defaults filled in.

    Raises:
        ConfigError: one line naming the first bad key and the fix.
    """
    schema = schema or load_schema()
    cmp = config.get("compare")
    methods_given = isinstance(cmp, dict) and "methods" in cmp
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        err = errors[0]
        # propertyNames errors point at the parent; name the offending key instead.
        if err.validator == "propertyNames" and err.instance and isinstance(err.instance, str):
            parent = _key_path(err)
            raise ConfigError(
                f"config key {parent}.{err.instance}: name {err.instance!r} is not a slug; "
                "use lower-case letters, digits, '_' and '-' only"
            )
        raise ConfigError(_one_line(err))
    if not methods_given:  # the default: every method that can do the compared task
        from cropmap.models.registry import methods_for

        can = methods_for(compare_task(config))
        config["compare"]["methods"] = [m for m in config["compare"]["methods"] if m in can]
    _check_semantics(config)
    from cropmap import config_checks

    config_checks.check(config)
    return config


def _check_semantics(config: dict) -> None:
    regions, sets = config["regions"], config["training_sets"]
    if not regions and not sets:
        raise ConfigError("config: no regions and no training_sets; add a region to map (regions: {name: {bbox, season}}) "
                          "or a training set (training_sets: {name: {tables, season}})")
    try:
        resolve_bands(config["bands"])
    except UnknownNameError as exc:
        raise ConfigError(f"config key {exc}") from None
    _check_classes(config)
    for name, ts in sets.items():
        if name in regions:
            raise ConfigError(f"config key training_sets.{name}: {name!r} is also a region; regions and training sets share one "
                              f"namespace (data/{name}, models/{name}, results/{name}): rename one of them")
        try:
            season_months(ts["season"]["start"], ts["season"]["end"])
        except ConfigError as exc:
            raise ConfigError(f"config key training_sets.{name}.season: {exc}") from None
    from cropmap import config_checks

    for name, region in regions.items():
        _check_region(config, name, region)
        config_checks.check_region(config, name, region)
    task = compare_task(config)
    from cropmap.models.registry import methods_for

    wrong = [m for m in config["compare"]["methods"] if m not in methods_for(task)]  # type: ignore[arg-type]
    if wrong:
        raise ConfigError(f"config key compare.methods: {wrong} cannot do {task} (compare.task); use some of {list(methods_for(task))}")  # type: ignore[arg-type]
    for r in config["compare"]["regions"] or []:
        if r in sets:
            if task != "classification":
                raise ConfigError(f"config key compare.regions: training set {r!r} trains pixel classifiers only; "
                                  "set compare.task: classification or compare regions only")
        elif r not in regions or not has_labels(config, r):
            raise ConfigError(f"config key compare.regions: {r!r} is not a region with labels or a training set; name some of "
                              f"{[x for x in regions if has_labels(config, x)] + list(sets)}")
    fr = config["split"]["fractions"]
    if not sum(fr.values()) > 0 or fr["train"] <= 0 or fr["val"] <= 0 or fr["test"] <= 0:
        raise ConfigError("config key split.fractions: train, val and test must all be > 0, e.g. {train: 0.7, val: 0.15, test: 0.15}")
    if config["split"]["block_size"] % config["chips"]["size"]:
        raise ConfigError(
            f"config key chips.size: {config['chips']['size']} must divide split.block_size {config['split']['block_size']} "
            "so that every chip lies in one split; e.g. chips.size 32 with block_size 64"
        )


def _check_classes(config: dict) -> None:
    ids = [c["id"] for c in config["classes"]]
    names = [c["name"] for c in config["classes"]]
    for label, values in (("id", ids), ("name", names)):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise ConfigError(f"config key classes: duplicate class {label}(s) {dup}; give every class a unique {label}")
    seen_codes: dict[str, str] = {}
    for c in config["classes"]:
        for code in c.get("codes", []):
            if str(code) in seen_codes and seen_codes[str(code)] != c["name"]:
                raise ConfigError(
                    f"config key classes: code {code!r} maps to both {seen_codes[str(code)]} and {c['name']}; keep it in one class"
                )
            seen_codes[str(code)] = c["name"]
    labelled = [r for r in config["regions"] if has_labels(config, r)]
    if labelled and len(config["classes"]) < 2:
        raise ConfigError(f"config key classes: the regions {labelled} have labels (synthetic regions bring their own), which need "
                          "a class table of at least 2 classes; list them ({id, name, codes}) or map these regions with model_from")


def _check_region(config: dict, name: str, region: dict) -> None:
    key = f"regions.{name}"
    uses_files = any(region_source(region, m) == "files" for m in config["modalities"])
    if uses_files and not region.get("files"):
        raise ConfigError(f"config key {key}.files: the region takes stacks from files but lists none; "
                          "add files: {s2: path/to/s2_cube.nc, ...} (see docs/real_data.md)")
    if region.get("bbox") is None and not region.get("files"):
        raise ConfigError(f"config key {key}.bbox: missing; add bbox: [lon_min, lat_min, lon_max, lat_max] "
                          "(only a region with files may leave it out: their footprint is used)")
    if region.get("bbox") is None:
        try:  # the grid comes from the files: they must exist and be readable now
            region_grid(region)
        except InputDataError as exc:
            raise ConfigError(f"config key {key}.files: {exc}") from None
    try:
        season_months(region["season"]["start"], region["season"]["end"])
    except ConfigError as exc:
        raise ConfigError(f"config key {key}.season: {exc}") from None
    regions, sets = config["regions"], config["training_sets"]
    frm = region.get("model_from")
    if frm is not None and frm not in regions and frm not in sets:
        raise ConfigError(f"config key {key}.model_from: {frm!r} is neither a region nor a training set; name one of "
                          f"{sorted(regions) + sorted(sets)}")
    if region.get("labels") is None and region.get("source", "synthetic") != "synthetic" and frm is None:
        raise ConfigError(
            f"config key {key}: a region without labels needs model_from (a region or training set whose model predicts it); "
            "add labels.path or model_from"
        )
    if frm is None:
        return
    if frm in regions and regions[frm].get("model_from") is not None:
        raise ConfigError(f"config key {key}.model_from: {frm} itself borrows a model; point to a region with labels or a training set")
    if frm in sets and config["model"]["task"] != "classification":
        raise ConfigError(f"config key {key}.model_from: training set {frm!r} trains a pixel classifier only; "
                          "set model.task: classification or map the region with a region's model")
    try:
        check_calendar_alignment(months_of(config, frm), region_months(region), what=f"regions.{name} and its model {frm}")
    except InputDataError as exc:
        raise ConfigError(f"config key {key}.season: {exc}") from None


def region_source(region: dict, modality: str) -> str:
    """Source serving ``modality`` for ``region`` (per-modality override first)."""
    return str(region.get("sources", {}).get(modality, region.get("source", "synthetic")))


def load(path: str | Path) -> dict:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file is missing or not YAML (one line with the place), or a key is invalid.
    """
    try:
        with open(path) as fh:
            config = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc}); give the path of a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML at {where} ({problem}); fix the indentation or quoting there") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys (regions, classes, ...)")
    return validate(config)


def region_grid(region: dict) -> Grid:
    """The grid of a region from its config block.

    A region with ``files`` and no ``bbox`` takes its files' footprint
    (:func:`cropmap.sources.files.footprint_grid`).
    """
    if region.get("bbox") is None:
        from cropmap.sources.files import footprint_grid

        return footprint_grid(region["files"], res=float(region.get("resolution", 10)), crs=region.get("crs"))
    return Grid.from_bbox(region["bbox"], res=float(region.get("resolution", 10)), crs=region.get("crs"))


def region_bbox(region: dict) -> list[float]:
    """The region's WGS84 bbox: ``bbox``, or its files' footprint when it has none."""
    if region.get("bbox") is None:
        from cropmap.sources.files import files_footprint

        return files_footprint(region["files"])
    return list(region["bbox"])


def region_months(region: dict) -> list[str]:
    """Month labels of the region's season."""
    return season_months(region["season"]["start"], region["season"]["end"])


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON used to pass config blocks to stages (stable for rerun triggers)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def model_region(config: dict, region: str) -> str:
    """Region or training set whose model predicts ``region`` (itself unless ``model_from`` is
    set; a training set is its own)."""
    if region in config["training_sets"]:
        return region
    return config["regions"][region].get("model_from") or region


def is_training_set(config: dict, name: str) -> bool:
    """Whether ``name`` is a training set (else a region)."""
    return name in config["training_sets"]


def months_of(config: dict, name: str) -> list[str]:
    """Season months of a region or training set."""
    if name in config["training_sets"]:
        return region_months(config["training_sets"][name])
    return region_months(config["regions"][name])


def bands_of(config: dict) -> dict[str, list[str]]:
    """The bands of every configured modality (``bands``, every band where not narrowed)."""
    full = resolve_bands(config["bands"])
    return {m: list(full[m]) for m in config["modalities"]}


def region_files(config: dict, region: str) -> list[str]:
    """The files a ``files`` region's stacks come from (globs expanded), the ``fetch`` rule's
    inputs so that editing a cube reruns it. A missing file is left out: the fetch stage then
    names it (one line)."""
    r = config["regions"][region]
    out: list[str] = []
    for m, v in (r.get("files") or {}).items():
        if m not in config["modalities"] or region_source(r, m) != "files" or not v:
            continue
        path = str(v if isinstance(v, str) else v.get("path", ""))
        if any(ch in path for ch in "*?["):
            out.extend(sorted(globmod.glob(path)))
        elif path and Path(path).exists():
            out.append(path)
    return out


def table_files(config: dict, name: str) -> list[str]:
    """The tables of a training set that exist (the ``samples`` rule's inputs; the stage names a
    missing one)."""
    return [str(t["path"]) for t in config["training_sets"][name]["tables"] if Path(t["path"]).exists()]


def has_labels(config: dict, region: str) -> bool:
    """Whether the region brings labels (synthetic regions always do)."""
    r = config["regions"][region]
    return r.get("labels") is not None or r.get("source", "synthetic") == "synthetic"


def stage_params(config: dict, stage: str, region: str, method: str | None = None,
                 fold: int | str | None = None) -> dict[str, Any]:
    """The config subset a stage of ``region`` depends on.

    ``method``: the method of a comparison run (stage ``train``), or the kind of the
    ``pretrain`` stage (``imt``, the default, or ``pixel``). ``fold``: the comparison fold of a
    ``train`` run (it picks that fold's pixel pretraining).

    Rules pass it to the stage as JSON, so Snakemake reruns a job exactly when its part of
    the config changed (adding a region changes no other region's parameters).
    """
    if region in config["training_sets"]:
        return _training_set_params(config, stage, region, method, fold)
    r = config["regions"][region]
    grid = region_grid(r).to_dict()
    months = region_months(r)
    base = {"region": region, "grid": grid, "months": months, "modalities": config["modalities"], "bands": bands_of(config)}
    if stage == "fetch":
        return base | {"config": r, "classes": config["classes"], "seed": config["seed"]}
    if stage == "stack":
        return base
    if stage == "labels":
        return base | {"labels": r.get("labels"), "classes": config["classes"], "split": config["split"], "seed": config["seed"],
                       "chip_size": config["chips"]["size"]}
    if stage == "fold":
        return {"region": region, "grid": grid, "split": config["split"], "seed": config["seed"], "folds": config["compare"]["folds"]}
    if stage == "chips":
        return base | {"size": config["chips"]["size"], "min_valid_fraction": config["availability"]["min_valid_fraction"]}
    if stage == "train":
        return _train_params(config, base, method, region, fold)
    if stage == "pretrain":
        if method == "pixel":
            return _pixel_pretrain_params(config, base)
        return base | {"pretrain": config["model"]["pretrain"], "preset": config["model"]["options"].get("preset", "tiny"),
                       "seed": config["seed"], "device": config["training"]["device"],
                       "min_valid_fraction": config["availability"]["min_valid_fraction"]}
    if stage == "predict":
        return base | {"prediction": config["prediction"], "chip_size": config["chips"]["size"]}
    if stage == "coverage":
        return base | {"tile_size": config["prediction"]["tile_size"]}
    if stage == "mosaic":
        sources = {m: region_source(r, m) for m in config["modalities"]}
        return base | {"classes": config["classes"], "bbox": region_bbox(r), "sources": sources,
                       "model": {"method": config["model"]["method"], "task": config["model"]["task"],
                                 "trained_on": model_region(config, region)}}
    if stage == "area":
        return {"region": region, "grid": grid, "classes": config["classes"]}
    if stage == "metrics":
        return base | {"evaluation": config["evaluation"], "seed": config["seed"], "prediction": config["prediction"]}
    raise ValueError(f"unknown stage {stage!r}")


def _pixel_pretrain_params(config: dict, base: dict[str, Any]) -> dict[str, Any]:
    """``pretrain`` parameters of the pixel encoders: the pretraining block, and the encoder
    names and width of the models that fine-tune them."""
    m = config["model"]
    return base | {"pretrain": {k: v for k, v in m["pretrain"].items() if k not in ("batch_size", "lr")},
                   "hidden": m["hidden"], "encoders": m["encoders"], "seed": config["seed"],
                   "device": config["training"]["device"], "min_valid_fraction": config["availability"]["min_valid_fraction"]}


def _train_params(config: dict, base: dict[str, Any], method: str | None, region: str,
                  fold: int | str | None = None) -> dict[str, Any]:
    p = base | copy.deepcopy({k: config[k] for k in ("model", "training", "classes", "availability", "seed")})
    if method is not None:  # a run of the comparison protocol
        if method != p["model"]["method"]:  # the options of model.method that this method takes
            from cropmap.config_checks import method_options

            takes = method_options(method)
            p["model"]["options"] = {k: v for k, v in p["model"]["options"].items() if k in takes}
        p["model"]["options"] |= copy.deepcopy(config["compare"]["options"].get(method, {}))
        p["model"]["method"] = method
        if config["compare"]["epochs"]:
            p["training"]["epochs"] = config["compare"]["epochs"]
            p["training"].setdefault("segmentation", {})["epochs"] = config["compare"]["epochs"]
        if fold is not None:  # trees fitted once per fold (trees_dedicated and every blend)
            p["trees_cache"] = f"{config['models_dir']}/{region}/compare/fold{fold}/trees_cache"
    name = p["model"]["method"]
    # the task trained: a training set's pixels, a comparison's compare.task, else model.task
    task = "classification" if region in config["training_sets"] else compare_task(config) if method else p["model"]["task"]
    if uses_pretraining(config, name, task):
        path = pretrain_path(config, region, name, task, fold)
        if name == "imt":
            p["model"]["options"]["pretrained"] = path
        else:  # TrainSettings.pretrained: the pixel encoders' checkpoint
            p["model"]["pretrain"]["checkpoint"] = path
    return p


def _training_set_params(config: dict, stage: str, name: str, method: str | None,
                         fold: int | str | None = None) -> dict[str, Any]:
    """:func:`stage_params` of a training set (stages ``samples``, ``fold``, ``train``, ``pretrain``
    (kind ``pixel``), ``metrics``)."""
    base = {"region": name, "months": months_of(config, name), "modalities": config["modalities"], "bands": bands_of(config)}
    if stage == "samples":
        return base | {"name": name, "set": config["training_sets"][name], "classes": config["classes"], "seed": config["seed"],
                       "split": config["split"]["fractions"], "min_valid_fraction": config["availability"]["min_valid_fraction"]}
    if stage == "fold":
        return {"region": name, "split": config["split"], "seed": config["seed"], "folds": config["compare"]["folds"]}
    if stage == "train":
        return _train_params(config, base, method, name, fold)
    if stage == "pretrain" and method == "pixel":
        return _pixel_pretrain_params(config, base)
    if stage == "metrics":
        return base | {"evaluation": config["evaluation"], "seed": config["seed"], "prediction": config["prediction"]}
    raise ValueError(f"stage {stage!r} does not apply to the training set {name!r} (it has no stacks or map)")


def compare_regions(config: dict) -> list[str]:
    """Regions and training sets of the comparison protocol (default: every region with labels
    and, when pixel classifiers are compared, every training set)."""
    sets = list(config["training_sets"]) if compare_task(config) == "classification" else []
    return list(config["compare"]["regions"] or [r for r in config["regions"] if has_labels(config, r)] + sets)


def compare_task(config: dict) -> str:
    """Task compared (default ``model.task``)."""
    return str(config["compare"]["task"] or config["model"]["task"])


def gpu_count(block: dict) -> int:
    """GPUs a job asks the executor for (resource ``gpu``) from a ``training``/``prediction`` block.

    ``device: cuda`` asks for ``devices`` GPUs (1 unless an integer count or an ``0,1``-style
    list is given); ``auto`` and ``cpu`` ask for none, so a cluster job only lands on a GPU node
    when the config says cuda.
    """
    if block["device"] != "cuda":
        return 0
    devices = block.get("devices", 1)
    if isinstance(devices, int):
        return max(devices, 1)
    devices = str(devices).strip()
    if devices.isdigit():
        return max(int(devices), 1)
    return len([d for d in devices.strip("[]").split(",") if d.strip()]) if "," in devices else 1


def pretrain_kind(method: str, task: str | None = None) -> str | None:
    """What the ``pretrain`` stage pretrains for ``method`` on ``task`` (default ``classification``
    for pixel methods): ``imt`` (its chip encoder), ``pixel`` (per-sensor pixel encoders) or None."""
    if method == "imt":
        return "imt"
    from cropmap.models.pixel_pretrain import pixel_pretrainable

    return "pixel" if (task or "classification") == "classification" and pixel_pretrainable(method) else None


def uses_pretraining(config: dict, method: str, task: str | None = None) -> bool:
    """Whether training ``method`` (on ``task``) starts from the self-supervised ``pretrain`` rule's weights."""
    return bool(config["model"]["pretrain"]["enabled"]) and pretrain_kind(method, task) is not None


def pretrain_path(config: dict, region: str, method: str = "imt", task: str | None = None, fold: int | str | None = None) -> str:
    """Checkpoint written by the ``pretrain`` rule for ``method`` of ``region`` (or training set):
    ``pretrain/imt.ckpt``, ``pretrain/pixel.ckpt`` or, for a fold of the comparison with
    ``compare.folds`` > 1, ``pretrain/fold<k>/pixel.ckpt`` (pretrained on that fold's split)."""
    kind = pretrain_kind(method, task) or "imt"
    per_fold = kind == "pixel" and fold is not None and int(config["compare"]["folds"]) > 1
    return f"{config['models_dir']}/{region}/pretrain/{f'fold{fold}/' if per_fold else ''}{kind}.ckpt"
