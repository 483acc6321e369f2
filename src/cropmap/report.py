"""Stage ``report``: one self-contained HTML page over every region.

Per region: the map quicklook and the expected-F1 layer, sensor availability per month and the
share of mapped pixels per sensor subset, held-out accuracy per sensor subset (and the method
comparison when ``compare`` ran), confusion matrices and per-class scores, error-adjusted area
estimates with confidence intervals (:mod:`cropmap.area`), what extra sensor would help most,
training curves and summary of the model that mapped it, and coverage. Figures come from
:mod:`cropmap.plots`, the numbers behind them from :mod:`cropmap.reportdata`.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cropmap.io import atomic_path

log = logging.getLogger(__name__)


_CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--accent:#0b6e4f}
*{box-sizing:border-box}
body{font-family:"DejaVu Sans",system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--ink);background:var(--bg);margin:0;line-height:1.45;font-size:14px}
header{background:var(--accent);color:white;padding:22px 40px}
header h1{margin:0;font-size:26px}header p{margin:4px 0 0;opacity:.9}
nav{padding:10px 40px;background:white;border-bottom:1px solid var(--line)}nav a{margin-right:18px;color:var(--accent);font-weight:bold;text-decoration:none}
main{max-width:1280px;margin:0 auto;padding:10px 28px 40px}
section.region,section.card{background:white;border:1px solid var(--line);border-radius:8px;padding:18px 26px;margin:22px 0;box-shadow:0 1px 3px rgba(0,0,0,.05)}
h2{margin:4px 0 10px;font-size:22px;color:var(--accent)}
h3{margin:28px 0 8px;font-size:17px;border-bottom:2px solid var(--line);padding-bottom:4px}
h4{margin:16px 0 6px;font-size:14px}
p.note{color:var(--muted);font-size:12.5px;margin:4px 0 10px}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 4px}
.kpi{background:var(--bg);border-radius:6px;padding:10px 16px;min-width:150px}
.kpi b{display:block;font-size:20px;color:var(--ink)}.kpi span{font-size:12px;color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:18px;align-items:start}
figure{margin:0}figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:12px;color:var(--muted);margin-top:4px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:var(--bg);font-weight:bold}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
.missing{color:var(--muted);font-style:italic}
.scroll{overflow-x:auto}
.wide{display:grid;grid-template-columns:minmax(0,1fr) auto;gap:18px;align-items:start}
"""


def _fmt(v: object, spec: str = "{:,.1f}") -> str:
    if v is None or (isinstance(v, float | np.floating) and not np.isfinite(v)):
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer) and "f}" in spec:
        return f"{v:,}"
    return spec.format(v) if isinstance(v, int | float | np.integer | np.floating) else html.escape(str(v))


def _table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """An HTML table of ``df`` (no index), numbers formatted per column (default one decimal)."""
    formats = formats or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v, formats.get(str(c), '{:,.1f}'))}</td>" for c, v in zip(df.columns, row, strict=True)) + "</tr>"
        for row in df.itertuples(index=False, name=None)
    )
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _img(data: bytes, alt: str, caption: str = "") -> str:
    import base64

    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'/>"
            f"{cap}</figure>")


def _missing(what: str) -> str:
    return f"<p class='missing'>{html.escape(what)}</p>"


def _exists(files: dict[str, Path], key: str) -> Path | None:
    p = files.get(key)
    return Path(p) if p and str(p) and Path(p).is_file() else None


def _read_band(path: Path, band: int, max_px: int = 600) -> tuple[np.ndarray, float, float]:
    """A band read at reduced size (from the overviews), its nodata, and the pixel area in ha."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        scale = max(1, int(np.ceil(max(src.width, src.height) / max_px)))
        arr = src.read(band, out_shape=(max(1, src.height // scale), max(1, src.width // scale)), resampling=Resampling.nearest)
        return arr, float(src.nodata if src.nodata is not None else np.nan), abs(src.transform.a * src.transform.e) / 10_000


def _class_table(map_tif: Path) -> tuple[list[str], list[str]]:
    """Class names and colours (``#rrggbb``) by class id, from the map's metadata and colour table."""
    import rasterio

    with rasterio.open(map_tif) as src:
        names = {int(k): v for k, v in json.loads(src.tags(1).get("class_names", "{}")).items()}
        try:
            cmap = src.colormap(1)
        except ValueError:
            cmap = {}
    k = max(names, default=-1) + 1
    colours = ["#{:02x}{:02x}{:02x}".format(*cmap.get(i, (128, 128, 128, 255))[:3]) for i in range(k)]
    return [names.get(i, str(i)) for i in range(k)], colours


def _kpis(items: list[tuple[str, str]]) -> str:
    return "<div class='kpis'>" + "".join(f"<div class='kpi'><b>{v}</b><span>{html.escape(k)}</span></div>" for k, v in items) + "</div>"


def _subset_label(s: str) -> str:
    return "no sensor (nodata)" if s == "none" else s


def _coverage_html(cov: dict, pixel_ha: float) -> str:
    empty = ", ".join(cov["empty_tiles"]) or "none"
    months = ", ".join(cov["months_without_data"]) or "none"
    shares = ", ".join(f"{html.escape(m)} {100 * v:.1f} %" for m, v in cov["modality_share"].items())
    def ha(px: int) -> str:
        return f", {px * pixel_ha:,.1f} ha" if np.isfinite(pixel_ha) else ""

    return (
        "<p>"
        f"The map has <b>{cov['pixels']:,}</b> pixels{ha(cov['pixels'])}. "
        f"<b>{100 * cov['nodata_share']:.2f} %</b> of them ({cov['nodata_pixels']:,} px{ha(cov['nodata_pixels'])}) "
        "had no sensor at all and are nodata (never a guess); "
        f"tiles without any sensor: <b>{len(cov['empty_tiles'])}</b> of {cov['tiles']} ({html.escape(empty)}); "
        f"months without data in any sensor: <b>{html.escape(months)}</b>. "
        f"Share of map pixels predicted with each sensor: {shares}.</p>"
    )


def _confusion_html(conf: pd.DataFrame, subset: str, names: list[str], why: str) -> str:
    from cropmap import plots
    from cropmap.reportdata import confusion_matrix, per_class_scores

    m = confusion_matrix(conf, subset, len(names))
    if m.sum() == 0:
        return _missing(f"No test pixels were scored with {subset}.")
    keep = np.flatnonzero((m.sum(axis=0) + m.sum(axis=1)) > 0)
    m = m[np.ix_(keep, keep)]
    kn = [names[i] for i in keep]
    pcs = per_class_scores(m, kn)
    tot = pcs["support"].sum()
    pcs.loc[len(pcs)] = ["weighted mean", *(float(np.nansum(pcs[c] * pcs["support"]) / tot) for c in ("precision", "recall", "f1")), tot]
    return (f"<h4>{html.escape(subset)} <span class='note'>({html.escape(why)})</span></h4><div>"
            + _img(plots.png(plots.confusion(m, kn, title=f"confusion matrix, {subset}")), f"confusion matrix {subset}",
                   f"{int(m.sum()):,} held-out test pixels. Left: counts; right: each row as % of its true class (the diagonal is the recall).")
            + "<div>" + _table(pcs.rename(columns={"precision": "precision %", "recall": "recall %", "f1": "F1 %"}),
                              {"support": "{:,.0f}"}) + "</div></div>")


def _area_html(a: dict, region: str) -> str:
    from cropmap import plots
    from cropmap.area import Z95

    df = pd.DataFrame(a["classes"]).astype({c: float for c in ("area_ha", "area_se_ha", "area_ci95_low_ha", "area_ci95_high_ha",
                                                                 "users_accuracy", "users_accuracy_se", "producers_accuracy",
                                                                 "producers_accuracy_se", "mapped_ha")})

    def pm(v: pd.Series, se: pd.Series, scale: float = 100, spec: str = "{:.1f}") -> list[str]:
        return [f"{spec.format(scale * x)} ± {spec.format(scale * Z95 * s)}" if np.isfinite(x) and np.isfinite(s)
                else (spec.format(scale * x) if np.isfinite(x) else "–") for x, s in zip(v, se, strict=True)]

    t = pd.DataFrame({
        "class": df["class"], "mapped (ha)": df["mapped_ha"], "estimated (ha)": df["area_ha"],
        "95 % CI (ha)": [f"{lo:,.1f} – {hi:,.1f}" if np.isfinite(lo) else "–" for lo, hi in zip(df.area_ci95_low_ha, df.area_ci95_high_ha, strict=True)],
        "± (ha)": Z95 * df["area_se_ha"],
        "user's acc. %": pm(df.users_accuracy, df.users_accuracy_se),
        "producer's acc. %": pm(df.producers_accuracy, df.producers_accuracy_se),
        "reference px (map class)": df["n_map"],
    })
    oa, oa_se = a["overall_accuracy"], a["overall_accuracy_se"]
    oa_txt = "undefined" if oa is None else f"{100 * oa:.1f} % ± {100 * Z95 * (oa_se if oa_se is not None else np.nan):.1f}"
    warn = ""
    if a["unassessed_strata"]:
        warn = (f"<p class='note'>Not assessed: {a['unassessed_px']:,} mapped pixels "
                f"({a['unassessed_px'] * a['pixel_area_ha']:,.1f} ha) of the map classes with fewer than 2 reference pixels ("
                + html.escape(", ".join(a["unassessed_strata"])) + "); the estimates cover the rest of the map.</p>")
    return (
        "<div class='wide'>" + _img(plots.png(plots.area_chart(df, title=f"area per class, {region}")), f"area per class {region}",
                                    "Light: area mapped (pixel count). Dark: error-adjusted estimate; red whiskers: 95 % confidence interval.")
        + "</div><div>" + _table(t, {"reference px (map class)": "{:,.0f}"})
        + f"<p>Overall accuracy (area-weighted): <b>{oa_txt}</b> (95 % CI); "
        f"{a['sample_px']:,} reference pixels on {a['mapped_px'] - a['unassessed_px']:,} assessed mapped pixels of {a['pixel_area_ha']:g} ha.</p>{warn}</div>"
        "<p class='note'>Stratified estimator with the map classes as strata (Olofsson et al. 2014, \"Good practices for estimating "
        "area and assessing accuracy of land change\", Remote Sensing of Environment 148). The reference sample is every labelled "
        "pixel of the held-out test split, with the map class read from map.tif there. Test pixels come in whole spatial blocks: a "
        "clustered, not a probability sample, so the intervals are approximate (likely too narrow). ± is the half-width of the 95 % "
        "confidence interval (1.96 standard errors).</p>"
    )


def _gains_html(metrics: pd.DataFrame, map_tif: Path, cov: dict | None, region: str, source: str) -> str:
    from cropmap import plots
    from cropmap.reportdata import ALL_PRESENT, NO_GAIN, gains_by_sensor, sensor_gains, subset_code

    sensors, gains = sensor_gains(metrics)
    bits, _, pixel_ha = _read_band(map_tif, 3)
    n = len(sensors)
    best_lut = gains["best"].to_numpy().astype(float)
    best_lut[best_lut == ALL_PRESENT] = n
    best_lut[best_lut == NO_GAIN] = n + 1
    best_lut[best_lut > n + 1] = np.nan
    labels = [*sensors, "all sensors present", "no single sensor helps"]
    colours = [plots.SENSOR_COLOURS.get(m, "#7f7f7f") for m in sensors] + [plots.GREY, "#969696"]
    fig = plots.gain_maps(best_lut[bits], gains["gain"].to_numpy()[bits], labels, colours, title=f"what would help, {region}")
    out = _img(plots.png(fig), f"what would help {region}",
               "Per pixel: the missing sensor whose addition would raise the expected weighted F1 most (left) and by how many points "
               "(right). Nodata pixels (no sensor) show the sensor that would map them best: without any sensor the expected F1 is 0.")
    if cov and cov.get("subset_pixels"):
        counts = {subset_code([] if s == "none" else s.split("+")): int(v) for s, v in cov["subset_pixels"].items()}
        t = gains_by_sensor(gains, sensors, counts, pixel_ha).rename(columns={
            "area_ha": "area (ha)", "share": "share of map %", "score_now": "expected F1 now", "gain": "gain (F1 points)",
            "score_after": "expected F1 with it"})
        t["share of map %"] *= 100
        out += _table(t)
    return out + (f"<p class='note'>From the held-out weighted F1 of every sensor subset ({html.escape(source)}) and the map's "
                  "availability bitmask (band 3). Differences of a point or two are within the noise of the test sample.</p>")


def _training_html(summary_json: Path, region: str) -> str:
    from cropmap import plots
    from cropmap.reportdata import training_history

    out = ""
    hist = training_history(summary_json)
    if not hist.empty:
        out += _img(plots.png(plots.training_curves(hist, title=f"training, {region}")), f"training curves {region}",
                    "Left: training loss terms and the validation loss per epoch; right: validation F1 (or accuracy where the "
                    "run logged no F1). Early stopping watches the validation loss.")
    else:
        out += _missing("No per-epoch history was found for this model.")
    if summary_json.exists():
        s = {k: v for k, v in json.loads(summary_json.read_text()).items() if k != "history"}
        names = {"task": "task", "method": "method", "epochs": "epochs run", "best_val_loss": "best validation loss",
                 "best_val_f1": "best validation weighted F1 (mean over sensor subsets)",
                 "temperatures": "calibration temperature per sensor subset", "fitted_subsets": "tree models (samples per subset)",
                 "n_train": "training samples", "n_val": "validation samples", "accelerator": "accelerator",
                 "precision": "precision", "resumed": "resumed from a checkpoint", "world_size": "processes",
                 "strategy": "strategy"}
        rows = [(names.get(k, k.replace("_", " ")), f"{v:.4g}" if isinstance(v, float) else _fmt(v)) for k, v in s.items()]
        out += _table(pd.DataFrame(rows, columns=["setting", "value"]))
    return out


def _region_html(name: str, files: dict[str, Path], compare: pd.DataFrame | None) -> str:
    from cropmap import plots

    parts = [f"<section class='region' id='region-{html.escape(name)}'><h2>{html.escape(name)}</h2>"]
    map_tif = _exists(files, "map")
    names, _colours = _class_table(map_tif) if map_tif else ([], [])
    pixel_ha = _read_band(map_tif, 1, 8)[2] if map_tif else float("nan")
    metrics_p, cov_p, area_p = _exists(files, "metrics"), _exists(files, "coverage"), _exists(files, "area")
    metrics = pd.read_csv(metrics_p) if metrics_p else None
    cov = json.loads(cov_p.read_text()) if cov_p else None
    a = json.loads(area_p.read_text()) if area_p else None
    expected = _exists(files, "expected")
    mean_exp = None
    if expected:
        import rasterio

        with rasterio.open(expected) as src:
            mean_exp = src.tags().get("mean_expected")
    summary_p = Path(files["summary"]) if files.get("summary") else None
    summ = json.loads(summary_p.read_text()) if summary_p and summary_p.exists() else {}
    kp = []
    if cov:
        kp.append(("mapped area (ha)", f"{(cov['pixels'] - cov['nodata_pixels']) * pixel_ha:,.0f}"))
        kp.append(("nodata (no sensor)", f"{100 * cov['nodata_share']:.2f} %"))
    if mean_exp is not None:
        kp.append(("mean expected weighted F1 over mapped pixels (expected_f1.tif)", html.escape(mean_exp)))
    if metrics is not None and len(metrics):
        kp.append(("weighted F1, all sensors (test split)", f"{metrics.iloc[0]['f1_weighted']:.1f}"))
        if "ece" in metrics.columns:
            kp.append(("calibration error of the confidence, all sensors (ECE, test split)", f"{metrics.iloc[0]['ece']:.3f}"))
    if a and a["overall_accuracy"] is not None:
        kp.append(("overall accuracy (area-weighted, 95 % CI)", f"{100 * a['overall_accuracy']:.1f} ± {196 * (a['overall_accuracy_se'] or 0):.1f} %"))
    if summ:
        kp.append(("model", html.escape(f"{summ.get('method', '?')}, {summ.get('epochs', '?')} epochs")))
    parts.append(_kpis(kp))

    # 1 the map
    parts.append("<h3>Map</h3><div class='grid'>")
    ql = _exists(files, "quicklook")
    parts.append(_img(ql.read_bytes(), f"quicklook of {name}", "map.tif, class band, with its legend") if ql else _missing("no quicklook"))
    if expected:
        arr, nod, _ = _read_band(expected, 1)
        e = np.where(arr == nod, np.nan, arr.astype(float))
        parts.append(_img(plots.png(plots.raster(e, title=f"expected weighted F1, {name}", cbar_label="held-out weighted F1 (%)",
                                                 nodata_label="nodata / subset not evaluated")),
                          f"expected F1 of {name}", "expected_f1.tif: per pixel, the held-out weighted F1 of the sensor subset it was mapped with."))
    parts.append("</div>")

    # 2 coverage, sensors
    if cov:
        parts.append("<h3>Coverage</h3>" + _coverage_html(cov, pixel_ha))
    figs = []
    av = _exists(files, "availability")
    if av:
        avail = {m: v for m, v in json.loads(av.read_text()).items() if v and "static" not in v}
        if avail:
            df = 100 * pd.DataFrame(avail).T
            df.columns = [c[2:] if len(c) == 7 else c for c in df.columns]  # 2023-05 -> 23-05
            figs.append(_img(plots.png(plots.heatmap(df, title="valid pixels per month and sensor", cbar_label="% valid pixels",
                                                     cmap="YlGnBu", xlabel="month", cell=(0.5, 0.42))),
                             f"availability {name}", "Share of the region's pixels with a valid (cloud-free, covered) observation, per month."))
    if cov and cov.get("subset_pixels"):
        sp = pd.Series({_subset_label(k): 100 * v / cov["pixels"] for k, v in cov["subset_pixels"].items()})
        figs.append(_img(plots.png(plots.barh(sp, title="map pixels per sensor subset", xlabel="% of map pixels", fmt="{:.1f} %")),
                         f"subset shares {name}", "Which sensors each pixel was actually mapped with (map.tif band 3)."))
    if figs:
        parts.append("<h3>Sensor availability</h3><div class='grid'>" + "".join(figs) + "</div>")

    # 3 accuracy per subset (+ compare)
    parts.append("<h3>Accuracy per sensor subset</h3>")
    if metrics is not None and len(metrics):
        mt = metrics.set_index("subset")[["f1_weighted", "f1_macro", "accuracy"]].T
        mt.index = ["weighted F1", "macro F1", "accuracy"]
        parts.append("<div>" + _img(plots.png(plots.heatmap(mt, title="held-out scores per sensor subset", cbar_label="%",
                                                            xlabel="sensors available")),
                     f"subset metrics {name}",
                     f"Test-split pixels where every sensor is present ({int(metrics['n'].iloc[0]):,} px), each scored with only the "
                     "subset's sensors; the model never saw them in training.") + "</div>")
    else:
        parts.append(_missing("No labels in this region: no held-out metrics."))
    if compare is not None and len(compare):
        c = compare[compare["region"] == name] if "region" in compare.columns else compare
        if len(c):
            from cropmap.compare import heatmap_figure

            folds = f", mean over {c['fold'].nunique()} folds" if "fold" in c.columns else ""
            parts.append(_img(plots.png(heatmap_figure(c, title="methods x sensor subsets (weighted F1)")),
                              f"method comparison {name}", f"results/compare/table.csv{folds}; red box: best method of each subset."))

    # 4 confusion and per-class scores
    conf_p = _exists(files, "confusion")
    if conf_p and names and metrics is not None and len(metrics):
        conf = pd.read_csv(conf_p)
        parts.append("<h3>Confusion and per-class scores</h3>")
        full = str(metrics.iloc[0]["subset"])
        parts.append(_confusion_html(conf, full, names, "all sensors"))
        if cov and cov.get("subset_pixels"):
            mapped = {k: v for k, v in cov["subset_pixels"].items() if k != "none"}
            common = max(mapped, key=lambda k: mapped[k]) if mapped else full
            if set(common.split("+")) != set(full.split("+")):
                codes = {frozenset(str(s).split("+")): str(s) for s in conf["subset"].unique()}
                sub = codes.get(frozenset(common.split("+")))
                share = 100 * mapped[common] / cov["pixels"]
                parts.append(_confusion_html(conf, sub, names, f"the subset most pixels were mapped with: {share:.1f} % of the map")
                             if sub else _missing(f"{common} was not evaluated."))
            else:
                parts.append("<p class='note'>Most pixels were mapped with all sensors: the matrix above is the one that applies to most of the map.</p>")
        parts.append("<p class='note'>Test-split pixels where every sensor is present, at most evaluation.max_pixels_per_class per "
                     "class: per-class recall is the map's; precision depends on that sampling. The area section below weighs by "
                     "mapped area instead.</p>")

    # 5 area
    if a:
        parts.append("<h3>Area per class</h3>" + _area_html(a, name))

    # 6 what would help
    sm = _exists(files, "subset_metrics")
    if sm and map_tif:
        src_note = "this region's test split" if metrics_p and sm.resolve() == metrics_p.resolve() else f"{sm.parent.name}'s test split"
        parts.append("<h3>What would help</h3>" + _gains_html(pd.read_csv(sm), map_tif, cov, name, src_note))

    # 7 training
    if summary_p:
        parts.append("<h3>Training</h3>" + _training_html(summary_p, name))
    parts.append("</section>")
    return "\n".join(parts)


def html_report(regions: dict[str, dict[str, Path]], out: Path, compare_table: Path | None = None) -> None:
    """A self-contained HTML page (figures embedded as PNG data URIs): one section per region.

    ``regions`` maps each region to its files: ``map``, ``quicklook``, ``expected``,
    ``availability``, ``coverage``, ``metrics``, ``confusion``, ``area`` (labelled regions),
    ``subset_metrics`` (the metrics of the model's region) and ``summary`` (train_summary.json).
    Missing files leave their part out. ``compare_table``: results/compare/table.csv, shown when
    it exists.
    """
    compare = pd.read_csv(compare_table) if compare_table is not None and compare_table.is_file() else None
    nav = "".join(f"<a href='#region-{html.escape(r)}'>{html.escape(r)}</a>" for r in regions)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cropmap report</title>",
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
        "<header><h1>cropmap report</h1><p>Crop-type maps, their held-out accuracy per sensor subset, error-adjusted areas "
        "and what would make them better.</p></header>",
        f"<nav>{nav}</nav><main>",
    ]
    for name, files in regions.items():
        parts.append(_region_html(name, files, compare))
    parts.append("</main></body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
