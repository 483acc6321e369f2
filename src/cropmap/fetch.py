"""Stage ``fetch``: get each modality of a region from its source into ``raw/``.

Sources (``synthetic``, ``earthengine``, ``stac``, ``files``) write into a persistent cache folder (``data/{region}/.fetch``) so an interrupted
download resumes there; finished files are then moved into ``raw/`` (the rule's output), so
``raw/`` never holds a half-written file. A modality a source cannot provide is absent.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from cropmap.config import region_source
from cropmap.errors import ConfigError
from cropmap.grid import Grid

log = logging.getLogger(__name__)


def run(p: dict[str, Any], raw_dir: Path, cache_dir: Path) -> dict[str, Path]:
    """Fetch every modality of ``p["modalities"]`` for the region described by ``p``.

    Args:
        p: the fetch stage parameters (:func:`cropmap.config.stage_params`).
        raw_dir: output folder.
        cache_dir: persistent folder for resumable downloads.

    Returns:
        ``{modality: raw path}`` (plus ``"fields"`` for synthetic regions).
    """
    region = p["config"]
    grid = Grid(**p["grid"])
    months = p["months"]
    by_source: dict[str, list[str]] = defaultdict(list)
    for m in p["modalities"]:
        by_source[region_source(region, m)].append(m)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    for source, mods in by_source.items():
        log.info("fetching %s from %s", ", ".join(mods), source)
        if source == "synthetic":
            from cropmap.sources.synthetic import fetch_synthetic

            opts = dict(region.get("synthetic", {}))
            staged |= fetch_synthetic(grid, months, p["classes"], cache_dir, seed=int(opts.pop("seed", p["seed"])), modalities=mods, options=opts)
        elif source == "stac":
            from cropmap.sources.stac import fetch_stac

            staged |= fetch_stac(grid, months, cache_dir, modalities=mods, options=region.get("stac", {}))
        elif source == "earthengine":
            from cropmap.sources.earthengine import fetch_earthengine

            staged |= fetch_earthengine(grid, months, cache_dir, modalities=mods, options=region.get("earthengine", {}))
        elif source == "files":
            from cropmap.sources.files import fetch_files

            staged |= fetch_files(grid, months, cache_dir, modalities=mods, options=region.get("files", {}),
                                  bands=p.get("bands"), region=p["region"])
        else:  # the schema prevents this
            raise ConfigError(f"config key regions.{p['region']}.source: unknown source {source!r}; use synthetic, earthengine, stac or files")
    raw_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, path in staged.items():
        dest = raw_dir / Path(path).name
        os.replace(path, dest)
        out[key] = dest
    return out
