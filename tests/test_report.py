"""What the HTML report computes (what would help, per-class scores, training history) and its HTML."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin
from sklearn.metrics import precision_recall_fscore_support

from cropmap import report, reportdata
from cropmap.modalities import bit

# held-out weighted F1 of every subset of s2, s1, dem (the region has no weather)
F1 = {"s2+s1+dem": 80.0, "s2+s1": 78.0, "s2+dem": 75.0, "s1+dem": 60.0, "s2": 70.0, "s1": 50.0, "dem": 20.0}


def _metrics() -> pd.DataFrame:
    return pd.DataFrame({"subset": list(F1), "n_modalities": [s.count("+") + 1 for s in F1], "n": 100,
                         "f1_weighted": list(F1.values()), "f1_macro": 50.0, "accuracy": 60.0})


def test_sensor_gains_pick_the_missing_sensor_that_raises_f1_most() -> None:
    sensors, g = reportdata.sensor_gains(_metrics())
    assert sensors == ["s2", "s1", "dem"]
    code = reportdata.subset_code
    # s1 only: +s2 gives 78 (+28), +dem gives 60 (+10) -> s2, 28 points
    row = g.loc[code(["s1"])]
    assert sensors[int(row.best)] == "s2" and row.gain == pytest.approx(28) and row.score_after == pytest.approx(78)
    # s2+s1: +dem gives 80 (+2)
    row = g.loc[code(["s2", "s1"])]
    assert sensors[int(row.best)] == "dem" and row.gain == pytest.approx(2)
    # dem only: +s2 75 (+55) beats +s1 60 (+40)
    assert sensors[int(g.loc[code(["dem"])].best)] == "s2"
    # nothing present (nodata): the best single sensor, from an expected F1 of 0
    assert sensors[int(g.loc[0].best)] == "s2" and g.loc[0].gain == pytest.approx(70)
    assert g.loc[code(["s2", "s1", "dem"])].best == reportdata.ALL_PRESENT
    assert g.loc[bit("weather")].best == reportdata.UNKNOWN  # a sensor the model was not evaluated with


def test_a_sensor_that_makes_things_worse_is_not_advised() -> None:
    m = _metrics()
    m.loc[m.subset == "s2+s1+dem", "f1_weighted"] = 70.0  # adding dem to s2+s1 (78) would lose 8 points
    _, g = reportdata.sensor_gains(m)
    row = g.loc[reportdata.subset_code(["s2", "s1"])]
    assert row.best == reportdata.NO_GAIN and row.gain == 0 and row.score_after == pytest.approx(78)


def test_area_by_missing_sensor_that_matters_most() -> None:
    sensors, g = reportdata.sensor_gains(_metrics())
    code = reportdata.subset_code
    pixels = {code(["s1"]): 300, code(["dem"]): 100, code(["s2", "s1"]): 500, code(["s2", "s1", "dem"]): 100, 0: 0}
    t = reportdata.gains_by_sensor(g, sensors, pixels, pixel_ha=0.01).set_index("missing sensor that matters most")
    assert set(t.index) == {"s2", "dem", "all sensors present"}
    assert t.loc["s2", "area_ha"] == pytest.approx(4.0) and t.loc["s2", "share"] == pytest.approx(0.4)
    # area-weighted: 300 px gain 28 (s1 -> s2+s1) and 100 px gain 55 (dem -> s2+dem)
    assert t.loc["s2", "gain"] == pytest.approx((300 * 28 + 100 * 55) / 400)
    assert t.loc["dem", "score_after"] == pytest.approx(80) and t.loc["all sensors present", "gain"] == 0
    assert t.index[0] == "dem"  # largest area first


def test_per_class_scores_agree_with_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 500)
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, 4, 500))
    conf = pd.DataFrame([("s2", t, p, 1) for t, p in zip(y, pred, strict=True)], columns=["subset", "true", "pred", "count"])
    m = reportdata.confusion_matrix(conf, "s2", 4)
    got = reportdata.per_class_scores(m, ["a", "b", "c", "d"])
    p, r, f, s = precision_recall_fscore_support(y, pred)
    assert np.allclose(got.precision, 100 * p) and np.allclose(got.recall, 100 * r) and np.allclose(got.f1, 100 * f)
    assert got.support.tolist() == s.tolist()


def test_training_history_from_the_summary_or_the_lightning_log(tmp_path: Path) -> None:
    summary = tmp_path / "train_summary.json"
    summary.write_text(json.dumps({"epochs": 2}))
    assert reportdata.training_history(summary).empty
    logs = tmp_path / "lightning/logs/version_0"
    logs.mkdir(parents=True)
    # Lightning's CSVLogger: validation and training figures of an epoch on separate rows
    (logs / "metrics.csv").write_text(
        "epoch,step,train/main,train/total,val_acc,val_loss\n"
        "0,5,,,0.30,1.87\n0,5,2.02,130.7,,\n1,11,,,0.35,1.79\n1,11,1.93,107.6,,\n")
    h = reportdata.training_history(summary)
    assert h["epoch"].tolist() == [0, 1] and h["val_loss"].tolist() == [1.87, 1.79] and h["train/total"].tolist() == [130.7, 107.6]
    hist = [{"epoch": 1, "train/total": 2.0, "val_loss": 1.5, "val_f1": 0.6}, {"epoch": 0, "train/total": 3.0, "val_loss": 1.9, "val_f1": 0.4}]
    summary.write_text(json.dumps({"epochs": 2, "history": hist}))
    h = reportdata.training_history(summary)  # the summary's history wins
    assert h["epoch"].tolist() == [0, 1] and h["val_f1"].tolist() == [0.4, 0.6]


def _map(path: Path, bits: np.ndarray) -> None:
    cls = np.where(bits == 0, 255, (np.arange(bits.size).reshape(bits.shape) // 7) % 3).astype(np.uint8)
    prof = {"driver": "GTiff", "width": bits.shape[1], "height": bits.shape[0], "count": 3, "dtype": "uint8",
            "crs": "EPSG:32631", "transform": from_origin(600_000, 5_000_000, 10, 10), "nodata": 255}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(np.stack([cls, np.full_like(cls, 80), bits]))
        dst.update_tags(1, class_names=json.dumps({0: "non_crop", 1: "wheat", 2: "maize"}))
        dst.write_colormap(1, {0: (158, 158, 158, 255), 1: (230, 194, 41, 255), 2: (63, 143, 41, 255)})


def test_html_report_of_a_region_without_labels(tmp_path: Path) -> None:
    """A region mapped with another region's model: no metrics, confusion or area of its own."""
    code = reportdata.subset_code
    bits = np.full((60, 80), code(["s2", "s1", "dem"]), np.uint8)
    bits[:, :30] = code(["s1", "dem"])
    bits[:10, :10] = 0
    _map(tmp_path / "map.tif", bits)
    (tmp_path / "metrics.csv").write_text(_metrics().to_csv(index=False))
    cov = {"pixels": bits.size, "nodata_pixels": 100, "nodata_share": 100 / bits.size, "tiles": 2, "empty_tiles": [],
           "modality_share": {"s2": 0.6, "s1": 0.98, "dem": 0.98}, "months_without_data": ["2023-02"],
           "subset_pixels": {"none": 100, "s1+dem": 1700, "s2+s1+dem": 3000}}
    (tmp_path / "coverage.json").write_text(json.dumps(cov))
    (tmp_path / "availability.json").write_text(json.dumps({"s2": {"2023-01": 0.5, "2023-02": 0.0}, "s1": {"2023-01": 1.0, "2023-02": 0.0},
                                                            "weather": None, "dem": {"static": 1.0}}))
    files = {"map": tmp_path / "map.tif", "metrics": Path(""), "confusion": Path(""), "area": Path(""),
             "subset_metrics": tmp_path / "metrics.csv", "coverage": tmp_path / "coverage.json",
             "availability": tmp_path / "availability.json", "summary": tmp_path / "missing/train_summary.json"}
    out = tmp_path / "report.html"
    report.html_report({"east": files}, out, compare_table=tmp_path / "no_table.csv")
    text = out.read_text()
    assert "What would help" in text and "<h3>Coverage</h3>" in text and "months without data in any sensor: <b>2023-02</b>" in text
    assert "Area per class" not in text and "Confusion" not in text
    assert "No labels in this region" in text
    # the table: the s1+dem part (1700 px) and the nodata corner (100 px) most need s2: 18 ha, 37.5 % of the map
    assert re.search(r"<td>s2</td><td>18\.0</td><td>37\.5</td><td>1\.0</td>", text), text[text.index("missing sensor that matters most"):][:600]
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(imgs) == 3  # availability, subset shares, what would help
    from PIL import Image

    for b in imgs:
        Image.open(io.BytesIO(base64.b64decode(b))).load()
