"""The Lightning side of training (:mod:`cropmap.train`): the module, samplers and RNG state.

:class:`CoLearningModule` wraps a :func:`cropmap.models.build_model` model with its
normalisation, class weights and recipe (AdamW and the cosine schedule, gap augmentations,
``val_f1`` over sensor subsets); :class:`EpochHistory` keeps the per-epoch history of every
logged term; :class:`EpochShuffleSampler` and :class:`BalancedEpochSampler` draw epoch ``e``
from ``(seed, e)`` and shard it by rank, and :func:`rng_state` / :func:`set_rng_state` carry
the global RNG states through ``last.ckpt``, so a resumed run is exact.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from cropmap.augment import Augment, AugmentSettings
from cropmap.datasets import PixelSamples
from cropmap.models import build_model
from cropmap.normalize import Normalizer

log = logging.getLogger(__name__)
#: Validation samples scored on every sensor subset each epoch (``val_f1``): a large region's
#: validation pixels are thinned to about this many (every k-th sample).
VAL_SUBSET_SAMPLES = 4096


class PixelDataset(Dataset):
    """In-memory pixel time series as a map-style dataset of sample dicts."""

    def __init__(self, s: PixelSamples) -> None:
        self.x = {m: torch.from_numpy(v) for m, v in s.x.items()}
        self.mask = torch.from_numpy(s.mask)
        self.y = torch.from_numpy(s.y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        d = {m: v[i] for m, v in self.x.items()}
        d["mask"] = self.mask[i]
        d["y"] = self.y[i]
        return d


class CoLearningModule(L.LightningModule):
    """Lightning wrapper: normalises the batch, augments it, calls the method's losses, logs every term.

    Args:
        model_kwargs: the :func:`~cropmap.models.build_model` arguments.
        stats: normalisation statistics.
        lr: learning rate.
        class_weights: weights of the supervised loss, or None.
        recipe: :meth:`TrainSettings.recipe` (weight decay, schedule, augmentations, monitor);
            None: plain Adam, no augmentation.
    """

    def __init__(self, model_kwargs: dict[str, Any], stats: dict, lr: float, class_weights: list[float] | None,
                 recipe: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.model = build_model(**model_kwargs, class_weights=weights)
        self.norm = Normalizer(stats)
        self.lr = lr
        r = recipe or {}
        self.weight_decay = float(r.get("weight_decay", 0.0))
        self.schedule = str(r.get("schedule", "none"))
        self.augment = Augment(AugmentSettings.from_dict(r.get("augment")), self.model.modalities)
        #: whether validation scores every sensor subset each epoch (``val_f1``, ``val_f1_full``);
        #: the final model's scores (``final_val_f1``, what recipes are compared on) come from
        #: the calibration pass whatever ``monitor`` is
        self.subset_f1 = r.get("monitor") == "val_f1" and not self.model.spatial
        #: every ``val_stride``-th validation sample is scored on every sensor subset
        self.val_stride = 1
        self._val: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._val_seen = 0

        self._pending_rng: dict[str, Any] | None = None

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        return self.model(self.norm(batch))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cropmap_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # restored when the next epoch starts: the state the uninterrupted run had there
        self._pending_rng = checkpoint.get("cropmap_rng")

    def on_train_epoch_start(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nb = self.norm(batch)
        if self.augment.s.active() and not self.model.spatial:
            nb = self.augment(nb)
        out = self.model(nb)
        losses = self.model.loss(out, nb | {"y": batch["y"]})
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), prog_bar=(k == "total"), on_step=False, on_epoch=True, batch_size=len(batch["y"]), sync_dist=True)
        return losses["total"]

    def on_validation_epoch_start(self) -> None:
        self._val = {}
        self._val_seen = 0

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        nb = self.norm(batch)
        out = self.model(nb)
        logits = out["logits"].float()
        y = batch["y"]
        loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100)
        valid = y != -100
        acc = (logits.argmax(1)[valid] == y[valid]).float().mean()
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, batch_size=int(valid.sum()), sync_dist=True)
        self.log("val_acc", acc, prog_bar=True, on_epoch=True, batch_size=int(valid.sum()), sync_dist=True)
        if self.subset_f1:
            self._subset_predictions(nb, logits, y, valid)

    def _subset_predictions(self, nb: dict[str, Tensor], logits: Tensor, y: Tensor, valid: Tensor) -> None:
        """Keep the predictions of every sensor subset of (every ``val_stride``-th) validation sample."""
        idx = self._val_seen + torch.arange(len(y), device=y.device)
        self._val_seen += len(y)
        pick = idx % self.val_stride == 0
        sub = {k: v[pick] for k, v in nb.items() if isinstance(v, Tensor) and len(v) == len(y)}
        n_mod = len(self.model.modalities)
        for code in range(1, 2**n_mod):
            keep = torch.tensor([(code >> i) & 1 for i in range(n_mod)], dtype=torch.bool, device=y.device)
            mask = sub["mask"].bool() & keep.view(1, -1)
            rows = valid[pick] & mask.any(1)
            if not bool(rows.any()):
                continue
            pred = (logits[pick] if bool(keep.all()) else self.model({**sub, "mask": mask})["logits"]).argmax(1)
            self._val.setdefault(code, []).append((pred[rows].cpu(), y[pick][rows].cpu()))

    def on_validation_epoch_end(self) -> None:
        """``val_f1``: weighted F1 (percent) averaged over every sensor subset; ``val_f1_full``: all sensors."""
        if not self._val:
            return
        from sklearn.metrics import f1_score

        f1 = {}
        for code, parts in self._val.items():
            p, t = torch.cat([a for a, _ in parts]).numpy(), torch.cat([b for _, b in parts]).numpy()
            f1[code] = 100 * f1_score(t, p, average="weighted", zero_division=0)
        full = 2 ** len(self.model.modalities) - 1
        self.log("val_f1", float(np.mean(list(f1.values()))), prog_bar=True, sync_dist=True)
        self.log("val_f1_full", float(f1.get(full, np.nan)), sync_dist=True)
        self._val = {}

    def configure_optimizers(self) -> Any:
        if self.weight_decay > 0:
            opt: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.schedule == "none":
            return opt
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warm_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up over ``warm_fraction`` of ``steps``, then cosine decay to 0."""
    steps = max(1, steps)
    warm = max(1, int(steps * warm_fraction + 1e-9))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class EpochHistory(Callback):
    """Every epoch's logged metrics: ``epoch``, the ``train/*`` loss terms (epoch means) and
    ``val_*`` (``val_loss``, ``val_acc``, ...), as the CSV logger writes them.

    The history is part of the callback's checkpoint state, so a run resumed from ``last.ckpt``
    still reports every epoch (the CSV logger starts its file again on a resumed run).
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row: dict[str, float] = {"epoch": trainer.current_epoch}
        for k, v in sorted(trainer.callback_metrics.items()):
            if k.startswith(("train/", "val_")):
                row[k] = float(v)
        self.history.append(row)
        if trainer.is_global_zero:  # the one line per epoch of a log (no progress bar there)
            log.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict["history"]]


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, for checkpoints (plain types and tensors only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochShuffleSampler(Sampler[Any]):
    """Shuffle with a permutation drawn from ``(seed, epoch)``; Lightning calls :meth:`set_epoch`.

    Epoch ``e`` has the same order whether the run is fresh or resumed from a checkpoint. With
    several processes (DDP) every rank takes every ``world``-th index of the (padded) permutation.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _order(self, g: torch.Generator) -> list[Any]:
        """The item order of one epoch."""
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[Any]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(self.shard(self._order(g)))

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of the epoch's ``n`` items (every ``world``-th of the padded list)."""
        rank, world = self._rank_world()
        if world > 1:
            items = items + items[: math.ceil(self.n / world) * world - self.n]
            items = items[rank::world]
        return items

    def __len__(self) -> int:
        return math.ceil(self.n / self._rank_world()[1])


class BalancedEpochSampler(EpochShuffleSampler):
    """Class-balanced epochs: ``n`` draws with replacement, each class equally likely.

    Same contract as :class:`EpochShuffleSampler` (epoch ``e`` drawn from ``(seed, e)``,
    sharded by rank); samples without label (``y < 0``) are never drawn.
    """

    def __init__(self, y: np.ndarray, seed: int) -> None:
        super().__init__(len(y), seed)
        y = np.asarray(y)
        w = np.zeros(len(y))
        labelled = y >= 0
        if labelled.any():
            counts = np.bincount(y[labelled])
            w[labelled] = 1.0 / counts[y[labelled]]
        self.weights = torch.as_tensor(w / max(w.sum(), 1e-12), dtype=torch.float64)

    def _order(self, g: torch.Generator) -> list[int]:
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
