"""Open any dataset gigaseg knows, recognising its task and layout from the folder.

:func:`load_dataset` returns a ``ClassificationDataset`` when the folder's dataset.yaml says
``task: classification``, a ``DetectionDataset`` when it says ``task: detection`` (or the folder
holds an Ultralytics YOLO data.yaml instead), otherwise a segmentation dataset of the first
layout that matches.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import DatasetError
from .base import YAML_NAME, SegmentationDataset, load_dataset_yaml, require_folder
from .cityscapes import Cityscapes
from .classification import TASK as CLASSIFICATION
from .classification import ClassificationDataset
from .deepglobe import DeepGlobe, looks_like_deepglobe
from .detection import TASK as DETECTION
from .detection import DetectionDataset, find_detection_yaml, is_coco_download
from .folder import FolderPairs, GigasegDataset
from .inria import Inria

__all__ = ["dataset_task", "load_dataset", "load_segmentation_dataset"]


def dataset_task(path: str | os.PathLike) -> str:
    """The ``task`` of a dataset's dataset.yaml.

    A yaml that cannot be read or parsed also gives "segmentation": the segmentation
    loader then reports the problem in detail.

    Args:
        path: a dataset folder, or its dataset.yaml.

    Returns:
        The yaml's ``task`` (``"classification"``, ``"detection"``, ...); "detection" for a folder
        (or yaml) of an Ultralytics YOLO dataset or of COCO as downloaded (``annotations/instances_*.json``);
        "segmentation" when there is no dataset.yaml or it does not say.
    """
    path = Path(path)
    if find_detection_yaml(path) is not None or is_coco_download(path):
        return DETECTION
    yaml_path = path if path.is_file() else path / YAML_NAME
    if not yaml_path.is_file():
        return "segmentation"
    try:
        data = load_dataset_yaml(yaml_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "segmentation"  # the segmentation loader reports the problem in detail
    return str(data.get("task", "segmentation")) if isinstance(data, dict) else "segmentation"


def load_segmentation_dataset(path: str | os.PathLike, split: str = "train", **options) -> SegmentationDataset:
    """Open the dataset at ``path``, recognising its layout.

    In order: a ``dataset.yaml`` -> ``GigasegDataset``; ``images/`` + ``masks/`` ->
    ``FolderPairs``; ``*_sat.jpg`` files (here, in a split folder, or in
    ``<split>/Sat``) -> ``DeepGlobe``; ``train/gt`` -> ``Inria``; ``leftImg8bit`` ->
    ``Cityscapes``.

    Args:
        path: the dataset folder (or its dataset.yaml).
        split: the split to open ("train", "val", ...).
        **options: passed to the dataset's constructor (``max_memory``, ``check``).

    Returns:
        The dataset of the first layout that matches.

    Raises:
        DatasetError: ``path`` is not a folder, is no layout gigaseg knows, or holds a malformed
            dataset.
    """
    path = Path(path)
    if path.is_file() and path.name == YAML_NAME:
        path = path.parent
    require_folder(path, "dataset folder")
    if (path / YAML_NAME).is_file():
        return GigasegDataset(path, split, **options)
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return FolderPairs(path, split, **options)  # before DeepGlobe: images/ may hold *_sat files
    if looks_like_deepglobe(path):
        return DeepGlobe(path, split, **options)
    if (path / "train" / "gt").is_dir():
        return Inria(path, split, **options)
    if (path / "leftImg8bit").is_dir():
        return Cityscapes(path, split, **options)
    raise DatasetError(
        path,
        "not a dataset layout gigaseg knows: "
        f"{YAML_NAME} with images/ and masks/ (gigaseg synth); "
        "DeepGlobe (<id>_sat.jpg + <id>_mask.png, optionally in <split>/ or <split>/Sat + <split>/Label); "
        "Inria Aerial (train/images + train/gt, test/images); "
        "Cityscapes (leftImg8bit/<split>/<city> + gtFine/<split>/<city>); "
        "or images/ + masks/ matched by file stem",
    )


def load_dataset(
    path: str | os.PathLike, split: str = "train", **options
) -> SegmentationDataset | ClassificationDataset | DetectionDataset:
    """Open the dataset at ``path``, whatever its task and layout.

    Args:
        path: the dataset folder (or its dataset.yaml).
        split: the split to open ("train", "val", ...).
        **options: passed to the dataset's constructor (``max_memory``, ``check``).

    Returns:
        A ``ClassificationDataset`` when the dataset.yaml says ``task: classification``, a
        ``DetectionDataset`` for ``task: detection`` or a YOLO data.yaml, else
        ``load_segmentation_dataset(path, split, **options)``.

    Raises:
        DatasetError: not a layout gigaseg knows, or a malformed file.
    """
    task = dataset_task(path)
    if task == CLASSIFICATION:
        return ClassificationDataset(path, split, **options)
    if task == DETECTION:
        return DetectionDataset(path, split, **options)
    return load_segmentation_dataset(path, split, **options)
