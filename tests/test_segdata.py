"""Segmentation training data: chips read once into memory, random windows inside the training chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch

from cropmap.chips import chip_table
from cropmap.datasets import IGNORE_INDEX, ChipDataset
from cropmap.grid import Grid
from cropmap.modalities import band_descriptions
from cropmap.segdata import CachedChips, RandomWindowSampler, chip_bytes, read_chips

MONTHS = ["2023-05", "2023-06"]
MODS = ["s2", "s1", "weather", "dem"]  # no weather stack: missing everywhere
SIZE, CHIP, BLOCK = 40, 8, 16


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> tuple[Grid, Path, Path, pd.DataFrame]:
    """A 40 px region whose stack values encode their position (exact in float16), with clouds."""
    root = tmp_path_factory.mktemp("segdata")
    grid = Grid(crs="EPSG:32631", res=10.0, xmin=640000.0, ymax=5063000.0, width=SIZE, height=SIZE)
    rng = np.random.default_rng(0)
    stack = root / "stack"
    stack.mkdir()
    pos = (np.arange(SIZE)[:, None] * SIZE + np.arange(SIZE)[None, :]).astype(np.float32)
    for m in ("s2", "s1", "dem"):
        n = len(band_descriptions(m, MONTHS))
        a = np.stack([pos * (-1) ** b for b in range(n)])  # integers < 2048: exact in float16
        if m == "s2":
            a[:, 5:12, 20:30] = np.nan  # a cloud over both months
        if m == "s1":
            a[:, :, 33:] = np.nan  # an orbit gap
        with rasterio.open(stack / f"{m}.tif", "w", **grid.profile(n)) as dst:
            dst.write(a)
            dst.descriptions = tuple(band_descriptions(m, MONTHS))
    cls = rng.integers(0, 3, (SIZE // 4, SIZE // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
    cls[rng.random(cls.shape) < 0.1] = 255
    blocks = rng.choice(3, size=(SIZE // BLOCK + 1, SIZE // BLOCK + 1), p=[0.6, 0.2, 0.2]).astype(np.uint8)
    split = blocks.repeat(BLOCK, 0).repeat(BLOCK, 1)[:SIZE, :SIZE]
    labels = root / "labels.tif"
    with rasterio.open(labels, "w", **grid.profile(2, "uint8", 255)) as dst:
        dst.write(np.stack([cls, split]))
    chips = chip_table(stack, labels, grid, MONTHS, MODS, CHIP, 0.5)
    return grid, stack, labels, chips


def _train(chips: pd.DataFrame) -> pd.DataFrame:
    return chips[(chips.split == "train") & (chips.n_labelled > 0)]


def test_cached_chips_equal_the_torchgeo_chip_dataset(region: tuple[Grid, Path, Path, pd.DataFrame]) -> None:
    grid, stack, labels, chips = region
    cache = read_chips(stack, labels, chips, MONTHS, MODS, 0.5, progress=False)
    assert set(cache.x) == {"s2", "s1", "dem"} and cache.x["s2"].dtype == np.float16
    assert cache.nbytes <= len(chips) * chip_bytes(CHIP, MONTHS, MODS)
    cached, ref = CachedChips(cache), ChipDataset(stack, labels, chips, grid, MONTHS, MODS, 0.5)
    assert len(cached) == len(ref) == (SIZE // CHIP) ** 2
    for i in range(len(ref)):
        a, b = cached[i], ref[i]
        assert set(a) == set(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].nan_to_num(-1.0), b[k].nan_to_num(-1.0)), (i, k)
    assert (torch.stack([cached[i]["y"] for i in range(len(cached))]) == IGNORE_INDEX).any()
    assert not torch.stack([cached[i]["mask"] for i in range(len(cached))])[:, 2].any()  # no weather stack


def test_random_windows_are_region_windows_inside_training_chips(region: tuple[Grid, Path, Path, pd.DataFrame]) -> None:
    _, stack, labels, chips = region
    tr = _train(chips)
    ds = CachedChips(read_chips(stack, labels, tr, MONTHS, MODS, 0.5, progress=False))
    sampler = RandomWindowSampler(ds.nbr, CHIP, 200, seed=1, augment=False)
    with rasterio.open(stack / "s2.tif") as src:
        s2 = src.read()
    with rasterio.open(labels) as src:
        cls, split = src.read(1), src.read(2)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 200
    shifted = 0
    for i, dr, dc, turns, flip in draws:
        assert turns == flip == 0
        r, c = int(tr.row.iloc[i]) + dr, int(tr.col.iloc[i]) + dc
        item = ds[(i, dr, dc, turns, flip)]
        assert (split[r : r + CHIP, c : c + CHIP] == 0).all(), "a window left the training chips"
        assert torch.equal(item["s2"].nan_to_num(-1.0), torch.from_numpy(s2[:, r : r + CHIP, c : c + CHIP]).nan_to_num(-1.0))
        want = cls[r : r + CHIP, c : c + CHIP].astype(np.int64)
        assert torch.equal(item["y"], torch.from_numpy(np.where(want == 255, IGNORE_INDEX, want)))
        shifted += dr > 0 and dc > 0
    assert shifted > 20, "windows should straddle neighbouring training chips"


def test_augmented_window_is_a_turned_and_flipped_window(region: tuple[Grid, Path, Path, pd.DataFrame]) -> None:
    _, stack, labels, chips = region
    ds = CachedChips(read_chips(stack, labels, _train(chips), MONTHS, MODS, 0.5, progress=False))
    draws = RandomWindowSampler(ds.nbr, CHIP, 64, seed=3).draws()
    assert {d[3] for d in draws} == {0, 1, 2, 3} and {d[4] for d in draws} == {0, 1}
    for key in draws[:16]:
        plain, aug = ds[(*key[:3], 0, 0)], ds[key]
        for k in ("s2", "mask", "y"):
            want = torch.rot90(plain[k], key[3], (-2, -1))
            want = want.flip(-1) if key[4] else want
            assert torch.equal(aug[k].nan_to_num(-1.0), want.nan_to_num(-1.0)), (key, k)


def test_window_draws_are_seeded_per_epoch_and_sharded_by_rank(region: tuple[Grid, Path, Path, pd.DataFrame],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, stack, labels, chips = region
    ds = CachedChips(read_chips(stack, labels, _train(chips), MONTHS, MODS, 0.5, progress=False))
    s = RandomWindowSampler(ds.nbr, CHIP, 50, seed=7)
    first = list(s)
    assert list(RandomWindowSampler(ds.nbr, CHIP, 50, seed=7)) == first
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    assert sorted({d[0] for d in first}) == list(range(len(ds))), "every training chip is drawn each pass"
    shards = []
    for rank in range(3):
        monkeypatch.setattr(RandomWindowSampler, "_rank_world", staticmethod(lambda rank=rank: (rank, 3)))
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 17
    assert sorted(d for shard in shards for d in shard) == sorted(first + first[:1])
