# Helpers and input functions shared by the rule files.
import os
import sys

# Jobs run `python -m cropmap`: make the package importable from this checkout in any
# environment that has its dependencies (a venv, or the conda env of envs/cropmap.yaml).
SRC = os.path.join(workflow.basedir, "src")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)


envvars:
    "PYTHONPATH",


from cropmap.config import (
    compare_regions,
    compare_task,
    dumps,
    gpu_count as gpus,
    has_labels,
    model_region,
    pretrain_path,
    region_grid,
    stage_params,
    uses_pretraining,
    validate,
)
from cropmap.config_checks import check_local_devices
from cropmap.errors import ConfigError
from cropmap.grid import tiles as tile_names

try:
    validate(config)
except ConfigError as exc:
    sys.exit(f"cropmap: invalid config: {exc}")


onstart:
    # Whether CUDA is there is known only where the jobs run: here when they run locally (on a
    # cluster every job checks its own node, cropmap.device.resolve_device).
    if workflow.local_exec:
        try:
            check_local_devices(config)
        except ConfigError as exc:
            sys.exit(f"cropmap: invalid config: {exc}")

# The software environment of every rule (--software-deployment-method conda), relative to the
# rule files in workflow/rules.
CONDA_ENV = "../../envs/cropmap.yaml"

DATA = config["data_dir"]
RESULTS = config["results_dir"]
MODELS = config["models_dir"]
REGIONS = list(config["regions"])
TASK = config["model"]["task"]
# How the stack stage parallelises (never what it computes) goes to the jobs through the
# environment, not the rules' params, so pointing at another dask cluster reruns nothing.
os.environ.update(
    CROPMAP_DASK_SCHEDULER=config["dask"]["scheduler"] or "",
    CROPMAP_DASK_CHUNK=str(config["dask"]["chunk_size"]),
)


envvars:
    "CROPMAP_DASK_SCHEDULER",
    "CROPMAP_DASK_CHUNK",


wildcard_constraints:
    region="[a-z0-9_-]+",
    task="classification|segmentation",
    tile="r[0-9]+_c[0-9]+",
    method="[a-z_]+",
    fold="[0-9]+",


def params_json(stage):
    """Input function: the stage's slice of the config as JSON (rerun trigger per region)."""
    return lambda wc: dumps(stage_params(config, stage, wc.region))


def region_tiles(region):
    return tile_names(region_grid(config["regions"][region]), config["prediction"]["tile_size"])


def model_of(wc):
    """The model that maps a region: its own, or that of its model_from region."""
    return f"{MODELS}/{model_region(config, wc.region)}/{TASK}/model.ckpt"


def labelled_regions():
    return [r for r in REGIONS if has_labels(config, r)]


def fold_inputs(wc):
    """Labels and chips of one cross-validation fold: the labels stage's own split when
    compare.folds is 1, else the fold's copy written by rule fold."""
    if config["compare"]["folds"] == 1:
        return {"labels": f"{DATA}/{wc.region}/labels.tif", "chips": f"{DATA}/{wc.region}/chips.parquet"}
    return {
        "labels": f"{DATA}/{wc.region}/folds/{wc.fold}/labels.tif",
        "chips": f"{DATA}/{wc.region}/folds/{wc.fold}/chips.parquet",
    }


def pretrained_input(method, region):
    """The pretrain checkpoint a training job needs (none unless imt with model.pretrain.enabled)."""
    return [pretrain_path(config, region)] if uses_pretraining(config, method) else []


def report_files(region):
    """What the report shows of a region; the training summary (rule train's output) is that of
    the model that mapped it (model_from)."""
    summary = expand(rules.train.output.summary, region=model_region(config, region), task=TASK)[0]
    labelled = has_labels(config, region)
    return {
        "map": f"{RESULTS}/{region}/map.tif",
        "metrics": f"{RESULTS}/{region}/metrics.csv" if labelled else "",
        "confusion": f"{RESULTS}/{region}/confusion.csv" if labelled else "",
        "area": f"{RESULTS}/{region}/area.json" if labelled else "",
        "subset_metrics": f"{RESULTS}/{model_region(config, region)}/metrics.csv",
        "quicklook": f"{RESULTS}/{region}/quicklook.png",
        "availability": f"{DATA}/{region}/availability.json",
        "summary": summary,
        "expected": f"{RESULTS}/{region}/expected_f1.tif",
        "coverage": f"{RESULTS}/{region}/coverage.json",
    }
