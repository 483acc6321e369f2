"""CropHarvest arrays (``.npz``/``.h5``) and Earth Engine exports in the CropHarvest layout as pixel
samples (:func:`load_cropharvest`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cropmap.datasets import IGNORE_INDEX, PixelSamples
from cropmap.modalities import BANDS, MODALITIES, TEMPORAL, n_channels
from cropmap.tables.common import colour_for, location_groups, samples_from, slug, spatial_split

log = logging.getLogger(__name__)

#: Band order of the CropHarvest arrays ``X [N, T, 18]``.
CROPHARVEST_ORDER: tuple[str, ...] = (
    "VV", "VH", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
    "temperature_2m", "total_precipitation", "elevation", "slope", "NDVI",
)
#: cropmap band -> CropHarvest band (B9 and NDVI are dropped).
_CH_NAME: dict[str, str] = {
    "B02": "B2", "B03": "B3", "B04": "B4", "B05": "B5", "B06": "B6", "B07": "B7", "B08": "B8",
    "B8A": "B8A", "B11": "B11", "B12": "B12", "VV": "VV", "VH": "VH",
    "temperature_2m": "temperature_2m", "total_precipitation": "total_precipitation",
    "elevation": "elevation", "slope": "slope",
}
#: Mean length of a month in days: converts a monthly mean of daily precipitation (m/day) to m/month.
DAYS_PER_MONTH = 365.25 / 12


def from_cropharvest_array(X: np.ndarray, s2_scale: float = 10000.0, precip_unit: str = "m/day") -> dict[str, np.ndarray]:
    """CropHarvest ``X [N, T, 18]`` -> ``{m: [N, T, C]}``, ``dem [N, 2]`` in cropmap units.

    B9 and NDVI are dropped; S2 is divided by ``s2_scale`` (CropHarvest stores Sentinel-2 DN);
    precipitation in ``"m/day"`` (ERA5-Land monthly averaged: mean daily total) is multiplied by
    :data:`DAYS_PER_MONTH` to m per month, ``"m/month"`` is kept; elevation and slope come from
    time step 0. Non-finite values stay NaN.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3 or X.shape[2] != len(CROPHARVEST_ORDER):
        raise ValueError(f"CropHarvest X must be [N, T, {len(CROPHARVEST_ORDER)}], got {list(X.shape)}")
    if precip_unit not in ("m/day", "m/month"):
        raise ValueError(f"precip_unit must be 'm/day' or 'm/month', not {precip_unit!r}")
    idx = {b: i for i, b in enumerate(CROPHARVEST_ORDER)}
    out: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        cols = [idx[_CH_NAME[b]] for b in BANDS[m]]
        a = X[:, :, cols].copy() if TEMPORAL[m] else X[:, 0, cols].copy()
        if m == "s2":
            a /= s2_scale
        if m == "weather" and precip_unit == "m/day":
            a[..., 1] *= DAYS_PER_MONTH
        out[m] = a.astype(np.float32)
    return out


def decode_export(path: str | Path, precip_unit: str = "m/day") -> dict[str, np.ndarray]:
    """A real Earth Engine export in the CropHarvest layout -> ``{m: [H*W, T, C]}``, ``dem [H*W, 2]``.

    Uses :func:`cropmap.sources.earthengine.decode_cropharvest_export` (band names ``VV``,
    ``VH_1``, ..., S2 / 10000), then reorders pixels row-major and converts precipitation like
    :func:`from_cropharvest_array`.
    """
    from cropmap.sources.earthengine import decode_cropharvest_export

    arrays = decode_cropharvest_export(path)
    out: dict[str, np.ndarray] = {}
    for m, a in arrays.items():
        c = n_channels(m)
        hw = a.shape[1] * a.shape[2]
        v: np.ndarray
        if TEMPORAL[m]:
            v = a.reshape(a.shape[0] // c, c, hw).transpose(2, 0, 1).copy()
            if m == "weather" and precip_unit == "m/day":
                v[..., 1] *= DAYS_PER_MONTH
        else:
            v = a.reshape(c, hw).T.copy()
        out[m] = v.astype(np.float32)
    return out


def read_arrays(path: Path) -> dict[str, Any]:
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in f}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_cropharvest(path: str | Path, *, seed: int = 42, cell_deg: float = 0.1, min_valid_fraction: float = 0.5,
                     s2_scale: float = 10000.0, precip_unit: str = "m/day",
                     fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     fold: int | None = None) -> tuple[PixelSamples, list[dict]]:
    """Read CropHarvest-layout samples (``.npz``/``.h5``) or an Earth Engine export (``.tif``).

    Arrays file keys: ``X [N, T, 18]`` (:data:`CROPHARVEST_ORDER`), ``y [N]`` (int class ids,
    ``-100`` unlabelled), optional ``lat``/``lon [N]`` (spatial split by ``cell_deg`` cells),
    optional ``groups [N]`` (used instead of lat/lon), optional ``class_names [K]``. Without
    either, the split is a seeded random one (logged as not spatial).

    A ``.tif`` is an unlabelled export (:func:`decode_export`): one sample per pixel,
    ``y = -100``, ``split = 2``, classes ``[]``.

    Returns:
        ``(samples, classes)`` with classes ``[{id, name, colour, codes: [], n}]``.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        x = decode_export(path, precip_unit)
        n = len(x["dem"])
        return samples_from(x, np.full(n, IGNORE_INDEX), np.full(n, 2), min_valid_fraction), []
    d = read_arrays(path)
    if "X" not in d or "y" not in d:
        raise ValueError(f"{path}: needs arrays 'X' [N, T, 18] and 'y' [N]; found {sorted(d)}")
    x = from_cropharvest_array(d["X"], s2_scale, precip_unit)
    y = np.asarray(d["y"]).astype(np.int64)
    k = int(y.max()) + 1 if (y >= 0).any() else 0
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in d["class_names"]] if "class_names" in d else []
    if names and len(names) < k:
        raise ValueError(f"{path}: {len(names)} class_names for class ids up to {k - 1}")
    names = [slug(n) for n in names] or [f"class_{i}" for i in range(k)]
    classes = [{"id": i, "name": names[i], "colour": colour_for(names[i], i), "codes": [], "n": int((y == i).sum())}
               for i in range(len(names))]
    if "groups" in d:
        groups = np.unique(np.asarray(d["groups"]), return_inverse=True)[1].ravel()
    elif "lat" in d and "lon" in d:
        groups = location_groups(d["lat"], d["lon"], cell_deg)
    else:
        log.warning("%s: no lat/lon or groups: the split is random, not spatial", path.name)
        groups = np.arange(len(y))
    split = spatial_split(y, groups, seed, fractions, fold)
    return samples_from(x, y, split, min_valid_fraction), classes
