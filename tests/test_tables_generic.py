"""Generic point tables (cropmap band naming), season alignment and classes shared by the table readers."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point

from cropmap.errors import InputDataError, LabelError, UnknownNameError
from cropmap.tables.generic import (
    check_calendar_alignment,
    decode_point_table,
    load_point_table,
    resolve_bands,
    select_season,
    table_classes,
)

MONTHS = ["2023-04", "2023-05", "2023-06", "2023-07"]


def point_table(n: int = 42, s1: bool = True) -> pd.DataFrame:
    """``n`` points in 14 cells, s2 B04/B08/B11 + (s1) + weather + dem, value = f(point, month, band)."""
    rng = np.random.default_rng(0)
    cols: dict[str, object] = {"lat": 48.0 + 0.5 * (np.arange(n) // 3), "lon": 2.0 + 0.001 * (np.arange(n) % 3),
                               "crop": np.array(["wheat", "maize", "rapeseed"])[np.arange(n) % 3]}
    for ti, mo in enumerate(MONTHS):
        for bi, b in enumerate(("B04", "B08", "B11")):
            cols[f"s2_{b}_{mo}"] = 0.01 * (bi + 1) + 0.001 * ti + 0.0001 * np.arange(n)
        if s1:
            cols[f"s1_VV_{mo}"] = -10.0 - ti + rng.normal(size=n)
            cols[f"s1_VH_{mo}"] = -17.0 - ti + rng.normal(size=n)
        cols[f"weather_temperature_2m_{mo}"] = 285.0 + ti
        cols[f"weather_total_precipitation_{mo}"] = 0.05
    cols["dem_elevation"] = 100.0 + np.arange(n)
    cols["dem_slope"] = 1.5
    df = pd.DataFrame(cols)
    df.loc[3, "s2_B08_2023-05"] = np.nan  # one invalid month of one point
    return df


def test_csv_point_table_reads_bands_months_labels(tmp_path: Path) -> None:
    path = tmp_path / "fields.csv"
    point_table().to_csv(path, index=False)
    s, classes, months = load_point_table(path, label="crop", bands={"s2": ["B04", "B08", "B11"]}, min_samples=5)
    assert months == MONTHS and len(s) == 42
    assert s.x["s2"].shape == (42, 4, 3) and s.x["s1"].shape == (42, 4, 2) and s.x["dem"].shape == (42, 2)
    assert s.x["s2"][7, 2, 1] == pytest.approx(0.02 + 0.002 + 0.0007)
    assert np.isnan(s.x["s2"][3, 1, 1]) and s.mask[3, 0]  # 3 valid months of 4 >= 0.5: still present
    np.testing.assert_allclose(s.x["weather"][0, :, 0], [285, 286, 287, 288])
    assert {c["name"]: c["n"] for c in classes} == {"maize": 14, "rapeseed": 14, "wheat": 14}
    names = {c["id"]: c["name"] for c in classes}
    assert [names[int(v)] for v in s.y[:3]] == ["wheat", "maize", "rapeseed"]
    assert s.mask.all(axis=0).tolist() == [True, True, True, True]
    assert set(np.unique(s.split)) == {0, 1, 2}


def test_geoparquet_points_modality_absent_and_season(tmp_path: Path) -> None:
    df = point_table(s1=False)
    gdf = gpd.GeoDataFrame(df.drop(columns=["lat", "lon"]), geometry=[Point(x, y) for x, y in zip(df.lon, df.lat, strict=True)],
                           crs="EPSG:4326").to_crs("EPSG:3857")
    path = tmp_path / "fields.parquet"
    gdf.to_parquet(path)
    classes = [{"id": 0, "name": "wheat", "codes": ["wheat"]}, {"id": 3, "name": "maize", "colour": "#3f8f29", "codes": ["maize"]}]
    s, table, months = load_point_table(path, label="crop", season=("2023-05", "2023-06"), classes=classes, unknown="ignore",
                                        bands={"s2": ["B04", "B08", "B11"]})
    assert months == ["2023-05", "2023-06"] and s.x["s2"].shape == (42, 2, 3)
    assert s.x["s2"][7, 0, 0] == pytest.approx(0.01 + 0.001 + 0.0007)
    assert not s.mask[:, 1].any() and s.mask[:, [0, 2, 3]].all()  # no s1_* columns: s1 absent
    assert [(c["id"], c["name"], c["n"]) for c in table] == [(0, "wheat", 14), (3, "maize", 14)]
    assert (s.y == -100).sum() == 14
    with pytest.raises(LabelError, match="rapeseed"):
        load_point_table(path, label="crop", classes=classes, bands={"s2": ["B04", "B08", "B11"]})


def test_point_table_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fields.csv"
    point_table().to_csv(path, index=False)
    with pytest.raises(InputDataError) as err:  # default bands: B02 etc. have no columns
        load_point_table(path, label="crop")
    msg = str(err.value)
    assert "\n" not in msg and "found s2 bands ['B04', 'B08', 'B11']" in msg and "'B02'" in msg
    with pytest.raises(InputDataError, match="no label column 'class'"):
        load_point_table(path, label="class")
    with pytest.raises(InputDataError) as err:
        load_point_table(path, label="crop", bands={"s2": ["B04", "B08", "B11"]}, season=("2023-01", "2023-12"))
    msg = str(err.value)
    assert str(path) in msg and "2023-04 .. 2023-07" in msg and "2023-01 .. 2023-12" in msg and "\n" not in msg
    with pytest.raises(UnknownNameError, match="not a subset"):
        resolve_bands({"s2": ["B04", "NDVI"]})


def test_select_season_and_calendar_alignment() -> None:
    months = [f"2020-{m:02d}" for m in range(8, 13)] + [f"2021-{m:02d}" for m in range(1, 12)]
    assert select_season(months, ("2021-01", "2021-03"), table="t") == [5, 6, 7]
    with pytest.raises(InputDataError, match=r"t: its months 2020-08 \.\. 2021-11 \(16 months\).*2021-06 \.\. 2021-12.*missing 2021-12"):
        select_season(months, ("2021-06", "2021-12"), table="t")
    check_calendar_alignment(["2021-01", "2021-02"], ["2023-01", "2023-02"], what="region r")
    with pytest.raises(InputDataError, match="region r"):
        check_calendar_alignment(["2021-01", "2021-02"], ["2023-02", "2023-03"], what="region r")
    with pytest.raises(InputDataError):
        check_calendar_alignment(["2021-01", "2021-02"], ["2023-01"], what="region r")


def test_table_classes_from_config_or_table() -> None:
    y, cl = table_classes(["a", "b", "a", "c"], table="t", min_samples=2)
    assert [(c["name"], c["codes"], c["n"]) for c in cl] == [("a", ["a"], 2), ("other", ["b", "c"], 2)]
    assert y.tolist() == [0, 1, 0, 1]
    y, cl = table_classes(np.array([1101060000, 1101060000, 7]), table="t", min_samples=2, ewoc=True)
    assert cl[0]["codes"] == [1101060000] and y.tolist() == [0, 0, 1]
    y, cl = table_classes([5, 6], table="t", classes=[{"id": 2, "name": "x", "codes": [5, 6]}])
    assert y.tolist() == [2, 2] and cl == [{"id": 2, "name": "x", "colour": "#808080", "codes": [5, 6], "n": 2}]


def test_documented_example_table_decodes(tmp_path: Path) -> None:
    """The 5-line CSV of docs/sample_tables.md section (d) is a valid generic table."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "sample_tables.md").read_text()
    block = doc.split("## (d) Generic point table", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) == 5
    path = tmp_path / "fields.csv"
    path.write_text(block)
    x, months = decode_point_table(pd.read_csv(path), table=path, bands={"s2": ["B04", "B08"]})
    assert months == ["2023-05", "2023-06"] and x["s2"].shape == (4, 2, 2) and np.isnan(x["s2"][3, 0]).all()
    assert np.isnan(x["weather"]).all() and x["dem"][1].tolist() == [128.0, pytest.approx(1.1)]
    y, classes = table_classes(pd.read_csv(path)["crop"], table=path, min_samples=1)
    assert sorted(c["name"] for c in classes) == ["maize", "rapeseed", "wheat"] and (y >= 0).all()
