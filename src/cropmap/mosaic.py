"""Stage ``mosaic``: prediction tiles into one Cloud-Optimized GeoTIFF map, a quicklook and a STAC item.

``map.tif``: band 1 ``class`` (uint8, nodata 255, colour table, class names in metadata),
band 2 ``confidence`` (0-100), band 3 ``modalities`` (bit m set when modality m was used,
bit order :data:`cropmap.modalities.MODALITIES`). Internal overviews use mode resampling so
class ids are never averaged. Tiles are copied window by window into a temporary tiled GTiff and
GDAL's block cache is capped (:data:`GDAL_CACHE_MB`), so memory is bounded by one tile plus that
cache, whatever the size of the region. The optional ``probabilities`` COG (one uint8 band per
class, percent) uses average overviews.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape as xml_escape

import numpy as np
import rasterio
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_translate, cog_validate
from rio_cogeo.profiles import cog_profiles

from cropmap.grid import Grid
from cropmap.io import atomic_path
from cropmap.labels import NODATA, colormap
from cropmap.modalities import MODALITIES
from cropmap.progress import progress

log = logging.getLogger(__name__)

BAND_NAMES = ("class", "confidence", "modalities")

#: GDAL block cache (MB) while mosaicking and writing COGs (the default, 5 % of RAM, grows with the map).
GDAL_CACHE_MB = 256


def tile_offsets(path: Path, grid: Grid) -> Window:
    """Window of a tile file inside the grid, from its transform."""
    with rasterio.open(path) as src:
        col = round((src.transform.c - grid.xmin) / grid.res)
        row = round((grid.ymax - src.transform.f) / grid.res)
        return Window(col, row, src.width, src.height)


def mosaic_to_cog(tiles: Sequence[Path], out: Path, grid: Grid, classes: Sequence[dict], *, tags: dict[str, str],
                  proba_out: Path | None = None) -> None:
    """Mosaic tiles into ``out`` (a COG) and optionally the probability bands into ``proba_out``."""
    names = {c["id"]: c["name"] for c in classes}
    prof = grid.profile(3, dtype="uint8", nodata=NODATA) | {"photometric": "MINISBLACK", "interleave": "band"}
    with rasterio.open(tiles[0]) as t0:
        n_bands = t0.count
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), tempfile.TemporaryDirectory(dir=out.parent, prefix=".mosaic.") as tmpd:
        mos, pmos = Path(tmpd) / "mosaic.tif", Path(tmpd) / "proba.tif"
        with_proba = proba_out is not None and n_bands > 3
        with rasterio.open(mos, "w", **prof) as dst:
            pdst = rasterio.open(pmos, "w", **grid.profile(n_bands - 3, dtype="uint8", nodata=None)) if with_proba else None
            for t in progress(tiles, "mosaic", "tile"):
                win = tile_offsets(t, grid)
                with rasterio.open(t) as src:
                    data = src.read()
                dst.write(data[:3], window=win)
                if pdst is not None:
                    pdst.write(data[3:], window=win)
            dst.descriptions = BAND_NAMES
            dst.update_tags(**tags)
            dst.update_tags(1, **{f"class_{k}": v for k, v in names.items()}, class_names=json.dumps(names))
            dst.update_tags(2, units="percent", description="probability of the mapped class x 100")
            dst.update_tags(3, bits=json.dumps({m: 1 << i for i, m in enumerate(MODALITIES)}))
            if pdst is not None:
                pdst.descriptions = tuple(f"proba_{names.get(k, k)}" for k in range(n_bands - 3))
                pdst.update_tags(**tags)
                pdst.close()
        to_cog(mos, out)
        write_palette_sidecars(out, classes)
        if with_proba and proba_out is not None:
            to_cog(pmos, proba_out, resampling="average")


def to_cog(src: Path, out: Path, resampling: Literal["mode", "average", "nearest"] = "mode") -> None:
    """Copy the GeoTIFF ``src`` to ``out`` as a validated COG with internal overviews (atomic)."""
    profile = cog_profiles.get("deflate")
    with rasterio.open(src) as ds:
        blocksize = 256 if min(ds.width, ds.height) >= 256 else 64
    profile.update(blockxsize=blocksize, blockysize=blocksize, photometric="MINISBLACK", interleave="band")
    with atomic_path(out) as tmp:
        cog_translate(str(src), str(tmp), profile, overview_resampling=resampling, overview_level=None,
                      in_memory=False, quiet=True, use_cog_driver=False, forward_band_tags=True,
                      config={"GDAL_CACHEMAX": GDAL_CACHE_MB})
        ok, errors, _ = cog_validate(str(tmp))
        if not ok:
            raise RuntimeError(f"{out}: the written file is not a valid COG: {errors}")


def write_palette_sidecars(map_tif: Path, classes: Sequence[dict]) -> None:
    """Colour table and class names of band 1, as GDAL PAM (``.aux.xml``) and a QGIS style (``.qml``).

    TIFF stores a palette only for single-sample files, so a 3-band map cannot carry it
    inside; GDAL (rasterio's ``colormap(1)``, QGIS, ArcGIS) reads the ``.aux.xml`` beside the file
    automatically, and QGIS applies the ``.qml`` style of the same name on loading.
    """
    cmap = colormap(classes)
    k = max(c["id"] for c in classes) + 1
    names = {c["id"]: c["name"] for c in classes}
    entries = "".join(
        '<Entry c1="{}" c2="{}" c3="{}" c4="{}"/>'.format(*cmap.get(i, (0, 0, 0, 0))) for i in range(max(k, NODATA + 1))
    )
    cats = "".join(f"<Category>{xml_escape(names.get(i, ''))}</Category>" for i in range(k))
    pam = (
        "<PAMDataset>\n"
        f'  <PAMRasterBand band="1"><Description>class</Description><ColorInterp>Palette</ColorInterp>'
        f"<ColorTable>{entries}</ColorTable><CategoryNames>{cats}</CategoryNames></PAMRasterBand>\n"
        '  <PAMRasterBand band="2"><Description>confidence</Description><ColorInterp>Undefined</ColorInterp></PAMRasterBand>\n'
        '  <PAMRasterBand band="3"><Description>modalities</Description><ColorInterp>Undefined</ColorInterp></PAMRasterBand>\n'
        "</PAMDataset>\n"
    )
    with atomic_path(map_tif.with_name(map_tif.name + ".aux.xml")) as tmp:
        tmp.write_text(pam)
    palette = "\n".join(
        f'        <paletteEntry value="{c["id"]}" color="{c.get("colour", "#808080")}" label="{xml_escape(c["name"])}" alpha="255"/>'
        for c in classes
    )
    qml = (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28" styleCategories="AllStyleCategories">\n  <pipe>\n'
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1">\n'
        f"      <colorPalette>\n{palette}\n      </colorPalette>\n"
        "    </rasterrenderer>\n  </pipe>\n</qgis>\n"
    )
    with atomic_path(map_tif.with_suffix(".qml")) as tmp:
        tmp.write_text(qml)


def _rgba01(rgba: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    r, g, b, a = rgba
    return (r / 255, g / 255, b / 255, a / 255)


def map_title(region: str, model: Mapping[str, Any]) -> str:
    """Quicklook title naming the model that drew the map: its task and method (and the region
    it was trained on when borrowed), e.g. ``cropmap demo: segmentation (comiss)``."""
    title = f"cropmap {region}: {model['task']} ({model['method']})"
    if model.get("trained_on") not in (None, region):
        title += f", model of {model['trained_on']}"
    return title


def quicklook(map_tif: Path, out_png: Path, classes: Sequence[dict], max_px: int = 1024, title: str = "") -> None:
    """PNG of the class band with a legend (read from an overview, bounded size).

    ``title`` (default: the map's folder name) is drawn above the map and stored as the PNG's
    ``Title`` text chunk.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    with rasterio.open(map_tif) as src:
        scale = max(1, int(np.ceil(max(src.width, src.height) / max_px)))
        arr = src.read(1, out_shape=(src.height // scale or 1, src.width // scale or 1), resampling=rasterio.enums.Resampling.mode)
    cmap_d = colormap(classes)
    k = max(c["id"] for c in classes) + 1
    colours = [np.array(cmap_d.get(i, (0, 0, 0, 0))) / 255 for i in range(k)]
    img = np.ma.masked_equal(arr, NODATA)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(img, cmap=ListedColormap(colours), vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
    ax.set_axis_off()
    title = title or map_tif.parent.name
    ax.set_title(title)
    handles = [Patch(facecolor=_rgba01(cmap_d[c["id"]]), label=c["name"]) for c in classes]
    handles.append(Patch(facecolor="white", edgecolor="black", label="nodata (no sensor)"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Title": title})
    plt.close(fig)


def stac_item(map_tif: Path, out_json: Path, region: str, classes: Sequence[dict], *, bbox: Sequence[float],
              months: Sequence[str], sources: dict[str, str], model: dict, proba_tif: Path | None = None) -> dict:
    """A STAC item describing the map (bands, classes, sources, model, date range).

    ``proba_tif``: the per-class probability COG, added as asset ``probabilities`` when given.
    """
    with rasterio.open(map_tif) as src:
        epsg = src.crs.to_epsg()
        shape = [src.height, src.width]
        transform = list(src.transform)[:6]
    lon0, lat0, lon1, lat1 = bbox
    names = {c["id"]: c["name"] for c in classes}
    item: dict = {
        "type": "Feature", "stac_version": "1.0.0", "id": f"cropmap-{region}",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "bbox": [lon0, lat0, lon1, lat1],
        "geometry": {"type": "Polygon", "coordinates": [[[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]]},
        "properties": {
            "datetime": None, "start_datetime": f"{months[0]}-01T00:00:00Z", "end_datetime": f"{months[-1]}-28T23:59:59Z",
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "proj:code": f"EPSG:{epsg}" if epsg else None, "proj:shape": shape, "proj:transform": transform,
            "cropmap:sources": sources, "cropmap:model": model,
        },
        "links": [],
        "assets": {
            "map": {
                "href": f"./{map_tif.name}", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "raster:bands": [
                    {"name": "class", "data_type": "uint8", "nodata": NODATA,
                     "classification:classes": [{"value": c["id"], "name": c["name"], "color_hint": c.get("colour", "#808080").lstrip("#")} for c in classes]},
                    {"name": "confidence", "data_type": "uint8", "unit": "percent"},
                    {"name": "modalities", "data_type": "uint8",
                     "classification:bitfields": [{"offset": i, "length": 1, "name": m} for i, m in enumerate(MODALITIES)]},
                ],
            },
        },
    }
    if proba_tif is not None:
        item["assets"]["probabilities"] = {
            "href": f"./{proba_tif.name}", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "raster:bands": [{"name": f"proba_{names.get(k, k)}", "data_type": "uint8", "unit": "percent"}
                             for k in range(max(c["id"] for c in classes) + 1)],
        }
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(item, indent=2))
    return item
