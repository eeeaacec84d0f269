"""Every image of a dataset split has the same channels and dtype, checked from headers when it is built."""

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from gigaseg.data.classification import ClassificationDataset, classification_yaml
from gigaseg.data.loader import load_dataset
from gigaseg.errors import DatasetError

SIZE = 32


def write_segmentation(root, images: dict):
    """images: stem -> array; masks are all zeros."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, image in images.items():
        tifffile.imwrite(root / "images" / f"{stem}.tif", image)
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / "masks" / f"{stem}.png")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["a", "b"], "mask_encoding": "index"}))
    return root


def rgb8():
    return np.zeros((SIZE, SIZE, 3), np.uint8)


def grey16():
    return np.zeros((SIZE, SIZE), np.uint16)


def test_a_segmentation_dataset_mixing_rgb_uint8_and_grey_uint16_is_refused(tmp_path):
    root = write_segmentation(tmp_path / "data", {"a": rgb8(), "b": rgb8(), "c": grey16(), "d": grey16()})
    with pytest.raises(DatasetError) as caught:
        load_dataset(root, split="train")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    # the first file that differs, what differs, and what the others have
    assert message.startswith(str(root / "images" / "c.tif") + ": "), message
    assert "1 channel of uint16" in message and "3 channels of uint8" in message and "a.tif" in message, message
    assert "1 more" in message  # d.tif differs too


@pytest.mark.parametrize(
    "other, what",
    [
        (np.zeros((SIZE, SIZE), np.uint8), "1 channel of uint8"),
        (np.zeros((SIZE, SIZE, 3), np.uint16), "3 channels of uint16"),
    ],
)
def test_channels_alone_or_dtype_alone_differing_is_refused(tmp_path, other, what):
    root = write_segmentation(tmp_path / "data", {"a": rgb8(), "b": other})
    with pytest.raises(DatasetError, match=rf"b\.tif: has {what}"):
        load_dataset(root, split="train")


def test_consistent_datasets_still_load(tmp_path):
    assert len(load_dataset(write_segmentation(tmp_path / "rgb", {"a": rgb8(), "b": rgb8()}), split="train")) == 2
    assert len(load_dataset(write_segmentation(tmp_path / "grey", {"a": grey16(), "b": grey16()}), "train")) == 2


def test_a_classification_dataset_mixing_rgb_uint8_and_grey_uint16_is_refused(tmp_path):
    root = tmp_path / "cls"
    (root / "images").mkdir(parents=True)
    Image.fromarray(rgb8()).save(root / "images" / "a.png")
    tifffile.imwrite(root / "images" / "b.tif", grey16())
    (root / "dataset.yaml").write_text(yaml.safe_dump(classification_yaml(["x", "y"], {"a": 0, "b": 1})))
    with pytest.raises(DatasetError) as caught:
        ClassificationDataset(root)
    message = str(caught.value)
    assert message.startswith(str(root / "images" / "b.tif") + ": "), message
    assert "1 channel of uint16" in message and "3 channels of uint8" in message and "a.png" in message, message
    # the check reads headers only and can be skipped like the others
    assert len(ClassificationDataset(root, check=False)) == 2
