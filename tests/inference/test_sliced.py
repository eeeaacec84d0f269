"""Sliced and whole-image detection with a network whose answer is known: it boxes bright squares.

``SquareFinder.detect`` labels the connected bright pixels of each view (channel 0 bright:
class 0, channel 1 bright: class 1) and scores a box by its area, less 0.25 when it touches the
view's border (a square cut by a tile border looks less like a square than its whole twin in the
neighbouring tile).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from gigaseg.geometry import Detections, Window
from gigaseg.inference.merge import MergeSettings
from gigaseg.inference.sliced import SlicedDetectionPredictor, WholeImageDetectionPredictor, tile_starts
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image

NORM = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=255.0)


class SquareFinder(torch.nn.Module):
    """Boxes around the bright components of channels 0 and 1; counts the views it was shown."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.views: list[tuple[int, int]] = []

    def detect(self, images: torch.Tensor, *, score_threshold: float = 0.0) -> list[Detections]:
        out = []
        for image in images:
            self.views.append(tuple(image.shape[-2:]))
            boxes, scores, labels = [], [], []
            for label in (0, 1):
                components, _ = ndimage.label(image[label].numpy() > 0.5)
                for rows, cols in ndimage.find_objects(components):
                    area = (rows.stop - rows.start) * (cols.stop - cols.start)
                    boxes.append([cols.start, rows.start, cols.stop, rows.stop])
                    touches = rows.start == 0 or cols.start == 0 or rows.stop == image.shape[-2]
                    touches = touches or cols.stop == image.shape[-1]
                    scores.append(0.3 + min(area, 1000) / 2000 - 0.25 * touches)
                    labels.append(label)
            found = Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(labels))
            out.append(
                Detections(*(a[found.scores > score_threshold] for a in (found.boxes, found.scores, found.labels)))
            )
        return out


def scene(height: int, width: int, squares) -> np.ndarray:
    """A dark image with squares ``(top, left, side, channel)``."""
    image = np.zeros((height, width, 3), np.uint8)
    for top, left, side, channel in squares:
        image[top : top + side, left : left + side, channel] = 255
    return image


def boxes_of(squares) -> list[list[float]]:
    return sorted([float(left), float(top), float(left + side), float(top + side)] for top, left, side, _ in squares)


def test_tile_starts_overlap_and_end_flush():
    assert tile_starts(1000, 256, 56) == [0, 200, 400, 600, 744]
    assert tile_starts(200, 256, 56) == [0]
    with pytest.raises(ValueError):
        tile_starts(1000, 256, 256)


def test_a_square_cut_by_a_tile_border_comes_out_as_one_box():
    # tiles start at 0 and 200 (256-px tiles, 56 px shared): the square at x 240..270 is cut
    # by the first tile's right border (256) and whole in the second tile
    squares = [(100, 240, 30, 0), (300, 20, 12, 1), (10, 400, 40, 0)]
    image = scene(456, 456, squares)
    for merge in (MergeSettings("nms", "ios", 0.5), MergeSettings("nmm", "ios", 0.5), MergeSettings("nmm", "iou", 0.3)):
        predictor = SlicedDetectionPredictor(SquareFinder(), NORM, tile_size=256, overlap=56, merge=merge)
        found = predictor.predict(open_image(image))
        assert sorted(found.boxes.tolist()) == boxes_of(squares), merge
    # the cut part (16 of 30 columns) has IoU 0.53 with its twin: NMS by IoU at 0.6 keeps both, which
    # is why tiles are merged by intersection over the smaller box
    loose = SlicedDetectionPredictor(
        SquareFinder(), NORM, tile_size=256, overlap=56, merge=MergeSettings("nms", "iou", 0.6)
    )
    assert len(loose.predict(open_image(image))) == len(squares) + 1


def test_every_tile_is_whole_and_small_images_are_padded():
    model = SquareFinder()
    predictor = SlicedDetectionPredictor(model, NORM, tile_size=128, overlap=28, sub_batch=3)
    found = predictor.predict(open_image(scene(300, 90, [(200, 10, 20, 1)])))
    assert set(model.views) == {(128, 128)}
    assert len(model.views) == len(tile_starts(300, 128, 28)) * 1
    assert found.boxes.tolist() == [[10, 200, 30, 220]] and found.labels.tolist() == [1]


def test_streamed_detection_of_a_tiff_equals_in_memory_and_a_crop(tmp_path):
    rng = np.random.default_rng(1)
    squares = [
        (int(top), int(left), int(side), int(channel))
        for top, left, side, channel in zip(
            rng.integers(0, 1950, 60), rng.integers(0, 1950, 60), rng.integers(6, 40, 60), rng.integers(0, 2, 60)
        )
    ]
    image = scene(2000, 2000, squares)
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib")
    settings = dict(tile_size=256, overlap=64, merge=MergeSettings("nmm", "ios", 0.5))
    predictor = SlicedDetectionPredictor(SquareFinder(), NORM, **settings)
    predictor.block_size = 700  # several column chunks per band
    with open_image(path) as source:
        streamed = predictor.predict(source)
    in_memory = SlicedDetectionPredictor(SquareFinder(), NORM, **settings).predict(open_image(image))
    np.testing.assert_array_equal(streamed.boxes, in_memory.boxes)
    np.testing.assert_array_equal(streamed.labels, in_memory.labels)
    # a crop's detections are the image's inside it, shifted
    crop = Window(448, 640, 900, 1000)
    on_crop = SlicedDetectionPredictor(SquareFinder(), NORM, **settings).predict(open_image(image[crop.slices]))

    def inside(found: Detections, dx: int, dy: int) -> list:
        boxes = found.boxes - np.array([dx, dy, dx, dy])
        keep = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < crop.width) & (boxes[:, 3] < crop.height)
        return sorted(map(tuple, np.concatenate([boxes[keep], found.labels[keep, None]], axis=1).tolist()))

    expected = inside(streamed, crop.left, crop.top)
    assert len(expected) > 5 and inside(on_crop, 0, 0) == expected


def test_sliced_prediction_reads_bands_not_the_image(tmp_path):
    image = scene(3072, 3072, [(1000, 1000, 30, 0), (3000, 3000, 50, 1)])
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib")
    predictor = SlicedDetectionPredictor(SquareFinder(), NORM, tile_size=256, overlap=32, sub_batch=2)
    predictor.block_size = 1024
    with open_image(path) as source:
        tracemalloc.start()
        found = predictor.predict(source)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert sorted(found.boxes.tolist()) == [[1000, 1000, 1030, 1030], [3000, 3000, 3050, 3050]]
    # one chunk of a band (256 x ~1024 x 3 bytes) plus a few float tiles, not the 28 MB image
    assert peak < 6e6, peak


def test_whole_image_pass_scales_boxes_back_and_merges_into_sliced():
    image = scene(800, 400, [(400, 200, 200, 0)])  # a large object, cut by every 128-px tile
    whole = WholeImageDetectionPredictor(SquareFinder(), NORM, size=200)
    found = whole.predict(open_image(image))
    np.testing.assert_allclose(found.boxes, [[200, 400, 400, 600]], atol=4)
    model = SquareFinder()
    sliced = SlicedDetectionPredictor(
        model, NORM, tile_size=128, overlap=0, full_image_size=200, merge=MergeSettings("nms", "ios", 0.5)
    )
    merged = sliced.predict(open_image(image))
    # the tiles see parts touching their borders (score 0.55); the whole-image pass the whole object (0.8)
    assert len(merged) == 1
    np.testing.assert_allclose(merged.boxes, [[200, 400, 400, 600]], atol=4)
    assert (200, 200) in model.views


def test_max_detections_and_score_threshold():
    squares = [(10 + 40 * i, 10, 5 + i, 0) for i in range(8)]
    image = scene(400, 100, squares)
    few = SlicedDetectionPredictor(SquareFinder(), NORM, tile_size=128, overlap=32, max_detections=3)
    found = few.predict(open_image(image))
    assert len(found) == 3 and found.scores.tolist() == sorted(found.scores.tolist(), reverse=True)
    every = SlicedDetectionPredictor(  # max_detections defaults to 0: no cap
        SquareFinder(), NORM, tile_size=128, overlap=32, merge=MergeSettings("nms", "ios", 0.5)
    )
    assert every.max_detections == 0 and len(every.predict(open_image(image))) == 8
    with pytest.raises(ValueError, match="no cap"):
        SlicedDetectionPredictor(SquareFinder(), NORM, tile_size=128, overlap=32, max_detections=-1)
    strict = SlicedDetectionPredictor(SquareFinder(), NORM, tile_size=128, overlap=32, score_threshold=0.34)
    assert sorted(strict.predict(open_image(image)).boxes[:, 2] - 10) == [9, 10, 11, 12]  # areas above 80 px
    with pytest.raises(ValueError):
        SlicedDetectionPredictor(SquareFinder(), NORM, tile_size=128, overlap=128)
