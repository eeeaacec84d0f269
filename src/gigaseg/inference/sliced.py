"""Whole-image detection for images of any size: overlapping tiles merged, or one downsampled pass.

Both predictors run a detection network's ``detect(images, *, score_threshold, ...)`` (see
``gigaseg.nn.base.DetectionModel``) on normalised ``(B, C, S, S)`` inputs and return the
objects in the image's full-resolution pixel coordinates.

- :class:`SlicedDetectionPredictor` (sliced inference, as SAHI): ``tile_size`` tiles sharing
  ``overlap`` pixels with their neighbours (the last row and column shifted inward so every tile
  is whole; an image smaller than a tile is padded with the normalised zero). The tiles are read
  one row band at a time, in chunks of at most ``block_size`` columns, so memory follows the
  tile and block sizes, never the image's. Each tile's boxes are shifted into the image; with
  ``full_image_size`` a downsampled pass over the whole image (its longer side resized to that,
  read from a pyramid level or a streamed decimation) adds the large objects tiles cut apart.
  All boxes are merged by :func:`gigaseg.inference.merge.merge_detections`.
- :class:`WholeImageDetectionPredictor`: the whole image resized so its longer side is ``size``
  and padded to a square, as ``gigaseg.training.detection_views.WholeImageDetections`` trains it;
  boxes scaled back.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..geometry import Detections, Window, sliding_starts
from ..io.base import ImageSource, read_resized, thumbnail_size
from ..io.normalize import Normalization
from .contract import DetectionPredictor
from .merge import MergeSettings, merge_detections
from .partial_detections import PartialDetections

__all__ = ["SlicedDetectionPredictor", "WholeImageDetectionPredictor", "tile_starts"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side start: every ``tile - overlap`` pixels, the last one flush.

    Args:
        length: the image side.
        tile: the tile side.
        overlap: pixels shared by neighbouring tiles, in ``0..tile-1``.

    Returns:
        Ascending starts; ``[0]`` when the side is not longer than a tile (padded).

    Raises:
        ValueError: ``overlap`` outside ``0..tile-1``.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    return sliding_starts(length, tile, tile - overlap)


def _scaled(found: Detections, scale_x: float, scale_y: float, dx: float, dy: float, width: int, height: int):
    """Boxes scaled, shifted by ``(dx, dy)`` and clipped to the image; boxes left with no area dropped."""
    boxes = found.boxes.astype(np.float64) * np.array([scale_x, scale_y, scale_x, scale_y]) + [dx, dy, dx, dy]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Detections(boxes[keep].astype(np.float32), found.scores[keep], found.labels[keep])


def _concatenate(parts: list[Detections]) -> Detections:
    if not parts:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    return Detections(
        np.concatenate([p.boxes for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.labels for p in parts]),
    )


def _best(found: Detections, limit: int) -> Detections:
    """The ``limit`` best-scoring detections (all of them when ``limit`` is 0), best first."""
    order = np.argsort(-found.scores, kind="stable")
    if limit:
        order = order[:limit]
    return Detections(found.boxes[order], found.scores[order], found.labels[order])


class _Detecting(DetectionPredictor):
    """What both predictors share: thresholds and running the network on a batch of normalised views."""

    def __init__(
        self,
        model: torch.nn.Module,
        normalization: Normalization,
        *,
        score_threshold: float = 0.05,
        max_detections: int = 0,
        device="cpu",
        sub_batch: int = 4,
        precision: str = "32",
    ):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        if not 0.0 <= float(score_threshold) < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        if int(max_detections) < 0:
            raise ValueError(f"max_detections must be >= 0 (0: no cap), got {max_detections}")
        self.score_threshold = float(score_threshold)
        self.max_detections = int(max_detections)

    def padded_tensor(self, pixels: np.ndarray, side: int) -> torch.Tensor:
        """Source pixels ``(h, w, C)`` normalised and padded at the bottom and right to ``side`` x ``side``.

        Args:
            pixels: as read from the source, ``h, w <= side``.
            side: the network's input side.

        Returns:
            float ``(C, side, side)`` on the device; the padding is the normalised zero.
        """
        array = torch.from_numpy(self.normalization.apply(pixels))
        h, w = array.shape[-2:]
        if (h, w) != (side, side):
            padded = array.new_zeros((array.shape[0], side, side))
            padded[:, :h, :w] = array
            array = padded
        return array.to(self.device)

    def detect(self, images: list[torch.Tensor]) -> list[Detections]:
        """The network's detections of each normalised view, in the view's pixels.

        Args:
            images: ``(C, S, S)`` tensors of one side.

        Returns:
            One ``Detections`` per view, run ``sub_batch`` views per forward pass.
        """
        out: list[Detections] = []
        for start in range(0, len(images), self.sub_batch):
            batch = torch.stack(images[start : start + self.sub_batch])
            with torch.inference_mode(), self.autocast():
                out.extend(self.model.detect(batch, score_threshold=self.score_threshold))
        return out


class WholeImageDetectionPredictor(_Detecting):
    """The whole image resized so its longer side is ``size``, padded to a square, detected in one pass.

    Args:
        model: a detection network (``detect(images, *, score_threshold)``).
        normalization: how the image's pixels are normalised.
        size: the network's input side.
        score_threshold: detections scoring at most this are dropped.
        max_detections: the most objects returned (0: every detection above ``score_threshold``).
        device: where the network runs.
        sub_batch: unused (one image per pass); kept for the predictor factories' common arguments.
        precision: "32", "bf16-mixed" or "16-mixed".
    """

    def __init__(self, model, normalization, *, size: int, sub_batch: int = 1, **options):
        super().__init__(model, normalization, sub_batch=1, **options)
        if int(size) < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = int(size)

    def predict(self, source: ImageSource, *, partial: PartialDetections | None = None) -> Detections:
        """The objects of ``source``, found on its downsampled view.

        Args:
            source: the image.
            partial: unused (one pass, nothing to resume); accepted as the sliced predictor's.

        Returns:
            Its ``Detections`` in full-resolution pixels, best first.
        """
        return _best(whole_image_pass(self, source, self.size), self.max_detections)


def whole_image_pass(predictor: _Detecting, source: ImageSource, size: int) -> Detections:
    """The objects found on ``source`` resized so its longer side is ``size``, in full-resolution pixels.

    Args:
        predictor: runs the network.
        source: the image.
        size: the view's longer side (and the padded square's side).

    Returns:
        The view's detections scaled back to the image, clipped to it.
    """
    h, w = thumbnail_size(source.height, source.width, size)
    view = read_resized(source, source.bounds, (h, w))
    (found,) = predictor.detect([predictor.padded_tensor(view, size)])
    return _scaled(found, source.width / w, source.height / h, 0.0, 0.0, source.width, source.height)


class SlicedDetectionPredictor(_Detecting):
    """Overlapping tiles detected in sub-batches, shifted into the image and merged (see the module docstring).

    Args:
        model: a detection network (``detect(images, *, score_threshold)``).
        normalization: how the image's pixels are normalised.
        tile_size: the tiles' side.
        overlap: pixels shared by neighbouring tiles (``0 .. tile_size-1``).
        merge: how the boxes of overlapping tiles are merged.
        full_image_size: with a value, a downsampled whole-image pass at that longer side is merged in.
        score_threshold: detections scoring at most this are dropped.
        max_detections: the most objects returned per image, after merging (0: no cap).
        device: where the network runs.
        sub_batch: tiles per forward pass.
        precision: "32", "bf16-mixed" or "16-mixed".

    Raises:
        ValueError: a tile side below 1, an overlap outside ``0..tile_size-1``.
    """

    #: columns of a band read at once (at least one tile); the predictor factory sets it from the budget
    block_size: int = 2048

    def __init__(
        self,
        model,
        normalization,
        *,
        tile_size: int,
        overlap: int,
        merge: MergeSettings | None = None,
        full_image_size: int | None = None,
        **options,
    ):
        super().__init__(model, normalization, **options)
        if int(tile_size) < 1:
            raise ValueError(f"tile_size must be at least 1, got {tile_size}")
        tile_starts(int(tile_size), int(tile_size), int(overlap))  # checks the overlap
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.merge = merge or MergeSettings()
        self.full_image_size = int(full_image_size) if full_image_size else None

    def tiles(self, source: ImageSource) -> list[Window]:
        """The tiles of ``source`` in reading order (rows, then columns), cut to the image.

        Args:
            source: the image.

        Returns:
            Windows of ``tile_size`` (or the image's side where it is smaller).
        """
        tile = self.tile_size
        return [
            Window(top, left, min(tile, source.height), min(tile, source.width))
            for top in tile_starts(source.height, tile, self.overlap)
            for left in tile_starts(source.width, tile, self.overlap)
        ]

    def _chunks(self, source: ImageSource) -> Iterator[tuple[int, Window, list[Window]]]:
        """Each row band's index, its column chunks (``block_size`` wide, at least a tile) and their tiles."""
        tile = self.tile_size
        lefts = tile_starts(source.width, tile, self.overlap)
        width = min(tile, source.width)
        for band, top in enumerate(tile_starts(source.height, tile, self.overlap)):
            height = min(tile, source.height)
            group: list[int] = []
            for left in lefts:
                if group and left + width - group[0] > max(self.block_size, tile):
                    yield (band, *_chunk(top, height, width, group))
                    group = []
                group.append(left)
            yield (band, *_chunk(top, height, width, group))

    def predict(self, source: ImageSource, *, partial: PartialDetections | None = None) -> Detections:
        """The objects of ``source``: every tile's, the downsampled pass's if set, merged.

        Tiles go through the network ``sub_batch`` at a time; a band's last sub-batch may be
        smaller, so that each band's detections are complete when the next band starts.

        Args:
            source: the image.
            partial: a store of finished bands (opened): the bands it holds are taken from it
                (their pixels are not read) and each band finished here is saved to it.

        Returns:
            Its ``Detections`` in full-resolution pixels, best first, at most ``max_detections`` (when not 0).
        """
        finished = {} if partial is None else dict(partial.finished)
        parts: list[Detections] = list(finished.values())
        band_parts: list[Detections] = []
        pending: list[tuple[torch.Tensor, Window]] = []

        def flush() -> None:
            found = self.detect([tensor for tensor, _ in pending])
            for result, (_, tile) in zip(found, pending, strict=True):
                band_parts.append(_scaled(result, 1.0, 1.0, tile.left, tile.top, source.width, source.height))
            pending.clear()

        def finish(band: int) -> None:
            if pending:
                flush()
            found = _concatenate(band_parts)
            band_parts.clear()
            parts.append(found)
            if partial is not None:
                partial.save(band, found)

        current = None
        for band, chunk, tiles in self._chunks(source):
            if band in finished:
                continue
            if current is not None and band != current:
                finish(current)
            current = band
            pixels = source.read(chunk)
            for tile in tiles:
                top, left = tile.top - chunk.top, tile.left - chunk.left
                view = pixels[top : top + tile.height, left : left + tile.width]
                pending.append((self.padded_tensor(view, self.tile_size), tile))
                if len(pending) == self.sub_batch:
                    flush()
            del pixels
        if current is not None:
            finish(current)
        if self.full_image_size:
            parts.append(whole_image_pass(self, source, self.full_image_size))
        return _best(merge_detections(_concatenate(parts), self.merge), self.max_detections)


def _chunk(top: int, height: int, width: int, lefts: list[int]) -> tuple[Window, list[Window]]:
    """The window spanning the tiles starting at ``lefts`` in one band, and those tiles."""
    span = Window(top, lefts[0], height, lefts[-1] + width - lefts[0])
    return span, [Window(top, left, height, width) for left in lefts]
