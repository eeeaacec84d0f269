"""What a detector's training step sees: resized whole images or random crops, with their boxes.

A detection dataset's samples (``gigaseg.data.detection.DetectionSample``: ``boxes`` float32
``(N, 4)`` ``(x0, y0, x1, y1)`` in full-resolution pixels, ``labels`` int64 ``(N,)``, ``width``,
``height`` and ``open()`` for the lazy pixels) become items

    ``{"image": float32 (C, S, S), "boxes": float32 (M, 4), "labels": int64 (M,), "index": int}``

with the boxes in the view's pixel coordinates, and :func:`collate_detections` batches them
(images stacked, boxes and labels kept per image, as ``DetectionModel.forward`` takes them).

- :class:`WholeImageDetections`: the image resized so its longer side is ``size`` (aspect
  kept; area averaging), padded at the bottom and right to ``size`` x ``size`` with the
  normalised zero; boxes scaled by the same factors.
- :class:`RandomDetectionCrops`: ``crop`` x ``crop`` full-resolution windows (padded the same
  way where the image is smaller), placed uniformly or, for ``object_share`` of the items,
  around a randomly chosen object (so sparse small objects are seen); boxes are clipped to the
  window and a box keeping less than ``min_visible`` of its area (or less than ``min_side``
  pixels across) is dropped.

Crowd regions (``sample.iscrowd``) are not trained on (:func:`training_boxes`).

Both flip horizontally and vertically at random (boxes flipped with the pixels). Randomness comes
from ``rng_for(seed, epoch, index)``: a resumed run draws the same views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..geometry import Window
from ..io.base import read_resized, thumbnail_size
from .views import SeededViews, rng_for

__all__ = [
    "RandomDetectionCrops",
    "WholeImageDetections",
    "clip_boxes",
    "collate_detections",
    "flip_boxes",
    "training_boxes",
]


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, window: Window, min_visible: float = 0.5, min_side: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The boxes seen through ``window``, in the window's coordinates.

    Args:
        boxes: float ``(N, 4)`` ``(x0, y0, x1, y1)`` in image pixels.
        labels: ``(N,)``.
        window: the crop, in image pixels.
        min_visible: a box keeping less than this share of its area inside the window is dropped.
        min_side: a clipped box narrower or lower than this (pixels) is dropped.

    Returns:
        ``(boxes, labels)``: float32 ``(M, 4)`` clipped to ``[0, width] x [0, height]`` of the
        window and int64 ``(M,)``, in the input's order.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    shift = np.array([window.left, window.top, window.left, window.top], dtype=np.float32)
    moved = boxes - shift
    clipped = moved.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, window.width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, window.height)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    keep = (w >= min_side) & (h >= min_side) & (w * h >= min_visible * np.maximum(area, 1e-6))
    return clipped[keep], labels[keep]


def training_boxes(sample) -> tuple[np.ndarray, np.ndarray]:
    """A sample's boxes and labels to train on: its crowd regions left out (as torchvision's COCO references do).

    Args:
        sample: a detection sample (``boxes``, ``labels`` and optional ``iscrowd``).

    Returns:
        float32 ``(N, 4)`` boxes and int64 ``(N,)`` labels.
    """
    boxes = np.asarray(sample.boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(sample.labels, dtype=np.int64).reshape(-1)
    crowd = getattr(sample, "iscrowd", None)
    if crowd is not None:
        keep = ~np.asarray(crowd, dtype=bool).reshape(-1)
        boxes, labels = boxes[keep], labels[keep]
    return boxes, labels


def flip_boxes(boxes: np.ndarray, width: int, height: int, horizontal: bool, vertical: bool) -> np.ndarray:
    """Boxes of an image flipped left-right and/or top-bottom.

    Args:
        boxes: float ``(N, 4)`` ``(x0, y0, x1, y1)``.
        width: the image's width (pixels).
        height: the image's height.
        horizontal: flip left-right.
        vertical: flip top-bottom.

    Returns:
        The flipped boxes, float32 ``(N, 4)``, still with ``x0 <= x1`` and ``y0 <= y1``.
    """
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    if horizontal:
        out[:, [0, 2]] = width - out[:, [2, 0]]
    if vertical:
        out[:, [1, 3]] = height - out[:, [3, 1]]
    return out


def collate_detections(items: Sequence[dict]) -> dict:
    """Batch detection items: images stacked, each image's boxes and labels kept apart.

    Args:
        items: dicts with ``image`` ``(C, H, W)`` (all the same size), ``boxes``, ``labels``
            and ``index``.

    Returns:
        ``{"image": (B, C, H, W), "targets": [{"boxes", "labels"}, ...], "index": (B,)}``.
    """
    return {
        "image": torch.stack([item["image"] for item in items]),
        "targets": [{"boxes": item["boxes"], "labels": item["labels"]} for item in items],
        "index": torch.tensor([int(item["index"]) for item in items]),
    }


class _DetectionViews(SeededViews):
    """Shared by both views: flipping, padding to a square, packing the item."""

    #: the DataLoader's collate function for these items
    collate = staticmethod(collate_detections)

    def __init__(self, dataset, normalization, side: int, augment: bool, seed: int, crops_per_image: int = 1):
        super().__init__(dataset, normalization, seed, crops_per_image)
        self.side = int(side)
        self.augment = augment

    def _pack(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng, index: int) -> dict:
        h, w = image.shape[:2]
        if self.augment:
            horizontal, vertical = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            boxes = flip_boxes(boxes, w, h, horizontal, vertical)
            if horizontal:
                image = image[:, ::-1]
            if vertical:
                image = image[::-1]
        pixels = torch.from_numpy(self.normalization.apply(np.ascontiguousarray(image)))
        if (h, w) != (self.side, self.side):  # padded with the normalised zero (the mean)
            padded = pixels.new_zeros((pixels.shape[0], self.side, self.side))
            padded[:, :h, :w] = pixels
            pixels = padded
        return {
            "image": pixels,
            "boxes": torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "index": index,
        }


class WholeImageDetections(_DetectionViews):
    """Each image resized so its longer side is ``size``, padded to ``size`` x ``size``, with its boxes scaled.

    Args:
        dataset: a detection dataset (samples with ``boxes``, ``labels``, ``width``,
            ``height``, ``open()``).
        normalization: how pixels are normalised for the network.
        size: the view's side.
        augment: random horizontal and vertical flips.
        seed: the run's seed.
        cache: keep each image's resized pixels in memory after the first read.
        min_side: boxes narrower or lower than this after scaling (pixels) are dropped.
    """

    def __init__(self, dataset, normalization, size: int, augment=True, seed=0, cache=True, min_side: float = 1.0):
        super().__init__(dataset, normalization, size, augment, seed)
        self.min_side = float(min_side)
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def view(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sample's resized pixels and scaled boxes, before flipping and padding.

        Args:
            index: the sample's index.

        Returns:
            ``(image (h, w, C) in the source's dtype, boxes float32 (M, 4), labels int64 (M,))``.
        """
        sample = self.dataset[index]
        h, w = thumbnail_size(sample.height, sample.width, self.side)
        image = self._cache.get(index) if self._cache is not None else None
        if image is None:
            with sample.open() as source:
                image = read_resized(source, Window(0, 0, sample.height, sample.width), (h, w))
            if self._cache is not None:
                self._cache[index] = image
        scale = np.array([w / sample.width, h / sample.height] * 2, dtype=np.float32)
        boxes, labels = training_boxes(sample)
        return (image, *clip_boxes(boxes * scale, labels, Window(0, 0, h, w), 0.0, self.min_side))

    def __getitem__(self, index: int) -> dict:
        image, boxes, labels = self.view(index)
        return self._pack(image, boxes, labels, rng_for(self.seed, self.epoch, index), index)


class RandomDetectionCrops(_DetectionViews):
    """``crops_per_image`` random full-resolution ``crop`` x ``crop`` windows per image, with the boxes they hold.

    Item ``i`` comes from image ``i // crops_per_image``. With probability ``object_share`` the
    window is drawn uniformly among those holding one of the image's objects (drawn uniformly)
    whole, or its centre where the object is larger than the window; else uniformly over the
    image.

    Args:
        dataset: a detection dataset.
        normalization: how pixels are normalised for the network.
        crop: the window's side (cut to the image where it is smaller; the view is padded).
        crops_per_image: items per image and epoch.
        augment: random horizontal and vertical flips.
        seed: the run's seed.
        object_share: the share of windows placed around an object.
        min_visible: a box keeping less than this share of its area in the window is dropped.
        min_side: a clipped box narrower or lower than this (pixels) is dropped.
    """

    def __init__(
        self,
        dataset,
        normalization,
        crop: int,
        crops_per_image: int = 1,
        augment=True,
        seed=0,
        object_share: float = 0.5,
        min_visible: float = 0.5,
        min_side: float = 2.0,
    ):
        super().__init__(dataset, normalization, crop, augment, seed, crops_per_image)
        self.object_share = float(object_share)
        self.min_visible = float(min_visible)
        self.min_side = float(min_side)

    def window(self, sample, rng: np.random.Generator) -> Window:
        """Draw the window of one item.

        Args:
            sample: the image's sample.
            rng: the item's generator.

        Returns:
            A window inside the image, ``min(crop, side)`` on each side.
        """
        height, width = int(sample.height), int(sample.width)
        ch, cw = min(self.side, height), min(self.side, width)
        boxes = training_boxes(sample)[0]
        if len(boxes) and rng.random() < self.object_share:
            x0, y0, x1, y1 = boxes[int(rng.integers(len(boxes)))]
            top = _start_holding(y0, y1, ch, height, rng)
            left = _start_holding(x0, x1, cw, width, rng)
        else:
            top, left = int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1))
        return Window(top, left, ch, cw)

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        sample = self.dataset[index // self.crops_per_image]
        window = self.window(sample, rng)
        with sample.open() as source:
            image = source.read(window)
        boxes, labels = clip_boxes(*training_boxes(sample), window, self.min_visible, self.min_side)
        return self._pack(image, boxes, labels, rng, index)


def _start_holding(low: float, high: float, side: int, length: int, rng: np.random.Generator) -> int:
    """A window start along one axis, drawn among those whose ``side`` pixels hold ``[low, high)``.

    Where the span is longer than ``side``, among those holding its centre. The window stays
    inside ``[0, length)``.
    """
    first, last = int(np.ceil(high)) - side, int(np.floor(low))
    if first > last:  # the object is larger than the window: hold its centre
        centre = int(np.clip((low + high) / 2, 0, length - 1))
        first, last = centre - side + 1, centre
    first, last = max(0, first), min(last, length - side)
    first = min(first, last)
    return first + int(rng.integers(last - first + 1))
