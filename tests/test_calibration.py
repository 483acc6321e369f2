"""Calibration: ECE against a hand computation, temperature fits, per-subset scaling, the bundle path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cropmap.calibration import (
    MIN_SUBSET_SAMPLES,
    Calibrated,
    ece,
    fit_temperature,
    fit_temperatures,
    nll,
    subset_codes,
)


def test_ece_matches_a_hand_computation() -> None:
    # confidences 0.95 (right), 0.85 (wrong), 0.85 (right), 0.55 (right), 0.10-bin edge 0.3 (wrong)
    proba = np.array([[0.95, 0.05, 0.0], [0.85, 0.15, 0.0], [0.85, 0.0, 0.15], [0.25, 0.55, 0.20], [0.3, 0.3, 0.4]])
    y = np.array([0, 1, 0, 1, 0])
    # bins (0.9, 1]: acc 1, conf .95 -> 1/5 * .05; (0.8, 0.9]: acc .5, conf .85 -> 2/5 * .35;
    # (0.5, 0.6]: acc 1, conf .55 -> 1/5 * .45; (0.3, 0.4]: conf .4 (class 2), acc 0 -> 1/5 * .4
    hand = (0.05 + 2 * 0.35 + 0.45 + 0.4) / 5
    assert ece(proba, y) == pytest.approx(hand)
    assert ece(proba, y, bins=1) == pytest.approx(abs(3 / 5 - (0.95 + 0.85 + 0.85 + 0.55 + 0.4) / 5))
    assert math.isnan(ece(np.zeros((0, 3)), np.zeros(0, int)))
    # a confidence exactly on a bin edge goes to the lower bin: 0.8 -> (0.7, 0.8]
    assert ece(np.array([[0.8, 0.2]]), np.array([0])) == pytest.approx(0.2)


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 4)) * 3
    true_t = 2.5
    p = np.exp(z / true_t)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.1)
    assert nll(z, y, t) <= min(nll(z, y, true_t), nll(z, y, 1.0)) + 1e-9
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, int)) == 1.0


def test_fit_temperatures_per_subset_with_fallback() -> None:
    rng = np.random.default_rng(1)

    def draw(n: int, t: float) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(size=(n, 3)) * 4
        p = np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
        return z, np.array([rng.choice(3, p=row) for row in p])

    per = {3: draw(3000, 3.0), 1: draw(3000, 0.7), 2: draw(MIN_SUBSET_SAMPLES - 1, 1.0)}
    temps = fit_temperatures(per, 2, "subset")
    pooled = fit_temperature(np.concatenate([v[0] for v in per.values()]), np.concatenate([v[1] for v in per.values()]))
    assert len(temps) == 4 and temps[0] == 1.0
    assert temps[3] == pytest.approx(3.0, rel=0.15) and temps[1] == pytest.approx(0.7, rel=0.15)
    assert temps[2] == pytest.approx(pooled)  # too few samples: the pooled temperature
    assert fit_temperatures(per, 2, "global") == [1.0, pooled, pooled, pooled]
    assert fit_temperatures(per, 2, "none") == [1.0] * 4


class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, batch: dict) -> dict:
        return {"logits": self.logits, "avail": batch["mask"], "per_modality": {}}


def test_calibrated_divides_by_the_temperature_of_each_subset() -> None:
    logits = torch.tensor([[2.0, 1.0], [4.0, -2.0], [1.0, 3.0]])
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    assert subset_codes(mask).tolist() == [3, 1, 2]
    model = Calibrated(_Fixed(logits), [1.0, 2.0, 0.5, 4.0])
    out = model({"mask": mask})["logits"]
    assert torch.allclose(out, logits / torch.tensor([[4.0], [2.0], [0.5]]))
    assert torch.equal(out.argmax(1), logits.argmax(1))  # the map's classes do not change
    # per-pixel masks [B, M, H, W]
    lg = torch.randn(1, 2, 2, 2)
    pm = torch.tensor([[[[True, False], [True, True]], [[True, True], [False, True]]]])
    got = Calibrated(_Fixed(lg), [1.0, 2.0, 0.5, 4.0])({"mask": pm})["logits"]
    t = torch.tensor([[4.0, 0.5], [2.0, 4.0]])
    assert torch.allclose(got, lg / t)


def test_calibrated_shows_the_model_attributes_even_one_named_temperature() -> None:
    """MDiCo has its own ``temperature`` (NT-Xent): wrapping it must neither clash nor hide it."""
    inner = _Fixed(torch.zeros(2, 3))
    inner.temperature = 0.07
    inner.modalities = ["s2", "s1"]
    wrapped = Calibrated(inner, [1.0, 2.0, 0.5, 4.0])
    assert wrapped.temperature == 0.07 and wrapped.modalities == ["s2", "s1"]
    assert wrapped.subset_temperatures.tolist() == [1.0, 2.0, 0.5, 4.0]
