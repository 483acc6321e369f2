"""Pixel pretraining: the masked-reconstruction loss, its masking, the checkpoint fine-tuning loads,
the config that wires it, and a real ``snakemake`` run of the pretrain rule for a training set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cropmap.config import pretrain_path, stage_params, uses_pretraining, validate
from cropmap.datasets import PixelSamples
from cropmap.errors import ConfigError
from cropmap.loop import CoLearningModule
from cropmap.modalities import BANDS
from cropmap.models.pixel_pretrain import PixelMAE, init_module, load_encoders, reconstruction_terms
from cropmap.pretrain import pretrain_pixels, region_pixels
from cropmap.train import TrainSettings
from tests.conftest import REALDATA, tiny_config

from .test_pretrain import MODS, _region

T = 3
MONTHS = [f"2023-0{i + 1}" for i in range(T)]
CH = {m: len(BANDS[m]) for m in MODS}
FULL = {m: list(BANDS[m]) for m in MODS}


def samples(n: int = 64, seed: int = 0) -> PixelSamples:
    """Pixels with cloudy months and a missing S1 on every third row (NaN, mask False)."""
    rng = np.random.default_rng(seed)
    x = {m: rng.normal(size=(n, T, CH[m])).astype(np.float32) for m in ("s2", "s1", "weather")}
    x["dem"] = rng.normal(size=(n, CH["dem"])).astype(np.float32)
    x["s2"][::4, 1] = np.nan
    mask = np.ones((n, 4), bool)
    mask[::3, 1] = False
    x["s1"][::3] = np.nan
    return PixelSamples(x, mask, np.arange(n) % 3, np.zeros(n, np.uint8), list(MODS))


def _batch(s: PixelSamples) -> dict[str, torch.Tensor]:
    return {m: torch.from_numpy(v.copy()) for m, v in s.x.items()} | {"mask": torch.from_numpy(s.mask.copy())}


def test_reconstruction_loss_by_hand() -> None:
    """MSE over the hidden values that are valid in the data, per sensor, averaged over sensors."""
    nan = float("nan")
    batch = {"a": torch.tensor([[[1.0], [2.0], [nan]], [[4.0], [5.0], [6.0]]]),  # [B=2, T=3, C=1]
             "b": torch.tensor([[10.0, 20.0], [30.0, 40.0]]),  # static [B, 2]
             "mask": torch.tensor([[True, True], [True, False]])}
    visible = {"a": torch.tensor([[[1.0], [nan], [nan]], [[nan], [5.0], [6.0]]]),  # months hidden: (0, 1) and (1, 0)
               "b": torch.tensor([[nan, nan], [30.0, 40.0]]),  # b hidden in row 0; row 1 has no b at all
               "mask": torch.tensor([[True, False], [True, False]])}
    pred = {"a": torch.tensor([[0.0, 0.0, 100.0], [1.0, 0.0, 0.0]]), "b": torch.tensor([[11.0, 17.0], [0.0, 0.0]])}
    terms = reconstruction_terms(pred, batch, visible, ["a", "b"])
    # a: hidden valid values 2.0 (pred 0) and 4.0 (pred 1); the invalid month (NaN, pred 100) is not scored
    assert terms["rec_a"].item() == pytest.approx((2.0**2 + 3.0**2) / 2)
    # b: row 0 hidden (pred 11, 17 for 10, 20); row 1 is missing (mask False), never a target
    assert terms["rec_b"].item() == pytest.approx((1.0**2 + 3.0**2) / 2)
    assert terms["total"].item() == pytest.approx((6.5 + 5.0) / 2)
    # nothing hidden: a zero that still has a gradient
    none = reconstruction_terms(pred, batch, batch, ["a", "b"])
    assert set(none) == {"total"} and none["total"].item() == 0.0


def test_hidden_and_missing_sensors_cannot_reach_the_encoding_or_the_loss() -> None:
    s = samples()
    model = PixelMAE(MODS, CH, T, 8, month_mask=0.3, modality_mask=0.5).eval()

    def run(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        model.generator = torch.Generator().manual_seed(7)  # the same masks for both batches
        visible = model.hide(batch)
        fused = model.encode(visible)
        terms = reconstruction_terms({m: model.decoders[m](fused) for m in MODS}, batch, visible, MODS)
        return visible, fused, terms["total"]

    base = _batch(s)
    visible, fused, total = run(base)
    hidden_s2 = base["mask"][:, 0] & ~visible["mask"][:, 0]
    assert hidden_s2.any() and (visible["mask"][:, 0]).any()
    # other values of a hidden sensor: the same visible encoding (only its reconstruction target moves)
    other = {k: v.clone() for k, v in base.items()}
    other["s2"][hidden_s2] = 50.0
    _, fused2, total2 = run(other)
    torch.testing.assert_close(fused2, fused)
    assert total2.item() != pytest.approx(total.item())
    # values behind a missing sensor (mask False) reach neither the encoding nor the loss
    garbage = {k: v.clone() for k, v in base.items()}
    garbage["s1"][~base["mask"][:, 1]] = 1e6
    _, fused3, total3 = run(garbage)
    torch.testing.assert_close(fused3, fused)
    assert total3.item() == pytest.approx(total.item())


def _settings(method: str, **kw: object) -> TrainSettings:
    classes = [{"id": i, "name": f"c{i}", "colour": "#101010"} for i in range(3)]
    return TrainSettings(task="classification", method=method, modalities=list(MODS), months=MONTHS, classes=classes,
                         hidden=8, device="cpu", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = samples(128)
    out = tmp_path_factory.mktemp("pixpre") / "pixel.ckpt"
    summary = pretrain_pixels(s.x, s.mask, MODS, MONTHS, FULL, out, hidden=8, epochs=12, batch_size=32, lr=3e-3, seed=0,
                              device="cpu")
    assert summary["steps"] == 12 * 4 and summary["n_pixels"] == 128
    assert np.mean(summary["loss"][-3:]) < np.mean(summary["loss"][:3])  # it learns to reconstruct
    return out


@pytest.mark.parametrize("method", ["comiss", "mdico"])
def test_fine_tuning_starts_from_the_pretrained_encoders(pretrained: Path, method: str) -> None:
    ckpt = torch.load(pretrained, weights_only=True)
    settings = _settings(method, pretrained=str(pretrained))
    module = CoLearningModule(settings.model_kwargs(), {m: ([0.0] * CH[m], [1.0] * CH[m]) for m in MODS}, 1e-3, None)
    summary = init_module(module, pretrained, settings.resolved_bands())
    dicts = [d for name, d in module.model.named_modules() if name in ("encoders", "shared_encoders")]
    assert len(dicts) == (2 if method == "mdico" else 1)
    assert summary == {"pretrained_from": str(pretrained), "pretrained_tensors": sum(len(ckpt["encoders"][m]) for d in dicts for m in d)}
    for d in dicts:
        for m, enc in d.items():
            for k, v in enc.state_dict().items():
                assert torch.equal(v, ckpt["encoders"][m][k]), (m, k)
    assert module.norm.stats()["s2"][0] == pytest.approx(ckpt["stats"]["s2"][0])  # the pretraining's scale


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"hidden": 16}, "width 8 but model.hidden is 16"),
        ({"encoders": {"s2": "ltae"}}, "the s2 encoder was pretrained as tempcnn but model.encoders gives ltae"),
        ({"bands": {"s2": ["B04", "B08"]}}, "the s2 encoder was pretrained on bands"),
        ({"months": MONTHS[:2]}, "pretrained on 3 months but the model has 2"),
        ({"method": "input_fusion"}, "has no per-sensor encoders"),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_model_is_one_clear_line(pretrained: Path, change: dict, fragment: str) -> None:
    settings = _settings("comiss")
    for k, v in change.items():
        setattr(settings, k, v)
    from cropmap.models import build_model

    model = build_model(**settings.model_kwargs())
    with pytest.raises(ConfigError) as err:
        load_encoders(model, pretrained, settings.resolved_bands())
    msg = str(err.value)
    assert str(pretrained) in msg and fragment in msg and "\n" not in msg, msg


def test_region_pixels_never_read_test_chips(tmp_path: Path) -> None:
    grid, stack, chips = _region(tmp_path)
    x, mask = region_pixels(stack, tmp_path / "labels.tif", chips, grid, ["2023-05", "2023-06"], MODS, max_pixels=300,
                            min_valid_fraction=0.5, seed=0)
    assert len(mask) == 300 and mask.any(1).all() and x["s2"].shape == (300, 2, CH["s2"])
    assert not mask[:, 2].any()  # no weather stack
    assert (~mask[:, 1]).any() and mask[:, 1].any()  # the chip without S1 gives pixels without S1
    # every pixel read comes from the three non-test chips: the S2 values are among theirs
    import rasterio

    with rasterio.open(stack / "s2.tif") as src:
        a = src.read()
    nontest = np.ones(grid.shape, bool)
    nontest[16:, 16:] = False
    first = a[0][nontest]
    assert np.isin(x["s2"][:, 0, 0], first).all() and not np.isin(x["s2"][:, 0, 0], a[0][16:, 16:]).any()


def test_config_wires_pixel_methods_and_folds(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    cfg["model"]["pretrain"] = {"enabled": True}
    cfg["compare"] |= {"folds": 3}
    cfg = validate(cfg)
    assert uses_pretraining(cfg, "comiss", "classification") and uses_pretraining(cfg, "mdico", "classification")
    assert not uses_pretraining(cfg, "trees_dedicated", "classification")
    assert not uses_pretraining(cfg, "input_fusion", "classification")
    assert not uses_pretraining(cfg, "comiss", "segmentation")
    models = cfg["models_dir"]
    assert pretrain_path(cfg, "tiny", "comiss", "classification") == f"{models}/tiny/pretrain/pixel.ckpt"
    assert pretrain_path(cfg, "tiny", "comiss", "classification", 2) == f"{models}/tiny/pretrain/fold2/pixel.ckpt"
    assert pretrain_path(cfg, "tiny", "imt", "segmentation", 2) == f"{models}/tiny/pretrain/imt.ckpt"
    train = stage_params(cfg, "train", "tiny", method="comiss", fold="1")
    assert train["model"]["pretrain"]["checkpoint"] == f"{models}/tiny/pretrain/fold1/pixel.ckpt"
    assert "checkpoint" not in stage_params(cfg, "train", "tiny", method="trees_nan", fold="1")["model"]["pretrain"]
    assert TrainSettings.from_config(train, "classification", train["months"]).pretrained == f"{models}/tiny/pretrain/fold1/pixel.ckpt"
    pix = stage_params(cfg, "pretrain", "tiny", method="pixel")
    assert pix["hidden"] == 16 and pix["pretrain"]["month_mask"] == 0.5 and "lr" not in pix["pretrain"]
    cfg["model"]["pretrain"]["enabled"] = False
    assert not uses_pretraining(cfg, "comiss", "classification")
    assert "checkpoint" not in stage_params(cfg, "train", "tiny")["model"]["pretrain"]


@pytest.mark.workflow
def test_pretrain_rule_runs_for_a_training_set_and_training_loads_it(tmp_path: Path) -> None:
    """Real snakemake: a fold's compare training and the training set's own model each depend on
    their pixel pretraining, and log and summarise that they start from it."""
    from tests.test_workflow import snakemake

    cfg = tiny_config(tmp_path)
    cfg["regions"] = {}
    cfg["classes"] = []
    cfg["bands"] = {"s2": ["B04", "B08", "B11"]}
    cfg["training_sets"] = {"fields": {"tables": [{"path": str(REALDATA / "worldcereal_flanders_2021_extractions_long.parquet"),
                                                   "format": "worldcereal_long"}],
                                       "season": {"start": "2021-04", "end": "2021-06"}, "min_samples": 10}}
    cfg["model"] |= {"hidden": 8, "pretrain": {"enabled": True, "epochs": 2, "pixel_batch_size": 64}}
    cfg["training"] |= {"epochs": 1, "batch_size": 64, "device": "cpu"}
    cfg["compare"] = {"epochs": 1, "folds": 2, "methods": ["comiss", "trees_nan"], "regions": ["fields"],
                      "options": {"trees_nan": {"max_iter": 10, "max_bins": 15}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    fold_model = "models/fields/compare/fold1/comiss/classification"
    res = snakemake(tmp_path, *(str(tmp_path / m / "train_summary.json") for m in (fold_model, "models/fields/classification")))
    pre = torch.load(tmp_path / "models/fields/pretrain/fold1/pixel.ckpt", weights_only=True)
    assert pre["summary"]["epochs"] == 2 and pre["hidden"] == 8 and pre["bands"]["s2"] == ["B04", "B08", "B11"]
    from cropmap.samples import read_samples

    fold1 = read_samples(tmp_path / "data/fields/folds/1/samples.npz").samples
    seen = (fold1.split != 2) & fold1.mask.any(1)  # never the fold's test rows
    assert pre["summary"]["n_pixels"] == int(seen.sum()) < len(fold1)
    s2_mean = np.nanmean(fold1.x["s2"][seen].reshape(-1, 3), axis=0)
    assert pre["stats"]["s2"][0] == pytest.approx(s2_mean.tolist(), rel=1e-4)
    for model, ckpt in ((fold_model, "pretrain/fold1/pixel.ckpt"), ("models/fields/classification", "pretrain/pixel.ckpt")):
        summary = json.loads((tmp_path / model / "train_summary.json").read_text())
        assert summary["pretrained_from"].endswith(f"models/fields/{ckpt}") and summary["pretrained_tensors"] > 0
    log = (tmp_path / "logs/fields/compare/fold1/train_comiss_classification.log").read_text()
    assert "fine-tuning from the pretrained encoders of" in log
    assert not (tmp_path / "models/fields/pretrain/fold0").exists()  # only what the targets need
    assert "pretrain" in res.stderr


def test_pretrain_command_of_a_region(tmp_path: Path) -> None:
    """``cropmap pretrain --kind pixel`` on a region's stack folder, labels and chips (as the rule calls it)."""
    from cropmap.cli import main

    grid, stack, chips = _region(tmp_path)
    months = ["2023-05", "2023-06"]
    p = {"region": "r", "grid": grid.to_dict(), "months": months, "modalities": MODS, "bands": FULL, "hidden": 8,
         "encoders": {}, "seed": 0, "device": "cpu", "min_valid_fraction": 0.5,
         "pretrain": {"enabled": True, "epochs": 1, "pixel_batch_size": 64, "pixel_lr": 1e-3, "month_mask": 0.5,
                      "modality_mask": 0.5, "max_pixels": 200}}
    out = tmp_path / "pixel.ckpt"
    assert main(["pretrain", "--kind", "pixel", "--params", json.dumps(p), "--inputs", str(stack), str(tmp_path / "labels.tif"),
                 str(chips), "--out", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["summary"]["n_pixels"] == 200 and ckpt["months"] == months and set(ckpt["encoders"]) == set(MODS)
