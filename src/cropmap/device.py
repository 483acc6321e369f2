"""Where models run: the one place that turns a config ``device`` setting into a torch device."""

from __future__ import annotations

import torch

from cropmap.errors import ConfigError


def resolve_device(setting: str, key: str) -> torch.device:
    """The torch device of a config ``device`` setting.

    Args:
        setting: ``auto`` (CUDA when a GPU is visible, else the CPU), ``cpu``, ``cuda`` or
            ``cuda:N``.
        key: the config key the setting comes from (``training.device``,
            ``prediction.device``), named in errors.

    Raises:
        ConfigError: CUDA is asked for and none is visible, or the setting is unknown.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda" or setting.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key {key} is {setting!r} but no CUDA device is visible; set it to auto or cpu")
        return torch.device(setting)
    raise ConfigError(f"config key {key}: {setting!r} is not a device; use auto, cpu or cuda")


def check_devices(devices: int | str, on_gpu: bool, key: str = "training.devices") -> None:
    """Check a Lightning ``devices`` setting against where training runs.

    Args:
        devices: ``training.devices`` (a count, ``auto``, ``-1`` or GPU ids like ``0,1``).
        on_gpu: whether training runs on CUDA (:func:`resolve_device`).
        key: the config key, named in errors.

    Raises:
        ConfigError: more GPUs asked for than visible, or GPU ids for a CPU run.
    """
    from cropmap.config import gpu_count

    if on_gpu:
        want, have = gpu_count({"device": "cuda", "devices": devices}), torch.cuda.device_count()
        if want > have:
            raise ConfigError(f"config key {key}: {devices!r} asks for {want} GPUs, {have} visible; lower it")
        return
    text = str(devices).strip()
    if not (text.isdigit() and int(text) >= 1):
        raise ConfigError(f"config key {key}: {devices!r} is not a number of CPU processes, and training runs on "
                          "the CPU (no CUDA device); give a count such as 1")
