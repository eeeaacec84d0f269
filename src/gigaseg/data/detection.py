"""Object detection datasets: boxes and class labels per (possibly huge) image, in COCO or YOLO layouts.

Two layouts are read; both give a :class:`DetectionDataset` whose ``dataset[i]`` is a
:class:`DetectionSample` (boxes float32 ``(N, 4)`` ``(x0, y0, x1, y1)`` in full-resolution
pixels, pixel edges: a box over pixels 0..9 has ``x0 = 0, x1 = 10``; labels int64 ``(N,)``,
the contiguous 0-based index of the class in ``dataset.classes``).

**COCO** -- a folder with a ``dataset.yaml``::

    name: objects                 # optional (default: the folder's name)
    task: detection               # required
    format: coco                  # optional (coco is the default)
    splits:                       # split name -> images folder and instances json
      train: {images: images/train, annotations: annotations/instances_train.json}
      val: {images: images/val, annotations: annotations/instances_val.json}
    palette: [[255, 0, 0], ...]   # optional: one RGB colour per class

(``images:`` + ``annotations:`` at the top level instead of ``splits`` make a single ``train``
split.) COCO as downloaded is read without a dataset.yaml: ``annotations/instances_<split>.json``
with the images in ``<split>/`` or ``images/<split>/`` (``--data /data/coco`` with split ``val``
reads ``instances_val2017.json`` and ``val2017/``). The json is COCO's instances format:
``images`` (``id``, ``file_name`` relative to the images folder, ``width``, ``height``),
``annotations`` (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, optional ``area`` and
``iscrowd``) and ``categories`` (``id``, ``name``).
Classes are the categories in increasing id order; ``category_ids[i]`` is class ``i``'s COCO id.
Boxes become ``(x, y, x + w, y + h)``; a box reaching outside its image by at most
``BORDER_TOLERANCE`` pixels is clipped to it (rounding in exported files), and a box with zero
width or height is left out (``dataset.degenerate`` counts them); crowd boxes stay, marked in
``iscrowd``, since COCO's evaluator ignores detections in them.

**YOLO** -- an Ultralytics ``data.yaml`` (``path``, ``train``, ``val``, ``test``: folders of
images or text files listing them, relative to ``path``, itself relative to the yaml's folder
when it is; ``names``: a list or a mapping ``{id: name}``), or a gigaseg ``dataset.yaml`` with
``task: detection``, ``format: yolo`` and ``classes`` (images in ``images/<split>``). Each
image ``.../images/.../a.jpg`` has its labels in ``.../labels/.../a.txt``, one object a line:
``class cx cy w h`` normalised to the image's size (or ``class x1 y1 x2 y2 ...``, a polygon,
whose bounding box is taken); a missing or empty file is an image without objects. Image sizes
come from the files' headers. ``category_ids`` are the YOLO class ids.

Every bad input is a :class:`~gigaseg.errors.DatasetError` naming the file and the problem:
a json or yaml that does not parse or misses a field, an image that is missing, an annotation
of an unknown image or category, a box outside its image or of negative size, a label line with
the wrong number of fields or a value that is not a number. Datasets hold only paths and arrays,
so they pickle into DataLoader workers; no pixel is read until ``sample.open()``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from ..errors import DatasetError, GigasegError, SplitNotFound
from ..io.base import ImageSource
from ..io.channels import RepeatedChannels
from ..io.palette import as_palette, default_palette
from ..io.sources import open_image
from .base import (
    IMAGE_EXTENSIONS,
    YAML_NAME,
    image_layout,
    listing,
    load_dataset_yaml,
    load_yaml_mapping,
    require_folder,
    yaml_classes,
)

__all__ = [
    "BORDER_TOLERANCE",
    "DetectionDataset",
    "DetectionSample",
    "TASK",
    "YOLO_YAML_NAMES",
    "coco_ground_truth",
    "detection_yaml",
    "coco_instances",
    "find_detection_yaml",
    "is_coco_download",
    "yolo_label_path",
]

TASK = "detection"

#: how far (pixels) a box may reach outside its image before it is an error (it is clipped)
BORDER_TOLERANCE = 1.0

#: Ultralytics' dataset yaml names, recognised in a folder without dataset.yaml
YOLO_YAML_NAMES = ("data.yaml", "data.yml")

_EMPTY_BOXES = np.zeros((0, 4), np.float32)


@dataclass
class DetectionSample:
    """One image with its objects; the image is opened lazily by :meth:`open` (or on first use of ``image``).

    Attributes:
        name: the image's name (its file stem, or its path relative to the images folder without extension).
        path: the image file.
        boxes: float32 ``(N, 4)`` ``(x0, y0, x1, y1)`` in full-resolution pixels.
        labels: int64 ``(N,)`` class indices into the dataset's ``classes``.
        image_id: the COCO image id (YOLO: the image's position in the split, from 1).
        width: the image's width in pixels.
        height: the image's height in pixels.
        iscrowd: bool ``(N,)`` COCO crowd flags, or None when the layout has none (YOLO).
        area: float32 ``(N,)`` the objects' areas from the json (COCO's segment areas, which
            COCO's evaluator sorts into small / medium / large), or None: the boxes' areas.
        channels: present the image with this many channels (a one-channel image is repeated,
            as Pillow converts grey to RGB); None: the file's own.
        max_memory: passed to ``open_image``.
    """

    name: str
    path: Path
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    width: int
    height: int
    iscrowd: np.ndarray | None = None
    area: np.ndarray | None = None
    channels: int | None = field(default=None, repr=False)
    max_memory: int | str | None = field(default=None, repr=False)
    _image: ImageSource | None = field(default=None, repr=False, compare=False)

    def open(self) -> ImageSource:
        """Open the image lazily (nothing is decoded until a window is read).

        Returns:
            A new ``ImageSource`` the caller closes (it is a context manager); a one-channel image
            is presented with ``channels`` channels when those are more.
        """
        source = open_image(self.path, max_memory=self.max_memory)
        if self.channels is not None and source.channels == 1 and self.channels > 1:
            return RepeatedChannels(source, self.channels)
        return source

    @property
    def image(self) -> ImageSource:
        """The image, opened on first use and kept until :meth:`close` (as other samples' ``image``)."""
        if self._image is None:
            self._image = self.open()
        return self._image

    @property
    def areas(self) -> np.ndarray:
        """float32 ``(N,)``: ``area`` when the json gave it, else the boxes' areas."""
        if self.area is not None:
            return self.area
        return ((self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])).astype(np.float32)

    def close(self) -> None:
        """Close the image opened through ``image`` (samples are also context managers)."""
        if self._image is not None:
            self._image.close()
            self._image = None

    def __enter__(self) -> DetectionSample:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Record:
    """What a dataset keeps per image (samples are built from it on indexing)."""

    name: str
    path: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray | None
    area: np.ndarray | None


def detection_yaml(
    splits: dict[str, dict[str, str]],
    *,
    name: str | None = None,
    palette=None,
    **extra: Any,
) -> dict:
    """The dataset.yaml content (a dict for ``yaml.safe_dump``) of a COCO-layout detection dataset.

    Args:
        splits: split name -> ``{"images": folder, "annotations": json file}``, relative to the dataset folder.
        name: the dataset's name; None: no ``name`` entry.
        palette: one RGB colour per class; None: no ``palette`` entry.
        **extra: further top-level entries, written last.

    Returns:
        The mapping (``name``, ``task``, ``format``, ``splits``, ``palette``, then ``extra``).
    """
    content: dict[str, Any] = {} if name is None else {"name": name}
    content.update({"task": TASK, "format": "coco", "splits": {k: dict(v) for k, v in splits.items()}})
    if palette is not None:
        content["palette"] = [[int(c) for c in colour] for colour in as_palette(palette)]
    content.update(extra)
    return content


def coco_instances(path: str | os.PathLike) -> list[Path]:
    """The ``annotations/instances_*.json`` files of a COCO download, sorted.

    Args:
        path: a folder.

    Returns:
        The instances files (empty when ``path`` has none).
    """
    folder = Path(path) / "annotations"
    return sorted(folder.glob("instances_*.json")) if folder.is_dir() else []


def is_coco_download(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder laid out as COCO is downloaded (and has no dataset.yaml).

    Args:
        path: a folder.

    Returns:
        True for a folder with ``annotations/instances_<split>.json`` files and no ``dataset.yaml``.
    """
    path = Path(path)
    return path.is_dir() and not (path / YAML_NAME).is_file() and bool(coco_instances(path))


def find_detection_yaml(path: str | os.PathLike) -> Path | None:
    """The yaml that makes ``path`` a detection dataset, if any.

    Args:
        path: a dataset folder, its dataset.yaml, or an Ultralytics data.yaml.

    Returns:
        ``dataset.yaml`` when it says ``task: detection``; else an Ultralytics yaml (``path``
        itself when it is a yaml file other than dataset.yaml, or ``data.yaml`` in the folder
        when there is no dataset.yaml) holding ``names``; else None.
    """
    path = Path(path)
    if path.is_file():
        candidates = [path]
    else:
        candidates = [path / YAML_NAME] if (path / YAML_NAME).is_file() else [path / n for n in YOLO_YAML_NAMES]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            data = load_dataset_yaml(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # not ours to report: the other loaders do
        if not isinstance(data, dict):
            continue
        if data.get("task") == TASK:
            return candidate
        if candidate.name != YAML_NAME and "task" not in data and "names" in data:
            return candidate
    return None


class DetectionDataset(Dataset):
    """A detection dataset (COCO or YOLO layout, see the module docstring); ``dataset[i]`` is a lazy sample.

    Construction reads the annotations and checks that every image exists; with ``check`` it
    also opens every image's header, checking that its size equals the json's and that the
    images share their channels (one-channel images among colour ones are read with the channel
    repeated) and dtype.

    Args:
        root: the dataset folder, its dataset.yaml, an Ultralytics data.yaml, or a COCO download's folder.
        split: the split to open (``"train"``, ``"val"``, ...).
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``.
        check: run ``validate()`` at construction.

    Attributes:
        classes: class names; a label is an index into them.
        category_ids: the COCO category id (YOLO: class id) of each class.
        palette: ``(num_classes, 3)`` uint8 colours.
        root: the dataset folder.
        samples: the split's images as :class:`DetectionSample`\\ s, in order.
        format: ``"coco"`` or ``"yolo"``.
        annotations: the file(s) the boxes came from (named by errors).
        degenerate: how many zero-width or zero-height boxes were left out.

    Raises:
        DatasetError: a malformed yaml, json or label file, a missing image, an unknown category,
            a box outside its image or of negative size.
        SplitNotFound: the dataset has no such split, or it holds no images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        root = Path(root)
        found = find_detection_yaml(root)
        if found is None and not is_coco_download(root):
            where = root if root.is_file() else root / YAML_NAME
            raise DatasetError(
                where,
                f"not a detection dataset: needs a {YAML_NAME} with 'task: detection', a YOLO data.yaml, or "
                "COCO's own layout (annotations/instances_<split>.json and the <split> images folder)",
            )
        self.split = split
        self.max_memory = max_memory
        self.degenerate = 0
        if found is None:  # COCO as downloaded: the splits are the instances files
            self.yaml_path = None
            self.root = root
            data = {}
            self.format = "coco"
            records, self.classes, self.category_ids = self._read_coco_download()
            found = self.annotations
        else:
            self.yaml_path = found
            self.root = found.parent
            data = load_yaml_mapping(found, "task:, splits:")
            records, self.classes, self.category_ids = self._read_yaml_layout(data)
        self._init_rest(found, data, records, check)

    def _read_yaml_layout(self, data: dict) -> tuple[list[_Record], list[str], list[int]]:
        found = self.yaml_path
        if found.name != YAML_NAME:
            self.format = "yolo"
            return self._read_ultralytics(data)
        self.format = str(data.get("format", "coco"))
        if self.format == "coco":
            return self._read_coco_split(data)
        if self.format == "yolo":
            return self._read_gigaseg_yolo(data)
        raise DatasetError(found, f"format is {self.format!r}; a detection dataset is 'coco' or 'yolo'")

    def _init_rest(self, found: Path, data: dict, records: list[_Record], check: bool) -> None:
        self.name = str(data.get("name", self.root.name))
        if not records:
            raise SplitNotFound(found, f"no images for split {self.split!r}")
        self._records = records
        palette = data.get("palette")
        try:
            self.palette = default_palette(len(self.classes)) if palette is None else as_palette(palette)
        except (ValueError, TypeError) as error:
            raise DatasetError(found, f"'palette' is not a list of RGB colours: {error}") from None
        if len(self.palette) != len(self.classes):
            raise DatasetError(found, f"{len(self.palette)} palette colours for {len(self.classes)} classes")
        #: detection has no ignored label; kept so checkpoints store the same data facts as segmentation
        self.ignore_index = 255
        self.exclude_from_miou: tuple[int, ...] = ()
        self.channels: int | None = None
        if check:
            self.validate()

    # --- the samples ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """The image names, in index order."""
        return [r.name for r in self._records]

    @property
    def samples(self) -> list[DetectionSample]:
        """Every sample of the split, in order (cheap: nothing is opened)."""
        return [self[i] for i in range(len(self))]

    @property
    def labelled(self) -> bool:
        """Detection datasets always hold their annotations (an image may have no objects)."""
        return True

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> DetectionSample:
        r = self._records[index]
        return DetectionSample(
            r.name,
            r.path,
            r.boxes,
            r.labels,
            r.image_id,
            r.width,
            r.height,
            r.iscrowd,
            r.area,
            channels=self.channels,
            max_memory=self.max_memory,
        )

    def object_count(self) -> int:
        """Count the split's objects.

        Returns:
            How many boxes the split holds (crowd boxes included).
        """
        return sum(len(r.labels) for r in self._records)

    def coco_ground_truth(self) -> dict:
        """The split's annotations as a COCO instances dict (what ``pycocotools.coco.COCO`` takes).

        Returns:
            ``{"images", "annotations", "categories"}``: image ids, file names (relative to the
            dataset folder) and sizes; one annotation per box with its COCO ``category_id``,
            ``bbox`` ``[x, y, w, h]``, ``area`` and ``iscrowd``, numbered from 1.
        """
        return coco_ground_truth(self.samples, self.classes, self.category_ids, self.root)

    # --- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Open every image's header: its size must equal the annotations', channels and dtype must agree.

        Sets ``channels`` (the first image's; samples of one-channel images in a colour dataset are
        read with the channel repeated).

        Raises:
            DatasetError: images that cannot be read, whose size differs from the annotations',
                or whose channels (other than one) or dtype differ from the first image's.
        """
        problems: list[tuple[Path, str]] = []
        first = None
        for r in self._records:
            try:
                with open_image(r.path, max_memory=self.max_memory) as image:
                    layout = (image.channels, np.dtype(image.dtype))
                    size = (image.height, image.width)
            except GigasegError as error:
                problems.append((getattr(error, "path", None) or r.path, getattr(error, "problem", str(error))))
                continue
            if size != (r.height, r.width):
                problems.append(
                    (r.path, f"is {size[0]}x{size[1]} (HxW) but {self.annotations} says {r.height}x{r.width}")
                )
                continue
            if first is None:
                first = (r.path, layout)
            elif layout != first[1] and not (layout[0] == 1 and layout[1] == first[1][1]):
                problems.append(
                    (
                        r.path,
                        f"has {image_layout(*layout)} but {first[0].name}, the split's first image, has "
                        f"{image_layout(*first[1])}; every image of a dataset needs the same channels and dtype",
                    )
                )
        if len(problems) == 1:
            raise DatasetError(*problems[0])
        if problems:
            shown = "; ".join(f"{path}: {problem}" for path, problem in problems[:5])
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise DatasetError(self.root, f"{len(problems)} problems in split {self.split!r}: {shown}{more}")
        self.channels = None if first is None else first[1][0]

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({str(self.root)!r}, split={self.split!r}, format={self.format!r}, {len(self)} images, "
            f"{self.object_count()} objects, {self.num_classes} classes)"
        )

    # --- COCO -----------------------------------------------------------------------------
    def _read_coco_split(self, data: dict) -> tuple[list[_Record], list[str], list[int]]:
        path = self.yaml_path
        splits = data.get("splits")
        if splits is None:
            if "annotations" not in data:
                raise DatasetError(path, "a COCO detection dataset needs 'splits' (or 'images' and 'annotations')")
            splits = {"train": {"images": data.get("images", "images"), "annotations": data["annotations"]}}
        if not isinstance(splits, dict):
            raise DatasetError(path, "'splits' must map split names to {images: folder, annotations: json file}")
        if self.split not in splits:
            raise SplitNotFound(path, f"no split {self.split!r} (splits: {', '.join(map(str, splits))})")
        entry = splits[self.split]
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("images", "annotations")):
            raise DatasetError(
                path, f"split {self.split!r} must be {{images: folder, annotations: json file}}, got {entry!r}"
            )
        images = require_folder(self.root / entry["images"], f"images folder '{entry['images']}'")
        self.annotations = self.root / entry["annotations"]
        return read_coco(self.annotations, images, yaml_names=data.get("classes"), owner=self)

    def _read_coco_download(self) -> tuple[list[_Record], list[str], list[int]]:
        annotations = self.root / "annotations"
        files = coco_instances(self.root)
        matches = [f for f in files if f.stem.removeprefix("instances_").startswith(self.split)]
        exact = [f for f in matches if f.stem == f"instances_{self.split}"]
        if exact:
            matches = exact
        if len(matches) != 1:
            listed = ", ".join(f.stem.removeprefix("instances_") for f in files)
            problem = "matches several" if matches else "matches none"
            raise SplitNotFound(annotations, f"split {self.split!r} {problem} of the instances files ({listed})")
        self.annotations = matches[0]
        name = matches[0].stem.removeprefix("instances_")
        for images in (self.root / name, self.root / "images" / name):
            if images.is_dir():
                return read_coco(self.annotations, images, owner=self)
        raise DatasetError(
            self.root, f"{self.annotations.name} has no images folder: neither {name}/ nor images/{name}/ exists"
        )

    # --- YOLO -----------------------------------------------------------------------------
    def _read_gigaseg_yolo(self, data: dict) -> tuple[list[_Record], list[str], list[int]]:
        classes = yaml_classes(data, self.yaml_path)
        folder = self.root / "images" / self.split
        if not folder.is_dir():
            raise SplitNotFound(self.yaml_path, f"no split {self.split!r}: {folder} is not a folder")
        self.annotations = self.root / "labels" / self.split
        ids = list(range(len(classes)))
        return self._read_yolo(_images_in(folder), classes, ids), classes, ids

    def _read_ultralytics(self, data: dict) -> tuple[list[_Record], list[str], list[int]]:
        path = self.yaml_path
        names = data.get("names")
        if isinstance(names, list) and names and all(isinstance(n, (str, int)) for n in names):
            ids, classes = list(range(len(names))), [str(n) for n in names]
        elif isinstance(names, dict) and names and all(isinstance(k, int) and k >= 0 for k in names):
            ids = sorted(names)
            classes = [str(names[k]) for k in ids]
        else:
            raise DatasetError(path, f"'names' must be a list of class names or a mapping {{id: name}}, got {names!r}")
        base = Path(data.get("path") or ".")
        base = base if base.is_absolute() else self.root / base
        entry = data.get(self.split)
        if entry is None:
            raise SplitNotFound(path, f"no split {self.split!r} (splits: {', '.join(_yolo_splits(data))})")
        entries = entry if isinstance(entry, list) else [entry]
        if not entries or not all(isinstance(e, str) for e in entries):
            raise DatasetError(path, f"split {self.split!r} must be a folder, a list file or a list of them")
        files: list[Path] = []
        for e in entries:
            where = Path(e) if Path(e).is_absolute() else base / e
            if where.is_dir():
                files += _images_in(where)
            elif where.is_file() and where.suffix.lower() == ".txt":
                files += _listed_images(where, base)
            else:
                raise DatasetError(path, f"split {self.split!r}: {where} is neither an images folder nor a list file")
        self.annotations = path
        return self._read_yolo(files, classes, ids), classes, ids

    def _read_yolo(self, files: Sequence[Path], classes: list[str], ids: list[int]) -> list[_Record]:
        index = {c: i for i, c in enumerate(ids)}
        records = []
        for position, image_path in enumerate(files):
            try:
                with open_image(image_path, max_memory=self.max_memory) as image:
                    height, width = image.height, image.width
            except GigasegError as error:
                raise DatasetError(getattr(error, "path", image_path), getattr(error, "problem", str(error))) from None
            label_path = yolo_label_path(image_path)
            boxes, labels = _read_yolo_labels(label_path, width, height, index, classes)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            self.degenerate += int((~keep).sum())
            records.append(
                _Record(
                    _strip_suffix(image_path.name),
                    image_path,
                    position + 1,
                    width,
                    height,
                    boxes[keep],
                    labels[keep],
                    None,
                    None,
                )
            )
        return records


def read_coco(
    json_path: Path, images: Path, *, yaml_names=None, owner: DetectionDataset | None = None
) -> tuple[list[_Record], list[str], list[int]]:
    """Parse and check a COCO instances json.

    Args:
        json_path: the instances json.
        images: the folder ``file_name`` is relative to.
        yaml_names: unused unless given: a list the categories' names must equal (a dataset.yaml's ``classes``).
        owner: the dataset whose ``degenerate`` count is increased.

    Returns:
        ``(records, classes, category_ids)``: one record per json image in json order.

    Raises:
        DatasetError: see the module docstring; every error names ``json_path`` or the image.
    """
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(json_path, "annotations file does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(json_path, f"cannot read: {getattr(error, 'strerror', None) or error}") from None
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(json_path, f"is not valid JSON: {error}") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise DatasetError(json_path, "is not a COCO instances file: needs lists 'images', 'annotations', 'categories'")
    categories = {}
    for c in coco["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise DatasetError(json_path, f"a category needs an integer 'id' and a 'name', got {c!r}")
        if c["id"] in categories:
            raise DatasetError(json_path, f"category id {c['id']} appears twice")
        categories[c["id"]] = str(c["name"])
    if not categories:
        raise DatasetError(json_path, "has no categories")
    category_ids = sorted(categories)
    classes = [categories[c] for c in category_ids]
    if yaml_names is not None and [str(n) for n in yaml_names] != classes:
        raise DatasetError(json_path, f"its categories {classes} differ from the dataset.yaml's classes {yaml_names}")
    class_of = {c: i for i, c in enumerate(category_ids)}

    by_id: dict[int, dict] = {}
    missing = []
    for image in coco["images"]:
        if not isinstance(image, dict) or not all(k in image for k in ("id", "file_name", "width", "height")):
            raise DatasetError(json_path, f"an image needs 'id', 'file_name', 'width' and 'height', got {image!r}")
        if not isinstance(image["id"], int) or not all(_positive_int(image[k]) for k in ("width", "height")):
            raise DatasetError(json_path, f"image {image['file_name']!r}: id, width and height must be integers")
        if image["id"] in by_id:
            raise DatasetError(json_path, f"image id {image['id']} appears twice")
        file = images / str(image["file_name"])
        if not file.is_file():
            missing.append(str(image["file_name"]))
        by_id[image["id"]] = {"info": image, "file": file, "boxes": [], "labels": [], "crowd": [], "area": []}
    if missing:
        raise DatasetError(json_path, f"{len(missing)} image(s) listed are missing from {images}: {listing(missing)}")

    anns = coco.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(json_path, "'annotations' must be a list")
    degenerate = 0
    for ann in anns:
        where = f"annotation {ann.get('id', '?')}" if isinstance(ann, dict) else "an annotation"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            raise DatasetError(json_path, f"{where} needs 'image_id', 'category_id' and 'bbox'")
        entry = by_id.get(ann["image_id"])
        if entry is None:
            raise DatasetError(json_path, f"{where} refers to image id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in class_of:
            raise DatasetError(
                json_path,
                f"{where} has category_id {ann['category_id']!r}, which is not in 'categories' "
                f"({listing([str(c) for c in category_ids])})",
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
            raise DatasetError(json_path, f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        info = entry["info"]
        box = _checked_box(
            x, y, x + w, y + h, info["width"], info["height"], json_path, f"{where} (image {info['file_name']})"
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            degenerate += 1
            continue
        entry["boxes"].append(box)
        entry["labels"].append(class_of[ann["category_id"]])
        entry["crowd"].append(bool(ann.get("iscrowd", 0)))
        area = ann.get("area")
        entry["area"].append(
            float(area) if _finite(area) and float(area) > 0 else (box[2] - box[0]) * (box[3] - box[1])
        )
    if owner is not None:
        owner.degenerate += degenerate

    records = []
    for image_id, entry in by_id.items():
        info = entry["info"]
        records.append(
            _Record(
                _strip_suffix(str(info["file_name"])),
                entry["file"],
                image_id,
                int(info["width"]),
                int(info["height"]),
                np.array(entry["boxes"], np.float32).reshape(-1, 4),
                np.array(entry["labels"], np.int64),
                np.array(entry["crowd"], bool),
                np.array(entry["area"], np.float32),
            )
        )
    return records, classes, category_ids


def coco_ground_truth(
    samples: Sequence[DetectionSample],
    classes: Sequence[str],
    category_ids: Sequence[int],
    root: Path | None = None,
) -> dict:
    """Samples as a COCO instances dict.

    Args:
        samples: the images and their boxes.
        classes: the class names.
        category_ids: each class's COCO id.
        root: file names are written relative to it when they are inside it.

    Returns:
        ``{"images", "annotations", "categories"}`` (boxes as ``[x, y, w, h]``, annotation ids from 1).
    """
    images, annotations = [], []
    for sample in samples:
        path = Path(sample.path)
        try:
            file_name = str(path.relative_to(root)) if root is not None else str(path)
        except ValueError:
            file_name = str(path)
        images.append(
            {
                "id": int(sample.image_id),
                "file_name": file_name,
                "width": int(sample.width),
                "height": int(sample.height),
            }
        )
        crowd = sample.iscrowd if sample.iscrowd is not None else np.zeros(len(sample.labels), bool)
        areas = sample.areas
        for box, label, is_crowd, area in zip(sample.boxes, sample.labels, crowd, areas):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(sample.image_id),
                    "category_id": int(category_ids[int(label)]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(area),
                    "iscrowd": int(bool(is_crowd)),
                }
            )
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(category_ids, classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def yolo_label_path(image: Path) -> Path:
    """Where YOLO keeps an image's labels: the last ``images`` folder of its path replaced by ``labels``, ``.txt``.

    Args:
        image: the image file.

    Returns:
        The label file's path (which may not exist: an image without objects).
    """
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_yolo_labels(
    path: Path, width: int, height: int, index: dict[int, int], classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """One YOLO label file's boxes (pixels, xyxy) and class indices; a missing file has none."""
    if not path.is_file():
        return _EMPTY_BOXES, np.zeros(0, np.int64)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(path, f"cannot read: {getattr(error, 'strerror', None) or error}") from None
    boxes, labels = [], []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DatasetError(
                path,
                f"line {number} has {len(fields)} fields; a YOLO label line is 'class cx cy w h' "
                "(5 fields) or 'class x1 y1 x2 y2 x3 y3 ...' (a polygon)",
            )
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise DatasetError(path, f"line {number}: {line.strip()!r} is not a class id followed by numbers") from None
        if cls not in index:
            raise DatasetError(path, f"line {number}: class {cls} is not one of the dataset's {len(classes)} classes")
        if not all(math.isfinite(v) for v in values):
            raise DatasetError(path, f"line {number}: {line.strip()!r} holds a value that is not finite")
        if len(values) == 4:
            cx, cy, w, h = values
            if w < 0 or h < 0:
                raise DatasetError(path, f"line {number}: negative box size w={w} h={h}")
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = values[0::2], values[1::2]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        boxes.append(
            _checked_box(x0 * width, y0 * height, x1 * width, y1 * height, width, height, path, f"line {number}")
        )
        labels.append(index[cls])
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def _checked_box(x0, y0, x1, y1, width: int, height: int, path: Path, where: str) -> tuple[float, ...]:
    """The box clipped to the image; an error when its size is negative or it reaches out by more than the tolerance."""
    if x1 < x0 or y1 < y0:
        raise DatasetError(path, f"{where}: box has a negative size ({x1 - x0:g} x {y1 - y0:g} px)")
    t = BORDER_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise DatasetError(
            path,
            f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) (x0, y0, x1, y1) reaches outside its "
            f"{width}x{height} (WxH) image",
        )
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, as Ultralytics does), sorted; hidden ones skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(s.startswith(".") for s in p.parts[-1:])
    )


def _listed_images(list_file: Path, base: Path) -> list[Path]:
    """The images a YOLO list file names, one a line (relative ones to ``base``, ``./`` as Ultralytics writes them)."""
    files = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        path = Path(line) if Path(line).is_absolute() else base / line
        if not path.is_file():
            raise DatasetError(list_file, f"line {number}: image {line!r} does not exist")
        files.append(path)
    return files


def _strip_suffix(file_name: str) -> str:
    return os.path.splitext(file_name)[0]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _yolo_splits(data: dict) -> list[str]:
    return [k for k in ("train", "val", "test") if data.get(k)]
