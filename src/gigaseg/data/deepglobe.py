"""DeepGlobe Land Cover Classification (CVPR 2018 challenge) in its published layouts.

Pairs are ``<id>_sat.jpg`` (2448x2448 RGB) with ``<id>_mask.png`` (RGB colour code):

- the Kaggle/challenge layout: ``train/`` holds both files of each pair, ``valid/`` and
  ``test/`` only the ``_sat.jpg`` images (their samples have ``mask`` None);
- GLNet's layout: ``<split>/Sat/<id>_sat.jpg`` with ``<split>/Label/<id>_mask.png``
  (splits ``train``, ``crossvalidation``, ``offical_crossvalidation``, ...);
- a flat folder holding the pairs itself.

Seven classes; class 0 "unknown" is excluded from mIoU, as in GLNet's evaluation.
The masks went through JPEG compression before being saved as PNG, so colours can
be slightly off. The dataset's instructions are to binarise each channel at 128
before reading the colour code, and so does this loader (``PaletteEncoding`` with
``threshold=128``): ``(250, 3, 252)`` reads as ``(255, 0, 255)``, rangeland. A colour
that is still unknown after thresholding (pure red) is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SplitNotFound
from .base import (
    IMAGE_EXTENSIONS,
    SegmentationDataset,
    index_files,
    list_images,
    match_pairs,
    require_folder,
    unlabelled_pairs,
)
from .labels import PaletteEncoding

CLASSES = ("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren")
PALETTE = (
    (0, 0, 0),
    (0, 255, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 255),
)
#: "unknown" is not scored in mIoU
EXCLUDE_FROM_MIOU = (0,)
#: per-channel binarisation threshold of the official instructions
THRESHOLD = 128

IMAGE_SUFFIX = "_sat"
MASK_SUFFIX = "_mask"

#: split names that may be spelled otherwise on disk (the Kaggle copy says "valid")
_ALIASES = {"val": ("valid",), "valid": ("val",)}


def encoding() -> PaletteEncoding:
    """How DeepGlobe stores classes: the colour code, each channel thresholded at ``THRESHOLD``.

    Returns:
        A ``PaletteEncoding`` of ``PALETTE`` with ``threshold=THRESHOLD``.
    """
    return PaletteEncoding(PALETTE, threshold=THRESHOLD)


def _holds_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.glob(f"*{IMAGE_SUFFIX}.*"))


def looks_like_deepglobe(path: Path) -> bool:
    """Whether ``path`` holds DeepGlobe images.

    Args:
        path: a folder.

    Returns:
        True when ``*_sat.<ext>`` image files are in ``path``, in ``path/Sat``, in one of its
        folders, or in a ``<folder>/Sat``.
    """
    if _holds_images(path) or _holds_images(path / "Sat"):
        return True
    return any(_holds_images(sub) or _holds_images(sub / "Sat") for sub in path.iterdir() if sub.is_dir())


def _split_folder(root: Path, split: str) -> Path:
    for name in (split, *_ALIASES.get(split, ())):
        if (root / name).is_dir():
            return root / name
    if _holds_images(root) or _holds_images(root / "Sat"):
        if split in ("train", "all"):
            return root  # a flat folder: all its pairs are "train", as in FolderPairs
        raise SplitNotFound(
            root, f"no split {split!r}: this folder holds the pairs itself, so they are all 'train' (or 'all')"
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise SplitNotFound(
        root / split,
        f"missing DeepGlobe split folder (found: {', '.join(found) or 'none'}), and {root} holds no "
        f"*{IMAGE_SUFFIX}.jpg itself",
    )


class DeepGlobe(SegmentationDataset):
    """DeepGlobe land cover: ``DeepGlobe(root, "train")`` reads ``root/train``.

    ``split`` names a folder under ``root`` (``val`` also finds ``valid``). When
    ``root`` itself holds the pairs (a flat folder), they are all the ``"train"``
    split (``"all"`` too), and other splits are an error. A folder without
    any mask is unlabelled (samples' ``mask`` is None); one with some masks must
    have all of them.

    Args:
        root: the DeepGlobe folder.
        split: a split folder's name (``"train"``, ``"val"``, ``"crossvalidation"``, ...).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: check every pair's headers at construction (``SegmentationDataset.validate``).

    Raises:
        DatasetError: no such split folder, no images, or an image without its mask (or the reverse)
            in a labelled folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        root = require_folder(Path(root), "DeepGlobe folder")
        folder = _split_folder(root, split)
        if (folder / "Sat").is_dir():  # GLNet's layout
            image_folder, mask_folder = folder / "Sat", folder / "Label"
        else:
            image_folder = mask_folder = folder
        image_files = list_images(image_folder, IMAGE_SUFFIX)
        if not image_files:
            raise SplitNotFound(image_folder, f"no DeepGlobe images (*{IMAGE_SUFFIX}.jpg) for split {split!r}")
        images = index_files(image_files, image_folder, IMAGE_SUFFIX)
        masks = {}
        if mask_folder.is_dir():
            masks = index_files(list_images(mask_folder, MASK_SUFFIX), mask_folder, MASK_SUFFIX)
        if masks:
            pairs = match_pairs(images, masks, image_folder, mask_folder)
        else:
            pairs = unlabelled_pairs(images)
        super().__init__(
            root,
            split,
            pairs,
            classes=CLASSES,
            encoding=encoding(),
            palette=PALETTE,
            exclude_from_miou=EXCLUDE_FROM_MIOU,
            max_memory=max_memory,
            check=check,
        )
        self.folder = folder
