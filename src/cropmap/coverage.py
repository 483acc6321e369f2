"""Stage ``coverage``: how much of a map had data, counted for the report.

``results/{region}/coverage.json`` (next to ``metrics.csv``) holds, per region:

* ``pixels``, ``nodata_pixels``, ``nodata_share``: map pixels without any sensor (nodata, never a guess);
* ``tiles``, ``empty_tiles``: prediction tiles where every modality is missing (all nodata);
* ``modality_share``: share of map pixels predicted with each sensor;
* ``subset_pixels``: map pixels per sensor subset they were predicted with (``s2+s1``; ``none``:
  nodata), the availability bitmask of band 3 counted;
* ``months``: per month of the season, the share of valid stack pixels of each temporal sensor;
* ``months_without_data``: months where no temporal sensor has a single valid pixel (the model
  still maps those pixels from the other months; the month is simply missing from every input).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from cropmap.availability import monthly_report
from cropmap.grid import Grid, tile_window, tiles
from cropmap.io import atomic_path
from cropmap.labels import NODATA
from cropmap.modalities import TEMPORAL, bit
from cropmap.reportdata import code_subset


def summarise(map_tif: Path, stack_dir: Path, grid: Grid, months: Sequence[str], modalities: Sequence[str],
              tile_size: int) -> dict[str, Any]:
    """Coverage of one region's map (read tile by tile: bounded memory)."""
    nodata = 0
    bit_counts = dict.fromkeys(modalities, 0)
    codes = np.zeros(256, np.int64)
    empty = []
    names = tiles(grid, tile_size)
    with rasterio.open(map_tif) as src:
        for name in names:
            win = tile_window(grid, name, tile_size)
            cls = src.read(1, window=win)
            bits = src.read(3, window=win)
            n = int((cls == NODATA).sum())
            nodata += n
            if n == cls.size:
                empty.append(name)
            for m in modalities:
                bit_counts[m] += int((bits & bit(m) > 0).sum())
            codes += np.bincount(bits.ravel(), minlength=256)
    total = grid.width * grid.height
    temporal = [m for m in modalities if TEMPORAL[m]]
    per_month: dict[str, dict[str, float]] = {mo: {} for mo in months}
    for m in temporal:
        f = stack_dir / f"{m}.tif"
        shares = monthly_report(f, m) if f.exists() else {}
        for mo in months:
            per_month[mo][m] = float(shares.get(mo, 0.0))
    without = [mo for mo in months if not any(v > 0 for v in per_month[mo].values())]
    return {
        "pixels": total, "nodata_pixels": nodata, "nodata_share": round(nodata / max(total, 1), 6),
        "tiles": len(names), "empty_tiles": empty,
        "modality_share": {m: round(c / max(total, 1), 6) for m, c in bit_counts.items()},
        "subset_pixels": {"+".join(code_subset(int(c), modalities)) or "none": int(codes[c]) for c in np.flatnonzero(codes)},
        "months": per_month, "months_without_data": without,
    }


def write(summary: dict[str, Any], out: Path) -> None:
    """Write ``coverage.json`` (atomic)."""
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
