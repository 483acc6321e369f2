"""WorldCereal long extractions: the real Flanders table and a hand-computed dekadal fixture."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cropmap.errors import InputDataError, LabelError
from cropmap.tables.worldcereal_long import (
    decode_worldcereal_long,
    load_worldcereal_long,
    step_frequency,
)
from tests.conftest import REALDATA as DATA

FLANDERS = DATA / "worldcereal_flanders_2021_extractions_long.parquet"
S2 = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
NODATA = 65535


def db(dn: float) -> float:
    return 20 * math.log10(dn) - 83


# ------------------------------------------------------------------------------------------
# The real Flanders table (monthly steps)
# ------------------------------------------------------------------------------------------
def test_flanders_long_table_reads_100_samples_16_months_classes_from_ewoc(caplog: pytest.LogCaptureFixture) -> None:
    raw = pd.read_parquet(FLANDERS)
    with caplog.at_level(logging.WARNING, logger="cropmap.tables.worldcereal_long"):
        s, classes, months = load_worldcereal_long(FLANDERS, seed=42)
    assert len(s) == 100 and s.modalities == ["s2", "s1", "weather", "dem"]
    assert months == [str(p) for p in pd.period_range("2020-08", "2021-11", freq="M")]
    assert s.x["s2"].shape == (100, 16, 10) and s.x["s1"].shape == (100, 16, 2)
    assert s.x["weather"].shape == (100, 16, 2) and s.x["dem"].shape == (100, 2)
    # classes from ewoc_code (the wide loader's rule): every code in exactly one class, counts add up
    codes = sorted(raw["ewoc_code"].unique().tolist())
    assert sorted(c for cl in classes for c in cl["codes"]) == codes
    assert sum(cl["n"] for cl in classes) == 100 and (s.y >= 0).all()
    per_sample = raw.drop_duplicates("sample_id")["ewoc_code"].value_counts()
    big = {cl["codes"][0]: cl["n"] for cl in classes if len(cl["codes"]) == 1}
    assert big == {int(c): int(k) for c, k in per_sample.items() if k >= 20}
    # B8A is nodata in every row: filled with B08, with a warning
    assert (raw["S2-L2A-B8A"] == NODATA).all()
    assert any("B8A is filled with B08" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(s.x["s2"][..., S2.index("B8A")], s.x["s2"][..., S2.index("B08")])
    assert np.bincount(s.split, minlength=3).min() > 0


def test_flanders_values_are_the_rows_in_cropmap_units() -> None:
    raw = pd.read_parquet(FLANDERS)
    x, months, samples = decode_worldcereal_long(raw, table=FLANDERS.name)
    i = 17
    sid = samples["sample_id"][i]
    rows = raw[raw["sample_id"] == sid]
    rows = rows.set_index(rows["timestamp"].dt.strftime("%Y-%m"))
    for mo in ("2020-08", "2021-03", "2021-07"):
        r, t = rows.loc[mo], months.index(mo)
        for b in ("B04", "B11"):
            dn = float(r[f"S2-L2A-{b}"])
            want = np.nan if dn == NODATA else dn / 10000
            np.testing.assert_allclose(x["s2"][i, t, S2.index(b)], want, rtol=1e-6)
        np.testing.assert_allclose(x["s1"][i, t, 0], db(float(r["S1-SIGMA0-VV"])), rtol=1e-5)
        np.testing.assert_allclose(x["weather"][i, t, 0], float(r["AGERA5-TMEAN"]) / 100, rtol=1e-6)
        np.testing.assert_allclose(x["weather"][i, t, 1], float(r["AGERA5-PRECIP"]) / 100 / 1000, rtol=1e-6)
    np.testing.assert_allclose(x["dem"][i], [float(rows["elevation"].iloc[0]), float(rows["slope"].iloc[0])])
    # monthly precipitation of the Flanders table is a monthly total: tens of millimetres (m per month)
    assert 0.01 < float(np.nanmean(x["weather"][..., 1])) < 0.2


def test_season_selects_calendar_months_and_uncovered_season_is_one_line() -> None:
    s, _, months = load_worldcereal_long(FLANDERS, season=("2021-01", "2021-11"))
    assert months == [f"2021-{m:02d}" for m in range(1, 12)] and s.x["s2"].shape[1] == 11
    full, _, all_months = load_worldcereal_long(FLANDERS)
    np.testing.assert_array_equal(s.x["s1"], full.x["s1"][:, all_months.index("2021-01"):all_months.index("2021-11") + 1])
    with pytest.raises(InputDataError) as err:
        load_worldcereal_long(FLANDERS, season=("2021-01", "2021-12"))
    msg = str(err.value)
    assert "\n" not in msg and FLANDERS.name in msg and "2020-08 .. 2021-11" in msg and "2021-01 .. 2021-12" in msg


def test_config_classes_map_ewoc_codes_unknown_codes_error_or_ignored() -> None:
    classes = [{"id": 0, "name": "maize", "colour": "#3f8f29", "codes": [1101060000]},
               {"id": 1, "name": "grassland", "codes": ["2001020000"]}]
    with pytest.raises(LabelError) as err:
        load_worldcereal_long(FLANDERS, classes=classes)
    assert FLANDERS.name in str(err.value) and "classes[].codes" in str(err.value)
    s, table, _ = load_worldcereal_long(FLANDERS, classes=classes, unknown="ignore")
    assert [(c["name"], c["n"]) for c in table] == [("maize", 12), ("grassland", 28)]
    assert (s.y == 0).sum() == 12 and (s.y == 1).sum() == 28 and (s.y == -100).sum() == 60


def test_band_subset_reads_only_those_bands() -> None:
    s, _, _ = load_worldcereal_long(FLANDERS, bands={"s2": ["B04", "B08", "B11"], "dem": ["elevation"]})
    full, _, _ = load_worldcereal_long(FLANDERS)
    assert s.x["s2"].shape[-1] == 3 and s.x["dem"].shape == (100, 1)
    np.testing.assert_array_equal(s.x["s2"], full.x["s2"][..., [S2.index("B04"), S2.index("B08"), S2.index("B11")]])
    # presence counts a month valid when its three bands are finite (not the ten of BANDS)
    frac = np.isfinite(s.x["s2"]).all(axis=-1).mean(axis=1)
    np.testing.assert_array_equal(s.mask[:, 0], (frac >= 0.5) & (frac > 0))
    np.testing.assert_array_equal(s.mask[:, 3], np.isfinite(s.x["dem"]).all(axis=1))


# ------------------------------------------------------------------------------------------
# A dekadal fixture in the same layout, values computed by hand
# ------------------------------------------------------------------------------------------
def dekadal_table(n: int = 28) -> pd.DataFrame:
    """``n`` samples (14 lat/lon cells), dekads of March and April 2021, known DNs.

    Sample 0 holds the hand-computed cases; the others repeat plain values.
    """
    rows = []
    stamps = [f"2021-03-{d:02d}" for d in (1, 11, 21)] + [f"2021-04-{d:02d}" for d in (1, 11, 21)]
    for i in range(n):
        for ts in stamps:
            r: dict = {"sample_id": f"dek_{i}", "timestamp": pd.Timestamp(ts), "lat": 50.0 + 0.5 * (i // 2),
                       "lon": 4.0 + 0.001 * (i % 2), "ewoc_code": [1101060000, 1201000010][i % 2],
                       "elevation": 12, "slope": 2, "start_date": "2021-03-01", "end_date": "2021-04-30"}
            for b in S2:
                r[f"S2-L2A-{b}"] = 1000
            r["S2-L2A-B8A"] = NODATA
            r["S1-SIGMA0-VV"], r["S1-SIGMA0-VH"] = 1000, 1000
            r["AGERA5-TMEAN"], r["AGERA5-PRECIP"] = 28000, 1000
            rows.append(r)
    df = pd.DataFrame(rows)
    s0 = df["sample_id"] == "dek_0"
    march = s0 & (df["timestamp"].dt.month == 3)
    april = s0 & (df["timestamp"].dt.month == 4)
    # March: B04 1000, 2000, nodata; VV 1000 (-23 dB), 10000 (-3 dB), nodata;
    # temperature 280.00, 283.00, nodata K; precipitation 10, 20, nodata mm (third dekad: 11 days)
    df.loc[march, "S2-L2A-B04"] = [1000, 2000, NODATA]
    df.loc[march, "S1-SIGMA0-VV"] = [1000, 10000, NODATA]
    df.loc[march, "AGERA5-TMEAN"] = [28000, 28300, NODATA]
    df.loc[march, "AGERA5-PRECIP"] = [1000, 2000, NODATA]
    # April: every dekad valid: precipitation 10, 20, 30 mm; all S2 nodata in the first dekad only
    df.loc[april, "AGERA5-PRECIP"] = [1000, 2000, 3000]
    first_april = april & (df["timestamp"].dt.day == 1)
    for b in S2:
        df.loc[first_april, f"S2-L2A-{b}"] = NODATA
    return df


def test_dekads_aggregate_to_months_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "dekadal_long.parquet"
    dekadal_table().to_parquet(path)
    assert step_frequency(pd.read_parquet(path)["timestamp"], table=path) == "dekad"
    s, classes, months = load_worldcereal_long(path, seed=1, min_samples=10)
    assert months == ["2021-03", "2021-04"] and len(s) == 28
    assert [c["codes"] for c in classes] == [[1101060000], [1201000010]]
    i = 0
    # three dekads -> one month: mean of the valid ones (nodata ignored)
    assert s.x["s2"][i, 0, S2.index("B04")] == pytest.approx(0.15)
    assert s.x["s1"][i, 0, 0] == pytest.approx(-13.0, abs=1e-5)  # mean of -23 and -3 dB
    assert s.x["weather"][i, 0, 0] == pytest.approx(281.5)
    # precipitation: each dekad holds its total; March misses its 11-day third dekad:
    # (10 + 20) mm over 20 days, scaled to 31 days = 46.5 mm
    assert s.x["weather"][i, 0, 1] == pytest.approx(0.0465, rel=1e-6)
    # April: 10 + 20 + 30 mm = 60 mm = 0.06 m
    assert s.x["weather"][i, 1, 1] == pytest.approx(0.06, rel=1e-6)
    # S2 of April from the two valid dekads
    assert s.x["s2"][i, 1, S2.index("B04")] == pytest.approx(0.1)
    # another sample: plain values, precipitation 3 x 10 mm per month
    assert s.x["weather"][5, 0, 1] == pytest.approx(0.03) and s.x["weather"][5, 1, 1] == pytest.approx(0.03)
    assert s.mask.all()


def test_bad_long_tables_are_one_line(tmp_path: Path) -> None:
    df = dekadal_table()
    bad = df.copy()
    bad.loc[bad.index[:3], "timestamp"] = pd.Timestamp("2021-03-05")
    p = tmp_path / "bad_days.parquet"
    bad.to_parquet(p)
    with pytest.raises(InputDataError, match=r"days \[5\].*1st, 11th, 21st"):
        load_worldcereal_long(p)
    p2 = tmp_path / "no_vh.parquet"
    df.drop(columns=["S1-SIGMA0-VH"]).to_parquet(p2)
    with pytest.raises(InputDataError) as err:
        load_worldcereal_long(p2)
    msg = str(err.value)
    assert "\n" not in msg and "S1-SIGMA0-VH" in msg and "found s1 bands ['VV']" in msg and "['VV', 'VH']" in msg
    with pytest.raises(InputDataError, match="no such table"):
        load_worldcereal_long(tmp_path / "absent.parquet")
