"""Detection boxes for ``gigaseg view``: read from their files, drawn into transparent Deep Zoom tiles.

:func:`read_boxes` reads the boxes of one image from

- a GeoJSON FeatureCollection: what ``gigaseg predict`` writes for a detector
  (``gigaseg.io.detections.detections_geojson``: each feature's ``pixel_box``, ``class_name``,
  ``score`` and ``color``), or any other collection of features: a feature's box is then its
  geometry's bounds, in map coordinates when the image is georeferenced (turned into pixels with
  the inverse of its affine transform, as a GIS overlays them), in pixels otherwise; its class
  from ``class_name``, ``name``, ``label`` or ``class``, its score from ``score`` (1 without);
- COCO results (a json list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``,
  what ``gigaseg predict`` writes beside the GeoJSON); classes ``category <id>``;
- a COCO dataset (``{"images", "annotations", "categories"}``): the ground-truth boxes of the
  entry whose ``file_name`` is the image's file name (or of its only image), classes named by
  ``categories``.

A :class:`BoxLayer` serves them as PNG tiles of the image's Deep Zoom grid (RGBA, transparent
but for the outlines), so OpenSeadragon lays them over the image and masks like any other
layer. A tile draws only the boxes that touch it (a vectorised test over all boxes), the highest
scores last, each outline in its class's colour; a box smaller than its outline at that zoom is
drawn as a filled square, so far-out views still show where the objects are, and boxes that fall
on the same level pixels are drawn once.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GigasegError
from ..io.base import ImageSource
from ..io.detections import Georeference, box_pixels, georeference
from ..io.palette import default_palette
from .tiles import DeepZoomGeometry

__all__ = ["BoxLayer", "BoxSet", "read_boxes"]

#: the outline's width in tile pixels
OUTLINE = 2
#: boxes listed at one pixel by :meth:`BoxLayer.boxes_at`
MAX_AT_PIXEL = 10
#: classes one file may name (a tile's drawing packs a class id in 12 bits)
MAX_CLASSES = 4096


class BoxFileError(GigasegError):
    """A detections file is missing, unreadable or not one of the formats :func:`read_boxes` reads.

    Args:
        path: the file (kept as ``self.path``, a str).
        problem: what is wrong (kept as ``self.problem``); the message is ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


@dataclass
class BoxSet:
    """The boxes of one image, in its full-resolution pixels.

    Args:
        boxes: ``(N, 4)`` float64 ``(x0, y0, x1, y1)``, pixel edges.
        scores: ``(N,)`` float64.
        labels: ``(N,)`` int64, indices into ``classes``.
        classes: the class names.
        colors: one ``"#rrggbb"`` per class.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: list[str]
    colors: list[str]

    def __len__(self) -> int:
        return len(self.scores)


class _Classes:
    """Class names in order of first appearance, with the colour a file gives or the default palette's."""

    def __init__(self):
        self.names: list[str] = []
        self.given: dict[int, str] = {}

    def index(self, name: str, color: object = None) -> int:
        if name not in self.names:
            self.names.append(name)
        index = self.names.index(name)
        if index not in self.given and isinstance(color, str) and _is_hex_colour(color):
            self.given[index] = color.lower()
        return index

    def colors(self) -> list[str]:
        palette = default_palette(max(1, len(self.names)))
        return [
            self.given.get(i, "#{:02x}{:02x}{:02x}".format(*(int(c) for c in palette[i])))
            for i in range(len(self.names))
        ]


def _is_hex_colour(text: str) -> bool:
    return len(text) == 7 and text[0] == "#" and all(c in "0123456789abcdefABCDEF" for c in text[1:])


def read_boxes(path: str | os.PathLike, image: ImageSource) -> BoxSet:
    """Read the boxes of ``image`` from a detections file (GeoJSON, COCO results or a COCO dataset).

    Args:
        path: the file (see the module docstring for the formats).
        image: the image the boxes belong to (its file name picks a COCO dataset's entry, its
            georeferencing turns a foreign GeoJSON's map coordinates into pixels).

    Returns:
        The boxes, with their classes.

    Raises:
        BoxFileError: the file is missing, not json, in none of the formats, has a box without
            four finite numbers, holds boxes of several images without one for ``image``, or
            names more than ``MAX_CLASSES`` classes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise BoxFileError(path, "no such file") from None
    except OSError as error:
        raise BoxFileError(path, f"cannot be read ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BoxFileError(path, f"is not json ({error})") from None
    if isinstance(content, dict) and content.get("type") == "FeatureCollection":
        found = _from_geojson(path, content, image)
    elif isinstance(content, list) and all(isinstance(item, dict) and "bbox" in item for item in content):
        found = _from_coco_results(path, content)
    elif isinstance(content, dict) and isinstance(content.get("annotations"), list):
        found = _from_coco_dataset(path, content, image)
    else:
        found = None
    if found is not None:
        if len(found.classes) > MAX_CLASSES:
            raise BoxFileError(path, f"names {len(found.classes)} classes; the viewer shows at most {MAX_CLASSES}")
        return found
    raise BoxFileError(
        path,
        "is neither a GeoJSON FeatureCollection, COCO results (a list of objects with a bbox) nor a COCO "
        "dataset (with annotations)",
    )


def _from_geojson(path: Path, collection: dict, image: ImageSource) -> BoxSet:
    from shapely.geometry import shape

    features = collection.get("features")
    if not isinstance(features, list):
        raise BoxFileError(path, "the FeatureCollection has no list of features")
    classes = _Classes()
    geo: Georeference | None = None
    geo_known = False
    boxes, scores, labels = [], [], []
    for number, feature in enumerate(features):
        properties = feature.get("properties") or {} if isinstance(feature, dict) else {}
        box = properties.get("pixel_box")
        if box is None:
            try:
                bounds = shape(feature["geometry"]).bounds
            except Exception as error:  # noqa: BLE001 - shapely raises many types for bad geometries
                raise BoxFileError(path, f"feature {number} has no readable geometry ({error})") from None
            if not geo_known:
                geo, geo_known = georeference(image), True
            box = bounds if geo is None else _to_pixels(geo, bounds)
        name = next(
            (str(properties[k]) for k in ("class_name", "name", "label", "class") if properties.get(k) is not None),
            "object",
        )
        boxes.append(_box(path, box, f"feature {number}"))
        scores.append(_score(path, properties.get("score", 1.0), f"feature {number}"))
        labels.append(classes.index(name, properties.get("color")))
    return _box_set(boxes, scores, labels, classes)


def _to_pixels(geo: Georeference, bounds) -> tuple[float, float, float, float]:
    """Map-coordinate bounds -> the pixel box covering their four corners (the inverse affine)."""
    a, b, c, d, e, f = geo.transform
    det = a * e - b * d
    x0, y0, x1, y1 = bounds
    xs, ys = np.array([x0, x1, x1, x0]) - c, np.array([y0, y0, y1, y1]) - f
    cols, rows = (e * xs - b * ys) / det, (-d * xs + a * ys) / det
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def _from_coco_results(path: Path, results: list) -> BoxSet:
    images = {item.get("image_id") for item in results}
    if len(images) > 1:
        raise BoxFileError(
            path, f"holds the boxes of {len(images)} images (image_id); give one image's results per file"
        )
    classes = _Classes()
    boxes, scores, labels = [], [], []
    for number, item in enumerate(results):
        boxes.append(_xywh(path, item.get("bbox"), f"result {number}"))
        scores.append(_score(path, item.get("score", 1.0), f"result {number}"))
        labels.append(classes.index(f"category {item.get('category_id')}"))
    return _box_set(boxes, scores, labels, classes)


def _from_coco_dataset(path: Path, dataset: dict, image: ImageSource) -> BoxSet:
    entries = [e for e in dataset.get("images") or [] if isinstance(e, dict)]
    name = os.path.basename(image.path) if image.path else None
    matching = [e for e in entries if name is not None and os.path.basename(str(e.get("file_name", ""))) == name]
    if len(matching) == 1 or (not matching and len(entries) == 1):
        image_id = (matching or entries)[0].get("id")
    else:
        raise BoxFileError(
            path,
            f"has {len(entries)} images and {'several' if matching else 'none'} named {name!r}: cannot tell "
            "which are this image's boxes",
        )
    names = {
        c.get("id"): str(c.get("name", c.get("id"))) for c in dataset.get("categories") or [] if isinstance(c, dict)
    }
    classes = _Classes()
    for category in names.values():  # the dataset's order, so colours do not depend on which image is shown
        classes.index(category)
    boxes, scores, labels = [], [], []
    for number, item in enumerate(dataset["annotations"]):
        if not isinstance(item, dict) or item.get("image_id") != image_id:
            continue
        boxes.append(_xywh(path, item.get("bbox"), f"annotation {number}"))
        scores.append(_score(path, item.get("score", 1.0), f"annotation {number}"))
        category = item.get("category_id")
        labels.append(classes.index(names.get(category, f"category {category}")))
    return _box_set(boxes, scores, labels, classes)


def _box(path: Path, value, where: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BoxFileError(path, f"{where}: a box is four numbers (x0, y0, x1, y1), got {value!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise BoxFileError(path, f"{where}: the box {value!r} is not finite")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _xywh(path: Path, value, where: str) -> tuple[float, float, float, float]:
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError):
        raise BoxFileError(path, f"{where}: a COCO bbox is four numbers (x, y, width, height), got {value!r}") from None
    return _box(path, (x, y, x + w, y + h), where)


def _score(path: Path, value, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise BoxFileError(path, f"{where}: the score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise BoxFileError(path, f"{where}: the score {value!r} is not finite")
    return score


def _box_set(boxes, scores, labels, classes: _Classes) -> BoxSet:
    return BoxSet(
        np.asarray(boxes, np.float64).reshape(-1, 4),
        np.asarray(scores, np.float64),
        np.asarray(labels, np.int64),
        list(classes.names),
        classes.colors(),
    )


class BoxLayer:
    """Boxes served as transparent PNG tiles on the image's Deep Zoom grid (see the module docstring).

    Args:
        boxes: the boxes, in the image's full-resolution pixels.
        height: the image's rows.
        width: the image's columns.
        tile_size: side of a Deep Zoom tile (the image's).
        min_score: boxes scoring below this are left out (drawn nowhere, counted nowhere).
        name: what the page calls this layer (the file's name).

    Raises:
        ValueError: more than ``MAX_CLASSES`` classes.
    """

    tile_format = "png"
    content_type = "image/png"

    def __init__(
        self, boxes: BoxSet, *, height: int, width: int, tile_size: int = 512, min_score: float = 0.0, name: str = ""
    ):
        if len(boxes.classes) > MAX_CLASSES:
            raise ValueError(f"at most {MAX_CLASSES} classes, got {len(boxes.classes)}")
        keep = boxes.scores >= float(min_score)
        order = np.argsort(boxes.scores[keep], kind="stable")  # the highest scores drawn last (on top)
        self.boxes = boxes.boxes[keep][order]
        self.scores = boxes.scores[keep][order]
        self.labels = boxes.labels[keep][order]
        self.classes = boxes.classes
        self.colors = boxes.colors
        self.name = name
        self.geometry = DeepZoomGeometry(int(height), int(width), int(tile_size))
        self._rgb = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in self.colors]

    def __len__(self) -> int:
        return len(self.scores)

    def class_counts(self) -> list[int]:
        """Boxes per class (after ``min_score``).

        Returns:
            One count per class, in the order of :attr:`classes`.
        """
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def close(self) -> None:
        """Nothing to close (the boxes are in memory); for the server's layers' common interface."""

    def boxes_in(self, left: float, top: float, right: float, bottom: float) -> np.ndarray:
        """Indices of the boxes touching a full-resolution rectangle, lowest score first.

        Args:
            left: the rectangle's left edge (pixels).
            top: its top edge.
            right: its right edge.
            bottom: its bottom edge.

        Returns:
            The indices into :attr:`boxes`.
        """
        b = self.boxes
        return np.flatnonzero((b[:, 0] < right) & (b[:, 2] > left) & (b[:, 1] < bottom) & (b[:, 3] > top))

    def tile(self, level: int, col: int, row: int) -> bytes:
        """One tile: the outlines of the boxes touching it, on transparency.

        Args:
            level: the Deep Zoom level.
            col: the tile's column.
            row: the tile's row.

        Returns:
            An RGBA PNG of the tile's size.

        Raises:
            KeyError: when the tile does not exist.
        """
        from PIL import Image, ImageDraw

        if not self.geometry.has_tile(level, col, row):
            raise KeyError((level, col, row))
        window = self.geometry.tile_window(level, col, row)
        scale = 2 ** (self.geometry.max_level - level)  # full-resolution pixels per level pixel
        # outlines reach OUTLINE level pixels inside the box: take boxes whose outline touches the tile
        found = self.boxes_in(
            window.left * scale,
            window.top * scale,
            (window.left + window.width) * scale,
            (window.top + window.height) * scale,
        )
        picture = Image.new("RGBA", (window.width, window.height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(picture)
        # the outline covers the box's own level pixels
        rects = box_pixels(self.boxes[found] / scale - [window.left, window.top, window.left, window.top])
        # beyond the tile by more than the outline, a side is drawn nowhere: clip it there
        rects = rects.clip(-2 * OUTLINE, self.geometry.tile_size + 2 * OUTLINE)
        rects = np.concatenate([rects, self.labels[found, None]], axis=1)
        # far out many boxes share their level pixels: draw each rectangle once, in the colour of the
        # best-scoring box drawn there (found is lowest score first: keep the last occurrence)
        key = np.zeros(len(rects), np.uint64)
        for column, bits in zip(rects.T, (13, 13, 13, 13, 12)):
            key = (key << np.uint64(bits)) | (column + 2 * OUTLINE).astype(np.uint64)
        _, last = np.unique(key[::-1], return_index=True)
        for x0, y0, x1, y1, label in rects[::-1][np.sort(last)[::-1]].tolist():
            colour = (*self._rgb[label], 255)
            if x1 - x0 < 2 * OUTLINE or y1 - y0 < 2 * OUTLINE:
                draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=colour)
            else:
                draw.rectangle((x0, y0, x1, y1), outline=colour, width=OUTLINE)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def boxes_at(self, x: float, y: float) -> list[dict]:
        """The boxes holding a full-resolution pixel, best score first (at most ``MAX_AT_PIXEL``).

        Args:
            x: the pixel's column.
            y: the pixel's row.

        Returns:
            ``[{"class", "name", "color", "score", "box"}, ...]``.
        """
        found = self.boxes_in(x, y, x + 1, y + 1)[::-1][:MAX_AT_PIXEL]
        return [
            {
                "class": int(self.labels[i]),
                "name": self.classes[int(self.labels[i])],
                "color": self.colors[int(self.labels[i])],
                "score": round(float(self.scores[i]), 4),
                "box": [round(float(v), 2) for v in self.boxes[i]],
            }
            for i in found
        ]
