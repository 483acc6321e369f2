"""Stage ``expected_f1``: per pixel, the held-out score of the sensor subset it was mapped with.

``results/R/expected_f1.tif`` shows where a map can be trusted and which extra sensor would
help most: the map's ``modalities`` bitmask, looked up in the ``metrics.csv`` of the region
whose model drew the map (one row per sensor subset).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio

from cropmap.labels import NODATA
from cropmap.modalities import bit
from cropmap.mosaic import to_cog


def run(map_tif: Path, metrics_csv: Path, out: Path, metric: str = "f1_weighted") -> float:
    """Write the expected-accuracy layer: per pixel, the held-out score of its sensor subset.

    Reads the map's ``modalities`` bitmask block by block and looks each subset up in the
    region's ``metrics.csv`` (one row per subset). Writes a uint8 COG (0-100, nodata 255 where the
    map is nodata or the subset was never evaluated) and returns the mean over mapped pixels.
    """
    df = pd.read_csv(metrics_csv)
    lut = np.full(256, NODATA, np.uint8)
    for sub, v in zip(df["subset"], df[metric], strict=True):
        if np.isfinite(v):
            code = sum(bit(m) for m in str(sub).split("+"))
            lut[code] = round(float(v))
    total, count = 0.0, 0
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".expected.") as tmpd:
        tmp = Path(tmpd) / "expected.tif"
        with rasterio.open(map_tif) as src:
            prof = src.profile | {"count": 1, "nodata": NODATA, "photometric": "MINISBLACK"}
            with rasterio.open(tmp, "w", **prof) as dst:
                for _, win in src.block_windows(3):
                    bits = src.read(3, window=win)
                    e = lut[bits]
                    dst.write(e, 1, window=win)
                    ok = e != NODATA
                    total += float(e[ok].sum())
                    count += int(ok.sum())
                dst.set_band_description(1, f"expected_{metric}")
                dst.update_tags(1, units="percent", source=str(metrics_csv.name),
                                description="held-out score of the sensor subset each pixel was predicted with")
        mean = total / count if count else float("nan")
        with rasterio.open(tmp, "r+") as dst:
            dst.update_tags(mean_expected=f"{mean:.2f}")
        to_cog(tmp, out, resampling="average")
    return mean
