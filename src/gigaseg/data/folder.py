"""Folder pairs and gigaseg's own layout: ``images/`` + ``masks/`` matched by stem, with a ``dataset.yaml``.

``FolderPairs`` reads masks of class ids (or RGB colours listed in a ``dataset.yaml``);
``GigasegDataset`` is the same with gigaseg's dataset.yaml, as written by ``gigaseg synth``.
``DatasetConfig`` describes the dataset.yaml of a segmentation dataset.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..io.palette import default_palette
from ..io.sources import open_image
from .base import (
    YAML_NAME,
    SegmentationDataset,
    index_files,
    list_images,
    load_yaml_mapping,
    match_pairs,
    require_folder,
    require_images,
    row_bands,
    select_split,
    yaml_classes,
    yaml_dataset_folder,
    yaml_folder,
    yaml_splits,
)
from .labels import IGNORE_INDEX, IndexEncoding, LabelEncoding, PaletteEncoding

__all__ = ["DatasetConfig", "FolderPairs", "GigasegDataset", "read_dataset_yaml"]


@dataclass
class DatasetConfig:
    """A parsed segmentation dataset.yaml (``read_dataset_yaml``).

    The file is a YAML mapping; only ``classes`` is required::

        name: my-scenes             # default: the dataset folder's name
        task: segmentation          # the default; classification datasets: gigaseg.data.classification
        images: images              # folder of the image files (default: images)
        masks: masks                # folder of the mask files, matched to images by stem (default: masks)
        mask_encoding: index        # index (pixels are class ids; default) or rgb (pixels are colours)
        classes: [water, forest]    # class names; a class's index is its id
        palette: [[0, 0, 255], [0, 255, 0]]   # one [R, G, B] per class; required for rgb
        ignore_index: 255           # the label of pixels not scored: an integer len(classes)..255
        ignore_color: [0, 0, 0]     # rgb only: the colour of pixels read as ignore_index
        exclude_from_miou: [0]      # class ids that mIoU leaves out (default: none)
        splits:                     # optional: split name -> image stems
          train: [scene_0, scene_1]
          val: [scene_2]

    Without ``palette``, an index-encoded dataset gets ``default_palette``. With ``rgb``,
    palette colours must be distinct and differ from ``ignore_color``. Every stem a split
    lists must have an image. Without ``splits`` every image is in ``train``; ``"all"`` is
    every image unless ``splits`` defines it.
    """

    path: Path
    name: str
    images: str
    masks: str
    classes: list[str]
    palette: np.ndarray
    encoding: LabelEncoding
    exclude_from_miou: tuple[int, ...]
    splits: dict[str, list[str]] | None


def _is_int(value: Any) -> bool:
    """An integer of the yaml, not a boolean (YAML's ``true`` loads as ``True``, which Python counts as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _colour(value: Any, what: str, path: Path) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_int(v) and 0 <= v <= 255 for v in value):
        raise DatasetError(path, f"{what} must be an [R, G, B] triple of integers 0..255, got {value!r}")
    return list(value)


def read_dataset_yaml(path: str | os.PathLike) -> DatasetConfig:
    """Parse and check a segmentation dataset.yaml (schema: ``DatasetConfig``).

    Args:
        path: the dataset.yaml.

    Returns:
        The parsed yaml, with its label encoding built (``IndexEncoding`` or ``PaletteEncoding``).

    Raises:
        DatasetError: the file cannot be read, its ``task`` is not segmentation, or an entry is
            missing or malformed; the error names the file.
    """
    path = Path(path)
    data = load_yaml_mapping(path, "name:, classes:, palette:")

    task = data.get("task", "segmentation")
    if task != "segmentation":
        raise DatasetError(path, f"task is {task!r}; only segmentation datasets (with masks) load here")
    classes = data.get("classes")
    if classes is None:
        raise DatasetError(path, "missing 'classes' (the list of class names; index = class id)")
    classes = yaml_classes(data, path)
    n = len(classes)

    kind = data.get("mask_encoding", "index")
    if kind not in ("index", "rgb"):
        raise DatasetError(path, f"mask_encoding must be 'index' or 'rgb', got {kind!r}")
    palette = data.get("palette")
    if palette is None:
        if kind == "rgb":
            raise DatasetError(path, "mask_encoding 'rgb' needs a 'palette' (one [R, G, B] per class)")
        palette = default_palette(n)
    else:
        if not isinstance(palette, list):
            raise DatasetError(path, f"'palette' must be a list of [R, G, B] triples, got {palette!r}")
        if len(palette) != n:
            raise DatasetError(path, f"'palette' has {len(palette)} colours but 'classes' has {n} names")
        palette = np.array([_colour(c, f"palette entry {i}", path) for i, c in enumerate(palette)], np.uint8)

    ignore_index = data.get("ignore_index", IGNORE_INDEX)
    if not _is_int(ignore_index):
        raise DatasetError(path, f"'ignore_index' must be an integer {n}..255, got {ignore_index!r}")
    ignore_color = data.get("ignore_color")
    if ignore_color is not None:
        if kind != "rgb":
            raise DatasetError(path, "'ignore_color' only applies to mask_encoding 'rgb'")
        ignore_color = _colour(ignore_color, "'ignore_color'", path)
    try:
        if kind == "rgb":
            encoding: LabelEncoding = PaletteEncoding(palette, ignore_color=ignore_color, ignore_index=ignore_index)
        else:
            encoding = IndexEncoding(n, ignore_index=ignore_index)
    except ValueError as error:
        raise DatasetError(path, str(error)) from None

    exclude = data.get("exclude_from_miou") or []
    if not isinstance(exclude, list) or not all(_is_int(c) and 0 <= c < n for c in exclude):
        raise DatasetError(
            path, f"'exclude_from_miou' must list class ids 0..{n - 1} (integers, not true/false), got {exclude!r}"
        )

    splits = yaml_splits(data, path)
    images = yaml_folder(data, "images", path)
    masks = yaml_folder(data, "masks", path)

    return DatasetConfig(
        path=path,
        name=str(data.get("name", path.parent.name)),
        images=images,
        masks=masks,
        classes=classes,
        palette=palette,
        encoding=encoding,
        exclude_from_miou=tuple(exclude),
        splits=splits,
    )


def _infer_index_encoding(masks: Iterable[Path], root: Path) -> IndexEncoding:
    """Class count of 1-channel id masks from the largest id present (a full, band-wise read).

    Pixels equal to ``IGNORE_INDEX`` are not scored and name no class; the encoding keeps it as its
    ``ignore_index``.
    """
    highest = 0
    for path in masks:
        with open_image(path, palette="indices") as raw:
            if raw.channels != 1:
                raise DatasetError(
                    path,
                    f"mask has {raw.channels} channels: colour-coded masks need a {YAML_NAME} in {root} "
                    "with 'classes', 'palette' and mask_encoding 'rgb'",
                )
            for band in row_bands(raw):
                ids = raw.read(band)
                ids = ids[ids != IGNORE_INDEX]
                if ids.size:
                    highest = max(highest, int(ids.max()))
    try:
        return IndexEncoding(highest + 1, ignore_index=IGNORE_INDEX)
    except ValueError as error:
        raise DatasetError(root, f"cannot infer the classes from the masks: {error}") from None


class FolderPairs(SegmentationDataset):
    """``root/images/<stem>.<ext>`` paired with ``root/masks/<stem>.<ext>``.

    What the labels mean comes from, in order: the ``classes`` / ``encoding`` given
    here; else ``root/dataset.yaml`` (which may also rename the folders and define
    splits); else it is inferred from 1-channel id masks (class ``i`` named
    ``class_i``, a full read of every mask, with a warning).

    Args:
        root: the dataset folder.
        split: a name from ``splits``; ``"all"`` is every pair; without splits every pair is
            ``"train"``.
        images: the image folder under ``root`` (replaced by the dataset.yaml's, when one is read).
        masks: the mask folder under ``root`` (likewise).
        classes: one name per class; None: from the dataset.yaml (read only when neither
            ``classes`` nor ``encoding`` is given), else ``class_0``, ``class_1``, ...
        encoding: how the masks store classes; None: an ``IndexEncoding`` of ``len(classes)``
            classes when ``classes`` is given, else from the dataset.yaml, else inferred from the masks.
        palette: one RGB colour per class; None: ``default_palette``.
        exclude_from_miou: class ids that mIoU leaves out.
        splits: split name -> image stems; None: no splits (unless the dataset.yaml defines them).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: check every pair's headers at construction (``SegmentationDataset.validate``).

    Raises:
        DatasetError: a missing folder, no images, an image without its mask (or the reverse), a
            malformed dataset.yaml, an unknown or empty split, or (with ``check``) a broken pair.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        images: str = "images",
        masks: str = "masks",
        classes: Sequence[str] | None = None,
        encoding: LabelEncoding | None = None,
        palette=None,
        exclude_from_miou: Iterable[int] = (),
        splits: dict[str, list[str]] | None = None,
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        root = require_folder(Path(root), "dataset folder")
        split_source: Path = root
        #: the parsed dataset.yaml, when the labels' meaning came from it
        self.config: DatasetConfig | None = None
        if encoding is None and classes is None and (root / YAML_NAME).is_file():
            config = self.config = read_dataset_yaml(root / YAML_NAME)
            images, masks, classes, encoding = config.images, config.masks, config.classes, config.encoding
            palette, exclude_from_miou, splits, split_source = (
                config.palette,
                config.exclude_from_miou,
                config.splits,
                config.path,
            )
        image_folder = require_folder(root / images, f"images folder '{images}'")
        mask_folder = require_folder(root / masks, f"masks folder '{masks}'")
        found = match_pairs(
            index_files(require_images(image_folder), image_folder),
            index_files(list_images(mask_folder), mask_folder),
            image_folder,
            mask_folder,
        )

        by_name = {pair.name: pair for pair in found}
        chosen = [by_name[name] for name in select_split(split, splits, list(by_name), split_source, image_folder)]

        if encoding is None:
            if classes is not None:
                encoding = IndexEncoding(len(classes))
            else:
                encoding = _infer_index_encoding((pair.mask for pair in found), root)
                warnings.warn(
                    f"{root}: no {YAML_NAME}; inferred {encoding.num_classes} classes from the masks "
                    f"(ids 0..{encoding.num_classes - 1}); write a {YAML_NAME} to name them",
                    stacklevel=2,
                )
        if classes is None:
            classes = [f"class_{i}" for i in range(encoding.num_classes)]
        super().__init__(
            root,
            split,
            chosen,
            classes=classes,
            encoding=encoding,
            palette=palette,
            exclude_from_miou=exclude_from_miou,
            max_memory=max_memory,
            check=check,
        )


class GigasegDataset(FolderPairs):
    """gigaseg's own layout: a folder with ``dataset.yaml`` (as written by ``gigaseg synth``).

    Classes, palette, encoding, folders and splits all come from the yaml (schema:
    ``DatasetConfig``).

    Args:
        root: the dataset folder, or its dataset.yaml.
        split: a name from the yaml's ``splits`` (``"all"``: every pair; without splits every
            pair is ``"train"``).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: check every pair's headers at construction (``SegmentationDataset.validate``).

    Raises:
        DatasetError: no dataset.yaml or a malformed one, or any problem ``FolderPairs`` finds.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        root = yaml_dataset_folder(root, "gigaseg's dataset description")
        super().__init__(root, split, max_memory=max_memory, check=check)
