"""Class statistics of a dataset, class-balanced random crops, and class frequencies kept with a checkpoint."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import torch
import yaml

from gigaseg.data import statistics as stats_module
from gigaseg.data.loader import load_dataset
from gigaseg.data.statistics import class_frequencies, class_statistics, locate_in_cell
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window
from gigaseg.io.normalize import Normalization
from gigaseg.training.checkpoint import data_info, load_checkpoint, save_checkpoint
from gigaseg.training.views import RandomCrops, augment_pair, rng_for, window_around

HEIGHT, WIDTH = 96, 128


def rare_masks() -> list[np.ndarray]:
    """Two masks: background 0, a block of class 1, and in the first a 40-px line of class 2 (0.16% of the pixels)."""
    first = np.zeros((HEIGHT, WIDTH), np.uint8)
    first[10:60, 70:120] = 1
    first[80, 20:60] = 2  # the rare, thin class
    first[0:4, 0:4] = 255  # ignored
    second = np.zeros((HEIGHT, WIDTH), np.uint8)
    second[40:90, 0:64] = 1
    return [first, second]


@pytest.fixture
def rare_dataset(tmp_path):
    root = tmp_path / "rare"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    rng = np.random.default_rng(0)
    for i, mask in enumerate(rare_masks()):
        image = colours[np.where(mask == 255, 0, mask)] + rng.integers(-20, 20, (HEIGHT, WIDTH, 3))
        tifffile.imwrite(root / "images" / f"scene_{i}.tif", image.clip(0, 255).astype(np.uint8))
        tifffile.imwrite(root / "masks" / f"scene_{i}.tif", mask)
    (root / "dataset.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "rare",
                "task": "segmentation",
                "images": "images",
                "masks": "masks",
                "mask_encoding": "index",
                "classes": ["ground", "field", "road"],
                "palette": colours.tolist(),
                "ignore_index": 255,
            }
        )
    )
    return load_dataset(root, split="train")


NORM = Normalization.for_image(3, np.uint8)


# ---------------------------------------------------------------- class statistics


def test_class_frequencies_are_pixel_shares_without_ignored_pixels(rare_dataset):
    masks = rare_masks()
    counts = sum(np.bincount(m[m != 255], minlength=3) for m in masks)
    frequencies = class_frequencies(rare_dataset)
    np.testing.assert_allclose(frequencies, counts / counts.sum())
    assert frequencies[2] == pytest.approx(40 / (2 * HEIGHT * WIDTH - 16))  # 0.16%


def test_grids_read_band_by_band_equal_the_whole_mask_counts(rare_dataset, monkeypatch):
    monkeypatch.setattr(stats_module, "STATISTICS_BAND_BYTES", 10 * WIDTH)  # bands of 10 rows, aligned to cells
    monkeypatch.setattr(stats_module, "_cache", type(stats_module._cache)())
    statistics = class_statistics(rare_dataset, cell=7)  # cells that do not divide the image
    for mask, grid in zip(rare_masks(), statistics.grids):
        rows, cols = -(-HEIGHT // 7), -(-WIDTH // 7)
        assert grid.shape == (3, rows, cols) and grid.dtype == np.uint16
        for c in range(3):
            padded = np.zeros((rows * 7, cols * 7), np.int64)
            padded[:HEIGHT, :WIDTH] = mask == c
            np.testing.assert_array_equal(grid[c], padded.reshape(rows, 7, cols, 7).sum(axis=(1, 3)))
    assert statistics.totals[:, 2].tolist() == [40, 0]


def test_statistics_are_small_cached_and_picklable(rare_dataset, monkeypatch):
    first = class_statistics(rare_dataset)
    again = class_statistics(load_dataset(rare_dataset.root, split="train"))  # another object, the same files
    assert again is first
    assert first.nbytes == 2 * 3 * 2 * 2 * 2  # two 2x2 grids of 64-px cells, 3 classes, uint16
    copy = pickle.loads(pickle.dumps(first))
    np.testing.assert_array_equal(copy.totals, first.totals)
    # an image whose grid would exceed MAX_CELLS gets wider cells
    monkeypatch.setattr(stats_module, "MAX_CELLS", 6)
    monkeypatch.setattr(stats_module, "_cache", type(stats_module._cache)())
    wide = class_statistics(rare_dataset, cell=8)
    assert wide.cells == [48, 48] and all(
        g.shape[1:] == (2, 3) for g in wide.grids
    )  # 46 = ceil(sqrt(12288 / 6)) gives 3x3
    np.testing.assert_array_equal(wide.totals, first.totals)


def test_draws_are_uniform_over_classes_then_over_their_pixels(rare_dataset):
    statistics = class_statistics(rare_dataset)
    probabilities = statistics.class_probabilities()
    np.testing.assert_allclose(probabilities, [1 / 3, 1 / 3, 1 / 3])
    rng = np.random.default_rng(0)
    masks = rare_masks()
    drawn = np.zeros(3)
    for _ in range(3000):
        draw = statistics.draw(rng, probabilities)
        cell = masks[draw.sample][draw.cell.top : draw.cell.bottom, draw.cell.left : draw.cell.right]
        row, col = locate_in_cell(cell, draw)
        assert masks[draw.sample][row, col] == draw.class_id  # every draw finds a pixel of its class
        drawn[draw.class_id] += 1
    np.testing.assert_allclose(drawn / 3000, [1 / 3] * 3, atol=0.03)  # [0.339, 0.327, 0.334]
    # temperature 1: classes as frequent as their pixels; 0.5 in between
    np.testing.assert_allclose(statistics.class_probabilities(1.0), statistics.frequencies)
    half = statistics.class_probabilities(0.5)
    np.testing.assert_allclose(half, np.sqrt(statistics.frequencies) / np.sqrt(statistics.frequencies).sum())
    assert statistics.class_probabilities(exclude=[0]).tolist() == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="temperature"):
        statistics.class_probabilities(2.0)


def test_window_around_holds_the_pixel_and_stays_inside():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        window = window_around(2, 50, (16, 8), (40, 52), rng)
        assert 0 <= window.top <= 2 < window.bottom <= 40 and window.left <= 50 < window.right <= 52
        seen.add((window.top, window.left))
    assert seen == {(t, left) for t in range(3) for left in range(43, 45)}  # every placement occurs


# ---------------------------------------------------------------- balanced crops


def expected_shares(masks, crop: int, probabilities) -> tuple[float, float]:
    """The exact probability that a crop holds class 2: (uniform sampling, balanced sampling)."""
    windows, holds = [], []
    for mask in masks:
        rare = np.pad((mask == 2).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        span = HEIGHT - crop + 1, WIDTH - crop + 1
        t, left = np.mgrid[: span[0], : span[1]]
        inside = rare[t + crop, left + crop] - rare[t, left + crop] - rare[t + crop, left] + rare[t, left]
        contains = (inside > 0).astype(np.float64)
        holds.append(contains.mean())
        windows.append(np.pad(contains.cumsum(0).cumsum(1), ((1, 0), (1, 0))))
    uniform = float(np.mean(holds))
    balanced = 0.0
    for c, p in enumerate(probabilities):
        total = sum(int((m == c).sum()) for m in masks)
        for mask, prefix in zip(masks, windows):
            ys, xs = np.nonzero(mask == c)
            t0, t1 = np.maximum(0, ys - crop + 1), np.minimum(ys, HEIGHT - crop) + 1
            l0, l1 = np.maximum(0, xs - crop + 1), np.minimum(xs, WIDTH - crop) + 1
            count = prefix[t1, l1] - prefix[t0, l1] - prefix[t1, l0] + prefix[t0, l0]
            balanced += p * float((count / ((t1 - t0) * (l1 - l0))).sum()) / total
    return uniform, balanced


def share_with_class(views, class_id: int) -> float:
    return float(np.mean([(views[i]["label"] == class_id).any().item() for i in range(len(views))]))


def test_balanced_crops_hold_the_rare_class_in_the_expected_share(rare_dataset):
    crop = 24
    uniform_views = RandomCrops(rare_dataset, NORM, crop=crop, crops_per_image=400, augment=False, seed=3)
    balanced_views = RandomCrops(
        rare_dataset, NORM, crop=crop, crops_per_image=400, augment=False, seed=3, sampling="balanced"
    )
    expected_uniform, expected_balanced = expected_shares(rare_masks(), crop, balanced_views.class_probabilities)
    # uniform: only image 0 has the line, and 16 of 73 tops and 60 of 105 lefts reach it
    assert expected_uniform == pytest.approx(16 * 60 / (73 * 105) / 2)  # 0.0626
    # balanced: 1/3 (the line's class drawn) + the crops around the other classes' pixels that reach it
    assert expected_balanced == pytest.approx(0.3673, abs=1e-4)
    uniform = share_with_class(uniform_views, 2)
    balanced = share_with_class(balanced_views, 2)
    # 800 crops each: standard errors of about 0.009 and 0.017
    assert uniform == pytest.approx(expected_uniform, abs=0.03)  # 0.0725
    assert balanced == pytest.approx(expected_balanced, abs=0.05)  # 0.3725
    # temperature 1 draws the classes as often as their pixels: back near the uniform share
    weighted = RandomCrops(
        rare_dataset, NORM, crop=crop, crops_per_image=400, augment=False, seed=3, sampling="balanced", temperature=1
    )
    _, expected_weighted = expected_shares(rare_masks(), crop, weighted.class_probabilities)
    assert expected_weighted == pytest.approx(0.0795, abs=1e-4)
    assert share_with_class(weighted, 2) == pytest.approx(expected_weighted, abs=0.03)  # 0.0863


def test_balanced_crops_are_deterministic_and_smaller_than_a_cell(rare_dataset):
    views = RandomCrops(rare_dataset, NORM, crop=[8, (6, 10)], crops_per_image=150, seed=1, sampling="balanced")
    views.set_epoch(2)
    items = [views[i] for i in range(300)]
    copy = pickle.loads(pickle.dumps(views))  # what a DataLoader worker gets
    copy.set_epoch(2)
    for i in (0, 17, 299):
        again = copy[i]
        assert torch.equal(again["label"], items[i]["label"]) and torch.equal(again["box"], items[i]["box"])
        assert torch.equal(again["image"], items[i]["image"])
    # crops much smaller than the 64-px cells still hold the class drawn: the rare line is in
    # about a third of them (it is 1 px thick, the crops 6-10 px)
    assert 0.27 < np.mean([(item["label"] == 2).any().item() for item in items]) < 0.42  # 0.313
    views.set_epoch(3)
    assert not all(torch.equal(views[i]["box"], items[i]["box"]) for i in range(10))


def test_bad_sampling_options_are_refused(rare_dataset):
    with pytest.raises(ConfigError, match="unknown crop sampling 'rare'"):
        RandomCrops(rare_dataset, NORM, crop=16, sampling="rare")
    with pytest.raises(ConfigError, match=r"temperature must lie in \[0, 1\]"):
        RandomCrops(rare_dataset, NORM, crop=16, sampling="balanced", temperature=-1)


# ---------------------------------------------------------------- uniform crops are what they were


def old_random_crop(views: RandomCrops, index: int) -> dict:
    """RandomCrops.__getitem__ as it was before balanced sampling existed."""
    rng = rng_for(views.seed, views.epoch, index)
    sample = views.dataset[index // views.crops_per_image]
    ch, cw = views.crops[int(rng.integers(len(views.crops)))]
    ch, cw = min(ch, sample.image.height), min(cw, sample.image.width)
    top = int(rng.integers(sample.image.height - ch + 1))
    left = int(rng.integers(sample.image.width - cw + 1))
    window = Window(top, left, ch, cw)
    out = views.out_size if views.out_size is not None else (ch, cw)
    image = sample.image.read(window, out_size=out if out != (ch, cw) else None, resample="area")
    label = sample.mask.read(window, out_size=out if out != (ch, cw) else None, resample="nearest")[..., 0]
    if views.augment:
        image, label = augment_pair(image, label, rng)
    box = [top / sample.image.height, left / sample.image.width, (top + ch) / sample.image.height]
    return {
        "image": NORM.apply(image),
        "label": label.astype(np.int64),
        "box": box + [(left + cw) / sample.image.width],
    }


@pytest.mark.parametrize("options", [{"crop": 24}, {"crop": [16, (20, 40), 200], "out_size": (12, 12)}])
def test_uniform_crops_are_bit_identical_to_before(rare_dataset, options):
    views = RandomCrops(rare_dataset, NORM, crops_per_image=5, seed=7, **options)
    assert views.sampling == "uniform" and views.statistics is None  # no mask is read up front
    views.set_epoch(4)
    for index in range(len(views)):
        item, old = views[index], old_random_crop(views, index)
        np.testing.assert_array_equal(item["image"].numpy(), old["image"])
        np.testing.assert_array_equal(item["label"].numpy(), old["label"])
        assert item["box"].tolist() == torch.tensor(old["box"]).tolist() and item["index"] == index


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_carry_class_frequencies_when_given(rare_dataset, tmp_path):
    from gigaseg.methods.registry import create_model

    plain = data_info(rare_dataset, NORM)
    assert "class_frequencies" not in plain  # unknown: what older checkpoints say too
    frequencies = class_frequencies(rare_dataset)
    info = data_info(rare_dataset, NORM, class_frequencies=frequencies)
    assert info["class_frequencies"] == pytest.approx(frequencies.tolist())
    assert all(type(f) is float for f in info["class_frequencies"])
    model = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=16)
    path = save_checkpoint(tmp_path / "m.ckpt", model, info)
    assert torch.load(path, weights_only=True)["data"]["class_frequencies"] == info["class_frequencies"]
    assert (
        load_checkpoint(save_checkpoint(tmp_path / "old.ckpt", model, plain))["data"].get("class_frequencies") is None
    )
    with pytest.raises(ValueError, match="one finite, non-negative value per class"):
        data_info(rare_dataset, NORM, class_frequencies=[0.5, 0.5])
