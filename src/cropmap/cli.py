"""Command line of the pipeline stages: ``cropmap <stage> --params JSON [paths]``.

One vocabulary: each stage is a Snakemake rule, a ``cropmap`` command and a module of the same
name (rule ``mosaic`` runs ``cropmap mosaic``, :mod:`cropmap.mosaic`). The rules call these;
each one can also be run by hand. ``--params`` is the JSON produced by
:func:`cropmap.config.stage_params`. Errors of cropmap itself are printed as one line (the
message names the file or key and the fix) with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cropmap.errors import CropmapError
from cropmap.grid import Grid

log = logging.getLogger("cropmap")


def _grid(p: dict) -> Grid:
    return Grid(**p["grid"])


def _checked_stacks(a: argparse.Namespace, p: dict[str, Any], window: Any = None) -> None:
    """Stop with one line naming the file and the fix if a stack is corrupt or off the grid."""
    from cropmap.io import check_stacks

    check_stacks(Path(a.stack_dir), _grid(p), p["modalities"], window=window)


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
               layer=lab.get("layer"), block_size=p["split"]["block_size"], fractions=p["split"]["fractions"], seed=p["seed"])


def cmd_fold(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import fold

    fold.write_fold(Path(a.labels), Path(a.chips), Path(a.out_tif), Path(a.out_chips), _grid(p),
                      block_size=p["split"]["block_size"], fractions=p["split"]["fractions"], seed=p["seed"],
                      folds=p["folds"], fold=int(a.fold))


def cmd_chips(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import chips

    _checked_stacks(a, p)
    chips.run(Path(a.stack_dir), Path(a.labels), Path(a.out), _grid(p), p["months"], p["modalities"], p["size"], p["min_valid_fraction"])


def cmd_train(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import train

    _checked_stacks(a, p)
    settings = train.TrainSettings.from_config(p, a.task, p["months"])
    summary = train.run(settings, Path(a.stack_dir), Path(a.labels), Path(a.chips), _grid(p), Path(a.out), Path(a.work_dir),
                        summary_json=Path(a.summary) if a.summary else None)
    log.info("trained: %s", json.dumps(summary))


def cmd_pretrain(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import pretrain

    pt = p["pretrain"]
    summary = pretrain.run(Path(a.stack_dir), Path(a.chips), _grid(p), p["months"], p["modalities"], Path(a.out),
                           preset=p["preset"], epochs=pt["epochs"], batch_size=pt["batch_size"], lr=pt["lr"],
                           seed=p["seed"], device=p["device"], min_valid_fraction=p["min_valid_fraction"],
                           labels_tif=Path(a.labels))
    log.info("pretrained: %s", json.dumps(summary, default=str))


def cmd_predict(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import predict
    from cropmap.grid import tile_window

    pr = p["prediction"]
    _checked_stacks(a, p, window=tile_window(_grid(p), a.tile, pr["tile_size"]))
    predict.run(Path(a.model), Path(a.stack_dir), _grid(p), a.tile, Path(a.out), tile_size=pr["tile_size"],
                modalities=p["modalities"], chip_size=p["chip_size"], overlap=pr["overlap"], batch_size=pr["batch_size"],
                device=pr["device"], probabilities=pr["probabilities"], precision=pr["precision"])


def cmd_mosaic(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import mosaic

    tiles = sorted(Path(a.tiles_dir).glob("*.tif")) if a.tiles_dir else [Path(t) for t in a.tiles]
    tags = {"cropmap_region": p["region"], "cropmap_method": p["model"]["method"], "cropmap_task": p["model"]["task"],
            "cropmap_season": f"{p['months'][0]}/{p['months'][-1]}", "cropmap_sources": json.dumps(p["sources"])}
    out = Path(a.out)
    mosaic.mosaic_to_cog(tiles, out, _grid(p), p["classes"], tags=tags, proba_out=Path(a.proba) if a.proba else None)
    mosaic.quicklook(out, Path(a.quicklook), p["classes"], title=f"cropmap {p['region']} ({p['model']['method']})")
    mosaic.stac_item(out, Path(a.stac), p["region"], p["classes"], bbox=p["bbox"], months=p["months"], sources=p["sources"], model=p["model"],
                   proba_tif=Path(a.proba) if a.proba else None)


def cmd_expected_f1(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import expected_f1

    mean = expected_f1.run(Path(a.map), Path(a.metrics), Path(a.out))
    log.info("mean expected weighted F1 over mapped pixels: %.1f", mean)


def cmd_metrics(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import metrics

    _checked_stacks(a, p)
    ev = p["evaluation"]
    df = metrics.evaluate(Path(a.model), Path(a.stack_dir), Path(a.labels), Path(a.chips), _grid(p),
                         max_pixels_per_class=ev["max_pixels_per_class"], seed=p["seed"],
                         device=p["prediction"]["device"], batch_size=p["prediction"]["batch_size"],
                         precision=p["prediction"]["precision"])
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

    summary = coverage.summarise(Path(a.map), Path(a.stack_dir), _grid(p), p["months"], p["modalities"], p["tile_size"])
    coverage.write(summary, Path(a.out))
    log.info("coverage: %.1f %% nodata pixels, %d of %d tiles without any sensor, months without data: %s",
             100 * summary["nodata_share"], len(summary["empty_tiles"]), summary["tiles"],
             ", ".join(summary["months_without_data"]) or "none")


def cmd_area(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import area

    s = area.run(Path(a.map), Path(a.labels), p["classes"], Path(a.out_csv), Path(a.out_json))
    log.info("area: %d reference pixels on %d mapped pixels; overall accuracy %s", s["sample_px"], s["mapped_px"],
             "n/a" if s["overall_accuracy"] is None else f"{s['overall_accuracy']:.3f} +- {1.96 * (s['overall_accuracy_se'] or 0):.3f}")


def cmd_compare(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import compare

    table = compare.collect([Path(x) for x in a.parts], Path(a.table), Path(a.summary), Path(a.heatmap) if a.heatmap else None)
    log.info("summary:\n%s", compare.summarise(table).round(1).to_string(index=False))


def cmd_report(a: argparse.Namespace, p: dict[str, Any]) -> None:
    from cropmap import report

    regions = {name: {k: Path(v) for k, v in files.items()} for name, files in json.loads(a.regions).items()}
    report.html_report(regions, Path(a.out), compare_table=Path(a.compare) if a.compare else None)


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
naming the file or config key and the fix (exit status 1)."""

#: ``cropmap <stage>``: what each stage does, as ``cropmap --help`` lists it.
STAGES: dict[str, str] = {
    "fetch": "fetch every modality of a region from its source into raw/ (+ availability.json)",
    "stack": "align each fetched modality onto the region grid (one GeoTIFF per modality)",
    "labels": "rasterise labelled fields onto the grid and split it into spatial blocks",
    "fold": "labels and chips of one fold of spatial cross-validation (compare.folds)",
    "chips": "enumerate segmentation chips with split and per-sensor presence (chips.parquet)",
    "train": "train a co-learning model of a region (model.ckpt + train_summary.json)",
    "pretrain": "self-supervised pretraining of the imt encoder on a region's stacks",
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
    add("fold", cmd_fold, "labels", "chips", "fold", "out_tif", "out_chips")
    add("chips", cmd_chips, "stack_dir", "labels", "out")
    add("train", cmd_train, "stack_dir", "labels", "chips", "out", "work_dir",
        task={"choices": ["classification", "segmentation"], "required": True},
        summary={"default": None, "help": "training summary JSON (default train_summary.json beside --out)"})
    add("pretrain", cmd_pretrain, "stack_dir", "labels", "chips", "out")
    add("predict", cmd_predict, "model", "stack_dir", "tile", "out")
    add("mosaic", cmd_mosaic, "out", "quicklook", "stac", tiles_dir={"default": None}, tiles={"nargs": "*", "default": []},
        proba={"default": None})
    add("expected_f1", cmd_expected_f1, "map", "metrics", "out")
    add("coverage", cmd_coverage, "map", "stack_dir", "out")
    add("metrics", cmd_metrics, "model", "stack_dir", "labels", "chips", "out",
        tag={"action": "append", "default": [], "help": "KEY=VALUE column added to every row (e.g. method=comiss)"},
        confusion={"default": None, "help": "also write the confusion counts of every subset here (subset,true,pred,count)"})
    add("area", cmd_area, "map", "labels", "out_csv", "out_json")
    add("compare", cmd_compare, "table", "summary", parts={"nargs": "+", "required": True}, heatmap={"default": None})
    add("report", cmd_report, "regions", "out", compare={"default": None, "help": "results/compare/table.csv, shown when it exists"})
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cropmap`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = json.loads(args.params)
    try:
        args.fn(args, params)
    except CropmapError as exc:
        print(f"cropmap {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
