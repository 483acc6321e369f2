"""Stage ``train``: fit a co-learning model (pixel classification or chip segmentation).

Lightning drives the loop: CUDA with bf16 autocast when a GPU is present, CPU otherwise,
seeded, early stopping on the validation split (never the test split), a progress bar on a
terminal (one line per epoch in a log), and ``last.ckpt`` after every epoch so a killed run
resumes where it stopped. The final
``model.ckpt`` is a plain ``torch.save`` bundle (:mod:`cropmap.predict.bundle`): weights, the
factory arguments, the normalisation statistics, the class table, modalities and months.
``train_summary.json`` (also inside the bundle) says how training went, with the per-epoch
history of every logged loss term and validation metric (:class:`~cropmap.loop.EpochHistory`).
The Lightning module, samplers and RNG state are in :mod:`cropmap.loop`.

Resuming is exact: the training order of epoch ``e`` is a permutation drawn from
``(seed, e)`` (:class:`~cropmap.loop.EpochShuffleSampler`), the data loaders draw from their own generators,
and ``last.ckpt`` carries the global RNG states (restored at the start of the next epoch), so a
run killed after any epoch and resumed writes the same weights as an uninterrupted one.
``work_dir/resume.json`` fingerprints the settings and input files: a checkpoint left by other
settings or other data is discarded instead of resumed. Several devices (``training.devices``,
``training.strategy`` e.g. ``ddp``) shard each epoch's permutation by rank; only global rank 0
writes ``model.ckpt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cropmap.blend import Blend, Blended, fit_weights, trees_kwargs
from cropmap.calibration import subset_logits
from cropmap.datasets import PixelSamples, sample_pixels
from cropmap.device import check_devices, resolve_device
from cropmap.errors import LabelError
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.io import fingerprint as io_fingerprint
from cropmap.loop import (
    VAL_SUBSET_SAMPLES,
    BalancedEpochSampler,
    CoLearningModule,
    EpochHistory,
    EpochShuffleSampler,
    PixelDataset,
)
from cropmap.modalities import channels_per_step, resolve_bands
from cropmap.models import build_model
from cropmap.models.pixel_pretrain import init_module
from cropmap.normalize import Normalizer, fit_stats
from cropmap.predict.bundle import save_bundle
from cropmap.progress import on_terminal

log = logging.getLogger(__name__)

Task = Literal["classification", "segmentation"]
def fingerprint(settings: TrainSettings, files: Sequence[Path] = ()) -> str:
    """Digest of the settings and of the inputs' names, sizes and mtimes (what a resume must match)."""
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns) for f in sorted(Path(p) for p in files) for st in [f.stat()]]
    return io_fingerprint({"settings": settings.__dict__, "files": stats})


def resume_checkpoint(work_dir: Path, digest: str) -> Path | None:
    """``last.ckpt`` to resume from, or ``None`` (stale checkpoints of other settings are deleted).

    Under DDP the launching process decides and its children inherit the decision through
    ``CROPMAP_RESUME_FROM`` (a child must not look again: rank 0 may have written a checkpoint).
    """
    if "CROPMAP_RESUME_FROM" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(os.environ["CROPMAP_RESUME_FROM"]) if os.environ["CROPMAP_RESUME_FROM"] else None
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = work_dir / "resume.json"
    last = work_dir / "last.ckpt"
    old = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
    resume: Path | None = None
    if last.exists() and old == digest:
        try:
            torch.load(last, map_location="cpu", weights_only=False)
            resume = last
        except Exception as exc:  # a checkpoint cut short by a crash: start over
            log.warning("%s is unreadable (%s); training from scratch", last, type(exc).__name__)
    elif last.exists():
        log.warning("%s was written with other settings or inputs; training from scratch", last)
    if resume is None:
        for f in work_dir.glob("*.ckpt"):
            f.unlink()
    stamp.write_text(json.dumps({"fingerprint": digest}))
    os.environ["CROPMAP_RESUME_FROM"] = str(resume or "")
    return resume


@dataclass
class TrainSettings:
    """What ``train`` needs from the config (``training`` + ``model`` blocks)."""

    task: Task
    method: str
    modalities: list[str]
    months: list[str]
    classes: list[dict]
    seed: int = 42
    hidden: int = 128
    encoders: dict[str, str] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    patience: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    pixels_per_class: int = 3000
    device: str = "auto"
    precision: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_workers: int = 0
    min_valid_fraction: float = 0.5
    bands: dict[str, list[str]] = field(default_factory=dict)
    windows_per_epoch: int | None = None
    window_augment: bool = True
    cache_mb: int = 2048
    weight_decay: float = 0.0
    schedule: Literal["none", "cosine"] = "none"
    balance: Literal["loss", "sampler", "none"] = "loss"
    monitor: Literal["val_loss", "val_f1"] = "val_loss"
    augment: dict[str, float] = field(default_factory=dict)
    calibration: Literal["none", "global", "subset"] = "subset"
    blend: Blend = "none"
    #: most training pixels the blend's trees are fitted on (a seeded random subset)
    blend_pixels: int = 4000
    #: hyper-parameters of the blend's trees (options of :class:`cropmap.models.trees.TreesDedicated`)
    blend_options: dict[str, Any] = field(default_factory=dict)
    #: pixel methods: checkpoint of the pretrain stage whose encoders fine-tuning starts from
    pretrained: str | None = None
    #: folder of fitted trees shared by the runs of one comparison fold (:func:`fit_trees`)
    trees_cache: str | None = None

    @classmethod
    def from_config(cls, config: dict, task: Task, months: list[str]) -> TrainSettings:
        """Settings of ``task``: a segmentation run takes ``training.segmentation``'s recipe
        (epochs, patience, batch size, learning rate, windows, augmentation, cache) over the
        ``training`` keys, which stay the pixel classifier's."""
        t, m = config["training"], config["model"]
        seg = t.get("segmentation", {})
        if task == "segmentation":  # its augment (quarter turns and flips of windows) is window_augment
            t = {**t, **{k: v for k, v in seg.items() if k != "augment"}}
        return cls(
            task=task, method=m["method"], modalities=list(config["modalities"]), months=months,
            classes=config["classes"], seed=config["seed"], hidden=m["hidden"], encoders=m.get("encoders", {}),
            method_options=m.get("options", {}), epochs=t["epochs"], patience=t["patience"], batch_size=t["batch_size"],
            lr=t["lr"], pixels_per_class=t["pixels_per_class"], device=t["device"], precision=t["precision"],
            devices=t["devices"], strategy=t["strategy"], num_workers=t["num_workers"],
            min_valid_fraction=config["availability"]["min_valid_fraction"],
            bands={m: list(b) for m, b in (config.get("bands") or {}).items()},
            windows_per_epoch=t.get("windows_per_epoch"), window_augment=bool(seg.get("augment", True)),
            cache_mb=t.get("cache_mb", 2048),
            weight_decay=t["weight_decay"], schedule=t["schedule"], balance=t["balance"], monitor=t["monitor"],
            augment=dict(config["training"]["augment"]), calibration=t["calibration"], blend=t["blend"],
            blend_pixels=t["blend_pixels"], blend_options=dict(t.get("blend_options", {})),
            pretrained=m.get("pretrain", {}).get("checkpoint"), trees_cache=config.get("trees_cache"),
        )

    def resolved_bands(self) -> dict[str, list[str]]:
        """The bands of every modality of the model (configured ones, else every band)."""
        full = resolve_bands(self.bands)
        return {m: list(full[m]) for m in self.modalities}

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`cropmap.models.build_model` (without class weights)."""
        return {
            "method": self.method, "task": self.task, "modalities": self.modalities,
            "in_channels": channels_per_step(self.bands, self.modalities), "n_steps": len(self.months),
            "n_classes": n_classes(self.classes), "hidden": self.hidden, "encoders": self.encoders or None,
            **self.method_options,
        }

    def recipe(self) -> dict[str, Any]:
        """What :class:`CoLearningModule` needs of the recipe (weight decay, schedule, augmentations, monitor)."""
        return {"weight_decay": self.weight_decay, "schedule": self.schedule, "augment": dict(self.augment),
                "monitor": self.monitor}


def n_classes(classes: Sequence[dict]) -> int:
    """Number of logits: the largest class id + 1."""
    return max(c["id"] for c in classes) + 1


def accelerator(device: str) -> str:
    """Lightning accelerator for ``training.device`` (:func:`cropmap.device.resolve_device`)."""
    return "gpu" if resolve_device(device, "training.device").type == "cuda" else "cpu"


def precision(setting: str, acc: str) -> str:
    """Lightning precision: ``auto`` is bf16 autocast on GPU and fp32 on CPU."""
    if setting == "auto":
        return "bf16-mixed" if acc == "gpu" else "32-true"
    return "32-true" if setting == "32" else setting


def balanced_weights(y: np.ndarray, k: int) -> list[float]:
    """Class-balanced CE weights ``N / (K_present * n_c)``; absent classes get 1."""
    y = y[y >= 0]
    counts = np.bincount(y, minlength=k).astype(float)
    present = counts > 0
    w = np.ones(k)
    w[present] = len(y) / (present.sum() * counts[present])
    return w.tolist()


def chip_stats(ds: Dataset, n: int, seed: int) -> dict:
    """Normalisation statistics from up to ``n`` training chips (items of the ``ChipDataset`` layout)."""
    rng = np.random.default_rng(seed)
    size = len(ds)  # type: ignore[arg-type]
    idx = rng.choice(size, size=min(n, size), replace=False)
    items = [ds[int(i)] for i in idx]
    return fit_stats({m: torch.stack([it[m] for it in items]).numpy() for m in ds.modalities}, "chips", ds.channels)  # type: ignore[attr-defined]


def run(settings: TrainSettings, stack_dir: Path, labels_tif: Path, chips_parquet: Path, grid: Grid,
        out_ckpt: Path, work_dir: Path, summary_json: Path | None = None) -> dict[str, Any]:
    """Train and write ``model.ckpt``; resume from ``work_dir/last.ckpt`` if a previous run was killed.

    Args:
        summary_json: where the training summary goes (default ``train_summary.json`` beside
            ``out_ckpt``).

    Returns:
        Training summary (epochs run, best validation loss, samples, device, per-epoch history).
    """
    torch.set_num_threads(max(1, int(os.environ.get("CROPMAP_THREADS", torch.get_num_threads()))))
    inputs = [labels_tif, chips_parquet, *sorted(stack_dir.glob("*.tif"))]
    pretrained = settings.method_options.get("pretrained")
    if pretrained and Path(pretrained).exists():
        inputs.append(Path(pretrained))
    chips = pd.read_parquet(chips_parquet)
    if settings.task == "classification":
        samples = sample_pixels(stack_dir, labels_tif, chips[chips.split != "test"], grid, settings.months,
                                settings.modalities, settings.pixels_per_class, settings.min_valid_fraction,
                                settings.seed, splits=("train", "val"), bands=settings.bands)
        train_s, val_s = samples.subset(np.flatnonzero(samples.split == 0)), samples.subset(np.flatnonzero(samples.split == 1))
        return fit_pixels(settings, train_s, val_s, out_ckpt, work_dir, inputs=inputs, summary_json=summary_json)
    return fit_chips(settings, stack_dir, labels_tif, chips, out_ckpt, work_dir, inputs=inputs, summary_json=summary_json)


def run_samples(settings: TrainSettings, samples_npz: Path, out_ckpt: Path, work_dir: Path,
                summary_json: Path | None = None) -> dict[str, Any]:
    """Train on a training set's samples (``samples.npz`` of the samples or fold stage).

    The samples' months, bands, modalities and class table replace the settings' (they are what
    the samples hold); up to ``pixels_per_class`` samples per class of the train and val splits
    are used, as for a region's pixels. Same loop and bundle as :func:`run`.
    """
    from cropmap.samples import cap_per_class, read_samples

    torch.set_num_threads(max(1, int(os.environ.get("CROPMAP_THREADS", torch.get_num_threads()))))
    s = read_samples(samples_npz)
    settings = replace(settings, task="classification", months=s.months, modalities=list(s.samples.modalities),
                       bands=s.bands, classes=s.classes)
    train_s = cap_per_class(s.part(0), settings.pixels_per_class, settings.seed)
    val_s = cap_per_class(s.part(1), settings.pixels_per_class, settings.seed + 1)
    return fit_pixels(settings, train_s, val_s, out_ckpt, work_dir, inputs=[samples_npz], summary_json=summary_json)


def fit_chips(settings: TrainSettings, stack_dir: Path, labels_tif: Path, chips: pd.DataFrame, out_ckpt: Path,
              work_dir: Path, inputs: Sequence[Path] = (), summary_json: Path | None = None) -> dict[str, Any]:
    """Train a segmentation model on the labelled chips of the train and val splits.

    The chips are read once into memory (:func:`cropmap.segdata.read_chips`, at most
    ``cache_mb``: a random subset of the training chips when more are labelled); every epoch
    draws ``windows_per_epoch`` random windows (default: one per training chip) with random
    quarter turns and flips (:class:`cropmap.segdata.RandomWindowSampler`). Validation uses
    the val chips as they are.
    """
    from cropmap.segdata import CachedChips, RandomWindowSampler, chip_bytes, read_chips

    labelled = chips[chips.n_labelled > 0]
    tr, va = labelled[labelled.split == "train"], labelled[labelled.split == "val"]
    if len(tr) == 0 or len(va) == 0:
        raise LabelError(f"{labels_tif}: {len(tr)} training and {len(va)} validation chips with labels; enlarge the region or lower split.block_size")
    per_chip = chip_bytes(int(tr["size"].iloc[0]), settings.months, settings.modalities, settings.bands)
    fit_n = max(1, settings.cache_mb * 2**20 // per_chip - len(va))
    if len(tr) > fit_n:
        log.warning("%d training chips do not fit in training.segmentation.cache_mb=%d; training on a random %d",
                    len(tr), settings.cache_mb, fit_n)
        tr = tr.sample(n=fit_n, random_state=settings.seed).sort_index()
    read = {name: read_chips(stack_dir, labels_tif, part, settings.months, settings.modalities, settings.min_valid_fraction,
                             bands=settings.bands)
            for name, part in (("train", tr), ("val", va))}
    log.info("chips in memory: %d train, %d val (%.0f MB)", len(read["train"]), len(read["val"]),
             sum(c.nbytes for c in read.values()) / 2**20)
    train_ds, val_ds = CachedChips(read["train"]), CachedChips(read["val"])
    sampler = RandomWindowSampler(train_ds.nbr, read["train"].size, settings.windows_per_epoch or len(train_ds),
                                  settings.seed, settings.window_augment)
    weights = balanced_weights(read["train"].y.ravel(), n_classes(settings.classes))
    return fit(settings, train_ds, val_ds, chip_stats(train_ds, 256, settings.seed), weights, out_ckpt, work_dir,
               inputs=inputs, summary_json=summary_json, sampler=sampler)


def fit_pixels(settings: TrainSettings, train_s: PixelSamples, val_s: PixelSamples, out_ckpt: Path, work_dir: Path,
               inputs: Sequence[Path] = (), summary_json: Path | None = None) -> dict[str, Any]:
    """Train a classification model on in-memory pixel samples (regions or sample tables).

    Normalisation statistics and class weights come from ``train_s`` only; ``inputs`` are the
    files the samples came from (a checkpoint is resumed only if they did not change).
    ``training.balance``: ``loss`` weights the supervised loss by inverse class frequency,
    ``sampler`` draws class-balanced epochs (:class:`BalancedEpochSampler`) with an unweighted
    loss, ``none`` does neither.
    """
    if len(train_s) == 0 or len(val_s) == 0:
        raise LabelError(f"{len(train_s)} training and {len(val_s)} validation pixels with a sensor: both splits need labelled samples; "
                         "check the labels cover the region where its stacks have data")
    stats = fit_stats(train_s.x, "pixels")
    weights = balanced_weights(train_s.y, n_classes(settings.classes)) if settings.balance == "loss" else None
    return fit(settings, PixelDataset(train_s), PixelDataset(val_s), stats, weights, out_ckpt, work_dir, inputs=inputs,
               summary_json=summary_json)


def normalised_batches(norm: Normalizer, ds: PixelDataset, size: int = 4096) -> list[dict[str, Tensor]]:
    """Normalised batches ``{m, "mask", "y"}`` of a whole pixel dataset (fits outside the gradient loop)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(ds), size):
            b = {m: v[i : i + size] for m, v in ds.x.items()}
            out.append(norm(b) | {"mask": ds.mask[i : i + size], "y": ds.y[i : i + size]})
    return out


def fit(settings: TrainSettings, train_ds: Dataset, val_ds: Dataset, stats: dict, weights: list[float] | None,
        out_ckpt: Path, work_dir: Path, inputs: Sequence[Path] = (), summary_json: Path | None = None,
        sampler: EpochShuffleSampler | None = None) -> dict[str, Any]:
    """Fit the model and write the ``model.ckpt`` bundle (resuming the gradient loop from ``last.ckpt``).

    A gradient-free method (the tree references of :mod:`cropmap.models.trees`) is fitted by its
    ``fit_samples`` on the normalised training pixels instead of the Lightning loop. For pixel
    models, temperatures are then fitted on the validation pixels (``training.calibration``,
    :mod:`cropmap.calibration`) and stored in the bundle, which applies them on load.

    The checkpoints in ``work_dir`` are deleted once ``model.ckpt`` is written, so only a killed
    run is ever resumed. The summary goes to ``summary_json`` (default ``train_summary.json``
    beside ``out_ckpt``) and into the bundle. ``sampler`` draws the training items of each epoch
    (default: every item of ``train_ds`` once, shuffled by :class:`EpochShuffleSampler`).
    """
    L.seed_everything(settings.seed, workers=True)
    n_train, n_val = len(train_ds), len(val_ds)  # type: ignore[arg-type]
    acc = accelerator(settings.device)
    check_devices(settings.devices, on_gpu=acc == "gpu")
    prec = precision(settings.precision, acc)
    module = CoLearningModule(settings.model_kwargs(), stats, settings.lr, weights, settings.recipe())
    summary: dict[str, Any] = {"task": settings.task, "method": settings.method, "n_train": n_train, "n_val": n_val}
    if settings.pretrained:  # encoders (and normalisation) from the pretrain stage
        summary |= init_module(module, Path(settings.pretrained), settings.resolved_bands())
        inputs = [*inputs, Path(settings.pretrained)]
    pixels = isinstance(train_ds, PixelDataset) and isinstance(val_ds, PixelDataset)
    if getattr(module.model, "gradient_free", False):
        if not isinstance(train_ds, PixelDataset):
            raise LabelError(f"method {settings.method} classifies pixel time series; set model.task: classification")
        summary |= fit_trees(module.model, module.norm, train_ds, settings.trees_cache)
        summary |= {"epochs": 0, "accelerator": "cpu", "precision": "32-true", "resumed": False, "world_size": 1,
                    "strategy": settings.strategy, "history": []}
        rank, world = 0, 1
    else:
        loop = _lightning(settings, module, train_ds, val_ds, work_dir, inputs, acc, prec, sampler)
        if loop is None:
            return {}
        summary |= loop
        rank, world = 0, loop["world_size"]
    calibration, blended = None, None
    module.eval()
    if pixels:
        if settings.blend != "none" and not getattr(module.model, "gradient_free", False):
            blended, val_logits = blend_trees(settings, module, train_ds, val_ds)  # type: ignore[arg-type]
            summary["blend_weights"] = [round(float(w), 2) for w in blended.blend_weights]
        else:
            val_logits = subset_logits(module.model, normalised_batches(module.norm, val_ds), settings.modalities)  # type: ignore[arg-type]
        summary |= subset_f1(val_logits, len(settings.modalities))
        if settings.calibration != "none":
            calibration = calibrate(val_logits, len(settings.modalities), settings.calibration)
            summary["temperatures"] = [round(t, 4) for t in calibration["temperatures"]]
    save_bundle(out_ckpt, module.model, module.norm, model_kwargs=settings.model_kwargs(), classes=settings.classes,
                modalities=settings.modalities, months=settings.months, task=settings.task,
                min_valid_fraction=settings.min_valid_fraction, class_weights=module.hparams["class_weights"],
                summary=summary, bands=settings.resolved_bands(), calibration=calibration, blend=blended)
    with atomic_path(summary_json or out_ckpt.parent / "train_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    log.info("rank %d of %d: wrote %s", rank, world, out_ckpt)
    for f in work_dir.glob("*.ckpt"):  # done: nothing left to resume
        f.unlink()
    return summary


def fit_trees(model: torch.nn.Module, norm: Normalizer, train_ds: PixelDataset,
              cache_dir: str | None = None, max_pixels: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Fit a gradient-free model (:mod:`cropmap.models.trees`) on the normalised training pixels
    (reusing an identical fit from ``cache_dir``, :meth:`~cropmap.models.trees.TreesDedicated.fit_cached`),
    one classifier per torch thread at a time; on at most ``max_pixels`` of them (a random
    subset drawn with ``seed``) when given."""
    batch = normalised_batches(norm, train_ds, size=max(1, len(train_ds)))[0]
    n = len(batch["y"])
    if max_pixels is not None and n > max_pixels:
        rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n, max_pixels, replace=False)))
        batch = {k: v[rows] if isinstance(v, Tensor) and len(v) == n else v for k, v in batch.items()}
        log.info("trees fitted on %d of %d training pixels (training.blend_pixels)", max_pixels, n)
    fit_cached: Callable[..., dict[str, Any]] = model.fit_cached  # type: ignore[assignment]
    return fit_cached({m: batch[m].numpy() for m in model.modalities if m in batch},  # type: ignore[union-attr]
                      batch["mask"].numpy(), batch["y"].numpy(), cache_dir, torch.get_num_threads())


def blend_trees(settings: TrainSettings, module: CoLearningModule, train_ds: PixelDataset, val_ds: PixelDataset,
                ) -> tuple[Blended, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The trained network blended with per-subset trees fitted on the same training pixels
    (``training.blend``, :mod:`cropmap.blend`): weights per sensor subset chosen on the validation
    pixels. Also returns the blend's validation logits per subset (:func:`subset_logits`)."""
    from cropmap.models.trees import TreesDedicated

    trees = build_model(**trees_kwargs(settings.model_kwargs()), **settings.blend_options)
    assert isinstance(trees, TreesDedicated)
    t0 = time.perf_counter()
    fitted = fit_trees(trees, module.norm, train_ds, settings.trees_cache, settings.blend_pixels, settings.seed)
    log.info("blend: %d tree models fitted in %.0f s; choosing their weights on %d validation pixels",
             len(fitted["fitted_subsets"]), time.perf_counter() - t0, len(val_ds))
    val = normalised_batches(module.norm, val_ds)
    net_val, trees_val = subset_logits(module.model, val, settings.modalities), subset_logits(trees, val, settings.modalities)
    weights = fit_weights(net_val, trees_val, len(settings.modalities))
    log.info("blend with %s (%d subsets fitted): network weight per sensor subset %s", trees.method,
             len(fitted["fitted_subsets"]), [round(w, 2) for w in weights])
    blended = Blended(module.model, trees, weights).eval()
    return blended, blended.pool_subset_logits(net_val, trees_val)


def calibrate(val_logits: dict[int, tuple[np.ndarray, np.ndarray]], n_modalities: int, per: str) -> dict[str, Any]:
    """Temperatures per sensor subset fitted on the final model's validation logits
    (:func:`cropmap.calibration.subset_logits`): the bundle's ``calibration``."""
    from cropmap.calibration import fit_temperatures

    temps = fit_temperatures(val_logits, n_modalities, per)  # type: ignore[arg-type]
    log.info("temperatures per sensor subset (%s): %s", per, [round(t, 3) for t in temps])
    return {"per": per, "temperatures": temps}


def subset_f1(val_logits: dict[int, tuple[np.ndarray, np.ndarray]], n_modalities: int) -> dict[str, float]:
    """The final model's validation scores (what recipes are compared on): ``final_val_f1``, the
    weighted F1 (percent) averaged over every sensor subset, and ``final_val_f1_full`` (all sensors)."""
    from sklearn.metrics import f1_score

    f1 = {c: 100 * float(f1_score(y, lg.argmax(1), average="weighted", zero_division=0)) for c, (lg, y) in val_logits.items()}
    if not f1:
        return {}
    return {"final_val_f1": round(float(np.mean(list(f1.values()))), 2),
            "final_val_f1_full": round(f1.get(2**n_modalities - 1, float("nan")), 2)}


def _lightning(settings: TrainSettings, module: CoLearningModule, train_ds: Dataset, val_ds: Dataset, work_dir: Path,
               inputs: Sequence[Path], acc: str, prec: str, sampler: EpochShuffleSampler | None = None) -> dict[str, Any] | None:
    """The gradient loop; loads the best checkpoint into ``module``. None on ranks other than 0."""
    n_train = len(train_ds)  # type: ignore[arg-type]
    loader_kw: dict[str, Any] = {"num_workers": settings.num_workers, "persistent_workers": settings.num_workers > 0}
    if sampler is None:
        sampler = (BalancedEpochSampler(train_ds.y.numpy(), settings.seed)
                   if settings.balance == "sampler" and isinstance(train_ds, PixelDataset)
                   else EpochShuffleSampler(n_train, settings.seed))
    n_draws = sampler.n
    # own generators: creating a loader's iterator must not draw from the global RNG
    train_dl = DataLoader(train_ds, batch_size=settings.batch_size, sampler=sampler,
                          generator=torch.Generator().manual_seed(settings.seed),
                          drop_last=n_draws > settings.batch_size and n_draws % settings.batch_size < 2, **loader_kw)
    val_dl = DataLoader(val_ds, batch_size=settings.batch_size * 2, shuffle=False,
                        generator=torch.Generator().manual_seed(settings.seed), **loader_kw)
    module.val_stride = max(1, math.ceil(len(val_ds) / VAL_SUBSET_SAMPLES))  # type: ignore[arg-type]
    resume = resume_checkpoint(work_dir, fingerprint(settings, inputs))
    monitor = settings.monitor if module.subset_f1 else "val_loss"
    mode = "max" if monitor == "val_f1" else "min"
    ckpt_cb = ModelCheckpoint(dirpath=work_dir, filename="best", monitor=monitor, mode=mode, save_last=True)
    history = EpochHistory()
    trainer = L.Trainer(
        max_epochs=settings.epochs, accelerator=acc, devices=settings.devices, strategy=settings.strategy,
        precision=prec,  # type: ignore[arg-type]
        callbacks=[history, ckpt_cb, EarlyStopping(monitor, patience=settings.patience, mode=mode)],
        default_root_dir=work_dir, logger=L.pytorch.loggers.CSVLogger(work_dir, name="logs", version=0),
        deterministic=acc == "cpu", enable_progress_bar=on_terminal(), log_every_n_steps=10, enable_model_summary=False,
        use_distributed_sampler=False,  # EpochShuffleSampler shards by rank itself
    )
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, train_dl, val_dl, ckpt_path=resume)
    rank, world = trainer.global_rank, trainer.world_size
    if not trainer.is_global_zero:
        log.info("rank %d of %d: training done; rank 0 writes the model", rank, world)
        return None
    best = ckpt_cb.best_model_path or str(work_dir / "last.ckpt")
    module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    score = float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None
    return {
        "epochs": int(trainer.current_epoch), f"best_{monitor}": score,
        "accelerator": acc, "precision": prec, "resumed": resume is not None,
        "world_size": world, "strategy": settings.strategy, "history": history.history,
    }
