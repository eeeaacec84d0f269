"""DeepGlobe land cover on tiny fixtures in the Kaggle layout, GLNet's layout and a flat folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gigaseg.data.deepglobe import CLASSES, PALETTE, DeepGlobe
from gigaseg.data.loader import load_dataset
from gigaseg.errors import DatasetError

H, W = 48, 64
URBAN, RANGELAND = (0, 255, 255), (255, 0, 255)


def colour_mask(seed: int) -> np.ndarray:
    """An RGB mask: left third urban, middle rangeland, right water; JPEG-ish noise when seed > 0."""
    mask = np.zeros((H, W, 3), dtype=np.uint8)
    mask[:, :20] = URBAN
    mask[:, 20:40] = RANGELAND
    mask[:, 40:] = (0, 0, 255)
    if seed:
        noise = np.random.default_rng(seed).integers(0, 20, size=mask.shape, dtype=np.uint8)
        mask = np.where(mask >= 128, mask - noise, mask + noise)
    mask[10, 25] = (250, 3, 252)  # slightly-off rangeland
    mask[11, 5] = (4, 240, 131)  # slightly-off urban
    mask[0, 0] = (0, 0, 0)  # unknown
    mask[0, 1] = (255, 255, 255)  # barren
    return mask


def write_pair(folder, image_id, seed=0, with_mask=True, image_folder=None, mask_folder=None):
    image_folder = image_folder or folder
    mask_folder = mask_folder or folder
    image_folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
        image_folder / f"{image_id}_sat.jpg", quality=90
    )
    if with_mask:
        mask_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colour_mask(seed)).save(mask_folder / f"{image_id}_mask.png")


def kaggle_layout(root):
    """train/ with both files; valid/ and test/ with only the satellite images."""
    for i, image_id in enumerate(("100694", "102122", "10452")):
        write_pair(root / "train", image_id, seed=i)
    write_pair(root / "valid", "104113", with_mask=False)
    write_pair(root / "test", "105036", with_mask=False)
    return root


def test_classes_palette_and_miou_exclusion(tmp_path):
    dataset = DeepGlobe(kaggle_layout(tmp_path / "dg"), "train")
    assert dataset.classes == list(CLASSES) and dataset.num_classes == 7
    assert dataset.classes[0] == "unknown" and dataset.exclude_from_miou == (0,)
    assert dataset.palette.tolist() == [list(c) for c in PALETTE]
    assert dataset.palette[1].tolist() == [0, 255, 255]
    assert dataset.names == ["100694", "102122", "10452"]


def test_colours_map_to_ids_after_thresholding(tmp_path):
    dataset = DeepGlobe(kaggle_layout(tmp_path / "dg"), "train")
    for index in range(len(dataset)):
        with dataset[index] as sample:
            ids = sample.mask.read()[..., 0]
        assert ids[5, 5] == 1  # (0, 255, 255) urban
        assert ids[10, 25] == 3  # (250, 3, 252) -> rangeland after thresholding at 128
        assert ids[11, 5] == 1  # (4, 240, 131) -> urban
        assert ids[5, 50] == 5  # water
        assert ids[0, 0] == 0 and ids[0, 1] == 6  # unknown, barren
    dataset.validate(full=True)


def test_unlabelled_splits_and_val_alias(tmp_path):
    root = kaggle_layout(tmp_path / "dg")
    val = DeepGlobe(root, "val")  # the Kaggle copy calls it "valid"
    assert val.names == ["104113"] and not val.labelled
    with val[0] as sample:
        assert sample.mask is None and sample.image.shape == (H, W, 3)
    with DeepGlobe(root, "test")[0] as sample:
        assert sample.mask is None


def test_glnet_layout(tmp_path):
    root = tmp_path / "deep_globe"
    for split, ids in (("train", ("1", "2")), ("crossvalidation", ("3",)), ("offical_crossvalidation", ("4",))):
        for image_id in ids:
            write_pair(root / split, image_id, image_folder=root / split / "Sat", mask_folder=root / split / "Label")
    assert DeepGlobe(root, "train").names == ["1", "2"]
    cross = DeepGlobe(root, "crossvalidation")
    assert cross.names == ["3"] and cross.labelled
    with cross[0] as sample:
        assert sample.mask.read()[20, 30, 0] == 3
    assert isinstance(load_dataset(root, "offical_crossvalidation"), DeepGlobe)


def test_flat_folder_is_the_train_split(tmp_path):
    folder = tmp_path / "train"
    write_pair(folder, "7")
    write_pair(folder, "8")
    dataset = load_dataset(folder)
    assert isinstance(dataset, DeepGlobe) and dataset.names == ["7", "8"]
    assert len(DeepGlobe(folder, "all")) == 2
    with pytest.raises(DatasetError, match=r"train: no split 'val': this folder holds the pairs itself"):
        DeepGlobe(folder, "val")


def test_load_dataset_detects_kaggle_layout(tmp_path):
    dataset = load_dataset(kaggle_layout(tmp_path / "dg"), "train")
    assert isinstance(dataset, DeepGlobe) and len(dataset) == 3


def test_unknown_colour_after_thresholding_is_an_error(tmp_path):
    root = kaggle_layout(tmp_path / "dg")
    mask = colour_mask(0)
    mask[30, 12] = (240, 10, 5)  # red: not a DeepGlobe colour even after thresholding
    Image.fromarray(mask).save(root / "train" / "102122_mask.png")
    dataset = DeepGlobe(root, "train")
    with pytest.raises(
        DatasetError,
        match=r"102122_mask\.png: unknown mask colour \(240, 10, 5\) \(thresholded at 128: \(255, 0, 0\)\) "
        r"at row 30, col 12",
    ):
        dataset.validate(full=True)


def test_missing_mask_and_missing_image(tmp_path):
    root = kaggle_layout(tmp_path / "dg")
    (root / "train" / "10452_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"train: 1 image\(s\) have no mask here: 10452_sat\.jpg"):
        DeepGlobe(root, "train")
    write_pair(root / "train", "10452")
    (root / "train" / "100694_sat.jpg").unlink()
    with pytest.raises(DatasetError, match=r"train: 1 mask\(s\) have no image here: 100694_mask\.png"):
        DeepGlobe(root, "train")


def test_missing_split_and_size_mismatch(tmp_path):
    root = kaggle_layout(tmp_path / "dg")
    with pytest.raises(
        DatasetError, match=r"dg/crossvalidation: missing DeepGlobe split folder \(found: test, train, valid\)"
    ):
        DeepGlobe(root, "crossvalidation")
    Image.fromarray(colour_mask(0)[:, :60]).save(root / "train" / "100694_mask.png")
    with pytest.raises(
        DatasetError, match=r"100694_mask\.png: mask is 48x60 \(HxW\) but its image .*100694_sat\.jpg is 48x64"
    ):
        DeepGlobe(root, "train")
