"""The ``model.ckpt`` bundle: everything needed to apply a trained model, in one ``torch.save`` file.

Keys: ``state_dict`` (the model's weights under ``model.*`` and the normalisation buffers under
``norm.*``), ``model_kwargs`` (the :func:`cropmap.models.build_model` arguments), ``stats``
(per-channel z-scores), ``classes``, ``modalities``, ``months``, ``task``,
``min_valid_fraction``, ``class_weights``, ``summary`` (the training summary), ``temporal``
(per modality, whether it has a time axis), ``bands`` (per modality, the bands of each time
step; :func:`bundle_bands` reads it, also from bundles written before it existed),
``calibration`` (``{"per", "temperatures"}`` of :mod:`cropmap.calibration`, or None; the
loaded model applies the temperature of each sample's sensor subset), ``blend_kwargs`` (the
tree part's arguments when the network is blended with trees, :mod:`cropmap.blend`; its
trees and weights are ``blend.*`` entries of ``state_dict``; None otherwise) and ``sha256``
(:func:`weights_digest` of the weights and temperatures, checked on load).
:func:`check_stacks` checks that a region's stacks are what the model was trained on. :func:`save_bundle` writes it (the ``train``
stage), :func:`load_bundle` rebuilds the model from the factory without Lightning.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cropmap.blend import Blended, trees_kwargs
from cropmap.errors import InputDataError, brief
from cropmap.io import atomic_path
from cropmap.modalities import TEMPORAL, resolve_bands
from cropmap.models import build_model
from cropmap.normalize import Normalizer


def save_bundle(out: Path, model: nn.Module, norm: Normalizer, *, model_kwargs: Mapping[str, Any],
                classes: Sequence[dict], modalities: Sequence[str], months: Sequence[str], task: str,
                min_valid_fraction: float, class_weights: Sequence[float] | None,
                summary: Mapping[str, Any], bands: Mapping[str, Sequence[str]] | None = None,
                calibration: Mapping[str, Any] | None = None, blend: nn.Module | None = None) -> None:
    """Write the ``model.ckpt`` bundle read by :func:`load_bundle` (atomic).

    Args:
        out: the bundle path.
        model: the trained model (a :class:`~cropmap.models.CoLearningModel`).
        norm: its input normalisation.
        model_kwargs: the :func:`~cropmap.models.build_model` arguments (without class weights).
        classes: the class table.
        modalities: the modalities, in the order of the model's mask.
        months: the season months of the temporal inputs.
        task: ``classification`` or ``segmentation``.
        min_valid_fraction: the presence threshold the model was trained with.
        class_weights: the weights of the supervised loss, or None.
        summary: the training summary.
        bands: the bands of each modality (default every band of :data:`cropmap.modalities.BANDS`).
        calibration: ``{"per": ..., "temperatures": [2^M floats]}`` fitted on validation data
            (:func:`cropmap.train.calibrate`), or None for an uncalibrated model.
        blend: the :class:`cropmap.blend.Blended` wrapper of ``model`` (``training.blend``), or None:
            its trees and weights are stored as ``blend.*`` weights and its trees' arguments
            under ``blend_kwargs``.
    """
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {f"norm.{k}": v for k, v in norm.state_dict().items()}
    if blend is not None:
        state |= {f"blend.{k}": v for k, v in blend.state_dict().items() if not k.startswith("model.")}
    bundle = {
        "state_dict": state, "model_kwargs": dict(model_kwargs), "stats": norm.stats(),
        "classes": list(classes), "modalities": list(modalities), "months": list(months),
        "task": task, "min_valid_fraction": min_valid_fraction,
        "class_weights": class_weights, "summary": dict(summary),
        "temporal": {m: TEMPORAL[m] for m in modalities},
        "bands": {m: list(resolve_bands(bands)[m]) for m in modalities},
        "calibration": dict(calibration) if calibration else None,
        "blend_kwargs": trees_kwargs(model_kwargs) if blend is not None else None,
        "sha256": weights_digest(state, calibration),
    }
    with atomic_path(out) as tmp:
        torch.save(bundle, tmp)


def weights_digest(state: Mapping[str, torch.Tensor], calibration: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of a state dict's names and tensor bytes (and of the temperatures, when calibrated):
    :func:`load_bundle` refuses a bundle whose weights were damaged on disk (a zip entry of
    ``torch.save`` has no checksum read back)."""
    h = hashlib.sha256()
    if calibration:
        h.update(repr([float(t) for t in calibration["temperatures"]]).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_bundle(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Normalizer, dict]:
    """Rebuild the model and normaliser of a ``model.ckpt`` (eval mode, on ``device``).

    Returns:
        ``(model, normaliser, bundle)``; ``bundle`` is the whole dictionary (see the module
        docstring). A calibrated bundle's model comes wrapped in
        :class:`cropmap.calibration.Calibrated`, so every prediction uses its temperatures.
    """
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(bundle, dict) or not {"model_kwargs", "state_dict", "stats"} <= set(bundle):
            raise ValueError("not a cropmap model bundle")
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
        raise InputDataError(f"{path} is not a readable cropmap model ({type(exc).__name__}: {brief(exc)}): "
                                 "delete it and rerun snakemake so the train stage writes it again") from None
    if "sha256" in bundle and weights_digest(bundle["state_dict"], bundle.get("calibration")) != bundle["sha256"]:  # older bundles have none
        raise InputDataError(f"{path}: its weights do not match their checksum (the file was damaged on disk); "
                             "delete it and rerun snakemake so the train stage writes it again")
    weights = bundle["class_weights"]
    model: nn.Module = build_model(**bundle["model_kwargs"],
                        class_weights=torch.tensor(weights, dtype=torch.float32) if weights else None)
    norm = Normalizer(bundle["stats"])
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "norm": {}, "blend": {}}
    for key, value in bundle["state_dict"].items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise InputDataError(f"{path}: unexpected weight {key!r}; is it a cropmap model.ckpt?")
        parts[head][rest] = value
    model.load_state_dict(parts["model"])
    norm.load_state_dict(parts["norm"])
    if bundle.get("blend_kwargs"):
        trees = build_model(**bundle["blend_kwargs"])
        trees.load_state_dict({k.removeprefix("trees."): v for k, v in parts["blend"].items() if k.startswith("trees.")})
        model = Blended(model, trees, parts["blend"]["blend_weights"])
    cal = bundle.get("calibration")
    if cal and cal.get("temperatures"):
        from cropmap.calibration import Calibrated

        model = Calibrated(model, cal["temperatures"])
    return model.eval().to(device), norm.eval().to(device), bundle


def bundle_classes(path: Path) -> list[dict]:
    """The class table stored in a ``model.ckpt`` (what the map's legend shows)."""
    return list(torch.load(path, map_location="cpu", weights_only=False)["classes"])


def bundle_bands(bundle: Mapping[str, Any]) -> dict[str, list[str]]:
    """The bands of each modality of a bundle (every band for bundles written before ``bands``)."""
    full = resolve_bands(None)
    return {m: list(bundle.get("bands", {}).get(m) or full[m]) for m in bundle["modalities"]}


def check_stacks(bundle: Mapping[str, Any], ckpt: Path, stacks: Mapping[str, Path], *, season_key: str = "the region's season") -> None:
    """Stop when a region's stacks are not what the model was trained on.

    Per stack of a modality the model uses: the bands of each month (the stack's band
    descriptions) must be the model's, in order, and the months must align with the model's
    month by month: the same number, starting in the same calendar month (January to January,
    whatever the years).

    Args:
        bundle: the loaded ``model.ckpt`` bundle.
        ckpt: its path (for messages).
        stacks: ``{modality: stack file}`` of the region.
        season_key: the config key of the region's season (for the fix).

    Raises:
        GridMismatchError: one line naming the stack, the model, the mismatch and the fix.
    """
    import rasterio

    from cropmap.availability import channels_of
    from cropmap.errors import GridMismatchError, InputDataError
    from cropmap.grid import check_calendar_alignment

    want = bundle_bands(bundle)
    for m, path in stacks.items():
        if m not in want:
            continue
        with rasterio.open(path) as src:
            desc = [str(d or "") for d in src.descriptions]
        c = channels_of(desc, m)
        have = [d.rsplit("_", 1)[0] for d in desc[:c]] if TEMPORAL[m] else desc
        if have != want[m]:
            raise GridMismatchError(
                f"{path}: {m} bands {have} per month, but the model {ckpt} was trained on {want[m]}; set bands.{m}: {want[m]} "
                "in the config (the bands apply to every region and training set) and rerun, or retrain the model on these bands")
        if TEMPORAL[m]:
            months = [d.rsplit("_", 1)[-1] for d in desc[::c]]
            try:
                check_calendar_alignment(list(bundle["months"]), months, what=f"{path} and the model {ckpt}")
            except InputDataError as exc:
                raise GridMismatchError(f"{exc} (set {season_key} accordingly)") from None
