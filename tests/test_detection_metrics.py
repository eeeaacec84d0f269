"""DetectionEvaluator (pycocotools' COCOeval) against hand-computed AP values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gigaseg.detection_metrics import DetectionEvaluator, coco_boxes, max_detections_for
from gigaseg.geometry import Detections

# two 40x40 objects (COCO "medium": 32² <= area < 96²) of class 0 and one 10x10 ("small") of class 1
GT_BOXES = np.array([[10, 10, 50, 50], [100, 100, 140, 140], [200, 200, 210, 210]], np.float32)
GT_LABELS = np.array([0, 0, 1])


def found(boxes, scores, labels) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), np.array(labels))


def test_coco_boxes_are_x_y_width_height():
    np.testing.assert_array_equal(coco_boxes(np.array([[10, 20, 15, 40]])), [[10, 20, 5, 20]])


def test_ground_truth_as_detections_scores_one():
    evaluator = DetectionEvaluator(["car", "marker"])
    evaluator.add("a", 300, 300, GT_BOXES, GT_LABELS, found(GT_BOXES, [0.9, 0.8, 0.7], GT_LABELS))
    scores = evaluator.compute()
    for key in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AR100"):
        assert scores[key] == pytest.approx(1.0), key
    assert math.isnan(scores["AP_large"])  # no large object
    assert scores["AP_per_class"] == {"car": pytest.approx(1.0), "marker": pytest.approx(1.0)}
    assert (scores["images"], scores["objects"], scores["detections"]) == (1, 3, 3)


def test_one_of_two_objects_found_is_51_of_101_recall_points():
    # class "car" only: precision 1 up to recall 0.5 (recall points 0.00..0.50), 0 beyond
    evaluator = DetectionEvaluator(["car"])
    evaluator.add("a", 300, 300, GT_BOXES[:2], [0, 0], found(GT_BOXES[:1], [0.9], [0]))
    scores = evaluator.compute()
    assert scores["AP"] == pytest.approx(51 / 101)
    assert scores["AP50"] == pytest.approx(51 / 101)
    assert scores["AR100"] == pytest.approx(0.5)


def test_a_loose_box_counts_only_at_low_iou_thresholds():
    # IoU 0.62 with the object: matched at IoU 0.50, 0.55, 0.60 of the ten thresholds
    evaluator = DetectionEvaluator(["car"])
    evaluator.add("a", 300, 300, [[0, 0, 100, 100]], [0], found([[0, 0, 100, 62]], [0.9], [0]))
    scores = evaluator.compute()
    assert scores["AP50"] == pytest.approx(1.0)
    assert scores["AP75"] == pytest.approx(0.0)
    assert scores["AP"] == pytest.approx(0.3)


def test_a_false_positive_ranked_first_halves_precision_at_full_recall():
    # ranked: FP (0.9), TP (0.8): precision 0.5 at recall 1, interpolated back to every recall point
    evaluator = DetectionEvaluator(["car"])
    evaluator.add(
        "a", 300, 300, [[0, 0, 40, 40]], [0], found([[200, 200, 240, 240], [0, 0, 40, 40]], [0.9, 0.8], [0, 0])
    )
    assert evaluator.compute()["AP"] == pytest.approx(0.5)


def test_wrong_class_is_a_miss_and_classes_score_separately():
    evaluator = DetectionEvaluator(["car", "marker"])
    evaluator.add("a", 300, 300, GT_BOXES, GT_LABELS, found(GT_BOXES, [0.9, 0.8, 0.7], [0, 0, 0]))
    scores = evaluator.compute()
    assert scores["AP_per_class"]["car"] == pytest.approx(1.0)
    assert scores["AP_per_class"]["marker"] == pytest.approx(0.0)
    assert scores["AP"] == pytest.approx(0.5)  # mean over the two classes


def test_images_accumulate_and_nothing_found_scores_zero():
    evaluator = DetectionEvaluator(["car", "marker"])
    evaluator.add("a", 300, 300, GT_BOXES[:1], [0], found([], [], []))
    evaluator.add("b", 300, 300, [], [], found([], [], []))
    scores = evaluator.compute()
    assert scores["AP"] == 0.0 and scores["AP_medium"] == 0.0
    assert math.isnan(scores["AP_small"]) and math.isnan(scores["AP_per_class"]["marker"])
    assert scores["images"] == 2


def test_crowd_regions_neither_count_nor_penalise():
    evaluator = DetectionEvaluator(["car"])
    evaluator.add(
        "a", 300, 300, GT_BOXES[:2], [0, 0], found(GT_BOXES[:2], [0.9, 0.8], [0, 0]), gt_iscrowd=[False, True]
    )
    assert evaluator.compute()["AP"] == pytest.approx(1.0)


def test_max_detections_caps_what_is_scored():
    boxes = np.array([[i * 50, 0, i * 50 + 40, 40] for i in range(5)], np.float32)
    for cap, recall in ((3, 0.6), (100, 1.0)):
        evaluator = DetectionEvaluator(["car"], max_detections=cap)
        evaluator.add("a", 300, 300, boxes, [0] * 5, found(boxes, np.linspace(0.9, 0.5, 5), [0] * 5))
        assert evaluator.compute()["AR100"] == pytest.approx(recall)


def test_the_cap_follows_the_most_crowded_image():
    assert max_detections_for([3, 0]) == 100 and max_detections_for([]) == 100
    assert max_detections_for([3, 655, 12]) == 655  # a 4096-px synthetic scene holds about 655 objects


def test_no_ground_truth_is_nan_and_bad_input_is_refused():
    evaluator = DetectionEvaluator(["car"])
    assert math.isnan(evaluator.compute()["AP"])
    evaluator.add("a", 10, 10, [], [], found([], [], []))
    with pytest.raises(ValueError, match="twice"):
        evaluator.add("a", 10, 10, [], [], found([], [], []))
    with pytest.raises(ValueError, match="outside"):
        evaluator.add("b", 10, 10, [[0, 0, 1, 1]], [3], found([], [], []))
    with pytest.raises(ValueError):
        DetectionEvaluator([])


def test_values_equal_cocoeval_summarize_at_coco_settings():
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    evaluator = DetectionEvaluator(["a", "b", "c"])
    for image in range(4):
        xy = rng.uniform(0, 400, (12, 2))
        truth = np.concatenate([xy, xy + rng.uniform(4, 120, (12, 2))], axis=1)
        labels = rng.integers(0, 3, 12)
        noisy = truth + rng.normal(0, 4, truth.shape)
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        guess = np.where(rng.random(12) < 0.8, labels, (labels + 1) % 3)
        evaluator.add(f"i{image}", 600, 600, truth, labels, found(noisy, rng.random(12), guess))
    ours = evaluator.compute()
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {
            "images": evaluator._images,
            "annotations": evaluator._truth,
            "categories": [{"id": i + 1} for i in range(3)],
        }
        truth.createIndex()
        reference = COCOeval(truth, truth.loadRes(evaluator._found), iouType="bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    from gigaseg.detection_metrics import COCO_KEYS

    for key, value in zip(COCO_KEYS, reference.stats):
        assert (math.isnan(ours[key]) and value == -1) or ours[key] == pytest.approx(value), key
    assert 0.1 < ours["AP"] < 0.9
