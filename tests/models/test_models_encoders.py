"""Encoder shapes and the encoder options of the factory."""

from __future__ import annotations

import pytest
import torch

from cropmap.errors import UnknownNameError
from cropmap.models import build_model
from cropmap.models.encoders import build_encoder


@pytest.mark.parametrize("name", ["tempcnn", "ltae", "gru"])
def test_temporal_encoders(name):
    enc = build_encoder(
        name, task="classification", temporal=True, in_channels=10, n_steps=6, hidden=16
    )
    enc.train()
    assert enc(torch.randn(3, 6, 10)).shape == (3, 16)


def test_static_and_unet():
    mlp = build_encoder(
        "mlp", task="classification", temporal=False, in_channels=2, n_steps=6, hidden=16
    )
    assert mlp(torch.randn(3, 2)).shape == (3, 16)
    unet = build_encoder(
        "unet", task="segmentation", temporal=True, in_channels=2, n_steps=6, hidden=16
    )
    assert unet(torch.randn(2, 12, 8, 8)).shape == (2, 16, 8, 8)  # T*C stacked channels


def test_smp_encoder():
    enc = build_encoder(
        "smp:resnet18", task="segmentation", temporal=False, in_channels=2, n_steps=1, hidden=16
    )
    assert enc(torch.randn(2, 2, 8, 8)).shape == (2, 16, 8, 8)


def test_unknown_encoder_lists_valid():
    with pytest.raises(UnknownNameError, match="tempcnn, ltae, gru"):
        build_encoder("lstm", task="classification", temporal=True, in_channels=2, n_steps=3)
    with pytest.raises(UnknownNameError, match="unet"):
        build_encoder("tempcnn", task="segmentation", temporal=True, in_channels=2, n_steps=3)


@pytest.mark.parametrize("enc", ["ltae", "gru"])
def test_alternative_encoders_in_a_method(enc, batch_fn):
    torch.manual_seed(0)
    model = build_model(
        "comiss",
        task="classification",
        modalities=("s2", "s1", "dem"),
        in_channels={"s2": 10, "s1": 2, "dem": 2},
        n_steps=4,
        n_classes=3,
        hidden=16,
        encoders={"s2": enc, "s1": enc},
    )
    batch = batch_fn("classification")
    batch["mask"] = batch["mask"][:, [0, 1, 3]]
    loss = model.loss(model(batch), batch)
    loss["total"].backward()
    assert torch.isfinite(loss["total"])


def test_five_dim_segmentation_input(batch_fn):
    model = build_model(
        "unimodal",
        task="segmentation",
        modalities=("s2",),
        in_channels={"s2": 10},
        n_steps=4,
        n_classes=3,
        hidden=8,
    ).eval()
    b = batch_fn("segmentation", b=2)
    x4 = b["s2"]  # [B, T*C, H, W] time-major
    x5 = x4.view(2, 4, 10, 8, 8)
    m = torch.ones(2, 1, dtype=torch.bool)
    assert torch.equal(
        model({"s2": x4, "mask": m})["logits"], model({"s2": x5, "mask": m})["logits"]
    )
