"""Stage ``pretrain``: self-supervised pretraining of encoders on unlabelled data (no labels used).

Two kinds, one stage (``--kind``; rule ``pretrain`` writes ``models/<name>/pretrain/<kind>.ckpt``):

``imt`` (:func:`run`), the chip encoder of ``imt`` on a region's stacks. Chips come from
``chips.parquet`` (every split except ``exclude_splits``,
by default the test split, so test inputs never shape the encoder) and are read with
:class:`cropmap.datasets.ChipDataset`; per-channel z-scores are fitted on them
(:func:`cropmap.normalize.fit_stats`). The objective is :class:`cropmap.models.imt_pretrain.IMTPretrainer`:
MultiMAE masking with a Dirichlet(alpha) token budget across modalities, per-modality
reconstruction of the masked patches (MSE s2/s1/weather, L1 dem) and InfoNCE between each
modality's global vector and the fusion vector. Optimiser as in the paper: AdamW (lr 1e-4,
weight decay 0.05), linear warm-up over the first 5 % of steps then cosine decay; bf16 autocast
on CUDA. The checkpoint (written atomically) holds the encoder weights and its size; fine-tuning
loads it with ``build_model("imt", ..., preset=<same>, pretrained=<path>)``.

``pixel`` (:func:`run_pixels`), the per-sensor encoders of the pixel co-learning methods
(``model.task: classification``; every gradient method with per-sensor encoders,
:func:`cropmap.models.pixel_pretrain.pixel_pretrainable`). The objective is masked reconstruction
across months and sensors, :class:`cropmap.models.pixel_pretrain.PixelMAE`. Its pixels, never
of the test split:

* a region: up to ``max_pixels`` pixels with a sensor, spread evenly over random chips whose
  split is ``train`` or ``val`` (a ``test`` or ``mixed`` chip is never read);
* a training set: every sample whose split is not test (at most ``max_pixels``, at random).

Cross-validation (``compare.folds`` > 1) re-splits the data per fold and every sample is test in
one fold, so there is no pretraining set that is never test: the pixel pretraining runs **per
fold**, on that fold's train and val data (the fold folder of the ``fold`` stage), and writes
``pretrain/fold<k>/pixel.ckpt``, which only that fold's models load. With one fold the
comparison uses the workflow's own split and the region's ``pretrain/pixel.ckpt``.
Normalisation statistics are fitted on the pretraining pixels and stored with the encoders
(and their names, width, bands and months); fine-tuning (:func:`cropmap.train.fit`, via
:func:`cropmap.models.pixel_pretrain.init_module`) loads the encoders, normalises with those
statistics and says so in its log and summary (``pretrained_from``, ``pretrained_tensors``).
The optimiser is AdamW with a linear warm-up and cosine decay (:func:`cropmap.loop.warmup_cosine`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cropmap.datasets import ChipDataset, to_time_series
from cropmap.device import resolve_device
from cropmap.errors import InputDataError
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.labels import SPLITS
from cropmap.modalities import resolve_bands
from cropmap.models.imt import build_encoder, imt_config
from cropmap.models.imt_pretrain import IMTPretrainer
from cropmap.models.spatial import flat_channels
from cropmap.normalize import Normalizer, fit_stats
from cropmap.samples import SampleSet, read_samples

log = logging.getLogger(__name__)


def _stats(ds: ChipDataset, n: int, seed: int) -> dict[str, tuple[list[float], list[float]]]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=min(n, len(ds)), replace=False)
    items = [ds[int(i)] for i in idx]
    with warnings.catch_warnings():  # an all-NaN modality (no stack) gets mean 0, std 1
        warnings.simplefilter("ignore", RuntimeWarning)
        return fit_stats(
            {m: torch.stack([it[m] for it in items]).numpy() for m in ds.modalities}, "chips", ds.channels
        )


def run(
    stack_dir: Path,
    chips_parquet: Path,
    grid: Grid,
    months: list[str],
    modalities: list[str],
    out: Path,
    *,
    preset: str = "tiny",
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    seed: int = 42,
    device: str = "auto",
    min_valid_fraction: float = 0.5,
    labels_tif: Path | None = None,
    exclude_splits: Sequence[str] = ("test",),
    stats_chips: int = 256,
    visible_fraction: float = 0.25,
    alpha: float = 1.0,
    temperature: float = 0.1,
    contrastive_weight: float = 1.0,
    num_workers: int = 0,
    bands: Mapping[str, Sequence[str]] | None = None,
    **size: int,
) -> dict[str, Any]:
    """Pretrain the IMT encoder and write its checkpoint to ``out``.

    Args:
        stack_dir: the region's ``stack`` folder (one GeoTIFF per modality).
        chips_parquet: the region's chip table (``row, col, size, xmin, ..., split, present_*``).
        grid: the region grid.
        months: season months (the temporal stacks' time axis).
        modalities: modalities of the encoder (a missing stack is treated as missing data).
        out: checkpoint path.
        preset: ``tiny`` or ``base`` (must match the fine-tuned model's preset).
        epochs, batch_size, lr, weight_decay, seed: optimisation (AdamW, warm-up + cosine).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        min_valid_fraction: share of valid months for a pixel to count as present.
        labels_tif: the labels raster ``ChipDataset`` opens (labels are not used); default
            ``labels.tif`` next to ``chips_parquet``.
        exclude_splits: chip splits left out (default: the test split).
        stats_chips: chips used to fit the normalisation statistics.
        visible_fraction, alpha, temperature, contrastive_weight: the objective (see
            :class:`~cropmap.models.imt_pretrain.IMTPretrainer`).
        num_workers: DataLoader workers.
        bands: the stacks' bands per modality (the config's ``bands``; default every band).
        **size: ``patch``, ``dim``, ``depth``, ``heads``, ``fusion_grid``, ``dec_dim``,
            ``dec_depth`` overrides of the preset.

    Returns:
        Summary: chips, epochs, steps, per-epoch mean loss, device, seconds, encoder config.

    Raises:
        FileNotFoundError: ``labels_tif`` does not exist.
        ValueError: no chip with any present modality is left.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    dev = resolve_device(device, "training.device")
    labels_tif = Path(labels_tif) if labels_tif else Path(chips_parquet).parent / "labels.tif"
    if not labels_tif.exists():
        raise FileNotFoundError(
            f"{labels_tif}: ChipDataset needs the region's labels raster (its labels are not used); give labels_tif"
        )
    chips = pd.read_parquet(chips_parquet)
    chips = chips[~chips["split"].isin(list(exclude_splits))]
    present = [f"present_{m}" for m in modalities if f"present_{m}" in chips]
    if present:
        chips = chips[(chips[present] > 0).any(axis=1)]
    if chips.empty:
        raise InputDataError(
            f"{chips_parquet}: no chip with a present modality outside the splits {list(exclude_splits)}; nothing to pretrain on"
        )
    ds = ChipDataset(
        Path(stack_dir), labels_tif, chips, grid, months, modalities, min_valid_fraction, bands
    )
    stats = _stats(ds, stats_chips, seed)
    norm = Normalizer(stats).to(dev)
    cfg = imt_config(preset, **{k: v for k, v in size.items() if k not in ("dec_dim", "dec_depth")})
    dims = flat_channels(ds.channels, len(months), modalities)
    encoder = build_encoder(modalities, dims, cfg)
    rng = torch.Generator().manual_seed(seed)
    model = IMTPretrainer(
        encoder,
        dec_dim=int(size.get("dec_dim", cfg["dec_dim"])),
        dec_depth=int(size.get("dec_depth", cfg["dec_depth"])),
        visible_fraction=visible_fraction,
        alpha=alpha,
        temperature=temperature,
        contrastive_weight=contrastive_weight,
        generator=rng,
    ).to(dev)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(ds) > batch_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    steps = max(1, epochs * len(loader))
    warm = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    autocast = dev.type == "cuda"
    history: list[float] = []
    step = 0
    model.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for batch in loader:
            batch = norm({k: v.to(dev, non_blocking=True) for k, v in batch.items() if k != "y"})
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                terms = model(batch)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            total += float(terms["total"].detach())
            n += 1
        history.append(total / max(n, 1))
        log.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    summary: dict[str, Any] = {
        "preset": preset,
        "n_chips": len(ds),
        "epochs": epochs,
        "steps": step,
        "loss": history,
        "device": str(dev),
        "seconds": round(time.time() - t0, 2),
        "config": dict(encoder.config),
    }
    ckpt = model.checkpoint(
        stats={m: [list(a), list(b)] for m, (a, b) in stats.items()},
        months=list(months),
        summary={k: v for k, v in summary.items() if k != "config"},
    )
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    summary["out"] = str(out)
    return summary


#: Chip splits whose pixels the pixel pretraining reads (never ``test``, nor a ``mixed`` chip).
PIXEL_SPLITS: tuple[str, ...] = ("train", "val")


def region_pixels(stack_dir: Path, labels_tif: Path, chips_parquet: Path, grid: Grid, months: Sequence[str],
                  modalities: Sequence[str], *, max_pixels: int, min_valid_fraction: float, seed: int,
                  bands: Mapping[str, Sequence[str]] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Up to ``max_pixels`` unlabelled pixels of a region that have a sensor: an equal random
    share of each of random chips of the :data:`PIXEL_SPLITS`.

    Returns:
        ``({m: [N, T, C] / [N, C]} with NaN invalid, mask bool [N, M])``.

    Raises:
        InputDataError: no such chip or pixel.
    """
    chips = pd.read_parquet(chips_parquet)
    chips = chips[chips["split"].isin(PIXEL_SPLITS)]
    present = [f"present_{m}" for m in modalities if f"present_{m}" in chips]
    if present:
        chips = chips[(chips[present] > 0).any(axis=1)]
    if chips.empty:
        raise InputDataError(f"{chips_parquet}: no {'/'.join(PIXEL_SPLITS)} chip with a present sensor; nothing to pretrain on")
    rng = np.random.default_rng(seed)
    ds = ChipDataset(stack_dir, labels_tif, chips.iloc[rng.permutation(len(chips))], grid, months, modalities,
                     min_valid_fraction, bands)
    per_chip = max(1, -(-max_pixels // len(chips)))
    xs: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    masks: list[np.ndarray] = []
    total = 0
    for i in range(len(ds)):
        item = ds[i]
        pres = item["mask"].numpy().reshape(len(modalities), -1)
        idx = np.flatnonzero(pres.any(axis=0))
        idx = rng.choice(idx, size=min(per_chip, len(idx), max_pixels - total), replace=False)
        if len(idx) == 0:
            continue
        for m in modalities:
            ts = to_time_series(item[m].numpy(), m, ds.channels[m])
            xs[m].append(ts.reshape(-1, *ts.shape[2:])[idx])
        masks.append(pres[:, idx].T)
        total += len(idx)
        if total >= max_pixels:
            break
    if not masks:
        raise InputDataError(f"{chips_parquet}: the {'/'.join(PIXEL_SPLITS)} chips hold no pixel with a sensor; nothing to pretrain on")
    return {m: np.concatenate(v).astype(np.float32) for m, v in xs.items()}, np.concatenate(masks).astype(bool)


def sample_pixels(samples_npz: Path, max_pixels: int, seed: int) -> tuple[SampleSet, dict[str, np.ndarray], np.ndarray]:
    """The samples of a training set (or of one fold of it) outside its test split, at most
    ``max_pixels`` of them (at random).

    Returns:
        ``(sample set, {m: [N, T, C] / [N, C]}, mask [N, M])``.
    """
    s = read_samples(samples_npz)
    keep = np.flatnonzero((s.samples.split != SPLITS.index("test")) & s.samples.mask.any(1))
    if len(keep) == 0:
        raise InputDataError(f"{samples_npz}: no sample with a sensor outside the test split; nothing to pretrain on")
    if len(keep) > max_pixels:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_pixels, replace=False))
    part = s.samples.subset(keep)
    return s, part.x, part.mask


def pretrain_pixels(x: Mapping[str, np.ndarray], mask: np.ndarray, modalities: Sequence[str], months: Sequence[str],
                    bands: Mapping[str, Sequence[str]], out: Path, *, hidden: int = 128,
                    encoders: Mapping[str, str] | None = None, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
                    weight_decay: float = 0.05, month_mask: float = 0.5, modality_mask: float = 0.5, seed: int = 42,
                    device: str = "auto") -> dict[str, Any]:
    """Pretrain the per-sensor pixel encoders on unlabelled pixels and write the checkpoint to ``out``.

    Args:
        x: ``{m: [N, T, C]}`` (static ``[N, C]``) raw values, NaN invalid.
        mask: bool ``[N, M]`` sensor presence in ``modalities`` order.
        modalities, months, bands: the sensors, months and bands of the model to fine-tune.
        out: checkpoint path (written atomically).
        hidden, encoders: the fine-tuned model's width and encoder names (``model.hidden``,
            ``model.encoders``).
        epochs, batch_size, lr, weight_decay: AdamW with a 5 % warm-up and cosine decay.
        month_mask, modality_mask: masking probabilities of
            :class:`~cropmap.models.pixel_pretrain.PixelMAE`.
        seed: seeds initialisation, order and masks.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

    Returns:
        Summary: samples, epochs, steps, per-epoch mean loss, device, seconds.
    """
    from cropmap.loop import warmup_cosine
    from cropmap.models.pixel_pretrain import PixelMAE

    t0 = time.time()
    torch.manual_seed(seed)
    dev = resolve_device(device, "training.device")
    with warnings.catch_warnings():  # a sensor without any valid value gets mean 0, std 1
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = fit_stats({m: np.asarray(x[m]) for m in modalities}, "pixels")
    with torch.no_grad():
        data = Normalizer(stats)({m: torch.from_numpy(np.ascontiguousarray(x[m], dtype=np.float32)) for m in modalities})
    data["mask"] = torch.from_numpy(np.asarray(mask, dtype=bool))
    n = len(data["mask"])
    if n < 2:
        raise InputDataError(f"{out}: {n} pretraining pixel with a sensor; pixel pretraining needs at least 2")
    model = PixelMAE(modalities, {m: len(bands[m]) for m in modalities}, len(months), hidden, encoders, month_mask,
                     modality_mask, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    bs = max(2, min(batch_size, n))
    # every pixel once per epoch; a last batch of one pixel is left out (batch norm needs two)
    batches = [(k, min(k + bs, n)) for k in range(0, n, bs) if min(k + bs, n) - k >= 2]
    per_epoch = len(batches)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, epochs * per_epoch)
    order = torch.Generator().manual_seed(seed)
    history: list[float] = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order)
        total = 0.0
        for a, b in batches:
            idx = perm[a:b]
            terms = model({key: v[idx].to(dev) for key, v in data.items()})
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(terms["total"].detach())
        history.append(total / per_epoch)
        log.info("pixel pretrain epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    summary: dict[str, Any] = {"kind": "pixel", "n_pixels": n, "epochs": epochs, "steps": epochs * per_epoch,
                               "loss": history, "device": str(dev), "seconds": round(time.time() - t0, 2)}
    with atomic_path(out) as tmp:
        torch.save(model.checkpoint(stats, bands, months, summary), tmp)
    return summary | {"out": str(out)}


def run_pixels(p: Mapping[str, Any], out: Path, *, stack_dir: Path | None = None, labels_tif: Path | None = None,
               chips_parquet: Path | None = None, samples_npz: Path | None = None) -> dict[str, Any]:
    """The ``pixel`` kind of the stage: a region's pixels (``stack_dir``, ``labels_tif``,
    ``chips_parquet``) or a training set's samples (``samples_npz``), then :func:`pretrain_pixels`.

    Args:
        p: the stage parameters (:func:`cropmap.config.stage_params` ``"pretrain"``, kind ``pixel``).
        out: checkpoint path.
    """
    pt = p["pretrain"]
    if samples_npz is not None:
        s, x, mask = sample_pixels(samples_npz, pt["max_pixels"], p["seed"])
        modalities, months, bands = list(s.samples.modalities), list(s.months), s.bands
    else:
        if stack_dir is None or labels_tif is None or chips_parquet is None:
            raise InputDataError("pixel pretraining of a region needs its stack folder, labels.tif and chips.parquet")
        modalities, months = list(p["modalities"]), list(p["months"])
        bands = {m: list(b) for m, b in resolve_bands(p.get("bands")).items() if m in modalities}
        x, mask = region_pixels(stack_dir, labels_tif, chips_parquet, Grid(**p["grid"]), months, modalities,
                                max_pixels=pt["max_pixels"], min_valid_fraction=p["min_valid_fraction"], seed=p["seed"],
                                bands=bands)
    return pretrain_pixels(x, mask, modalities, months, bands, out, hidden=p["hidden"], encoders=p.get("encoders"),
                           epochs=pt["epochs"], batch_size=pt["pixel_batch_size"], lr=pt["pixel_lr"],
                           month_mask=pt["month_mask"], modality_mask=pt["modality_mask"], seed=p["seed"],
                           device=p["device"])
