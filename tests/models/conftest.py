"""Tiny synthetic batches for the model tests (kept small: 2 shared CPU cores)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

MODS = ("s2", "s1", "weather", "dem")
CH = {"s2": 10, "s1": 2, "weather": 2, "dem": 2}
T = 4
K = 3
HW = 8


def checker_chips(
    b: int = 2,
    hw: int = 32,
    *,
    seed: int = 0,
    separable: bool = False,
    mask: torch.Tensor | None = None,
    steps: int = 3,
    n_classes: int = K,
) -> dict[str, torch.Tensor]:
    """Segmentation chips ``{m: [B, steps*C, hw, hw]}`` (DEM static) with 8 px checkerboard classes."""
    g = torch.Generator().manual_seed(seed)
    y = ((torch.arange(hw)[None, :, None] // 8 + torch.arange(hw)[None, None, :] // 8) % n_classes).expand(b, hw, hw)
    batch: dict[str, torch.Tensor] = {}
    for m in MODS:
        x = torch.randn(b, CH[m] * (1 if m == "dem" else steps), hw, hw, generator=g)
        batch[m] = 0.3 * x + 1.5 * y[:, None].float() if separable else x
    batch["y"] = y.clone()
    batch["mask"] = mask if mask is not None else torch.ones(b, len(MODS), dtype=torch.bool)
    return batch


def make_batch(
    task: str,
    b: int = 6,
    *,
    seed: int = 0,
    separable: bool = False,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Random batch; ``separable`` adds class-dependent means so a model can learn it."""
    g = torch.Generator().manual_seed(seed)
    if task == "classification":
        y = torch.arange(b) % K
        shape = {m: (b, T, CH[m]) for m in MODS[:3]} | {"dem": (b, CH["dem"])}
    else:
        y = (torch.arange(b * HW * HW).view(b, HW, HW) // 5) % K
        shape = {m: (b, T * CH[m], HW, HW) for m in MODS[:3]} | {"dem": (b, CH["dem"], HW, HW)}
    batch: dict[str, torch.Tensor] = {}
    for m in MODS:
        x = torch.randn(shape[m], generator=g)
        if separable:
            yf = y.float()
            off = yf.view(b, *([1] * (x.dim() - 1))) if task == "classification" else yf[:, None]
            x = 0.3 * x + 1.5 * off
        batch[m] = x
    batch["y"] = y
    batch["mask"] = mask if mask is not None else torch.ones(b, len(MODS), dtype=torch.bool)
    return batch


def build(method: str, task: str, **kw: object) -> torch.nn.Module:
    """A model of ``method``; gradient-free (tree) methods come fitted on a separable batch with gaps."""
    from cropmap.models import build_model, methods_for

    if method in methods_for("classification", gradient=False):  # small data: small leaves, few rounds
        kw = {"min_samples_leaf": 3, "max_iter": 30, **kw}
    model = build_model(
        method,
        task=task,
        modalities=MODS,
        in_channels=CH,
        n_steps=T,
        n_classes=K,
        hidden=kw.pop("hidden", 8),
        **kw,  # type: ignore[arg-type]
    )
    if getattr(model, "gradient_free", False):
        g = torch.Generator().manual_seed(11)
        mask = torch.rand(120, len(MODS), generator=g) > 0.25
        fit = make_batch(task, b=120, seed=11, separable=True, mask=mask)
        model.fit_samples({m: fit[m].numpy() for m in MODS}, mask.numpy(), fit["y"].numpy())  # type: ignore[operator]
    return model


@pytest.fixture
def batch_fn() -> Callable[..., dict[str, torch.Tensor]]:
    return make_batch


@pytest.fixture
def build_fn() -> Callable[..., torch.nn.Module]:
    return build


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
