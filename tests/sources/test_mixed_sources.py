"""A region mixing sources: S2/S1/DEM from a STAC API, weather from Earth Engine."""

from __future__ import annotations

import numpy as np
import rasterio
from sources_fixtures import ee_options, expected_ee_stack, mol_grid, pc_options

from cropmap.modalities import MODALITIES, band_descriptions
from cropmap.sources.earthengine import fetch_earthengine
from cropmap.sources.stac import fetch_stac

MONTHS = ["2023-04", "2023-05"]


def test_stac_and_earthengine_build_one_region(stac_server, ee_server, mol_catalog, tmp_path):
    grid = mol_grid(mol_catalog)
    raw = tmp_path / "data" / "mol" / "raw"
    sources = {"s2": "stac", "s1": "stac", "dem": "stac", "weather": "earthengine"}
    wanted = {src: [m for m in MODALITIES if sources[m] == src] for src in set(sources.values())}
    out = fetch_stac(grid, MONTHS, raw, modalities=wanted["stac"], options=pc_options(stac_server))
    out |= fetch_earthengine(grid, MONTHS, raw, modalities=wanted["earthengine"], options=ee_options(ee_server, block_size=32))
    assert set(out) == set(MODALITIES)
    for m, p in out.items():
        assert p == raw / f"{m}.tif"
        grid.check(p)  # every stack on the one region grid
        with rasterio.open(p) as src:
            assert list(src.descriptions) == band_descriptions(m, MONTHS)
            assert src.tags()["source"] == sources[m]
            arr = src.read()
        assert arr.dtype == np.float32 and not np.isnan(arr).all()
    with rasterio.open(out["weather"]) as src:
        assert np.array_equal(src.read(), expected_ee_stack(grid, list(src.descriptions)), equal_nan=True)
    assert not (raw / ".parts").exists()
