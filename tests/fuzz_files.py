"""Input-file fuzzer: damaged stacks, raw files, label files, chips, models and maps through the
stage commands (``cropmap <stage> --log``), in-process.

A :class:`Base` is one tiny synthetic region run through every stage once (fetch .. mosaic).
A case copies the inputs of one stage, damages one file (truncated, garbage, empty, wrong band
count or band names, wrong CRS or origin, all-NaN, deleted; for label files: empty layer, no
CRS, outside the bbox, mixed geometries, unknown codes, missing column or layer, ...) and runs
the stage. The outcome:

* ``valid``: the stage succeeded (allowed only for damage a region can legitimately have: an
  all-NaN or missing modality, odd but usable geometries) and wrote every output;
* ``one_line``: it failed with exactly one line ``cropmap <stage>: error: ...`` on the terminal
  (and in the log), naming the damaged file, and left no output or temporary file behind;
* ``traceback``: anything else on the terminal or a traceback in the log; ``silent``: a damage
  that must fail did not (and changed the output); ``undetected``: garbage written over the
  compressed tiles of a stack or raw file that GDAL decodes without an error (nothing can tell
  without a checksum of the pixels); ``unnamed``: one line that does not name the damaged file;
  ``partial``: an output or temporary file left behind; ``hang``: over :data:`TIMEOUT` seconds.
"""

from __future__ import annotations

import io
import random
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import yaml
from hypothesis import strategies as st
from shapely.geometry import LineString, Polygon

from tests.conftest import tiny_config
from tests.fuzz_config import Hang, time_limit

TIMEOUT = 120
REGION = "tiny"
MODS = ("s2", "s1", "weather", "dem")

#: target -> damages applied to it, and the stages that read it.
RASTER_DAMAGE = ("truncate", "garbage", "empty", "drop_bands", "add_bands", "unknown_band", "other_year",
                 "no_descriptions", "wrong_crs", "shifted", "other_size", "all_nan", "delete", "text")
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stack": (RASTER_DAMAGE, ("chips", "train", "predict", "metrics", "coverage")),
    "raw": (("truncate", "garbage", "empty", "drop_bands", "unknown_band", "no_crs", "wrong_crs", "all_nan", "delete", "text"),
            ("stack",)),
    "vector": (("empty_layer", "no_crs", "outside", "mixed", "unknown_code", "no_column", "no_layer", "garbage",
                "truncate", "missing", "bowtie", "null_geometry", "points"), ("labels",)),
    "labels_tif": (("truncate", "garbage", "empty", "wrong_crs", "all_nodata", "text"), ("chips", "train", "metrics", "area")),
    "chips": (("truncate", "garbage", "empty", "no_rows", "text"), ("train", "metrics")),
    "model": (("truncate", "garbage", "empty", "not_a_bundle", "text"), ("predict", "metrics")),
    "map": (("truncate", "garbage", "wrong_crs", "text"), ("area", "coverage")),
}
#: Damage that a region can legitimately have: ``(target, damage)`` the stages may take.
MAY_SUCCEED = {("stack", "all_nan"), ("stack", "delete"), ("raw", "all_nan"), ("raw", "delete"), ("raw", "wrong_crs"),
               ("vector", "mixed"), ("vector", "bowtie"), ("vector", "null_geometry"), ("vector", "points"),
               ("labels_tif", "all_nodata")}


@dataclass
class Base:
    """One tiny region run through every stage: its folders and stage parameters."""

    root: Path
    cfg: dict
    params: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data" / REGION


def build_base(root: Path) -> Base:
    """Fetch, stack, labels, chips, train (1 epoch), predict and mosaic a tiny region in ``root``."""
    from cropmap.cli import main
    from cropmap.config import dumps, stage_params, validate

    cfg = tiny_config(root)
    cfg["training"].update(epochs=1, patience=1)
    cfg["prediction"]["tile_size"] = 128
    cfg = validate(cfg)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    base = Base(root, cfg, {s: dumps(stage_params(cfg, s, REGION)) for s in
                            ("fetch", "stack", "labels", "chips", "train", "predict", "mosaic", "metrics", "coverage", "area")})
    d, res = base.data, root / "results" / REGION
    steps = [
        ["fetch", "--raw-dir", d / "raw", "--cache-dir", d / ".fetch", "--availability", d / "availability.json"],
        ["stack", "--raw-dir", d / "raw", "--out-dir", d / "stack"],
        ["labels", "--raw-dir", d / "raw", "--out-tif", d / "labels.tif", "--out-gpkg", d / "labels.gpkg"],
        ["chips", "--stack-dir", d / "stack", "--labels", d / "labels.tif", "--out", d / "chips.parquet"],
        ["train", "--task", "classification", "--stack-dir", d / "stack", "--labels", d / "labels.tif", "--chips",
         d / "chips.parquet", "--out", root / "model.ckpt", "--work-dir", root / "work"],
        ["predict", "--model", root / "model.ckpt", "--stack-dir", d / "stack", "--tile", "r000000_c000000", "--out",
         res / "tiles" / "r000000_c000000.tif"],
        ["mosaic", "--tiles", res / "tiles" / "r000000_c000000.tif", "--out", res / "map.tif", "--quicklook",
         res / "quicklook.png", "--stac", res / "map.json"],
        ["metrics", "--model", root / "model.ckpt", "--stack-dir", d / "stack", "--labels", d / "labels.tif", "--chips",
         d / "chips.parquet", "--out", res / "metrics.csv", "--confusion", res / "confusion.csv"],
        ["coverage", "--map", res / "map.tif", "--stack-dir", d / "stack", "--out", res / "coverage.json"],
        ["area", "--map", res / "map.tif", "--labels", d / "labels.tif", "--out-csv", res / "area.csv", "--out-json",
         res / "area.json"],
    ]
    for step in steps:
        argv = [step[0], "--params", base.params[step[0]], *map(str, step[1:]), "--log", str(root / "logs" / f"{step[0]}.log")]
        if main(argv) != 0:
            raise RuntimeError(f"base {step[0]} failed: {(root / 'logs' / f'{step[0]}.log').read_text()[-3000:]}")
    return base


# ------------------------------------------------------------------------------------------ damage
def _rewrite(path: Path, data: np.ndarray | None = None, descriptions: Any = "keep", **profile: Any) -> None:
    with rasterio.open(path) as src:
        prof, arr, desc = src.profile, src.read(), list(src.descriptions)
    arr = arr if data is None else data
    prof.update(count=arr.shape[0], **profile)
    desc = desc if descriptions == "keep" else descriptions
    path.unlink()
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(arr)
        if desc is not None:
            dst.descriptions = tuple(desc[: arr.shape[0]]) + ("",) * max(0, arr.shape[0] - len(desc))


def damage_bytes(path: Path, kind: str, frac: float) -> bool:
    """Byte-level damage; ``False`` when ``kind`` is not one."""
    raw = path.read_bytes() if path.exists() else b""
    if kind == "truncate":
        path.write_bytes(raw[: max(1, int(len(raw) * frac))])
    elif kind == "garbage":
        mid = int(len(raw) * frac)
        path.write_bytes(raw[:mid] + bytes(range(256)) * 16 + raw[mid + 4096 :])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not the file you are looking for\n")
    elif kind in ("delete", "missing"):
        path.unlink(missing_ok=True)
    else:
        return False
    return True


def damage_raster(path: Path, kind: str, k: int) -> None:
    """Raster damage of a stack, raw file, labels.tif or map."""
    with rasterio.open(path) as src:
        arr, desc, t, prof = src.read(), list(src.descriptions), src.transform, src.profile
    if kind == "drop_bands":
        n = max(1, arr.shape[0] - k)
        _rewrite(path, arr[:n], desc[:n])
    elif kind == "add_bands":
        _rewrite(path, np.concatenate([arr, arr[-k:]]), desc + desc[-k:])
    elif kind == "unknown_band":
        _rewrite(path, descriptions=["B99" + d[d.find("_"):] if "_" in d else "B99" for d in desc])
    elif kind == "other_year":
        _rewrite(path, descriptions=[d.replace("2023-", "2021-") for d in desc])
    elif kind == "no_descriptions":
        _rewrite(path, descriptions=[""] * len(desc))
    elif kind == "wrong_crs":
        _rewrite(path, crs="EPSG:3857")
    elif kind == "no_crs":
        _rewrite(path, crs=None)
    elif kind == "shifted":
        _rewrite(path, transform=rasterio.Affine(t.a, t.b, t.c + 5 * k, t.d, t.e, t.f))
    elif kind == "other_size":
        _rewrite(path, arr[:, : arr.shape[1] - 8 * k], height=arr.shape[1] - 8 * k)
    elif kind == "all_nan":
        _rewrite(path, np.full_like(arr, np.nan if np.issubdtype(arr.dtype, np.floating) else prof.get("nodata") or 0))
    elif kind == "all_nodata":
        _rewrite(path, np.stack([np.full_like(arr[0], 255), arr[1]]))
    else:
        raise ValueError(kind)


def damage_vector(path: Path, kind: str) -> Path:
    """Write a damaged label file next to ``path`` (the base's fields); returns the file to label."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _damage_vector(path, kind)


def _damage_vector(path: Path, kind: str) -> Path:
    gdf = gpd.read_file(path)
    out = path.with_name("fields_case.gpkg")
    if kind == "empty_layer":
        gdf.iloc[:0].to_file(out, layer="fields")
    elif kind == "no_crs":
        out = out.with_suffix(".shp")
        gdf.set_crs(None, allow_override=True).to_file(out)
        out.with_suffix(".prj").unlink(missing_ok=True)
    elif kind == "outside":
        gdf.set_geometry(gdf.geometry.translate(5e5, 5e5)).to_file(out, layer="fields")
    elif kind == "mixed":
        geoms = list(gdf.geometry)
        geoms[0] = geoms[0].centroid
        geoms[1] = LineString(list(geoms[1].exterior.coords)[:3])
        gdf.set_geometry(geoms).to_file(out, layer="fields")
    elif kind == "points":
        gdf.set_geometry(gdf.geometry.representative_point()).to_file(out, layer="fields")
    elif kind == "unknown_code":
        gdf.assign(code=["WHT-2023"] * len(gdf)).to_file(out, layer="fields")
    elif kind == "no_column":
        gdf.drop(columns=["code"]).to_file(out, layer="fields")
    elif kind == "no_layer":
        gdf.to_file(out, layer="other")
        return out  # the case asks for layer 'fields'
    elif kind == "bowtie":
        x0, y0 = gdf.geometry.iloc[0].centroid.coords[0]
        geoms = list(gdf.geometry)
        geoms[0] = Polygon([(x0, y0), (x0 + 100, y0 + 100), (x0 + 100, y0), (x0, y0 + 100)])
        gdf.set_geometry(geoms).to_file(out, layer="fields")
    elif kind == "null_geometry":
        geoms = list(gdf.geometry)
        geoms[0] = None
        gdf.set_geometry(geoms, crs=gdf.crs).to_file(out, layer="fields")
    else:
        shutil.copy(path, out)
        damage_bytes(out, kind, 0.5)
    return out


# ------------------------------------------------------------------------------------------ cases
@dataclass
class FileCase:
    target: str
    modality: str
    damage: str
    stage: str
    frac: float
    k: int


@st.composite
def file_case(draw: Any) -> FileCase:
    """A target file, a damage of it, and a stage reading it."""
    target = draw(st.sampled_from(sorted(TARGETS)))
    damages, stages = TARGETS[target]
    return FileCase(target, draw(st.sampled_from(MODS)), draw(st.sampled_from(damages)), draw(st.sampled_from(stages)),
                    draw(st.floats(0.02, 0.98)), draw(st.integers(1, 3)))


def every_case(seed: int) -> list[FileCase]:
    """Every ``(target, damage, stage)`` of :data:`TARGETS` once; modality, cut and band count drawn from ``seed``."""
    rng = random.Random(seed)
    return [FileCase(t, rng.choice(MODS), d, st_, rng.uniform(0.02, 0.98), rng.randint(1, 3))
            for t, (damages, stages) in sorted(TARGETS.items()) for d in damages for st_ in stages]


def stage_argv(base: Base, case: Path, stage: str, labels_path: Path | None = None) -> tuple[list[str], list[Path]]:
    """``cropmap <stage>`` arguments on the inputs copied into ``case`` (outputs under ``case/out``); and the outputs."""
    from cropmap.config import dumps, stage_params, validate

    d, out = case, case / "out"
    params = base.params.get(stage, "{}")
    if labels_path is not None:
        cfg = validate(yaml.safe_load((base.root / "config.yaml").read_text()))
        cfg["regions"][REGION]["labels"] = {"path": str(labels_path), "column": "code",
                                            "layer": "fields" if labels_path.suffix == ".gpkg" else None}
        params = dumps(stage_params(cfg, "labels", REGION))
    args: dict[str, list[Any]] = {
        "stack": ["--raw-dir", d / "raw", "--out-dir", out / "stack"],
        "labels": ["--raw-dir", d / "raw", "--out-tif", out / "labels.tif", "--out-gpkg", out / "labels.gpkg"],
        "chips": ["--stack-dir", d / "stack", "--labels", d / "labels.tif", "--out", out / "chips.parquet"],
        "train": ["--task", "classification", "--stack-dir", d / "stack", "--labels", d / "labels.tif", "--chips",
                  d / "chips.parquet", "--out", out / "model.ckpt", "--work-dir", case / "work"],
        "predict": ["--model", d / "model.ckpt", "--stack-dir", d / "stack", "--tile", "r000000_c000000", "--out",
                    out / "tile.tif"],
        "metrics": ["--model", d / "model.ckpt", "--stack-dir", d / "stack", "--labels", d / "labels.tif", "--chips",
                    d / "chips.parquet", "--out", out / "metrics.csv", "--confusion", out / "confusion.csv"],
        "coverage": ["--map", d / "map.tif", "--stack-dir", d / "stack", "--out", out / "coverage.json"],
        "area": ["--map", d / "map.tif", "--labels", d / "labels.tif", "--out-csv", out / "area.csv", "--out-json", out / "area.json"],
    }
    argv = [stage, "--params", params, *map(str, args[stage])]
    outputs = [Path(a) for a in args[stage] if (isinstance(a, Path) and out in Path(a).parents) or a == out / "stack"]
    if stage == "train":
        outputs.append(out / "train_summary.json")
    return argv, outputs


def prepare(base: Base, c: FileCase, case: Path) -> tuple[Path, Path | None]:
    """Copy the base's inputs into ``case`` and damage one; ``(damaged file, label file or None)``."""
    case.mkdir(parents=True)
    d, res = base.data, base.root / "results" / REGION
    shutil.copytree(d / "raw", case / "raw")
    shutil.copytree(d / "stack", case / "stack")
    for src, dst in ((d / "labels.tif", "labels.tif"), (d / "chips.parquet", "chips.parquet"),
                     (base.root / "model.ckpt", "model.ckpt"), (res / "map.tif", "map.tif")):
        shutil.copy2(src, case / dst)
    files = {"stack": case / "stack" / f"{c.modality}.tif", "raw": case / "raw" / f"{c.modality}.tif",
             "labels_tif": case / "labels.tif", "chips": case / "chips.parquet", "model": case / "model.ckpt",
             "map": case / "map.tif"}
    if c.target == "vector":
        labels = damage_vector(case / "raw" / "fields.gpkg", c.damage)
        return labels, labels
    path = files[c.target]
    if damage_bytes(path, c.damage, c.frac):
        return path, None
    if c.target == "model" and c.damage == "not_a_bundle":
        import torch

        torch.save({"epoch": 3, "state_dict": {}}, path)  # e.g. a Lightning checkpoint given as the model
        return path, None
    if c.target == "chips" and c.damage == "no_rows":
        import pandas as pd

        pd.read_parquet(path).iloc[:0].to_parquet(path)
        return path, None
    damage_raster(path, c.damage, c.k)
    return path, None


def run_file_case(base: Base, c: FileCase, case: Path) -> tuple[str, str]:
    """Prepare, damage and run one case; ``(outcome, detail)`` (see the module docstring)."""
    from cropmap.cli import main

    damaged, labels = prepare(base, c, case)
    argv, outputs = stage_argv(base, case, c.stage, labels)
    log = case / "stage.log"
    terminal, old = io.StringIO(), sys.stderr
    sys.stderr = terminal
    try:
        with time_limit(TIMEOUT):
            rc = main([*argv, "--log", str(log)])
    except Hang as exc:
        return "hang", str(exc)
    finally:
        sys.stderr = old
    said = [ln for ln in terminal.getvalue().splitlines() if ln.strip()]
    logged = log.read_text(errors="replace") if log.exists() else ""
    left = sorted(str(p) for p in (case / "out").rglob("*") if ".part" in p.name) if (case / "out").exists() else []
    if rc == 0:
        missing = [str(p) for p in outputs if not p.exists()]
        if said or "Traceback" in logged:
            return "traceback", f"succeeded but said {said} / traceback in the log"
        if missing or left:
            return "partial", f"succeeded without {missing} or left {left}"
        if (c.target, c.damage) not in MAY_SUCCEED and not same_as_base(base, c.stage, outputs):
            # bytes overwritten inside compressed tiles that GDAL decodes without an error: no
            # reader can tell (the file carries no checksum of its pixels)
            kind = "undetected" if c.damage == "garbage" and c.target in ("raw", "stack") else "silent"
            return kind, f"{c.damage} of {damaged.name} went unnoticed by {c.stage}"
        return "valid", ""
    left += [str(p) for p in outputs if p.exists()]
    if len(said) != 1 or not said[0].startswith(f"cropmap {c.stage}: error: ") or "Traceback" in logged:
        tail = logged[-1500:] if "Traceback" in logged else ""
        return "traceback", f"terminal: {said}; log: {tail}"
    if left:
        return "partial", f"{said[0]} but left {left}"
    if damaged.name not in said[0]:
        return "unnamed", said[0]
    return "one_line", said[0]


def same_as_base(base: Base, stage: str, outputs: list[Path]) -> bool:
    """Whether a case's outputs equal the base's (the damage missed every byte the stage reads)."""
    import pandas as pd

    res = base.root / "results" / REGION
    ref = {"stack": base.data / "stack", "labels.tif": base.data / "labels.tif", "chips.parquet": base.data / "chips.parquet",
           "tile.tif": res / "tiles" / "r000000_c000000.tif", "metrics.csv": res / "metrics.csv",
           "coverage.json": res / "coverage.json", "area.json": res / "area.json"}
    compared = 0
    for out in outputs:
        other = ref.get(out.name)
        if other is None:
            continue
        compared += 1
        pairs = [(f, other / f.name) for f in sorted(out.glob("*.tif"))] if out.is_dir() else [(out, other)]
        for a, b in pairs:
            if a.suffix == ".tif":
                with rasterio.open(a) as x, rasterio.open(b) as y:
                    if not np.array_equal(x.read(), y.read(), equal_nan=True):
                        return False
            elif a.suffix == ".parquet":
                if not pd.read_parquet(a).equals(pd.read_parquet(b)):
                    return False
            elif a.read_bytes() != b.read_bytes():
                return False
    return compared > 0
