"""The modalities cropmap knows, their bands and the stack band-naming contract.

Stack files store bands time-major: all channels of step 0, then step 1, ... with
descriptions like ``B04_2023-05``. Static modalities (``dem``) have no time axis and their
band descriptions are the bare band names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Modality = Literal["s2", "s1", "weather", "dem"]

#: Every modality, in the canonical order used for masks ``[B, M]`` and the map bitmask
#: (bit ``i`` of band 3 is ``MODALITIES[i]``).
MODALITIES: tuple[Modality, ...] = ("s2", "s1", "weather", "dem")

BANDS: dict[str, tuple[str, ...]] = {
    "s2": ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
    "s1": ("VV", "VH"),
    "weather": ("temperature_2m", "total_precipitation"),
    "dem": ("elevation", "slope"),
}

TEMPORAL: dict[str, bool] = {"s2": True, "s1": True, "weather": True, "dem": False}


def band_descriptions(modality: str, months: Sequence[str], bands: Sequence[str] | None = None) -> list[str]:
    """Band descriptions of a stack, time-major.

    Args:
        modality: one of :data:`MODALITIES`.
        months: month labels ``YYYY-MM`` of the season (ignored for static modalities).
        bands: the stack's bands, in order (default :data:`BANDS` of the modality; a subset
            when the config narrows a modality to fewer bands).

    Returns:
        ``["B02_2023-01", "B03_2023-01", ...]`` for temporal modalities, the band names for
        static ones.
    """
    bands = tuple(bands) if bands is not None else BANDS[modality]
    if not TEMPORAL[modality]:
        return list(bands)
    return [f"{b}_{m}" for m in months for b in bands]


def n_channels(modality: str) -> int:
    """Number of channels per time step of ``modality``."""
    return len(BANDS[modality])


def bit(modality: str) -> int:
    """Bit value of ``modality`` in the availability bitmask band."""
    return 1 << MODALITIES.index(modality)  # type: ignore[arg-type]
