# Helpers and input functions shared by the rule files.
import os
import sys
from types import SimpleNamespace

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
    is_training_set,
    model_region,
    pretrain_path,
    region_files,
    region_grid,
    stage_params,
    table_files,
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
# Labelled sample tables (rule samples); they share the {region} wildcard and the data/,
# models/ and results/ folders with the regions (the config keeps the names apart).
TRAINING_SETS = list(config["training_sets"])
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


def task_of(name):
    """The task of a region's or training set's model (training sets train pixel classifiers)."""
    return "classification" if is_training_set(config, name) else TASK


def model_of(wc):
    """The model that maps a region: its own, or that of its model_from region or training set."""
    frm = model_region(config, wc.region)
    return f"{MODELS}/{frm}/{task_of(frm)}/model.ckpt"


def labelled_regions():
    return [r for r in REGIONS if has_labels(config, r)]


def training_data(wc):
    """The inputs of the train rule. A region's model trains on its stacks, labels and chips,
    a training set's on its samples."""
    if is_training_set(config, wc.region):
        return {"samples": f"{DATA}/{wc.region}/samples.npz"}
    return {
        "stack": f"{DATA}/{wc.region}/stack",
        "labels": f"{DATA}/{wc.region}/labels.tif",
        "chips": f"{DATA}/{wc.region}/chips.parquet",
    }


def split_data(wc):
    """The inputs of the fold rule. It re-splits a region's labels and chips or a training set's samples."""
    return {k: v for k, v in training_data(wc).items() if k != "stack"}


def fold_data(wc):
    """Training data of one cross-validation fold. With compare.folds 1 it is the workflow's own
    split, else the fold's copy that the fold rule writes (plus a region's stacks)."""
    if config["compare"]["folds"] == 1:
        return training_data(wc)
    data = {"fold": f"{DATA}/{wc.region}/folds/{wc.fold}"}
    if not is_training_set(config, wc.region):
        data["stack"] = f"{DATA}/{wc.region}/stack"
    return data


def pretrained_input(method, region, task, fold=None):
    """The pretrain checkpoint a training job needs (none unless model.pretrain.enabled and the
    method is imt or a pixel method; a comparison fold's own with compare.folds > 1)."""
    if not uses_pretraining(config, method, task):
        return []
    return [pretrain_path(config, region, method, task, fold)]


def pretrain_kind_of(wc):
    """The kind of the pretrain job: imt or pixel (the checkpoint's name)."""
    return wc.ckpt.rsplit("/", 1)[-1]


def pretrain_data(wc):
    """The inputs of the pretrain rule: the imt encoder reads a region's stacks, labels and chips;
    the pixel encoders a region's or training set's data, or one comparison fold's."""
    if wc.ckpt.startswith("fold"):
        return fold_data(SimpleNamespace(region=wc.region, fold=wc.ckpt[len("fold") :].split("/")[0]))
    return training_data(wc)


def report_files(region):
    """What the report shows of a region; the training summary (rule train's output) is that of
    the model that mapped it (model_from)."""
    frm = model_region(config, region)
    summary = expand(rules.train.output.summary, region=frm, task=task_of(frm))[0]
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
