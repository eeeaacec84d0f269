"""Detection training views: boxes clipped, scaled and flipped with the pixels; crops around objects; collate."""

import numpy as np
import pytest
import torch

from gigaseg.geometry import Window
from gigaseg.io.normalize import Normalization
from gigaseg.training.detection_views import (
    RandomDetectionCrops,
    WholeImageDetections,
    clip_boxes,
    collate_detections,
    flip_boxes,
    training_boxes,
)
from gigaseg.training.views import rng_for

from .squares import Squares

NORM = Normalization.for_image(3, np.uint8)


def test_clip_boxes_by_hand():
    boxes = np.array([[10, 10, 20, 20], [25, 0, 45, 10], [38, 5, 48, 15], [0, 0, 5, 5]], np.float32)
    labels = np.array([0, 1, 2, 3])
    window = Window(top=0, left=20, height=30, width=20)  # x in [20, 40), y in [0, 30)
    out, kept = clip_boxes(boxes, labels, window, min_visible=0.5)
    # box 0: nothing inside; box 1: whole box, shifted; box 2: 2/10 of its width inside (dropped); box 3 outside
    assert kept.tolist() == [1]
    assert out.tolist() == [[5, 0, 20, 10]]
    out, kept = clip_boxes(boxes, labels, window, min_visible=0.1)
    assert kept.tolist() == [1, 2] and out[1].tolist() == [18, 5, 20, 15]
    out, kept = clip_boxes(boxes, labels, window, min_visible=0.1, min_side=3)  # 2 px wide after clipping
    assert kept.tolist() == [1]
    assert clip_boxes(np.zeros((0, 4)), np.zeros(0), window)[0].shape == (0, 4)


def test_flip_boxes_by_hand():
    boxes = np.array([[2, 3, 5, 9]], np.float32)
    assert flip_boxes(boxes, 10, 20, True, False).tolist() == [[5, 3, 8, 9]]
    assert flip_boxes(boxes, 10, 20, False, True).tolist() == [[2, 11, 5, 17]]
    assert flip_boxes(flip_boxes(boxes, 10, 20, True, True), 10, 20, True, True).tolist() == boxes.tolist()


def bright_box(image: torch.Tensor, box) -> float:
    """Mean of the view's pixels inside ``box`` (normalised units), for checking boxes follow the pixels."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return float(image[:, y0:y1, x0:x1].max(0).values.mean())


def test_whole_image_views_scale_boxes_and_flip_them_with_the_pixels():
    data = Squares(count=3, size=96)
    views = WholeImageDetections(data, NORM, 48, seed=1)
    background = float(torch.from_numpy(NORM.apply(np.full((1, 1, 3), 20, np.uint8))).max())
    flipped_any = False
    for epoch in range(3):
        views.set_epoch(epoch)
        for i in range(len(data)):
            item = views[i]
            assert item["image"].shape == (3, 48, 48)
            scaled = data[i].boxes / 2
            assert item["boxes"].shape == scaled.shape and item["labels"].tolist() == data[i].labels.tolist()
            flipped_any |= not np.allclose(item["boxes"].numpy(), scaled)
            for box in item["boxes"]:  # the boxes still cover the bright squares
                assert bright_box(item["image"], box) > background + 1.0
    assert flipped_any
    views.set_epoch(1)
    assert (
        torch.equal(views[2]["image"], views[2]["image"]) and views[2]["boxes"].tolist() == views[2]["boxes"].tolist()
    )


def test_whole_image_views_keep_the_aspect_and_pad():
    data = Squares(count=1, size=96)
    sample = data[0]
    sample.pixels = sample.pixels[:48]  # a 96 x 48 image (w x h)
    sample.height = 48
    sample.boxes = np.array([[10, 10, 30, 30]], np.float32)
    sample.labels = np.array([1])
    item = WholeImageDetections(data, NORM, 64, augment=False)[0]
    assert item["image"].shape == (3, 64, 64)
    assert item["boxes"][0].tolist() == pytest.approx([10 * 2 / 3, 10 * 2 / 3, 20, 20])
    assert torch.all(item["image"][:, 32:] == 0)  # padded with the normalised zero below the 64 x 32 view


def test_random_crops_hold_objects_and_their_clipped_boxes():
    data = Squares(count=4, size=96)
    crops = RandomDetectionCrops(data, NORM, 40, crops_per_image=8, seed=0, object_share=1.0, augment=False)
    assert len(crops) == 32
    with_objects = 0
    for index in range(len(crops)):
        item = crops[index]
        assert item["image"].shape == (3, 40, 40)
        boxes = item["boxes"].numpy()
        assert (boxes >= 0).all() and (boxes <= 40).all()
        with_objects += len(boxes) > 0
        sample = data[index // 8]
        window = crops.window(sample, rng_for(0, 0, index))
        expected, labels = clip_boxes(sample.boxes, sample.labels, window, 0.5, 2.0)
        assert boxes.tolist() == expected.tolist() and item["labels"].tolist() == labels.tolist()
        # the crop's pixels are the image's
        pixels = sample.pixels[window.top : window.bottom, window.left : window.right]
        assert torch.allclose(item["image"], torch.from_numpy(NORM.apply(pixels)))
    assert with_objects == 32  # every crop was placed around an object


def test_crops_larger_than_the_image_are_padded_and_collated():
    data = Squares(count=2, size=32, side=(6, 8))
    crops = RandomDetectionCrops(data, NORM, 48, crops_per_image=2, seed=3)
    batch = collate_detections([crops[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 48, 48)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert [len(t["boxes"]) for t in batch["targets"]] == [len(t["labels"]) for t in batch["targets"]]
    assert batch["targets"][0]["boxes"].dtype == torch.float32 and batch["targets"][0]["labels"].dtype == torch.int64
    assert torch.all(batch["image"][:, :, 32:] == 0)
    assert crops.collate is collate_detections


def test_crowd_regions_are_not_trained_on():
    data = Squares(count=1, size=96)
    sample = data[0]
    sample.boxes = np.array([[10, 10, 30, 30], [50, 50, 70, 70]], np.float32)
    sample.labels = np.array([0, 1])
    sample.iscrowd = np.array([0, 1])
    assert training_boxes(sample)[1].tolist() == [0]
    assert WholeImageDetections(data, NORM, 96, augment=False)[0]["boxes"].tolist() == [[10, 10, 30, 30]]
    crops = RandomDetectionCrops(data, NORM, 96, augment=False)
    assert crops[0]["labels"].tolist() == [0]
