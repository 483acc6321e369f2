"""The modalities cropmap knows, their bands and the stack band-naming contract.

Stack files store bands time-major: all channels of step 0, then step 1, ... with
descriptions like ``B04_2023-05``. Static modalities (``dem``) have no time axis and their
band descriptions are the bare band names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from cropmap.errors import UnknownNameError

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
    """Number of channels per time step of ``modality`` when it holds every band of :data:`BANDS`."""
    return len(BANDS[modality])


def resolve_bands(bands: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """Band list per modality: ``bands`` where given (the config's ``bands``), every band of
    :data:`BANDS` otherwise.

    Raises:
        UnknownNameError: a modality or band that cropmap does not know (the message lists the valid ones).
    """
    out: dict[str, tuple[str, ...]] = {m: BANDS[m] for m in MODALITIES}
    for m, bs in (bands or {}).items():
        if m not in BANDS:
            raise UnknownNameError(f"bands: unknown modality {m!r}; use some of {list(BANDS)}")
        wrong = [b for b in bs if b not in BANDS[m]]
        if wrong or not bs:
            raise UnknownNameError(f"bands.{m}: {wrong or 'an empty list'} is not a subset of the {m} bands {list(BANDS[m])}; "
                                   "list some of those (in any order)")
        if len(set(bs)) != len(bs):
            raise UnknownNameError(f"bands.{m}: {list(bs)} names a band twice; list each band once")
        out[m] = tuple(bs)
    return out


def channels_per_step(bands: Mapping[str, Sequence[str]] | None, modalities: Sequence[str]) -> dict[str, int]:
    """Channels per time step of each of ``modalities`` with ``bands`` (:func:`resolve_bands`)."""
    full = resolve_bands(bands)
    return {m: len(full[m]) for m in modalities}


def bit(modality: str) -> int:
    """Bit value of ``modality`` in the availability bitmask band."""
    return 1 << MODALITIES.index(modality)  # type: ignore[arg-type]
