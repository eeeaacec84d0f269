"""Inria Aerial Image Labeling (building footprints) in its published layout.

``<root>/train/images/<city><n>.tif`` (5000x5000 RGB GeoTIFF) with
``<root>/train/gt/<city><n>.tif`` (1 channel, 0 = not building, 255 = building), and
``<root>/test/images/*.tif`` without ground truth. Two classes: 0 background (not
building), 1 building; gt values >= 128 read as building.

Splits: the standard validation set is the first five images of every training city
(austin1-5, chicago1-5, kitsap1-5, tyrol-w1-5, vienna1-5):

- ``"train"``: the training images outside that validation set;
- ``"val"``: the validation set;
- ``"all"``: every training image;
- ``"test"``: ``test/images`` (samples' ``mask`` is None).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SplitNotFound
from .base import (
    SegmentationDataset,
    check_split,
    index_files,
    list_images,
    match_pairs,
    require_folder,
    require_images,
    unlabelled_pairs,
)
from .labels import BinaryEncoding

CLASSES = ("background", "building")
PALETTE = ((0, 0, 0), (255, 255, 255))
SPLITS = ("train", "val", "all", "test")
#: images 1..VAL_PER_CITY of each city form the validation split
VAL_PER_CITY = 5

_NUMBERED = re.compile(r"^(?P<city>.*?)(?P<number>\d+)$")


def is_validation(name: str) -> bool:
    """Whether ``name`` (e.g. ``"tyrol-w3"``) is one of the first five images of its city.

    Args:
        name: an image stem: the city and the image's number.

    Returns:
        True when the number is 1..``VAL_PER_CITY`` (False for a name without a number).
    """
    match = _NUMBERED.match(name)
    return match is not None and 1 <= int(match.group("number")) <= VAL_PER_CITY


class Inria(SegmentationDataset):
    """Inria Aerial: ``Inria(root, split)`` with split ``train``, ``val``, ``all`` or ``test``.

    Args:
        root: the folder holding ``train/`` (``images/``, ``gt/``) and ``test/images/``.
        split: ``"train"``, ``"val"``, ``"all"`` or ``"test"`` (see the module docstring).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: check every pair's headers at construction (``SegmentationDataset.validate``).

    Raises:
        DatasetError: an unknown split, a missing folder, no images, or an image without its
            ground truth (or the reverse).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        root = require_folder(Path(root), "Inria folder")
        check_split(root, "Inria", split, SPLITS)
        if split == "test":
            folder = require_folder(root / "test" / "images", "Inria test images folder")
        else:
            folder = require_folder(root / "train" / "images", "Inria training images folder")
        images = index_files(require_images(folder), folder)
        if split == "test":
            pairs = unlabelled_pairs(images)
        else:
            gt_folder = require_folder(root / "train" / "gt", "Inria ground-truth folder")
            found = match_pairs(images, index_files(list_images(gt_folder), gt_folder), folder, gt_folder)
            pairs = [p for p in found if split == "all" or is_validation(p.name) == (split == "val")]
        if not pairs:
            raise SplitNotFound(folder, f"no images for split {split!r}")
        super().__init__(
            root,
            split,
            pairs,
            classes=CLASSES,
            encoding=BinaryEncoding(threshold=128),
            palette=PALETTE,
            max_memory=max_memory,
            check=check,
        )
