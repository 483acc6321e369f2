"""Shared helpers of the prediction benchmarks: a cached synthetic region and an untrained model.

Regions are built once with the synthetic source and the ``stack`` stage and kept under
``.bench/`` (gitignored); the model bundle has the default config's method and size
(``model.method``, ``model.hidden``) with random weights and normalisation statistics fitted on
the region, which is all a throughput measurement needs.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import rasterio
import torch
from rasterio.windows import Window

from cropmap.config import load, region_months
from cropmap.grid import Grid

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("CROPMAP_BENCH_DIR", ROOT / ".bench"))


def config() -> dict:
    """The repository's ``config.yaml``, validated (defaults filled)."""
    return load(ROOT / "config.yaml")


def months(cfg: dict) -> list[str]:
    """Season of the config's first region."""
    return region_months(next(iter(cfg["regions"].values())))


def region(size: int, cfg: dict, quiet: bool = True) -> tuple[Grid, Path]:
    """A ``size`` x ``size`` px synthetic region, stacked on its grid; ``(grid, stack dir)`` (cached)."""
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=size, height=size)
    d = BENCH / f"region_{size}"
    done = d / "stack" / ".complete"
    if not done.exists():  # imported here only: measured processes import what predict needs
        from cropmap import stack
        from cropmap.sources.synthetic import fetch_synthetic

        sink = io.StringIO()
        with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
            fetch_synthetic(grid, months(cfg), cfg["classes"], d / "raw", seed=cfg["seed"], modalities=cfg["modalities"],
                            options={"seed": 1})
            stack.run(d / "raw", d / "stack", grid, months(cfg), cfg["modalities"])
        done.touch()
    return grid, d / "stack"


def tiled_region(base: int, factor: int, cfg: dict) -> tuple[Grid, Path]:
    """The ``base`` px region repeated ``factor`` x ``factor`` times (same content per unit area),
    so that sizes differ by area only (cached)."""
    grid0, stack0 = region(base, cfg)
    if factor == 1:
        return grid0, stack0
    size = base * factor
    grid = Grid(crs=grid0.crs, res=grid0.res, xmin=grid0.xmin, ymax=grid0.ymax, width=size, height=size)
    d = BENCH / f"region_{base}_x{factor}" / "stack"
    done = d / ".complete"
    if not done.exists():
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted(stack0.glob("*.tif")):
            with rasterio.open(f) as src:
                data, desc = src.read(), src.descriptions
            with rasterio.open(d / f.name, "w", **grid.profile(data.shape[0])) as dst:
                dst.descriptions = desc
                for r in range(factor):
                    for c in range(factor):
                        dst.write(data, window=Window(c * base, r * base, base, base))
        done.touch()
    return grid, d


def bundle(task: str, cfg: dict, stack_dir: Path, out: Path, seed: int = 0) -> Path:
    """Untrained model bundle of the config's method and size, statistics from ``stack_dir``."""
    from cropmap.models import build_model
    from cropmap.normalize import Normalizer, fit_stats
    from cropmap.predict import save_bundle
    from cropmap.train import TrainSettings

    torch.manual_seed(seed)
    settings = TrainSettings.from_config(cfg, task, months(cfg))  # type: ignore[arg-type]
    samples = {}
    for m in settings.modalities:
        with rasterio.open(stack_dir / f"{m}.tif") as src:
            samples[m] = src.read(window=Window(0, 0, min(64, src.width), min(64, src.height)), out_dtype="float32")[None]
    kwargs = settings.model_kwargs()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(out, build_model(**kwargs), Normalizer(fit_stats(samples, "chips", kwargs["in_channels"])), model_kwargs=kwargs,
                classes=settings.classes, modalities=settings.modalities, months=settings.months, task=settings.task,
                min_valid_fraction=settings.min_valid_fraction, class_weights=None, summary={"benchmark": "untrained"})
    return out


def sync(device: str) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (``VmHWM``: since its ``exec``, unlike ``ru_maxrss``,
    which a child inherits from the process it was forked from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mpx(pixels: float, seconds: float) -> float:
    """Megapixels per second."""
    return pixels / 1e6 / max(seconds, 1e-9)
