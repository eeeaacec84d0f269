"""Detections written for people and tools: COCO results json, GeoJSON boxes, boxes drawn on the overview PNG.

All three take a :class:`~gigaseg.geometry.Detections` (boxes ``(x0, y0, x1, y1)`` in the image's
full-resolution pixels, pixel edges) and are written atomically
(:func:`gigaseg.io.atomic.atomic_output`): a file is complete or absent.

- :func:`coco_results` / :func:`write_coco_results`: COCO's results format, a json list of
  ``{"image_id", "category_id", "bbox": [x, y, width, height], "score"}`` (what
  ``pycocotools.coco.COCO.loadRes`` reads), the category ids being the model's (its dataset's
  COCO ids).
- :func:`detections_geojson` / :func:`write_detections_geojson`: a GeoJSON FeatureCollection,
  one Polygon per box (counter-clockwise exterior ring, as RFC 7946 asks), with the class id,
  name, COCO category id, score and colour. When the image is georeferenced (a GeoTIFF: its
  affine transform and CRS, read by rasterio as ``gigaseg vectorize`` does) the corners are map
  coordinates and the collection names its CRS; otherwise they are pixel coordinates (x right, y
  down, from the image's top-left corner), and every feature's ``coordinates`` property and the
  collection's ``coordinates`` member say which.
- :func:`draw_detections` / :func:`write_detection_overlay_png`: the boxes as outlines in their
  class colours on the image's overview (its thumbnail, read from a pyramid when it has one).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..geometry import Detections
from .atomic import atomic_output
from .base import ImageSource
from .overlay import to_display_rgb, write_png
from .palette import as_palette, default_palette

__all__ = [
    "Georeference",
    "box_pixels",
    "coco_results",
    "detections_geojson",
    "draw_detections",
    "georeference",
    "write_coco_results",
    "write_detection_overlay_png",
    "write_detections_geojson",
]


class Georeference:
    """An image's pixel-to-map transform and CRS.

    Args:
        transform: the affine ``(a, b, c, d, e, f)``: ``x = a * col + b * row + c``,
            ``y = d * col + e * row + f`` (GDAL's order, pixel corners).
        crs: the CRS as a string (``"EPSG:32633"`` or WKT), or None when unknown.
    """

    def __init__(self, transform: Sequence[float], crs: str | None = None):
        self.transform = tuple(float(v) for v in transform)
        self.crs = crs

    def apply(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixel coordinates to map coordinates.

        Args:
            xs: columns (pixel edges).
            ys: rows.

        Returns:
            ``(x, y)`` map coordinates, arrays of the inputs' shape.
        """
        a, b, c, d, e, f = self.transform
        return a * xs + b * ys + c, d * xs + e * ys + f


def georeference(source: ImageSource) -> Georeference | None:
    """The georeferencing of ``source``'s file, when it has some.

    Args:
        source: the image (its ``geo_tags`` say whether it is a GeoTIFF; rasterio reads the file).

    Returns:
        Its ``Georeference``, or None for an image without georeferencing (or without a file).
    """
    path = getattr(source, "path", None)
    if path is None or not source.geo_tags:
        return None
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            transform, crs = src.transform, src.crs
    if crs is None and transform.is_identity:
        return None
    return Georeference(
        (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f),
        None if crs is None else crs.to_string(),
    )


def coco_results(detections: Detections, image_id: int, category_ids: Sequence[int]) -> list[dict]:
    """One image's detections in COCO's results format.

    Args:
        detections: the image's detections (labels index ``category_ids``).
        image_id: the COCO id of the image.
        category_ids: the COCO category id of each class.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` in the detections' order.
    """
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(label)]),
            "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            "score": round(float(score), 5),
        }
        for (x0, y0, x1, y1), score, label in zip(boxes, detections.scores, detections.labels)
    ]


def write_coco_results(path: str | os.PathLike, results: Sequence[dict]) -> Path:
    """Write COCO results (from :func:`coco_results`) as a json list, atomically.

    Args:
        path: the output file.
        results: the entries of one or more images.

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(list(results)))
    return Path(path)


def detections_geojson(
    detections: Detections,
    classes: Sequence[str],
    *,
    category_ids: Sequence[int] | None = None,
    palette=None,
    geo: Georeference | None = None,
    image: str | None = None,
) -> dict:
    """Detections as a GeoJSON FeatureCollection of box polygons.

    Args:
        detections: the image's detections.
        classes: the class names (labels index them).
        category_ids: the COCO category id of each class; None: the class index.
        palette: one RGB colour per class; None: ``default_palette``.
        geo: the image's georeferencing; None: pixel coordinates.
        image: the image's path or name, recorded on the collection.

    Returns:
        The FeatureCollection (``features`` in the detections' order, each with ``class_id``,
        ``class_name``, ``category_id``, ``score``, ``color``, ``pixel_box`` and ``coordinates``:
        ``"map"`` or ``"pixel"``); ``crs`` names the CRS when it is known.
    """
    palette = default_palette(len(classes)) if palette is None else as_palette(palette)
    ids = list(range(len(classes))) if category_ids is None else [int(c) for c in category_ids]
    kind = "pixel" if geo is None else "map"
    features = []
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    for (x0, y0, x1, y1), score, label in zip(boxes, detections.scores, detections.labels):
        xs, ys = np.array([x0, x1, x1, x0, x0]), np.array([y0, y0, y1, y1, y0])
        if geo is not None:
            xs, ys = geo.apply(xs, ys)
        ring = list(zip(xs.tolist(), ys.tolist()))
        if _signed_area(ring) < 0:  # counter-clockwise exterior (RFC 7946), whatever the transform's flips
            ring.reverse()
        label = int(label)
        colour = palette[label] if label < len(palette) else (255, 255, 255)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[x, y] for x, y in ring]]},
                "properties": {
                    "class_id": label,
                    "class_name": str(classes[label]) if label < len(classes) else str(label),
                    "category_id": ids[label] if label < len(ids) else label,
                    "score": round(float(score), 5),
                    "color": "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colour)),
                    "pixel_box": [float(x0), float(y0), float(x1), float(y1)],
                    "coordinates": kind,
                },
            }
        )
    collection: dict = {"type": "FeatureCollection"}
    if geo is not None and geo.crs is not None:
        collection["crs"] = {"type": "name", "properties": {"name": _crs_urn(geo.crs)}}
    collection["coordinates"] = (
        "map coordinates of the image's georeferencing"
        if geo is not None
        else "pixel coordinates of the image (x right, y down, from its top-left corner): it has no georeferencing"
    )
    if image is not None:
        collection["image"] = str(image)
    collection["features"] = features
    return collection


def write_detections_geojson(
    path: str | os.PathLike,
    detections: Detections,
    classes: Sequence[str],
    *,
    source: ImageSource | None = None,
    category_ids: Sequence[int] | None = None,
    palette=None,
) -> Path:
    """Write :func:`detections_geojson` to ``path`` atomically, in the georeferencing of ``source`` when it has one.

    Args:
        path: the output ``.geojson``.
        detections: the image's detections.
        classes: the class names.
        source: the image (for its georeferencing and name); None: pixel coordinates.
        category_ids: the COCO category id of each class.
        palette: one RGB colour per class.

    Returns:
        ``path`` as a ``Path``.
    """
    geo = None if source is None else georeference(source)
    image = None if source is None else (source.path or source.name)
    collection = detections_geojson(
        detections, classes, category_ids=category_ids, palette=palette, geo=geo, image=image
    )
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(collection))
    return Path(path)


def box_pixels(boxes: np.ndarray) -> np.ndarray:
    """The pixels a box covers: edges ``x0..x1`` are the pixels ``floor(x0) .. ceil(x1) - 1``.

    Args:
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` pixel edges (already scaled to the picture).

    Returns:
        ``(N, 4)`` int64 ``(left, top, right, bottom)``, inclusive; a box thinner than a pixel
        covers the one it starts in.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    left, top = np.floor(boxes[:, 0]).astype(np.int64), np.floor(boxes[:, 1]).astype(np.int64)
    right = np.maximum(np.ceil(boxes[:, 2]).astype(np.int64) - 1, left)
    bottom = np.maximum(np.ceil(boxes[:, 3]).astype(np.int64) - 1, top)
    return np.stack([left, top, right, bottom], axis=1)


def draw_detections(image, detections: Detections, palette=None, scale: float = 1.0, width: int | None = None):
    """Draw box outlines on an image in their class colours.

    Args:
        image: ``(H, W[, C])`` pixels (made displayable by ``to_display_rgb``).
        detections: boxes in full-resolution pixels.
        palette: one RGB colour per class; None: ``default_palette``.
        scale: the image's size over the full resolution (a thumbnail's factor).
        width: the outline's width in pixels; None: ``max(1, longer side // 512)``.

    Returns:
        ``(H, W, 3)`` uint8 with the boxes drawn (the highest scores last, so on top).
    """
    from PIL import Image, ImageDraw

    rgb = to_display_rgb(image)
    labels = np.asarray(detections.labels, dtype=np.int64)
    palette = default_palette(int(labels.max()) + 1 if len(labels) else 1) if palette is None else as_palette(palette)
    width = max(1, max(rgb.shape[:2]) // 512) if width is None else int(width)
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    h, w = rgb.shape[:2]
    rects = box_pixels(np.asarray(detections.boxes, dtype=np.float64) * scale)
    rects[:, 0::2] = rects[:, 0::2].clip(0, w - 1)
    rects[:, 1::2] = rects[:, 1::2].clip(0, h - 1)
    for i in np.argsort(np.asarray(detections.scores), kind="stable"):
        left, top, right, bottom = rects[i].tolist()
        label = int(labels[i])
        colour = tuple(int(c) for c in palette[label]) if label < len(palette) else (255, 255, 255)
        draw.rectangle((left, top, right, bottom), outline=colour, width=width)
    return np.asarray(picture)


def write_detection_overlay_png(
    path: str | os.PathLike, source: ImageSource, detections: Detections, palette=None, max_side: int = 2048
) -> Path:
    """Draw the boxes on the overview of ``source`` (its thumbnail) and write a PNG, atomically.

    Args:
        path: the output PNG.
        source: the image.
        detections: its detections, in full-resolution pixels.
        palette: one RGB colour per class; None: ``default_palette``.
        max_side: longer side of the picture in pixels.

    Returns:
        ``path`` as a ``Path``.
    """
    thumb = source.thumbnail(max_side)
    scale = thumb.shape[1] / source.width
    return write_png(path, draw_detections(thumb, detections, palette, scale=scale))


def _signed_area(ring: Sequence[tuple[float, float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def _crs_urn(crs: str) -> str:
    """``EPSG:32633`` -> ``urn:ogc:def:crs:EPSG::32633`` (GeoJSON's named CRS); other strings as they are."""
    authority, _, code = crs.partition(":")
    return f"urn:ogc:def:crs:{authority}::{code}" if authority.isalpha() and code.isdigit() else crs
