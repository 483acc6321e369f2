"""Stage ``pretrain``: self-supervised pretraining of the ``imt`` encoder on a region's stacks.

No labels are used: chips come from ``chips.parquet`` (every split except ``exclude_splits``,
by default the test split, so test inputs never shape the encoder) and are read with
:class:`cropmap.datasets.ChipDataset`; per-channel z-scores are fitted on them
(:func:`cropmap.normalize.fit_stats`). The objective is :class:`cropmap.models.imt_pretrain.IMTPretrainer`:
MultiMAE masking with a Dirichlet(alpha) token budget across modalities, per-modality
reconstruction of the masked patches (MSE s2/s1/weather, L1 dem) and InfoNCE between each
modality's global vector and the fusion vector. Optimiser as in the paper: AdamW (lr 1e-4,
weight decay 0.05), linear warm-up over the first 5 % of steps then cosine decay; bf16 autocast
on CUDA.

The checkpoint (written atomically) holds the encoder weights and its size; fine-tuning loads it
with ``build_model("imt", ..., preset=<same>, pretrained=<path>)``.
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

from cropmap.datasets import ChipDataset
from cropmap.device import resolve_device
from cropmap.errors import InputDataError
from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.models.imt import build_encoder, imt_config
from cropmap.models.imt_pretrain import IMTPretrainer
from cropmap.models.spatial import flat_channels
from cropmap.normalize import Normalizer, fit_stats

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
