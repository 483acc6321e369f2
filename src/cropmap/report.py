"""Stage ``report``: one self-contained HTML page over every region.

Per region: the held-out metrics per sensor subset (``metrics.csv``), the mean expected F1
(``expected_f1.tif``), the training summary of the model that mapped it, the monthly
availability of each sensor, the coverage counts and the quicklook.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from cropmap.io import atomic_path


def html_report(regions: dict[str, dict[str, Path]], out: Path) -> None:
    """A self-contained HTML page: per region its metrics table, quicklook and availability."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>cropmap report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             "<h1>cropmap report</h1>"]
    import base64

    for name, files in regions.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if files.get("metrics") and Path(files["metrics"]).exists():
            parts.append("<h3>Held-out metrics per sensor subset (test split)</h3>")
            parts.append(pd.read_csv(files["metrics"]).to_html(index=False, float_format=lambda v: f"{v:.1f}"))
        if files.get("expected") and Path(files["expected"]).exists():
            import rasterio

            with rasterio.open(files["expected"]) as src:
                mean = src.tags().get("mean_expected", "n/a")
            parts.append(f"<p>Mean expected weighted F1 over mapped pixels (expected_f1.tif): <b>{html.escape(mean)}</b></p>")
        if files.get("summary") and Path(files["summary"]).exists():
            s = json.loads(Path(files["summary"]).read_text())
            parts.append(f"<p>Training: {html.escape(json.dumps(s))}</p>")
        if files.get("availability") and Path(files["availability"]).exists():
            av = json.loads(Path(files["availability"]).read_text())
            df = pd.DataFrame({m: v for m, v in av.items() if v}).T
            parts.append("<h3>Valid-pixel fraction per month</h3>" + df.to_html(float_format=lambda v: f"{v:.2f}"))
        if files.get("coverage") and Path(files["coverage"]).exists():
            cov = json.loads(Path(files["coverage"]).read_text())
            empty = ", ".join(cov["empty_tiles"]) or "none"
            parts.append(
                "<h3>Coverage</h3><p>"
                f"Nodata pixels (no sensor at all): <b>{100 * cov['nodata_share']:.2f} %</b> ({cov['nodata_pixels']} of {cov['pixels']}); "
                f"tiles without any sensor: <b>{len(cov['empty_tiles'])}</b> of {cov['tiles']} ({html.escape(empty)}); "
                f"months without data in any sensor: <b>{html.escape(', '.join(cov['months_without_data']) or 'none')}</b>.</p>"
            )
        if files.get("quicklook") and Path(files["quicklook"]).exists():
            b64 = base64.b64encode(Path(files["quicklook"]).read_bytes()).decode()
            parts.append(f"<img alt='quicklook of {html.escape(name)}' src='data:image/png;base64,{b64}'/>")
    parts.append("</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
