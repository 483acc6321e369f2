"""Command line of the pipeline stages: ``cropmap <stage> --params JSON [paths]``.

One vocabulary: each stage is a Snakemake rule, a ``cropmap`` command and a module of the same
name (rule ``mosaic`` runs ``cropmap mosaic``, :mod:`cropmap.mosaic`). The rules call these;
each one can also be run by hand. ``--params`` is the JSON produced by
:func:`cropmap.config.stage_params`. How a command runs is :mod:`cropmap.runner`: an error is
one line ``cropmap <stage>: error: ...`` naming the file or key and the fix (exit status 1),
``--log FILE`` sends the command's whole output into ``FILE`` and that line also to the
terminal, and a failed stage leaves none of its outputs (:data:`OUTPUTS`) behind. Inputs are
checked before a stage reads them (:func:`check_inputs`, stacks, labels, chips).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cropmap.errors import CropmapError, InputDataError, MissingParamError
from cropmap.grid import Grid
from cropmap.runner import parse_params, run_stage

log = logging.getLogger("cropmap")


def _grid(p: dict) -> Grid:
    try:
        return Grid(**p["grid"])
    except TypeError as exc:
        raise MissingParamError(f"--params grid is not a grid ({exc}); pass the stage's parameters "
                                "(cropmap.config.stage_params)") from None


def _checked_stacks(a: argparse.Namespace, p: dict[str, Any], window: Any = None) -> None:
    """Stop with one line naming the file and the fix if a stack is corrupt, off the grid or
    holds other bands or months than the config's."""
    from cropmap.io import check_stacks

    check_stacks(Path(a.stack_dir), _grid(p), p["modalities"], window=window, months=p["months"], bands=p.get("bands"))


def _sort_inputs(a: argparse.Namespace) -> None:
    """Spread ``--inputs`` (what a rule's input function chose) over the stage's input arguments.

    A region's data is its stack folder, ``labels.tif`` (``.tif``) and ``chips.parquet``
    (``.parquet``); a training set's is ``samples.npz`` (``.npz``); a cross-validation fold is a
    folder holding either ``labels.tif`` + ``chips.parquet`` or ``samples.npz``. Checkpoints
    (``.ckpt``) are left alone: the stages get their model otherwise.
    """
    for raw in getattr(a, "inputs", None) or []:
        path = Path(raw)
        found: dict[str, Path] = {}
        if path.suffix == ".npz":
            found["samples"] = path
        elif path.suffix in (".tif", ".tiff"):
            found["labels"] = path
        elif path.suffix == ".parquet":
            found["chips"] = path
        elif path.is_dir() and (path / "samples.npz").exists():
            found["samples"] = path / "samples.npz"
        elif path.is_dir() and (path / "labels.tif").exists():
            found |= {"labels": path / "labels.tif", "chips": path / "chips.parquet"}
        elif path.is_dir():
            found["stack_dir"] = path
        elif path.suffix != ".ckpt":
            raise CropmapError(f"--inputs: {raw} is none of a stack folder, labels .tif, chips .parquet or samples .npz")
        for k, v in found.items():
            if getattr(a, k, None) is None:
                setattr(a, k, str(v))


def _need(a: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if getattr(a, n, None) is None]
    if missing:
        raise CropmapError(f"cropmap {a.stage}: give {', '.join('--' + n.replace('_', '-') for n in missing)} (or --inputs)")


def _checked_map(a: argparse.Namespace, p: dict[str, Any]) -> None:
    """Stop with one line if the map is corrupt or (when the stage knows the grid) off the grid."""
    from cropmap.io import check_raster

    check_raster(Path(a.map), _grid(p) if "grid" in p else None,
                 fix=f"delete {a.map} and rerun snakemake so the mosaic stage writes it again")


def _checked_labels(a: argparse.Namespace, p: dict[str, Any]) -> None:
    """Stop with one line if ``labels.tif`` (and ``chips.parquet`` when the stage reads it) is
    corrupt or ``labels.tif`` is off the grid."""
    from cropmap.io import check_raster, check_table

    check_raster(Path(a.labels), _grid(p) if "grid" in p else None,
                 fix=f"delete {a.labels} and rerun snakemake so the labels stage writes it again")
    if getattr(a, "chips", None):
        check_table(Path(a.chips), fix=f"delete {a.chips} and rerun snakemake so the chips stage writes it again", min_rows=1)


def cmd_fetch(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import availability, fetch

    files = fetch.run(p, Path(a.raw_dir), Path(a.cache_dir))
    availability.write_report({m: f for m, f in files.items() if m != "fields"}, Path(a.availability), p["modalities"])


def cmd_stack(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import stack

    out = Path(a.out_dir)
    threads = int(a.threads or os.environ.get("CROPMAP_THREADS", 1))
    with _atomic_dir(out) as tmp:
        stack.run(Path(a.raw_dir), tmp, _grid(p), p["months"], p["modalities"], chunk=int(a.chunk),
                  scheduler=a.dask_scheduler or None, threads=threads, bands=p.get("bands"))


def cmd_labels(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import labels

    lab = p["labels"] or {"path": str(Path(a.raw_dir) / "fields.gpkg"), "column": "code", "layer": None}
    labels.run(Path(lab["path"]), Path(a.out_tif), Path(a.out_gpkg), _grid(p), p["classes"], column=lab.get("column", "code"),
               layer=lab.get("layer"), block_size=p["split"]["block_size"], fractions=p["split"]["fractions"], seed=p["seed"],
               chip_size=p.get("chip_size"))


def cmd_samples(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import samples

    samples.run(p, Path(a.out))


def cmd_fold(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import fold

    _sort_inputs(a)
    with _atomic_dir(Path(a.out_dir)) as tmp:
        if a.samples is not None:
            fold.write_samples_fold(Path(a.samples), tmp, fractions=p["split"]["fractions"], seed=p["seed"], folds=p["folds"],
                                    fold=int(a.fold))
            return
        _need(a, "labels", "chips")
        _checked_labels(a, p)
        fold.write_fold(Path(a.labels), Path(a.chips), tmp, _grid(p), block_size=p["split"]["block_size"],
                        fractions=p["split"]["fractions"], seed=p["seed"], folds=p["folds"], fold=int(a.fold))


def cmd_chips(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import chips

    _checked_stacks(a, p)
    _checked_labels(a, p)
    chips.run(Path(a.stack_dir), Path(a.labels), Path(a.out), _grid(p), p["months"], p["modalities"], p["size"], p["min_valid_fraction"],
              bands=p.get("bands"))


def cmd_train(a: argparse.Namespace, p: dict[str, Any]) -> None:
    # idle OpenMP threads sleep instead of spinning: on a busy shared CPU a spinning thread waits
    # out its peer's time slice at every kernel (a 2-thread chip step measured 5-10x slower)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from cropmap import train

    _sort_inputs(a)
    settings = train.TrainSettings.from_config(p, a.task, p["months"])
    summary_json = Path(a.summary) if a.summary else None
    if a.samples is not None:  # a training set
        if a.task != "classification":
            raise CropmapError(f"cropmap train: {a.samples} holds pixel samples; train them with --task classification")
        summary = train.run_samples(settings, Path(a.samples), Path(a.out), Path(a.work_dir), summary_json=summary_json)
    else:  # a region
        _need(a, "stack_dir", "labels", "chips")
        _checked_stacks(a, p)
        _checked_labels(a, p)
        summary = train.run(settings, Path(a.stack_dir), Path(a.labels), Path(a.chips), _grid(p), Path(a.out), Path(a.work_dir),
                            summary_json=summary_json)
    log.info("trained: %s", json.dumps(summary))


def cmd_pretrain(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import pretrain

    _sort_inputs(a)
    if a.kind == "pixel" and a.samples is not None:  # a training set (or a fold of it)
        summary = pretrain.run_pixels(p, Path(a.out), samples_npz=Path(a.samples))
    else:
        _need(a, "stack_dir", "labels", "chips")
        _checked_stacks(a, p)
        _checked_labels(a, p)
        if a.kind == "pixel":
            summary = pretrain.run_pixels(p, Path(a.out), stack_dir=Path(a.stack_dir), labels_tif=Path(a.labels),
                                          chips_parquet=Path(a.chips))
        else:
            pt = p["pretrain"]
            summary = pretrain.run(Path(a.stack_dir), Path(a.chips), _grid(p), p["months"], p["modalities"], Path(a.out),
                                   preset=p["preset"], epochs=pt["epochs"], batch_size=pt["batch_size"], lr=pt["lr"],
                                   seed=p["seed"], device=p["device"], min_valid_fraction=p["min_valid_fraction"],
                                   labels_tif=Path(a.labels), bands=p.get("bands"))
    log.info("pretrained: %s", json.dumps(summary, default=str))


def cmd_predict(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import predict
    from cropmap.grid import tile_window

    pr = p["prediction"]
    _checked_stacks(a, p, window=tile_window(_grid(p), a.tile, pr["tile_size"]))
    predict.run(Path(a.model), Path(a.stack_dir), _grid(p), a.tile, Path(a.out), tile_size=pr["tile_size"],
                modalities=p["modalities"], chip_size=p["chip_size"], overlap=pr["overlap"], batch_size=pr["batch_size"],
                device=pr["device"], probabilities=pr["probabilities"], precision=pr["precision"],
                season_key=f"regions.{p['region']}.season")


def cmd_mosaic(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import mosaic

    tiles = sorted(Path(a.tiles_dir).glob("*.tif")) if a.tiles_dir else [Path(t) for t in a.tiles]
    if not tiles:
        raise InputDataError(f"no tiles to mosaic ({'in ' + a.tiles_dir if a.tiles_dir else 'give --tiles'}); run the predict stage first")
    tags = {"cropmap_region": p["region"], "cropmap_method": p["model"]["method"], "cropmap_task": p["model"]["task"],
            "cropmap_season": f"{p['months'][0]}/{p['months'][-1]}", "cropmap_sources": json.dumps(p["sources"])}
    out = Path(a.out)
    classes = p["classes"]
    if a.model:  # the legend of the model that drew the map (a training set's classes may come from its tables)
        from cropmap.predict.bundle import bundle_classes

        classes = bundle_classes(Path(a.model))
    mosaic.mosaic_to_cog(tiles, out, _grid(p), classes, tags=tags, proba_out=Path(a.proba) if a.proba else None)
    mosaic.quicklook(out, Path(a.quicklook), classes, title=mosaic.map_title(p["region"], p["model"]))
    mosaic.stac_item(out, Path(a.stac), p["region"], classes, bbox=p["bbox"], months=p["months"], sources=p["sources"], model=p["model"],
                   proba_tif=Path(a.proba) if a.proba else None)


def cmd_expected_f1(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import expected_f1

    _checked_map(a, p)
    mean = expected_f1.run(Path(a.map), Path(a.metrics), Path(a.out))
    log.info("mean expected weighted F1 over mapped pixels: %.1f", mean)


def cmd_metrics(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import metrics

    _sort_inputs(a)
    ev = p["evaluation"]
    kw = {"max_pixels_per_class": ev["max_pixels_per_class"], "seed": p["seed"], "device": p["prediction"]["device"],
          "batch_size": p["prediction"]["batch_size"], "precision": p["prediction"]["precision"]}
    if a.samples is not None:  # a training set: its test-split samples
        df = metrics.evaluate_set(Path(a.model), Path(a.samples), **kw)
    else:
        _need(a, "stack_dir", "labels", "chips")
        _checked_stacks(a, p)
        _checked_labels(a, p)
        df = metrics.evaluate(Path(a.model), Path(a.stack_dir), Path(a.labels), Path(a.chips), _grid(p), **kw)
    for tag in a.tag:
        key, _, value = tag.partition("=")
        df.insert(0, key, value)
    metrics.write_metrics(df, Path(a.out))
    log.info("metrics:\n%s", df.round(1).to_string(index=False))
    if a.confusion:
        from cropmap import area

        area.write_confusion(df.attrs["confusion"], Path(a.confusion))


def cmd_coverage(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import coverage

    _checked_stacks(a, p)
    _checked_map(a, p)
    summary = coverage.summarise(Path(a.map), Path(a.stack_dir), _grid(p), p["months"], p["modalities"], p["tile_size"])
    coverage.write(summary, Path(a.out))
    log.info("coverage: %.1f %% nodata pixels, %d of %d tiles without any sensor, months without data: %s",
             100 * summary["nodata_share"], len(summary["empty_tiles"]), summary["tiles"],
             ", ".join(summary["months_without_data"]) or "none")


def cmd_area(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import area

    _checked_labels(a, p)
    _checked_map(a, p)
    s = area.run(Path(a.map), Path(a.labels), p["classes"], Path(a.out_csv), Path(a.out_json))
    log.info("area: %d reference pixels on %d mapped pixels; overall accuracy %s", s["sample_px"], s["mapped_px"],
             "n/a" if s["overall_accuracy"] is None else f"{s['overall_accuracy']:.3f} +- {1.96 * (s['overall_accuracy_se'] or 0):.3f}")


def cmd_compare(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import compare

    table = compare.collect([Path(x) for x in a.parts], Path(a.table), Path(a.summary), Path(a.heatmap) if a.heatmap else None)
    log.info("summary:\n%s", compare.summarise(table).round(1).to_string(index=False))


def cmd_report(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import report

    regions = {name: {k: Path(v) for k, v in files.items()} for name, files in parse_params(a.regions, "--regions").items()}
    report.html_report(regions, Path(a.out), compare_table=Path(a.compare) if a.compare else None)


#: The arguments naming each stage's outputs: none is left behind when the stage fails.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "fetch": ("raw_dir", "availability"), "stack": ("out_dir",), "labels": ("out_tif", "out_gpkg"),
    "samples": ("out",), "fold": ("out_dir",), "chips": ("out",), "train": ("out", "summary"), "pretrain": ("out",),
    "predict": ("out",), "mosaic": ("out", "quicklook", "stac", "proba"), "expected_f1": ("out",),
    "coverage": ("out",), "metrics": ("out", "confusion"), "area": ("out_csv", "out_json"),
    "compare": ("table", "summary", "heatmap"), "report": ("out",),
}

#: The arguments naming each stage's inputs, and the stage that writes each.
INPUTS: dict[str, dict[str, str]] = {
    "stack": {"raw_dir": "fetch"},
    "fold": {"inputs": "labels, chips or samples", "labels": "labels", "chips": "chips", "samples": "samples"},
    "chips": {"stack_dir": "stack", "labels": "labels"},
    "train": {"inputs": "stack, labels, chips or samples", "stack_dir": "stack", "labels": "labels", "chips": "chips",
              "samples": "samples"},
    "pretrain": {"inputs": "stack, labels, chips or samples", "stack_dir": "stack", "labels": "labels", "chips": "chips",
                 "samples": "samples"},
    "predict": {"model": "train", "stack_dir": "stack"}, "mosaic": {"tiles_dir": "predict", "tiles": "predict"},
    "expected_f1": {"map": "mosaic", "metrics": "metrics"}, "coverage": {"map": "mosaic", "stack_dir": "stack"},
    "metrics": {"model": "train", "inputs": "stack, labels, chips or samples", "stack_dir": "stack", "labels": "labels",
                "chips": "chips", "samples": "samples"},
    "area": {"map": "mosaic", "labels": "labels"}, "compare": {"parts": "metrics"},
}


def output_paths(a: argparse.Namespace) -> list[Path]:
    """The output paths of the parsed command ``a`` (:data:`OUTPUTS`)."""
    paths = [Path(v) for k in OUTPUTS[a.stage] if (v := getattr(a, k, None))]
    if a.stage == "train" and not a.summary:
        paths.append(Path(a.out).parent / "train_summary.json")
    return paths


def check_inputs(a: argparse.Namespace) -> None:
    """Stop with one line naming the first input of ``a`` that does not exist and the stage that writes it."""
    for arg, writer in INPUTS.get(a.stage, {}).items():
        values = getattr(a, arg, None) or []
        for value in [values] if isinstance(values, str) else values:
            if not Path(value).exists():
                raise InputDataError(f"{value}: no such file or folder (--{arg.replace('_', '-')} of cropmap {a.stage}); "
                                     f"run the {writer} stage first (snakemake does) or fix the path")


def _atomic_dir(path: Path) -> Any:
    from cropmap.io import atomic_dir

    return atomic_dir(path)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose top-level epilog (the method list) is built only for ``--help``,
    so a stage does not import the models to parse its arguments."""

    def format_help(self) -> str:
        if self.epilog is None and self.prog == "cropmap":
            from cropmap.models.registry import methods_help

            self.epilog = methods_help()
        return super().format_help()


DESCRIPTION = """Run one stage of the cropmap pipeline: cropmap <stage> --params JSON [paths].

Each stage is a Snakemake rule, a cropmap command and a module (cropmap.<stage>) of the
same name; the rules in workflow/rules call these, and each can be run by hand. --params is
the stage's slice of the config (cropmap.config.stage_params). An error prints one line
naming the file or config key and the fix (exit status 1), and a failed stage leaves no
outputs behind. --log FILE: all output goes into FILE, the error line to stderr as well."""

#: ``cropmap <stage>``: what each stage does, as ``cropmap --help`` lists it.
STAGES: dict[str, str] = {
    "fetch": "fetch every modality of a region from its source into raw/ (+ availability.json)",
    "stack": "align each fetched modality onto the region grid (one GeoTIFF per modality)",
    "labels": "rasterise labelled fields onto the grid and split it into spatial blocks",
    "samples": "read a training set's tables: samples on its season, classes, spatial groups and split (samples.npz)",
    "fold": "labels and chips, or samples, of one fold of spatial cross-validation (compare.folds)",
    "chips": "enumerate segmentation chips with split and per-sensor presence (chips.parquet)",
    "train": "train a co-learning model of a region or training set (model.ckpt + train_summary.json)",
    "pretrain": "self-supervised pretraining (no labels) of the imt encoder or of the pixel methods' sensor encoders",
    "predict": "predict one tile of a region with whichever sensors each pixel has",
    "mosaic": "mosaic the tiles into the map COG, a quicklook PNG and a STAC item",
    "expected_f1": "per pixel, the held-out weighted F1 of the sensor subset it was mapped with",
    "coverage": "what the map could not see: nodata share, empty tiles, months without data",
    "metrics": "held-out metrics and confusion counts for every non-empty subset of sensors",
    "area": "error-adjusted area per class with confidence intervals, user's, producer's and overall accuracy",
    "compare": "the method comparison: table.csv, summary.csv and a heatmap from per-method tables",
    "report": "one self-contained HTML page over every region: maps, accuracy, area, what would help",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``cropmap`` argument parser."""
    ap = _Parser(prog="cropmap", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="stage", required=True, metavar="<stage>")

    def add(name: str, fn: Any, *args: str, **flags: dict[str, Any]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=STAGES[name], description=STAGES[name])
        sp.add_argument("--params", default="{}", help="stage parameters as JSON (see cropmap.config.stage_params)")
        sp.add_argument("--log", default=None, help="write all output into this file; the final error line also goes to stderr")
        for arg in args:
            sp.add_argument(f"--{arg.replace('_', '-')}", dest=arg, required=True)
        for arg, kw in flags.items():
            sp.add_argument(f"--{arg.replace('_', '-')}", dest=arg, **kw)
        sp.set_defaults(fn=fn)
        return sp

    add("fetch", cmd_fetch, "raw_dir", "cache_dir", "availability")
    add("stack", cmd_stack, "raw_dir", "out_dir", threads={"default": None, "help": "local threads (default $CROPMAP_THREADS or 1)"},
        chunk={"default": os.environ.get("CROPMAP_DASK_CHUNK") or 512, "help": "chunk side in pixels (dask.chunk_size; default $CROPMAP_DASK_CHUNK)"},
        dask_scheduler={"default": os.environ.get("CROPMAP_DASK_SCHEDULER", ""),
                        "help": "address of a running dask.distributed scheduler (dask.scheduler; default $CROPMAP_DASK_SCHEDULER)"})
    add("labels", cmd_labels, "raw_dir", "out_tif", "out_gpkg")
    inputs = {"nargs": "+", "default": None,
              "help": "the rule's inputs, told apart by kind: a stack folder, labels .tif, chips .parquet, samples .npz, a fold folder"}
    add("samples", cmd_samples, "out")
    add("fold", cmd_fold, "fold", "out_dir", inputs=inputs, labels={"default": None}, chips={"default": None},
        samples={"default": None})
    add("chips", cmd_chips, "stack_dir", "labels", "out")
    add("train", cmd_train, "out", "work_dir", inputs=inputs, stack_dir={"default": None}, labels={"default": None},
        chips={"default": None}, samples={"default": None, "help": "a training set's samples.npz (instead of a region's data)"},
        task={"choices": ["classification", "segmentation"], "required": True},
        summary={"default": None, "help": "training summary JSON (default train_summary.json beside --out)"})
    add("pretrain", cmd_pretrain, "out", inputs=inputs, stack_dir={"default": None}, labels={"default": None},
        chips={"default": None}, samples={"default": None, "help": "a training set's samples.npz (kind pixel)"},
        kind={"choices": ["imt", "pixel"], "default": "imt",
              "help": "imt: the imt chip encoder; pixel: the pixel methods' per-sensor encoders"})
    add("predict", cmd_predict, "model", "stack_dir", "tile", "out")
    add("mosaic", cmd_mosaic, "out", "quicklook", "stac", tiles_dir={"default": None}, tiles={"nargs": "*", "default": []},
        proba={"default": None}, model={"default": None, "help": "model.ckpt that drew the tiles: its class table is the legend "
                                                             "(default the config's classes)"})
    add("expected_f1", cmd_expected_f1, "map", "metrics", "out")
    add("coverage", cmd_coverage, "map", "stack_dir", "out")
    add("metrics", cmd_metrics, "model", "out", inputs=inputs, stack_dir={"default": None}, labels={"default": None},
        chips={"default": None}, samples={"default": None, "help": "a training set's samples.npz (its test split is scored)"},
        tag={"action": "append", "default": [], "help": "KEY=VALUE column added to every row (e.g. method=comiss)"},
        confusion={"default": None, "help": "also write the confusion counts of every subset here (subset,true,pred,count)"})
    add("area", cmd_area, "map", "labels", "out_csv", "out_json")
    add("compare", cmd_compare, "table", "summary", parts={"nargs": "+", "required": True}, heatmap={"default": None})
    add("report", cmd_report, "regions", "out", compare={"default": None, "help": "results/compare/table.csv, shown when it exists"})
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cropmap`` console script."""
    args = build_parser().parse_args(argv)

    def stage() -> None:
        check_inputs(args)
        args.fn(args, parse_params(args.params))

    return run_stage(args.stage, stage, output_paths(args), Path(args.log) if args.log else None, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
