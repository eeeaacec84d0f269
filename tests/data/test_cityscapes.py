"""Cityscapes on a tiny fixture in its published layout (leftImg8bit + gtFine labelIds PNGs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gigaseg.data.cityscapes import CLASSES, PALETTE, Cityscapes, label_id_to_train_id
from gigaseg.data.loader import load_dataset
from gigaseg.errors import DatasetError

H, W = 32, 64
FRAMES = {
    "train": [("aachen", "000000", "000019"), ("aachen", "000001", "000019"), ("bochum", "000000", "000313")],
    "val": [("frankfurt", "000000", "000294")],
    "test": [("berlin", "000000", "000019")],
}


def label_ids() -> np.ndarray:
    """labelIds: road (7) bottom, car (26) block, sky (23) top, unlabeled (0) / ego vehicle (1) corners."""
    ids = np.full((H, W), 23, dtype=np.uint8)
    ids[16:] = 7
    ids[18:26, 10:30] = 26
    ids[0, 0] = 0
    ids[H - 1, W - 1] = 1
    ids[5, 40] = 33  # bicycle
    ids[6, 40] = 14  # guard rail: not evaluated
    return ids


def cityscapes_layout(root):
    for split, frames in FRAMES.items():
        for city, seq, frame in frames:
            base = f"{city}_{seq}_{frame}"
            images = root / "leftImg8bit" / split / city
            annotations = root / "gtFine" / split / city
            images.mkdir(parents=True, exist_ok=True)
            annotations.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(images / f"{base}_leftImg8bit.png")
            ids = label_ids() if split != "test" else np.zeros((H, W), np.uint8)  # test labels are placeholders
            Image.fromarray(ids).save(annotations / f"{base}_gtFine_labelIds.png")
            # the other files of a real gtFine folder, which the loader must skip
            Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(annotations / f"{base}_gtFine_color.png")
            Image.fromarray(ids.astype(np.uint16)).save(annotations / f"{base}_gtFine_instanceIds.png")
            (annotations / f"{base}_gtFine_polygons.json").write_text("{}")
    return root


def test_official_train_id_table():
    lut = label_id_to_train_id()
    assert lut[7] == 0 and lut[8] == 1 and lut[26] == 13 and lut[33] == 18 and lut[31] == 16
    assert lut[0] == 255 and lut[14] == 255 and lut[29] == 255 and lut[255] == 255
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))


def test_classes_palette_and_names(tmp_path):
    dataset = Cityscapes(cityscapes_layout(tmp_path / "cityscapes"), "train")
    assert dataset.classes == list(CLASSES) and dataset.num_classes == 19
    assert dataset.classes[13] == "car" and dataset.classes[0] == "road"
    assert dataset.palette.shape == (19, 3) and dataset.palette[0].tolist() == [128, 64, 128]
    assert dataset.palette.tolist() == [list(c) for c in PALETTE]
    assert dataset.ignore_index == 255 and dataset.exclude_from_miou == ()
    assert dataset.names == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]


def test_label_ids_map_to_train_ids(tmp_path):
    dataset = Cityscapes(cityscapes_layout(tmp_path / "cityscapes"), "val")
    assert dataset.names == ["frankfurt_000000_000294"]
    with dataset[0] as sample:
        assert sample.image.shape == (H, W, 3)
        ids = sample.mask.read()[..., 0]
    assert ids[20, 15] == 13  # car 26 -> 13
    assert ids[0, 0] == 255  # unlabeled 0 -> ignored
    assert ids[H - 1, W - 1] == 255  # ego vehicle 1 -> ignored
    assert ids[30, 50] == 0  # road 7 -> 0
    assert ids[2, 2] == 10  # sky 23 -> 10
    assert ids[5, 40] == 18 and ids[6, 40] == 255
    dataset.validate(full=True)


def test_test_split_has_no_masks(tmp_path):
    dataset = Cityscapes(cityscapes_layout(tmp_path / "cityscapes"), "test")
    assert not dataset.labelled
    with dataset[0] as sample:
        assert sample.mask is None


def test_load_dataset_detects_cityscapes(tmp_path):
    dataset = load_dataset(cityscapes_layout(tmp_path / "cityscapes"), "val")
    assert isinstance(dataset, Cityscapes) and len(dataset) == 1


def test_errors(tmp_path):
    root = cityscapes_layout(tmp_path / "cityscapes")
    with pytest.raises(DatasetError, match=r"cityscapes: Cityscapes has no split 'train_extra'"):
        Cityscapes(root, "train_extra")
    (root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png").unlink()
    with pytest.raises(
        DatasetError, match=r"gtFine/train: 1 image\(s\) have no mask here: bochum_000000_000313_leftImg8bit\.png"
    ):
        Cityscapes(root, "train")
    Image.fromarray(label_ids()[:, :32]).save(
        root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png"
    )
    with pytest.raises(DatasetError, match=r"bochum_000000_000313_gtFine_labelIds\.png: mask is 32x32 \(HxW\)"):
        Cityscapes(root, "train")
    for path in (root / "gtFine" / "val" / "frankfurt").iterdir():
        path.unlink()
    (root / "gtFine" / "val" / "frankfurt").rmdir()
    (root / "gtFine" / "val").rmdir()
    with pytest.raises(DatasetError, match=r"gtFine/val: Cityscapes annotation folder does not exist"):
        Cityscapes(root, "val")
