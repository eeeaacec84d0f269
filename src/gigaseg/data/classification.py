"""Image classification datasets: one class label per (possibly huge) image.

A classification dataset is a folder with a ``dataset.yaml`` whose ``task`` is
``classification``::

    name: ultramnist              # optional (default: the folder's name)
    task: classification          # required for this loader
    images: images                # folder of the image files (default: images)
    classes: ["0", "1", "2"]      # class names; a class's index is its id
    labels:                       # image stem -> class: an id (integer) or a name (string)
      img_0000: 2
      img_0001: "0"
    splits:                       # optional: split name -> list of image stems
      train: [img_0000]
      val: [img_0001]

Rules (each violation is a ``DatasetError`` naming the file):

- ``classes`` is a non-empty list of distinct names;
- ``labels`` maps stems to an integer id in ``0..len(classes)-1`` or a string that is one
  of ``classes`` (so with numeric class names, ``7`` is the id 7 and ``"7"`` the class
  named "7" -- the same thing when the names are "0".."9" in order);
- every labelled stem has an image file (``.tif``, ``.tiff``, ``.png``, ``.jpg``, ``.jpeg``)
  in ``images``; an image without a label entry is *unlabelled* (label ``None``, e.g. a
  test split): it can be predicted but not trained on or scored;
- without ``splits`` every image is in ``train``; ``"all"`` is every image.

``dataset[i]`` is a :class:`ClassificationSample`: the name, a lazy ``ImageSource`` and
the class id. Like the segmentation datasets it has ``classes``, ``palette``,
``ignore_index`` and ``exclude_from_miou``, so the training engine can store the same data
facts in checkpoints. :func:`gigaseg.data.loader.load_dataset` opens either kind of dataset, deciding
from ``dataset.yaml``'s ``task``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import DatasetError, GigasegError
from ..io.base import ImageSource
from ..io.palette import default_palette
from ..io.sources import open_image
from .base import (
    YAML_NAME,
    index_files,
    listing,
    load_yaml_mapping,
    mixed_layouts,
    require_folder,
    require_images,
    select_split,
    yaml_classes,
    yaml_dataset_folder,
    yaml_folder,
    yaml_splits,
)

__all__ = [
    "ClassificationConfig",
    "ClassificationDataset",
    "ClassificationSample",
    "classification_yaml",
    "read_classification_yaml",
]

TASK = "classification"


@dataclass
class ClassificationSample:
    """One image and its class id (``None`` when unlabelled); the image is opened lazily."""

    name: str
    image: ImageSource
    label: int | None
    #: classification samples have no mask (the engine's segmentation paths check this)
    mask: None = None

    def close(self) -> None:
        """Close the image (samples are also context managers)."""
        self.image.close()

    def __enter__(self) -> ClassificationSample:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ClassificationConfig:
    """A parsed classification dataset.yaml."""

    path: Path
    name: str
    images: str
    classes: list[str]
    labels: dict[str, int]
    splits: dict[str, list[str]] | None


def read_classification_yaml(path: str | os.PathLike) -> ClassificationConfig:
    """Parse and check a classification dataset.yaml (schema in the module docstring).

    Args:
        path: the dataset.yaml.

    Returns:
        The parsed yaml; labels given by name are turned into class ids, and ``name`` defaults
        to the yaml's folder's name.

    Raises:
        DatasetError: the file cannot be read or breaks a rule of the schema.
    """
    path = Path(path)
    data = load_yaml_mapping(path, "task:, classes:, labels:")
    task = data.get("task")
    if task != TASK:
        raise DatasetError(path, f"task is {task!r}; a classification dataset needs 'task: classification'")
    classes = yaml_classes(data, path)
    raw_labels = data.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise DatasetError(path, "missing 'labels': a mapping from image stem to class (id or name)")
    labels: dict[str, int] = {}
    bad = []
    for stem_name, value in raw_labels.items():
        label = _class_id(value, classes)
        if label is None:
            bad.append(f"{stem_name}: {value!r}")
        else:
            labels[str(stem_name)] = label
    if bad:
        raise DatasetError(
            path, f"{len(bad)} label(s) are neither a class id 0..{len(classes) - 1} nor a class name: {listing(bad)}"
        )
    splits = yaml_splits(data, path)
    images = yaml_folder(data, "images", path)
    return ClassificationConfig(
        path=path,
        name=str(data.get("name", path.parent.name)),
        images=images,
        classes=classes,
        labels=labels,
        splits=splits,
    )


def _class_id(value: Any, classes: list[str]) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < len(classes) else None
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    return None


def classification_yaml(
    classes: Sequence[str],
    labels: dict[str, int | str],
    *,
    splits: dict[str, list[str]] | None = None,
    name: str | None = None,
    images: str = "images",
    **extra: Any,
) -> dict:
    """The dataset.yaml content (a dict for ``yaml.safe_dump``) of a classification dataset.

    Args:
        classes: the class names (a class's index is its id).
        labels: image stem -> class id or class name.
        splits: split name -> image stems; None: no ``splits`` entry (every image is ``train``).
        name: the dataset's name; None: no ``name`` entry (readers use the folder's name).
        images: the images folder, relative to the dataset folder.
        **extra: further top-level entries, written last.

    Returns:
        The mapping, keys in schema order (``name``, ``task``, ``images``, ``classes``, ``labels``,
        ``splits``, then ``extra``).
    """
    content: dict[str, Any] = {}
    if name is not None:
        content["name"] = name
    content.update(
        {
            "task": TASK,
            "images": images,
            "classes": [str(c) for c in classes],
            "labels": {str(k): v for k, v in labels.items()},
        }
    )
    if splits is not None:
        content["splits"] = {k: list(v) for k, v in splits.items()}
    content.update(extra)
    return content


class ClassificationDataset(Dataset):
    """A classification dataset folder (see the module docstring); ``dataset[i]`` is a lazy sample.

    Construction checks that every labelled stem has an image and, with ``check``, that
    every image of the split opens and has the same channels and dtype (headers only). ``ignore_index`` (255) and
    ``exclude_from_miou`` (empty) are unused by classification; they exist so checkpoints
    store the same data facts as for segmentation.

    Args:
        root: the dataset folder, or its dataset.yaml.
        split: a name from ``splits`` (``"all"``: every image; without splits every image is
            ``"train"``).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: run ``validate()`` at construction.

    Raises:
        DatasetError: no dataset.yaml or a malformed one, no images, a labelled stem without image,
            an unknown or empty split, or (with ``check``) images that cannot be read or whose
            channels or dtype differ.
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "train", *, max_memory: int | str | None = None, check: bool = True
    ):
        root = yaml_dataset_folder(root, "a classification dataset needs one")
        config = self.config = read_classification_yaml(root / YAML_NAME)
        self.root = root
        self.split = split
        self.max_memory = max_memory
        self.classes = list(config.classes)
        self.palette = default_palette(len(self.classes))
        #: not used by classification; kept so checkpoints store the same data facts as segmentation
        self.ignore_index = 255
        self.exclude_from_miou: tuple[int, ...] = ()

        image_folder = require_folder(root / config.images, f"images folder '{config.images}'")
        files = index_files(require_images(image_folder), image_folder)
        missing = sorted(set(config.labels) - set(files))
        if missing:
            raise DatasetError(
                config.path, f"{len(missing)} labelled stem(s) have no image in {image_folder}: {listing(missing)}"
            )
        chosen = select_split(split, config.splits, sorted(files), config.path, image_folder)
        self.names = list(chosen)
        self.files = [files[s] for s in chosen]
        self.labels: list[int | None] = [config.labels.get(s) for s in chosen]
        if check:
            self.validate()

    @property
    def num_classes(self) -> int:
        """Number of classes (ids ``0..num_classes-1``)."""
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """Whether every image of the split has a label."""
        return all(label is not None for label in self.labels)

    def require_labels(self, what: str = "training") -> None:
        """Check that every image of the split has a label.

        Args:
            what: what needs the labels, for the message (``"training"``, ``"evaluation"``).

        Raises:
            DatasetError: some images are unlabelled (they are listed).
        """
        unlabelled = [n for n, label in zip(self.names, self.labels) if label is None]
        if unlabelled:
            raise DatasetError(
                self.config.path,
                f"{what} needs a label for every image of split {self.split!r}; "
                f"{len(unlabelled)} have none in 'labels': {listing(unlabelled)}",
            )

    def class_counts(self) -> np.ndarray:
        """Images per class id among the labelled images.

        Returns:
            ``(num_classes,)`` int64 counts.
        """
        return np.bincount([label for label in self.labels if label is not None], minlength=self.num_classes)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> ClassificationSample:
        return ClassificationSample(
            self.names[index], open_image(self.files[index], max_memory=self.max_memory), self.labels[index]
        )

    def validate(self) -> None:
        """Check that every image of the split opens and has the channels and dtype of the first (headers only).

        Raises:
            DatasetError: some images cannot be read (one error lists them all), or an image's
                channels or dtype differ from the first image's (the first that differs is named).
        """
        problems = []
        layouts = []
        for path in self.files:
            try:
                with open_image(path, max_memory=self.max_memory) as image:
                    layouts.append((path, image.channels, image.dtype))
            except GigasegError as error:
                problems.append(str(error))
        if problems:
            raise DatasetError(
                self.root, f"{len(problems)} image(s) of split {self.split!r} cannot be read: {listing(problems)}"
            )
        mixed = mixed_layouts(layouts)
        if mixed is not None:
            raise mixed

    def __repr__(self) -> str:
        return (
            f"ClassificationDataset({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
            f"{self.num_classes} classes)"
        )
