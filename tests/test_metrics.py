"""Streaming confusion matrix against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gigaseg.metrics import ConfusionMatrix

# 12 pixels, the last two ignored (255):
TARGET = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 255, 255])
PRED = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1, 0, 2])
# rows = target, cols = prediction:
#   t=0: predicted 0,0,1,2 -> [2, 1, 1]
#   t=1: predicted 1,1,0   -> [1, 2, 0]
#   t=2: predicted 2,2,1   -> [0, 1, 2]
MATRIX = [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
# support (row sums) [4, 3, 3], predicted (col sums) [3, 4, 3], tp [2, 2, 2]
# IoU = tp / (support + predicted - tp): 2/5, 2/5, 2/4
IOU = [0.4, 0.4, 0.5]


def filled() -> ConfusionMatrix:
    return ConfusionMatrix(3).update(PRED, TARGET)


def test_matrix_and_scores_by_hand():
    cm = filled()
    assert cm.matrix.dtype == np.int64
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    np.testing.assert_allclose(cm.iou(), IOU)
    assert cm.miou() == pytest.approx((0.4 + 0.4 + 0.5) / 3)
    assert cm.miou(exclude=[0]) == pytest.approx((0.4 + 0.5) / 2)
    np.testing.assert_allclose(cm.f1(), [4 / 7, 4 / 7, 4 / 6])  # 2tp / (support + predicted)
    np.testing.assert_allclose(cm.dice(), cm.f1())
    np.testing.assert_allclose(cm.precision(), [2 / 3, 2 / 4, 2 / 3])
    np.testing.assert_allclose(cm.recall(), [2 / 4, 2 / 3, 2 / 3])
    assert cm.pixel_accuracy() == pytest.approx(6 / 10)
    assert cm.balanced_accuracy() == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert cm.mean_f1(exclude=[2]) == pytest.approx(4 / 7)


def test_absent_classes_are_nan_and_skipped_in_means():
    # class 3 absent from both, class 2 only predicted (IoU 0 counts), class 0 only in target
    cm = ConfusionMatrix(4).update(np.array([1, 1, 2, 1]), np.array([0, 1, 1, 1]))
    # matrix: t=0 -> p=1; t=1 -> p=1,2,1
    iou = cm.iou()
    assert iou[0] == 0 and iou[1] == pytest.approx(2 / 4) and iou[2] == 0 and math.isnan(iou[3])
    assert cm.miou() == pytest.approx((0 + 0.5 + 0) / 3)
    assert math.isnan(cm.precision()[0]) and math.isnan(cm.recall()[2])
    assert cm.balanced_accuracy() == pytest.approx((0 + 2 / 3) / 2)  # recall over classes in target
    empty = ConfusionMatrix(2)
    assert math.isnan(empty.miou()) and math.isnan(empty.pixel_accuracy())
    assert math.isnan(filled().miou(exclude=[0, 1, 2]))


def test_ignore_index_and_bad_ids():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(np.array([2, 2]), np.array([255, 255]))
    assert cm.matrix.sum() == 0
    with pytest.raises(ValueError, match=r"\[7\]"):
        cm.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        cm.update(np.array([-1, 3, 0]), np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="dtype"):
        cm.update(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="size"):
        cm.update(np.array([0, 1, 1]), np.array([0, 1]))
    assert cm.matrix.sum() == 0  # failed updates count nothing
    # ignore_index=None counts everything; 255 is then an invalid target
    with pytest.raises(ValueError, match="255"):
        ConfusionMatrix(3, ignore_index=None).update(PRED, TARGET)
    # an ignore index inside the class range drops that class from the target
    zero = ConfusionMatrix(3, ignore_index=0).update(PRED[:10], TARGET[:10])
    np.testing.assert_array_equal(zero.matrix, [[0, 0, 0], [1, 2, 0], [0, 1, 2]])


def test_tiles_of_any_shape_torch_and_merge():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(2, 64, 48))
    target[:, :3] = 255
    pred = rng.integers(0, 5, size=(2, 64, 48))
    whole = ConfusionMatrix(5).update(pred, target)

    tiled = ConfusionMatrix(5)
    for rows in (slice(0, 20), slice(20, 64)):
        tiled.update(torch.from_numpy(pred[:, rows]), torch.from_numpy(target[:, rows]).to(torch.uint8))
    np.testing.assert_array_equal(tiled.matrix, whole.matrix)

    a = ConfusionMatrix(5).update(pred[0], target[0])
    b = ConfusionMatrix(5).update(pred[1], target[1])
    concat = ConfusionMatrix(5).update(np.concatenate([pred[0], pred[1]]), np.concatenate([target[0], target[1]]))
    np.testing.assert_array_equal(a.merge(b).matrix, concat.matrix)
    np.testing.assert_array_equal(a.matrix, whole.matrix)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))

    # reference count by loops
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(whole.matrix, expected)

    whole.reset()
    assert whole.matrix.sum() == 0
    whole.matrix[...] = expected  # .matrix is the live counts: writing replaces them
    assert whole.miou() == pytest.approx(tiled.miou())


class FakeFabric:
    """Two processes whose other rank counted exactly the same."""

    world_size = 2
    device = torch.device("cpu")

    def all_reduce(self, tensor, reduce_op):
        assert reduce_op == "sum" and tensor.dtype == torch.int64
        return tensor * 2


def test_all_reduce():
    cm = filled()
    assert cm.all_reduce(None) is cm
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    cm.all_reduce(FakeFabric())
    np.testing.assert_array_equal(cm.matrix, 2 * np.array(MATRIX))
    np.testing.assert_allclose(cm.iou(), IOU)  # ratios unchanged


def test_bool_masks():
    cm = ConfusionMatrix(2).update(torch.tensor([True, False, True]), np.array([1, 0, 0]))
    np.testing.assert_array_equal(cm.matrix, [[1, 1], [0, 1]])


def test_binary_metrics_by_hand():
    target = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    # tp=3 (first three), fn=1 (4th), fp=1 (5th), tn=5
    m = ConfusionMatrix(2).update(pred, target).binary_metrics()
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(6 / 8)
    assert m["iou"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["lr_positive"] == pytest.approx((3 / 4) / (1 / 6))  # 4.5
    assert m["lr_negative"] == pytest.approx((1 / 4) / (5 / 6))  # 0.3
    # positive=0 swaps the roles
    m0 = ConfusionMatrix(2).update(pred, target).binary_metrics(positive=0)
    assert m0["sensitivity"] == pytest.approx(5 / 6) and m0["specificity"] == pytest.approx(3 / 4)


def test_binary_metrics_degenerate_denominators():
    # no false positives: specificity 1 -> LR+ = sens / 0 = inf; LR- = 0.5 / 1
    m = ConfusionMatrix(2).update(np.array([1, 0, 0]), np.array([1, 1, 0])).binary_metrics()
    assert m["specificity"] == 1 and math.isinf(m["lr_positive"]) and m["lr_negative"] == pytest.approx(0.5)
    # perfect prediction: LR+ inf, LR- = 0 / 1 = 0
    m = ConfusionMatrix(2).update(np.array([1, 0]), np.array([1, 0])).binary_metrics()
    assert math.isinf(m["lr_positive"]) and m["lr_negative"] == 0
    # no positives in the target: sensitivity NaN -> LR+ and LR- NaN
    m = ConfusionMatrix(2).update(np.array([1, 0]), np.array([0, 0])).binary_metrics()
    assert math.isnan(m["sensitivity"]) and math.isnan(m["lr_positive"]) and math.isnan(m["lr_negative"])
    # all wrong on positives and no negatives predicted: sens 0, spec 0 -> LR+ 0 / 1 = 0, LR- 1 / 0 = inf
    m = ConfusionMatrix(2).update(np.array([0, 1]), np.array([1, 0])).binary_metrics()
    assert m["lr_positive"] == 0 and math.isinf(m["lr_negative"])
    # one-vs-rest on a 3-class matrix
    m = filled().binary_metrics(positive=2)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 6)


def test_summary_is_strict_json():
    cm = ConfusionMatrix(4).update(PRED, TARGET)  # class 3 absent -> NaN entries
    s = cm.summary(class_names=["unknown", "urban", "water", "forest"], exclude=["unknown"])
    text = json.dumps(s, allow_nan=False)
    back = json.loads(text)
    assert back["miou"] == pytest.approx((0.4 + 0.5) / 2)
    assert back["excluded"] == ["unknown"]
    assert back["per_class"]["water"]["iou"] == pytest.approx(0.5)
    assert back["per_class"]["forest"]["iou"] is None
    assert back["per_class"]["unknown"]["support"] == 4
    assert back["counted"] == 10 and back["pixel_accuracy"] == pytest.approx(0.6)
    assert back["matrix"][0] == [2, 1, 1, 0]
    assert ConfusionMatrix(3).update(PRED, TARGET).summary(exclude=[0])["miou"] == pytest.approx(0.45)
    with pytest.raises(ValueError):
        cm.summary(exclude=["unknown"])  # names need class_names
    with pytest.raises(ValueError):
        cm.summary(class_names=["a", "b"])
