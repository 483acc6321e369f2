"""Sample tables: WorldCereal wide extractions and CropHarvest arrays/exports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cropmap.tables import (
    CROPHARVEST_ORDER,
    DAYS_PER_MONTH,
    ewoc_classes,
    load_cropharvest,
    load_worldcereal,
    location_groups,
    spatial_split,
    worldcereal_months,
)
from tests.conftest import REALDATA

S2 = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
RES = {"B02": 10, "B03": 10, "B04": 10, "B08": 10}


def wide_table(n: int = 28, t: int = 3, b8a: bool = True) -> pd.DataFrame:
    """A tiny WorldCereal-like table: 14 lat/lon cells of 2 points, known DN values."""
    rows = []
    for i in range(n):
        r: dict = {"sample_id": f"s{i}", "lat": 1.0 + 0.5 * (i // 2), "lon": 33.0 + 0.001 * (i % 2),
                   "ewoc_code": [1101060000, 1101070000][i % 2] if i < n - 4 else 1106000010,
                   "label_full": ["maize", "unspecified_sorghum"][i % 2] if i < n - 4 else "sunflower",
                   "start_date": "2016-12-01", "DEM-alt-20m": 1000 + i, "DEM-slo-20m": 3}
        for ts in range(t):
            for b in S2:
                if b == "B8A" and not b8a:
                    continue
                r[f"OPTICAL-{b}-ts{ts}-{RES.get(b, 20)}m"] = 1000 + 10 * S2.index(b) + ts
            r[f"SAR-VV-ts{ts}-20m"] = 3906
            r[f"SAR-VH-ts{ts}-20m"] = 1846
            r[f"METEO-temperature_mean-ts{ts}-100m"] = 29655
            r[f"METEO-precipitation_flux-ts{ts}-100m"] = 7928
        rows.append(r)
    df = pd.DataFrame(rows)
    # sample 0: S2 cloudy in 2 of 3 months -> S2 missing; S1 nodata in month 1 only -> S1 present
    for ts in (0, 1):
        for b in S2:
            c = f"OPTICAL-{b}-ts{ts}-{RES.get(b, 20)}m"
            if c in df.columns:
                df.loc[0, c] = 65535
    df.loc[0, "SAR-VV-ts1-20m"] = 65535
    df.loc[1, "DEM-alt-20m"] = 65535  # DEM nodata -> dem missing
    return df


def test_worldcereal_conversions(tmp_path: Path) -> None:
    p = tmp_path / "wc.parquet"
    wide_table().to_parquet(p)
    s, classes = load_worldcereal(p, seed=1, min_samples=5, cell_deg=0.1)
    assert s.modalities == ["s2", "s1", "weather", "dem"]
    assert s.x["s2"].shape == (28, 3, 10) and s.x["dem"].shape == (28, 2)
    # S2 reflectance = DN / 10000, band order B02 .. B12 (B8A is the 8th band)
    assert s.x["s2"][2, 2, 0] == pytest.approx(0.1002)
    assert s.x["s2"][2, 0, 7] == pytest.approx((1000 + 70) / 10000)
    assert s.x["s2"][2, 1, 9] == pytest.approx((1000 + 90 + 1) / 10000)
    # S1 dB = 20 log10(DN) - 83
    assert s.x["s1"][2, 0, 0] == pytest.approx(20 * math.log10(3906) - 83, abs=1e-4)
    assert s.x["s1"][2, 0, 1] == pytest.approx(20 * math.log10(1846) - 83, abs=1e-4)
    # AgERA5: K = DN / 100; precipitation mm x 100 per month -> m per month
    assert s.x["weather"][2, 0, 0] == pytest.approx(296.55, abs=1e-3)
    assert s.x["weather"][2, 0, 1] == pytest.approx(0.07928, abs=1e-6)
    assert s.x["dem"][3].tolist() == [1003.0, 3.0]
    # nodata 65535 -> NaN, and presence from the valid-month share
    assert np.isnan(s.x["s2"][0, :2]).all() and np.isfinite(s.x["s2"][0, 2]).all()
    assert np.isnan(s.x["s1"][0, 1, 0]) and np.isnan(s.x["dem"][1, 0])
    assert s.mask[0].tolist() == [False, True, True, True]
    assert s.mask[1].tolist() == [True, True, True, False]
    assert s.mask[2:].all()
    # classes: maize and sorghum 12 each, sunflower (4 < 5) pooled into "other"
    assert [(c["name"], c["n"]) for c in classes] == [("maize", 12), ("sorghum", 12), ("other", 4)]
    assert s.y[:2].tolist() == [0, 1] and (s.y[-4:] == 2).all()
    assert worldcereal_months(p) == ["2016-12", "2017-01", "2017-02"]


def test_worldcereal_b8a_absent_is_filled_with_b08(tmp_path: Path) -> None:
    p = tmp_path / "wc.parquet"
    wide_table(b8a=False).to_parquet(p)
    s, _ = load_worldcereal(p, min_samples=5)
    np.testing.assert_array_equal(s.x["s2"][5, :, 7], s.x["s2"][5, :, 6])
    assert s.mask[2:, 0].all()


def test_spatial_split_keeps_groups_whole_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(0, 2, 400), rng.uniform(30, 32, 400)
    groups = location_groups(lat, lon, 0.25)
    y = rng.integers(0, 3, 400)
    split = spatial_split(y, groups, seed=3)
    for g in np.unique(groups):
        assert len(np.unique(split[groups == g])) == 1
    assert set(np.unique(split)) == {0, 1, 2}
    assert 0.05 < (split == 2).mean() < 0.3 and 0.05 < (split == 1).mean() < 0.3
    np.testing.assert_array_equal(split, spatial_split(y, groups, seed=3))
    assert not np.array_equal(split, spatial_split(y, groups, seed=4))
    # fold = 0..6 is a spatial 7-fold cross-validation: the test splits partition the samples
    tests = np.stack([spatial_split(y, groups, seed=3, fold=f) == 2 for f in range(7)])
    assert (tests.sum(axis=0) == 1).all()


def test_ewoc_grouping_pools_small_codes_by_legend_group() -> None:
    codes = np.array([1101070000] * 30 + [1106000050] * 8 + [1106000010] * 7 + [2000000000] * 3)
    y, classes = ewoc_classes(codes, None, min_samples=10)
    assert [(c["name"], c["n"]) for c in classes] == [("ewoc_1101070000", 30), ("oilseeds", 15), ("other", 3)]
    assert classes[1]["codes"] == [1106000010, 1106000050]
    assert np.bincount(y).tolist() == [30, 15, 3]


def cropharvest_npz(path: Path, n: int = 28) -> np.ndarray:
    x = np.zeros((n, 12, 18), np.float32)
    for b, _name in enumerate(CROPHARVEST_ORDER):
        x[:, :, b] = b + 1 + np.arange(12)[None, :] * 100  # band b, month t -> b + 1 + 100 t
    x[:, 0, 15], x[:, 0, 16] = 250.0, 4.0  # elevation, slope at t = 0
    x[3, :, 0] = np.nan  # VV missing -> S1 absent
    y = np.arange(n) % 2
    lat, lon = 7.0 + 0.5 * (np.arange(n) // 2), np.full(n, 1.0)
    np.savez(path, X=x, y=y, lat=lat, lon=lon, class_names=np.array(["non crop", "Crop"]))
    return x


def test_cropharvest_npz_band_order_and_units(tmp_path: Path) -> None:
    p = tmp_path / "ch.npz"
    cropharvest_npz(p)
    s, classes = load_cropharvest(p, seed=0)
    assert [c["name"] for c in classes] == ["non_crop", "crop"]
    # VV VH | B2..B8A (bands 3..10) B11 B12 (12, 13; B9 = band 11 dropped) | T P | DEM; NDVI dropped
    assert s.x["s1"][0, 0].tolist() == [1.0, 2.0]
    np.testing.assert_allclose(s.x["s2"][0, 2], (np.array([3, 4, 5, 6, 7, 8, 9, 10, 12, 13]) + 200) / 10000, rtol=1e-6)
    assert s.x["weather"][0, 1, 0] == pytest.approx(114.0)
    assert s.x["weather"][0, 1, 1] == pytest.approx(115.0 * DAYS_PER_MONTH, rel=1e-6)
    assert s.x["dem"][0].tolist() == [250.0, 4.0]
    assert s.mask[3].tolist() == [True, False, True, True] and s.mask[0].all()
    groups = location_groups(np.load(p)["lat"], np.load(p)["lon"], 0.1)
    for g in np.unique(groups):
        assert len(np.unique(s.split[groups == g])) == 1


def test_cropharvest_h5_same_keys(tmp_path: Path) -> None:
    import h5py

    npz = tmp_path / "ch.npz"
    cropharvest_npz(npz)
    d = np.load(npz)
    with h5py.File(tmp_path / "ch.h5", "w") as f:
        for k in ("X", "y", "lat", "lon"):
            f[k] = d[k]
    s, classes = load_cropharvest(tmp_path / "ch.h5", precip_unit="m/month")
    assert s.x["weather"][0, 1, 1] == pytest.approx(115.0)
    assert [c["name"] for c in classes] == ["class_0", "class_1"]


def test_real_worldcereal_uganda() -> None:
    s, classes = load_worldcereal(REALDATA / "worldcereal_uganda_2017_extractions.parquet")
    assert len(s) == 500 and sum(c["n"] for c in classes) == 500 and (s.y >= 0).all()
    assert classes[-1]["name"] == "other" and min(c["n"] for c in classes[:-1]) >= 20
    s2, s1, w, dem = (s.x[m] for m in ("s2", "s1", "weather", "dem"))
    assert np.nanmin(s2) > 0 and np.nanmax(s2) < 1.5
    assert np.nanmin(s1) > -40 and np.nanmax(s1) < 10
    assert np.nanmin(w[..., 0]) > 270 and np.nanmax(w[..., 0]) < 320
    assert np.nanmin(w[..., 1]) >= 0 and np.nanmax(w[..., 1]) < 1.5  # m per month
    assert 0 < np.nanmin(dem[:, 0]) < np.nanmax(dem[:, 0]) < 5000 and 0 <= np.nanmin(dem[:, 1]) <= np.nanmax(dem[:, 1]) < 90
    assert np.isnan(s2).any() and np.isnan(s1).any()  # real clouds and S1 gaps
    assert s.mask.mean() > 0.9
    assert set(np.unique(s.split)) == {0, 1, 2}
    import pandas as pd

    df = pd.read_parquet(REALDATA / "worldcereal_uganda_2017_extractions.parquet", columns=["lat", "lon"])
    groups = location_groups(df["lat"].to_numpy(), df["lon"].to_numpy(), 0.1)
    for g in np.unique(groups):
        assert len(np.unique(s.split[groups == g])) == 1


def test_real_cropharvest_export_plausible() -> None:
    s, classes = load_cropharvest(REALDATA / "cropharvest_togo_ee_export.tif")
    assert classes == [] and len(s) == 17 * 17 and (s.y == -100).all()
    assert s.x["s2"].shape == (289, 12, 10) and s.x["dem"].shape == (289, 2)
    assert np.nanmin(s.x["s2"]) > 0 and np.nanmax(s.x["s2"]) < 1.5
    assert np.nanmin(s.x["s1"]) > -40 and np.nanmax(s.x["s1"]) < 10
    t, p = s.x["weather"][..., 0], s.x["weather"][..., 1]
    assert np.nanmin(t) > 280 and np.nanmax(t) < 315
    assert np.nanmin(p) >= 0 and 0.1 < np.nanmax(p) < 1.0  # Togo wet season, m per month
    assert 100 < np.nanmin(s.x["dem"][:, 0]) < 400 and np.nanmax(s.x["dem"][:, 1]) < 90
    assert s.mask[:, :3].all() and 0 < s.mask[:, 3].mean() < 1  # slope NaN on the border
