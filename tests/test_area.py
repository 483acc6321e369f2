"""The area estimator against the worked example of Olofsson et al. (2014), and the ``area`` stage on rasters.

The example (Olofsson, Foody, Herold, Stehman, Woodcock, Wulder, "Good practices for estimating
area and assessing accuracy of land change", Remote Sensing of Environment 148, section 5): a
change map of 30 m pixels with four classes, a stratified random sample of 640 pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from cropmap import area
from cropmap.errors import GridMismatchError

# rows: map class; columns: reference class (deforestation, forest gain, stable forest, stable non-forest)
COUNTS = np.array([[66, 0, 5, 4],
                   [0, 55, 8, 12],
                   [1, 0, 153, 11],
                   [2, 1, 9, 313]])
MAPPED_PX = np.array([200_000, 150_000, 3_200_000, 6_450_000])
HA_PER_PX = 0.09  # 30 m x 30 m
Z = 1.96


@pytest.fixture(scope="module")
def est() -> area.StratifiedEstimate:
    return area.stratified_estimate(COUNTS, MAPPED_PX)


def test_deforestation_area_and_accuracies_computed_by_hand(est: area.StratifiedEstimate) -> None:
    # strata weights W_i = A_i / A_tot, A_tot = 10,000,000 px; stratum sample sizes n_i.
    w = [0.02, 0.015, 0.32, 0.645]
    n = [75, 75, 165, 325]
    assert np.allclose(est.weights, w)
    # area proportion of reference class deforestation: sum_i W_i n_i0 / n_i.
    p_def = 0.02 * 66 / 75 + 0.015 * 0 / 75 + 0.32 * 1 / 165 + 0.645 * 2 / 325
    assert math.isclose(p_def, 0.0235086247, rel_tol=1e-9)
    assert math.isclose(est.proportion[0], p_def, rel_tol=1e-12)
    assert math.isclose(est.area[0], p_def * 10_000_000, rel_tol=1e-12)  # 235,086 px
    # its variance: sum_i W_i^2 f_i0 (1 - f_i0) / (n_i. - 1), f_i0 = n_i0 / n_i.
    v0 = 0.02**2 * (66 / 75) * (9 / 75) / 74
    v1 = 0.0
    v2 = 0.32**2 * (1 / 165) * (164 / 165) / 164
    v3 = 0.645**2 * (2 / 325) * (323 / 325) / 324
    se_def = math.sqrt(v0 + v1 + v2 + v3)
    assert math.isclose(est.proportion_se[0], se_def, rel_tol=1e-12)
    assert math.isclose(est.area_se[0], 10_000_000 * se_def, rel_tol=1e-12)
    # user's accuracy: n_00 / n_0.
    u = 66 / 75
    assert math.isclose(est.users[0], u, rel_tol=1e-12)
    assert math.isclose(est.users_se[0], math.sqrt(u * (1 - u) / 74), rel_tol=1e-12)
    # producer's accuracy: p_00 / p_.0 with p_00 = W_0 n_00 / n_0.
    pa = (0.02 * 66 / 75) / p_def
    assert math.isclose(est.producers[0], pa, rel_tol=1e-12)
    pa_var = (0.02**2 * (1 - pa) ** 2 * u * (1 - u) / 74 + pa**2 * (v1 + v2 + v3)) / p_def**2
    assert math.isclose(est.producers_se[0], math.sqrt(pa_var), rel_tol=1e-12)
    # overall accuracy: sum_j p_jj; variance sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)
    users = [66 / 75, 55 / 75, 153 / 165, 313 / 325]
    oa = sum(wi * ui for wi, ui in zip(w, users, strict=True))
    oa_var = sum(wi**2 * ui * (1 - ui) / (ni - 1) for wi, ui, ni in zip(w, users, n, strict=True))
    assert math.isclose(est.overall, oa, rel_tol=1e-12)
    assert math.isclose(est.overall_se, math.sqrt(oa_var), rel_tol=1e-12)
    # the cell proportions of their table 9, e.g. p_23 = W_2 n_23 / n_2. = 0.32 * 11 / 165
    assert math.isclose(est.cell_proportions[2, 3], 0.32 * 11 / 165, rel_tol=1e-12)
    assert math.isclose(est.cell_proportions.sum(), 1.0, rel_tol=1e-12)


def test_forest_gain_area_computed_by_hand(est: area.StratifiedEstimate) -> None:
    p = 0.02 * 0 / 75 + 0.015 * 55 / 75 + 0.32 * 0 / 165 + 0.645 * 1 / 325
    se = math.sqrt(0.015**2 * (55 / 75) * (20 / 75) / 74 + 0.645**2 * (1 / 325) * (324 / 325) / 324)
    assert math.isclose(est.area[1], p * 10_000_000, rel_tol=1e-12)
    assert math.isclose(est.area_se[1], se * 10_000_000, rel_tol=1e-12)


def test_published_figures_of_the_worked_example(est: area.StratifiedEstimate) -> None:
    """The rounded figures printed in the paper (areas in ha, +- the 95 % CI half-width)."""
    ha, ci_ha = est.area * HA_PER_PX, Z * est.area_se * HA_PER_PX
    for j, (a, c) in enumerate([(21_158, 6_158), (11_686, 3_756), (285_770, 15_510), (581_386, 16_282)]):
        assert abs(ha[j] - a) <= 1 and abs(ci_ha[j] - c) <= 1, (j, ha[j], ci_ha[j])
    for j, (u, cu) in enumerate([(0.88, 0.07), (0.73, 0.10), (0.93, 0.04), (0.96, 0.02)]):
        assert round(est.users[j], 2) == u and round(Z * est.users_se[j], 2) == cu
    for j, p in enumerate([0.75, 0.85, 0.93, 0.96]):
        assert round(est.producers[j], 2) == p
    assert round(Z * est.producers_se[0], 2) == 0.21 and round(Z * est.producers_se[2], 2) == 0.03
    assert round(est.overall, 2) == 0.95 and round(Z * est.overall_se, 2) == 0.02


def test_area_units_follow_the_mapped_areas() -> None:
    in_px = area.stratified_estimate(COUNTS, MAPPED_PX)
    in_ha = area.stratified_estimate(COUNTS, MAPPED_PX * HA_PER_PX)
    assert np.allclose(in_ha.area, in_px.area * HA_PER_PX) and np.allclose(in_ha.area_se, in_px.area_se * HA_PER_PX)
    assert np.allclose(in_ha.producers, in_px.producers) and in_ha.overall == pytest.approx(in_px.overall)


def test_a_perfect_map_has_its_mapped_areas_and_no_error() -> None:
    est = area.stratified_estimate(np.diag([10, 20, 5]), np.array([100, 300, 600]))
    assert np.allclose(est.area, [100, 300, 600]) and np.allclose(est.area_se, 0)
    assert np.allclose(est.users, 1) and np.allclose(est.producers, 1) and est.overall == pytest.approx(1)


def test_unmapped_class_counts_nothing_and_unsampled_stratum_is_undefined() -> None:
    counts = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    est = area.stratified_estimate(counts, np.array([500, 500, 0]))  # class 2 neither mapped nor seen
    assert np.isfinite(est.area).all() and est.area[2] == 0 and est.area.sum() == pytest.approx(1000)
    est = area.stratified_estimate(counts, np.array([500, 400, 100]))  # class 2 mapped, never sampled
    assert np.isnan(est.area).all() and np.isnan(est.users[2]) and est.users[0] == pytest.approx(0.8)


def test_error_matrix_counts_map_rows_and_reference_columns() -> None:
    m = area.error_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    long = area.confusion_long(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), "s2")
    assert long.to_dict("list") == {"subset": ["s2"] * 4, "true": [0, 1, 1, 2], "pred": [0, 1, 2, 2], "count": [1, 1, 1, 1]}


def _write(path: Path, bands: np.ndarray, res: float = 10.0) -> None:
    prof = {"driver": "GTiff", "width": bands.shape[2], "height": bands.shape[1], "count": bands.shape[0], "dtype": "uint8",
            "crs": "EPSG:32631", "transform": from_origin(600_000, 5_000_000, res, res), "nodata": 255,
            "tiled": True, "blockxsize": 16, "blockysize": 16}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(bands)


def test_area_stage_reads_test_pixels_of_the_rasters(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    h = w = 48
    cls = rng.integers(0, 3, (h, w)).astype(np.uint8)
    cls[:4, :4] = 255  # nodata: no stratum
    ref = np.where(rng.random((h, w)) < 0.8, cls, rng.integers(0, 3, (h, w))).astype(np.uint8)
    ref[cls == 255] = 1
    ref[40:, :] = 255  # unlabelled
    split = np.zeros((h, w), np.uint8)
    split[:16, :] = 2  # test blocks (with the nodata corner and its labels: not counted)
    split[16:32, :] = 1
    _write(tmp_path / "map.tif", np.stack([cls, np.full_like(cls, 90), np.full_like(cls, 15)]))
    _write(tmp_path / "labels.tif", np.stack([ref, split]))
    classes = [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}, {"id": 2, "name": "c"}]
    s = area.run(tmp_path / "map.tif", tmp_path / "labels.tif", classes, tmp_path / "area.csv", tmp_path / "area.json")
    t = (split == 2) & (ref != 255) & (cls != 255)
    want = np.zeros((3, 3), int)
    np.add.at(want, (cls[t], ref[t]), 1)
    assert s["error_matrix"] == want.tolist() and s["sample_px"] == int(t.sum())
    mapped = np.bincount(cls[cls != 255], minlength=3)
    assert s["mapped_px"] == int(mapped.sum()) and s["pixel_area_ha"] == pytest.approx(0.01)
    df = pd.read_csv(tmp_path / "area.csv")
    assert list(df.columns) == area.AREA_COLUMNS and list(df["class"]) == ["a", "b", "c"]
    ref_est = area.stratified_estimate(want, mapped)
    assert np.allclose(df.area_ha, ref_est.area * 0.01, rtol=1e-5)
    assert np.allclose(df.area_ci95_high_ha - df.area_ha, area.Z95 * ref_est.area_se * 0.01, rtol=1e-4)
    assert df.mapped_ha.sum() == pytest.approx(mapped.sum() * 0.01)
    assert json.loads((tmp_path / "area.json").read_text())["overall_accuracy"] == pytest.approx(ref_est.overall)


def test_area_stage_stops_on_rasters_of_other_grids(tmp_path: Path) -> None:
    _write(tmp_path / "map.tif", np.zeros((3, 32, 32), np.uint8))
    _write(tmp_path / "labels.tif", np.zeros((2, 32, 32), np.uint8), res=20.0)
    with pytest.raises(GridMismatchError, match=r"labels\.tif"):
        area.run(tmp_path / "map.tif", tmp_path / "labels.tif", [{"id": 0, "name": "a"}], tmp_path / "a.csv", tmp_path / "a.json")


def test_map_classes_without_2_reference_pixels_are_left_out_and_reported(tmp_path: Path) -> None:
    h = w = 32
    cls = np.zeros((h, w), np.uint8)
    cls[16:, :] = 1
    cls[30:, 30:] = 2  # 4 px of class 2, outside the test rows: no reference pixel
    ref = cls.copy()
    ref[:4, :4] = 1  # 16 errors in the class-0 stratum
    split = np.zeros((h, w), np.uint8)
    split[:8, :] = 2
    split[20:24, :] = 2
    _write(tmp_path / "map.tif", np.stack([cls, cls, cls]))
    _write(tmp_path / "labels.tif", np.stack([ref, split]))
    classes = [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}, {"id": 2, "name": "c"}]
    s = area.run(tmp_path / "map.tif", tmp_path / "labels.tif", classes, tmp_path / "area.csv", tmp_path / "area.json")
    assert s["unassessed_strata"] == ["c"] and s["unassessed_px"] == 4
    df = pd.read_csv(tmp_path / "area.csv").set_index("class")
    assessed_ha = (h * w - 4) * 0.01
    assert df.area_ha.sum() == pytest.approx(assessed_ha)
    # stratum a: 512 px, 16 of its 256 reference px are b -> b gains 512 * 16/256 px
    assert df.loc["b", "area_ha"] == pytest.approx((508 + 512 * 16 / 256) * 0.01)
    assert df.loc["a", "users_accuracy"] == pytest.approx(240 / 256) and df.loc["b", "users_accuracy"] == 1
    assert df.loc["c", "mapped_px"] == 4 and np.isnan(df.loc["c", "users_accuracy"]) and df.loc["c", "area_ha"] == 0
