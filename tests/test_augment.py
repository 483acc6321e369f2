"""Every augmentation: what it changes, and what it must not (labels, the mask of untouched sensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cropmap.augment import (
    Augment,
    AugmentSettings,
    add_noise,
    drop_modalities,
    mask_months,
    shift_months,
)
from cropmap.errors import ConfigError

MODS = ["s2", "s1", "weather", "dem"]
T = 6


def batch(b: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"s2": torch.randn(b, T, 10, generator=g), "s1": torch.randn(b, T, 2, generator=g),
         "weather": torch.randn(b, T, 2, generator=g), "dem": torch.randn(b, 2, generator=g)}
    x["s2"][:8, 2] = float("nan")  # a cloudy month already
    mask = torch.ones(b, 4, dtype=torch.bool)
    mask[::3, 1] = False  # no S1 on every third sample
    x["s1"][::3] = float("nan")
    mask[::5, 0] = False  # no S2 on every fifth
    return x | {"mask": mask, "y": torch.arange(b) % 5}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.nan_to_num(a, nan=123.0), torch.nan_to_num(b, nan=123.0)))


def _untouched_input(before: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in before:
        assert _same(before[k].float(), b[k].float()), f"the input batch was modified in place ({k})"


def test_mask_months_hides_months_of_present_sensors_only() -> None:
    b = batch()
    before = {k: v.clone() for k, v in b.items()}
    out = mask_months(b, MODS, 0.5, torch.Generator().manual_seed(1))
    _untouched_input(before, b)
    assert torch.equal(out["y"], b["y"]) and torch.equal(out["mask"], b["mask"])
    assert torch.equal(out["dem"], b["dem"])  # static sensor untouched
    hidden_any = False
    for i, m in enumerate(("s2", "s1", "weather")):
        was = torch.isfinite(b[m]).all(-1)
        now = torch.isfinite(out[m]).all(-1)
        assert not (now & ~was).any()  # nothing becomes valid
        hidden = was & ~now
        hidden_any |= bool(hidden.any())
        assert not hidden[~b["mask"][:, i]].any()  # an absent sensor is not touched
        assert torch.isnan(out[m][hidden]).all()  # a hidden month loses every channel
        assert torch.equal(out[m][now], b[m][now])  # visible values unchanged
        assert now[was.any(1)].any(1).all()  # a sensor with valid months keeps at least one
        frac = hidden.sum() / (was & b["mask"][:, i : i + 1]).sum()
        assert 0.35 < float(frac) < 0.65, (m, float(frac))
    assert hidden_any


def test_mask_months_with_p1_keeps_exactly_one_month() -> None:
    b = batch()
    out = mask_months(b, MODS, 1.0, torch.Generator().manual_seed(2))
    for i, m in enumerate(("s2", "s1", "weather")):
        rows = b["mask"][:, i]
        assert (torch.isfinite(out[m]).all(-1)[rows].sum(1) == 1).all()


def test_drop_modalities_drops_present_sensors_but_never_all() -> None:
    b = batch()
    before = {k: v.clone() for k, v in b.items()}
    out = drop_modalities(b, MODS, 0.5, torch.Generator().manual_seed(3))
    _untouched_input(before, b)
    assert torch.equal(out["y"], b["y"])
    keep, was = out["mask"], b["mask"]
    assert not (keep & ~was).any()  # an absent sensor never comes back
    assert keep.any(1).all()  # every sample keeps one of its sensors
    dropped = was & ~keep
    assert dropped.any() and (keep & was).any()
    for i, m in enumerate(MODS):
        rows = dropped[:, i]
        assert torch.isnan(out[m][rows]).all()  # a dropped sensor's values are gone
        assert _same(out[m][~rows], b[m][~rows])  # the others' values and mask are untouched
    assert 0.3 < float(dropped.sum() / was.sum()) < 0.6


def test_drop_modalities_with_p1_keeps_one_sensor_per_sample() -> None:
    b = batch()
    out = drop_modalities(b, MODS, 1.0, torch.Generator().manual_seed(4))
    assert (out["mask"].sum(1) == 1).all() and not (out["mask"] & ~b["mask"]).any()


def test_shift_months_moves_a_sample_by_one_month_in_every_temporal_sensor() -> None:
    b = batch()
    before = {k: v.clone() for k, v in b.items()}
    out = shift_months(b, MODS, 1.0, torch.Generator().manual_seed(5))
    _untouched_input(before, b)
    assert torch.equal(out["y"], b["y"]) and torch.equal(out["mask"], b["mask"])
    assert torch.equal(out["dem"], b["dem"])
    seen = set()
    for r in range(len(b["y"])):
        shifts = set()
        for m in ("s2", "s1", "weather"):
            x, o = b[m][r], out[m][r]
            if _same(o[1:], x[:-1]) and torch.isnan(o[0]).all():
                shifts.add(+1)  # later: month t shows t-1
            elif _same(o[:-1], x[1:]) and torch.isnan(o[-1]).all():
                shifts.add(-1)
            else:
                pytest.fail(f"sample {r} {m} is not shifted by one month")
        if not torch.isnan(b["s1"][r]).all():  # an all-NaN sensor matches both shifts
            assert len(shifts) == 1, (r, shifts)  # the same shift for every sensor of a sample
        seen |= shifts
    assert seen == {-1, 1}


def test_shift_months_p0_and_share() -> None:
    b = batch(400)
    assert all(_same(shift_months(b, MODS, 0.0)[m], b[m]) for m in MODS)
    out = shift_months(b, MODS, 0.3, torch.Generator().manual_seed(6))
    moved = ~(torch.isfinite(out["weather"]).all(-1).all(1))  # weather has no gap: NaN month = shifted
    assert 0.22 < float(moved.float().mean()) < 0.38


def test_add_noise_changes_valid_values_only() -> None:
    b = batch(256)
    before = {k: v.clone() for k, v in b.items()}
    out = add_noise(b, MODS, 0.1, torch.Generator().manual_seed(7))
    _untouched_input(before, b)
    assert torch.equal(out["y"], b["y"]) and torch.equal(out["mask"], b["mask"])
    for m in MODS:
        nan = torch.isnan(b[m])
        assert torch.equal(torch.isnan(out[m]), nan)  # invalid stays invalid, valid stays valid
        d = (out[m] - b[m])[~nan]
        assert abs(float(d.std()) - 0.1) < 0.02 and abs(float(d.mean())) < 0.02


def test_augment_chain_off_is_identity_and_settings_are_checked() -> None:
    b = batch()
    aug = Augment(AugmentSettings(), MODS, torch.Generator().manual_seed(0))
    assert not aug.s.active()
    out = aug(b)
    assert all(_same(out[k].float(), b[k].float()) for k in b)
    on = Augment(AugmentSettings.from_dict({"month_mask": 0.2, "modality_drop": 0.2, "shift": 0.5, "noise": 0.05}), MODS,
                 torch.Generator().manual_seed(0))
    out = on(b)
    assert torch.equal(out["y"], b["y"]) and not (out["mask"] & ~b["mask"]).any()
    with pytest.raises(ConfigError, match=r"training\.augment"):
        AugmentSettings.from_dict({"clouds": 0.1})
    with pytest.raises(ConfigError, match="month_mask"):
        AugmentSettings.from_dict({"month_mask": 1.5})


def test_augment_is_seeded() -> None:
    b = batch()
    s = AugmentSettings(month_mask=0.3, modality_drop=0.3, shift=0.3, noise=0.1)
    a1 = Augment(s, MODS, torch.Generator().manual_seed(9))(b)
    a2 = Augment(s, MODS, torch.Generator().manual_seed(9))(b)
    assert all(_same(a1[k].float(), a2[k].float()) for k in b)
    assert np.isfinite(a1["dem"].numpy()[a1["mask"][:, 3].numpy()]).all()
