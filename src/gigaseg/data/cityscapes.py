"""Cityscapes (fine annotations) in its published layout.

``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (2048x1024 RGB) with
``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (1 channel, the 34
label ids). The label ids are mapped to the 19 evaluation classes ("train ids") by the
official table; every other id (void, and the classes not evaluated: guard rail,
bridge, tunnel, polegroup, caravan, trailer, license plate, ...) becomes 255, ignored.

Splits ``train``, ``val`` and ``test``. The public ``gtFine/test`` holds only
placeholder annotations, so the test split is read without masks (``mask`` None).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import SplitNotFound
from .base import (
    SegmentationDataset,
    check_split,
    index_files,
    list_images,
    match_pairs,
    require_folder,
    unlabelled_pairs,
)
from .labels import IGNORE_INDEX, LookupEncoding

CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
#: label id of each train id 0..18 (the official cityscapesScripts table)
LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
SPLITS = ("train", "val", "test")

IMAGE_SUFFIX = "_leftImg8bit"
MASK_SUFFIX = "_gtFine_labelIds"


def label_id_to_train_id() -> np.ndarray:
    """The 256-entry table labelId -> trainId (255 for ids not evaluated).

    Returns:
        ``(256,)`` uint8: entry ``LABEL_IDS[i]`` is ``i``, every other entry ``IGNORE_INDEX``.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(LABEL_IDS)] = np.arange(len(LABEL_IDS))
    return lut


def encoding() -> LookupEncoding:
    """How Cityscapes stores classes: labelIds mapped to the 19 trainIds.

    Returns:
        A ``LookupEncoding`` of ``label_id_to_train_id()``, ignoring the other ids.
    """
    return LookupEncoding(label_id_to_train_id(), ignore_index=IGNORE_INDEX)


def _files(folder: Path, suffix: str) -> list[Path]:
    """Files with ``suffix`` in every city folder of ``folder``."""
    cities = sorted(p for p in folder.iterdir() if p.is_dir())
    return [f for city in cities for f in list_images(city, suffix)]


class Cityscapes(SegmentationDataset):
    """Cityscapes fine: ``Cityscapes(root, split)``, split ``train``, ``val`` or ``test``.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (read without masks).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: check every pair's headers at construction (``SegmentationDataset.validate``).

    Raises:
        DatasetError: an unknown split, a missing folder, no images, or an image without its
            annotation (or the reverse).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        root = require_folder(Path(root), "Cityscapes folder")
        check_split(root, "Cityscapes", split, SPLITS)
        image_folder = require_folder(root / "leftImg8bit" / split, "Cityscapes image folder")
        images = index_files(_files(image_folder, IMAGE_SUFFIX), image_folder, IMAGE_SUFFIX)
        if not images:
            raise SplitNotFound(image_folder, f"no images (<city>/*{IMAGE_SUFFIX}.png) for split {split!r}")
        if split == "test":
            pairs = unlabelled_pairs(images)
        else:
            mask_folder = require_folder(root / "gtFine" / split, "Cityscapes annotation folder")
            masks = index_files(_files(mask_folder, MASK_SUFFIX), mask_folder, MASK_SUFFIX)
            pairs = match_pairs(images, masks, image_folder, mask_folder)
        super().__init__(
            root,
            split,
            pairs,
            classes=CLASSES,
            encoding=encoding(),
            palette=PALETTE,
            max_memory=max_memory,
            check=check,
        )
