"""Inria Aerial on a tiny fixture in its published layout (GeoTIFF-like .tif images, 0/255 gt)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gigaseg.data.inria import Inria, is_validation
from gigaseg.data.loader import load_dataset
from gigaseg.errors import DatasetError

H, W = 48, 64
CITIES = ("austin", "chicago", "kitsap", "tyrol-w", "vienna")


def gt(number: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[10:20, 10 + number : 30 + number] = 255  # one building
    return mask


def inria_layout(root, per_city=7, test=("bellingham1", "innsbruck2")):
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "gt").mkdir()
    (root / "test" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for city in CITIES:
        for number in range(1, per_city + 1):
            name = f"{city}{number}.tif"
            image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            tifffile.imwrite(root / "train" / "images" / name, image, photometric="rgb")
            tifffile.imwrite(root / "train" / "gt" / name, gt(number))
    for name in test:
        tifffile.imwrite(root / "test" / "images" / f"{name}.tif", np.zeros((H, W, 3), np.uint8), photometric="rgb")
    return root


def test_validation_rule_is_first_five_images_per_city():
    assert all(is_validation(f"{city}{n}") for city in CITIES for n in range(1, 6))
    assert not any(is_validation(f"{city}{n}") for city in CITIES for n in (6, 10, 15, 36))


def test_splits(tmp_path):
    root = inria_layout(tmp_path / "AerialImageDataset")
    val = Inria(root, "val")
    assert len(val) == 25
    assert val.names[:5] == ["austin1", "austin2", "austin3", "austin4", "austin5"]
    assert "tyrol-w5" in val.names and "tyrol-w6" not in val.names
    train = Inria(root, "train")
    assert len(train) == 10 and sorted(train.names)[:2] == ["austin6", "austin7"]
    assert not set(train.names) & set(val.names)
    assert len(Inria(root, "all")) == 35
    test = Inria(root, "test")
    assert test.names == ["bellingham1", "innsbruck2"] and not test.labelled
    with test[0] as sample:
        assert sample.mask is None and sample.image.shape == (H, W, 3)
    with pytest.raises(DatasetError, match=r"AerialImageDataset: Inria has no split 'valid'"):
        Inria(root, "valid")


def test_classes_and_binary_labels(tmp_path):
    dataset = Inria(inria_layout(tmp_path / "inria", per_city=2), "all")
    assert dataset.classes == ["background", "building"] and dataset.num_classes == 2
    assert dataset.exclude_from_miou == ()
    with dataset[0] as sample:
        assert sample.name == "austin1"
        ids = sample.mask.read()[..., 0]
        assert ids[15, 20] == 1 and ids[0, 0] == 0  # 255 -> building, 0 -> background
        assert set(np.unique(ids)) == {0, 1}
        assert np.array_equal(ids, gt(1) // 255)
    dataset.validate(full=True)


def test_load_dataset_detects_inria(tmp_path):
    root = inria_layout(tmp_path / "inria", per_city=6)
    dataset = load_dataset(root, "val")
    assert isinstance(dataset, Inria) and len(dataset) == 25


def test_missing_gt_and_unpaired_files(tmp_path):
    root = inria_layout(tmp_path / "inria", per_city=6)
    (root / "train" / "gt" / "vienna3.tif").unlink()
    with pytest.raises(DatasetError, match=r"train/gt: 1 image\(s\) have no mask here: vienna3\.tif"):
        Inria(root, "train")
    tifffile.imwrite(root / "train" / "gt" / "vienna3.tif", gt(3))
    tifffile.imwrite(root / "train" / "gt" / "vienna99.tif", gt(3))
    with pytest.raises(DatasetError, match=r"train/images: 1 mask\(s\) have no image here: vienna99\.tif"):
        Inria(root, "train")
    (root / "train" / "gt" / "vienna99.tif").unlink()
    tifffile.imwrite(root / "train" / "gt" / "kitsap2.tif", gt(2)[:, :32])
    with pytest.raises(
        DatasetError, match=r"gt/kitsap2\.tif: mask is 48x32 \(HxW\) but its image .*images/kitsap2\.tif"
    ):
        Inria(root, "val")


def test_missing_folders(tmp_path):
    root = tmp_path / "inria"
    (root / "train" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"train/images: no images"):
        Inria(root, "train")
    tifffile.imwrite(root / "train" / "images" / "austin1.tif", np.zeros((H, W, 3), np.uint8), photometric="rgb")
    with pytest.raises(DatasetError, match=r"train/gt: Inria ground-truth folder does not exist"):
        Inria(root, "train")
    with pytest.raises(DatasetError, match=r"test/images: Inria test images folder does not exist"):
        Inria(root, "test")
    (root / "train" / "gt").mkdir()
    tifffile.imwrite(root / "train" / "gt" / "austin1.tif", gt(1))
    with pytest.raises(DatasetError, match=r"train/images: no images for split 'train'"):
        Inria(root, "train")  # austin1 is a validation image
    assert Inria(root, "val").names == ["austin1"]
