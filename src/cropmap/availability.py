"""Which modality is present where: per pixel, per tile and per month.

A temporal modality is present for a pixel when at least ``min_valid_fraction`` of its months
are valid (a month is valid when all of its channels are finite). A static modality (DEM) is
present where all its bands are finite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from cropmap.io import atomic_path
from cropmap.modalities import MODALITIES, TEMPORAL, n_channels


def valid_months(x: np.ndarray, modality: str, channels: int | None = None) -> np.ndarray:
    """Per-month validity of a stack array.

    Args:
        x: ``[T*C, ...]`` time-major bands (or ``[C, ...]`` for static modalities).
        modality: modality name.
        channels: channels per month ``C`` (default: every band of :data:`BANDS`; fewer when
            the stack holds a band subset).

    Returns:
        bool ``[T, ...]`` (``[1, ...]`` for static), True where all channels are finite.
    """
    c = channels or n_channels(modality)
    finite = np.isfinite(x)
    return finite.reshape(x.shape[0] // c, c, *x.shape[1:]).all(axis=1)


def present(x: np.ndarray, modality: str, min_valid_fraction: float, channels: int | None = None) -> np.ndarray:
    """Per-pixel presence of a modality.

    Args:
        x: ``[T*C, ...]`` stack array.
        modality: modality name.
        min_valid_fraction: share of months that must be valid (temporal modalities).
        channels: channels per month (default every band of the modality).

    Returns:
        bool array of shape ``x.shape[1:]``.
    """
    v = valid_months(x, modality, channels)
    if not TEMPORAL[modality]:
        return v[0]
    frac = v.mean(axis=0)
    # a fraction of 0 never counts, even with a threshold of 0
    return (frac >= min_valid_fraction) & (frac > 0)


def presence_stack(
    arrays: Mapping[str, np.ndarray], modalities: Sequence[str], min_valid_fraction: float, shape: tuple[int, ...],
    channels: Mapping[str, int] | None = None,
) -> np.ndarray:
    """bool ``[M, ...]`` presence for ``modalities``; a modality absent from ``arrays`` is all False.

    ``channels``: channels per month of each modality (a band subset has fewer than :data:`BANDS`;
    default every band).
    """
    out = np.zeros((len(modalities), *shape), dtype=bool)
    for i, m in enumerate(modalities):
        if m in arrays:
            out[i] = present(arrays[m], m, min_valid_fraction, (channels or {}).get(m))
    return out


def bitmask(presence: np.ndarray, modalities: Sequence[str]) -> np.ndarray:
    """uint8 bitmask (bit ``MODALITIES.index(m)`` set where ``m`` is present) from ``[M, ...]``."""
    out = np.zeros(presence.shape[1:], dtype=np.uint8)
    for i, m in enumerate(modalities):
        out |= presence[i].astype(np.uint8) << MODALITIES.index(m)  # type: ignore[arg-type]
    return out


def monthly_report(path: str | Path, modality: str, block: int = 512) -> dict[str, float]:
    """Fraction of valid pixels per month of a stack or raw file, read block by block.

    Args:
        path: GeoTIFF with band descriptions ``{band}_{YYYY-MM}`` (or bare band names if static).
        modality: modality name.
        block: rows read at a time (bounded memory).

    Returns:
        ``{"2023-01": 0.82, ...}``; static modalities report under ``"static"``.
    """
    with rasterio.open(path) as src:
        c = channels_of(src.descriptions, modality)
        n_t = src.count // c
        labels = (
            [d.rsplit("_", 1)[-1] if d else f"t{i}" for i, d in enumerate(src.descriptions[::c])]
            if TEMPORAL[modality]
            else ["static"]
        )
        valid = np.zeros(n_t, dtype=np.int64)
        total = 0
        for row in range(0, src.height, block):
            h = min(block, src.height - row)
            x = src.read(window=Window(0, row, src.width, h))
            valid += valid_months(x, modality, c).reshape(n_t, -1).sum(axis=1)
            total += h * src.width
    return {lab: round(float(v) / max(total, 1), 4) for lab, v in zip(labels, valid, strict=True)}


def channels_of(descriptions: Sequence[str | None], modality: str) -> int:
    """Channels per month of a stack from its band descriptions (a band subset has fewer than
    :data:`BANDS`): the bands of a temporal stack that share the first band's month, every band
    of a static one; without descriptions, every band of the modality."""
    if not descriptions or not all(descriptions):
        return n_channels(modality)
    if not TEMPORAL[modality]:
        return len(descriptions)
    first = str(descriptions[0]).rsplit("_", 1)[-1]
    return sum(1 for d in descriptions if str(d).rsplit("_", 1)[-1] == first)


def write_report(files: Mapping[str, str | Path], out: str | Path, modalities: Sequence[str]) -> dict:
    """Write ``availability.json``: per modality and month the valid-pixel fraction.

    Modalities without a file are reported as ``null`` (absent for the region).
    """
    report: dict[str, dict[str, float] | None] = {m: None for m in modalities}
    for m, p in files.items():
        report[m] = monthly_report(p, m)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report
