"""Labelled sample tables as training data, and the missing-sensor comparison on them.

Two layouts are read into :class:`~cropmap.datasets.PixelSamples` (``docs/sample_tables.md``
describes both precisely, so a user with another table can convert to one of them):

* **WorldCereal point extractions** (:func:`load_worldcereal`): one row per point, wide columns
  ``OPTICAL-B02-ts{t}-10m`` ... ``SAR-VV-ts{t}-20m`` ... ``METEO-*-ts{t}-100m``,
  ``DEM-alt-20m``, ``DEM-slo-20m``, the crop code ``ewoc_code``, ``lat``/``lon``.
* **CropHarvest arrays** (:func:`load_cropharvest`): ``X [N, 12, 18]`` in the band order of
  :data:`CROPHARVEST_ORDER` (``.npz`` or ``.h5``), plus real Earth Engine exports in the
  CropHarvest layout (GeoTIFF, unlabelled, decoded with
  :func:`cropmap.sources.earthengine.decode_cropharvest_export`).

Every value is converted to the units of cropmap's modalities (:data:`cropmap.modalities.BANDS`):
S2 surface reflectance 0-1, S1 backscatter in dB, 2 m temperature in K, precipitation in metres
per month, elevation in m, slope in degrees; invalid values are NaN. Presence masks follow
:func:`cropmap.availability.present` (a temporal modality is present when at least
``min_valid_fraction`` of its months have every channel finite; DEM when both bands are finite).

Splits are spatial: samples are grouped by ``cell_deg`` x ``cell_deg`` lat/lon cells and whole
cells are dealt into train / val / test by the workflow's splitter
(:func:`cropmap.splits.group_splits`, the same rule as a region's split blocks), so no cell (and
no field sampled several times) is in two splits.

In the workflow, ``training_sets`` in the config name tables (:mod:`cropmap.tables.training`
reads them; the ``samples`` stage writes their samples), and ``snakemake compare`` runs the
missing-sensor protocol on them (``benchmarks/compare_table.py`` wraps that for one table).

Modules: ``common`` (class names and colours, presence masks, spatial splits), ``worldcereal``
(wide), ``worldcereal_long``, ``generic`` (cropmap's own band naming, season alignment),
``cropharvest``, ``training`` (a training set's tables); the names below are re-exported here.
"""

from cropmap.tables.common import (
    class_counts,
    location_groups,
    months_from,
    presence_mask,
    spatial_split,
)
from cropmap.tables.cropharvest import (
    CROPHARVEST_ORDER,
    DAYS_PER_MONTH,
    decode_export,
    from_cropharvest_array,
    load_cropharvest,
)
from cropmap.tables.generic import load_point_table, select_season
from cropmap.tables.worldcereal import (
    decode_worldcereal,
    ewoc_classes,
    load_worldcereal,
    worldcereal_months,
)
from cropmap.tables.worldcereal_long import load_worldcereal_long

__all__ = [
    "CROPHARVEST_ORDER",
    "DAYS_PER_MONTH",
    "class_counts",
    "decode_export",
    "decode_worldcereal",
    "ewoc_classes",
    "from_cropharvest_array",
    "load_cropharvest",
    "load_point_table",
    "load_worldcereal",
    "load_worldcereal_long",
    "location_groups",
    "months_from",
    "presence_mask",
    "select_season",
    "spatial_split",
    "worldcereal_months",
]
