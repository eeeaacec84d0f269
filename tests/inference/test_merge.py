"""merge_detections on hand-computed cases: NMS and greedy merging, IoU and IoS, classes."""

from __future__ import annotations

import numpy as np
import pytest

from gigaseg.errors import ConfigError
from gigaseg.geometry import Detections
from gigaseg.inference.merge import MergeSettings, match_scores, merge_detections


def dets(boxes, scores, labels=None) -> Detections:
    return Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(labels or [0] * len(scores)))


# a whole object (0..40) and the part of it a tile border at x=30 leaves in the left tile
WHOLE = [0, 0, 40, 20]
CUT = [0, 0, 30, 20]
FAR = [100, 100, 120, 120]


def test_match_scores_by_hand():
    # IoU of CUT and WHOLE: 600 / 800; IoS: 600 / 600
    assert match_scores(np.array(CUT), np.array([WHOLE, FAR]), "iou") == pytest.approx([0.75, 0.0])
    assert match_scores(np.array(CUT), np.array([WHOLE, FAR]), "ios") == pytest.approx([1.0, 0.0])
    # half-overlapping squares: intersection 50, union 150
    assert match_scores(np.array([0, 0, 10, 10]), np.array([[5, 0, 15, 10]]), "iou") == pytest.approx([1 / 3])
    # a degenerate box matches nothing
    assert match_scores(np.array([0, 0, 0, 0]), np.array([[0, 0, 0, 0]]), "iou") == pytest.approx([0.0])


def test_nms_keeps_the_best_of_each_group():
    found = merge_detections(dets([CUT, WHOLE, FAR], [0.6, 0.9, 0.5]), MergeSettings("nms", "iou", 0.5))
    np.testing.assert_array_equal(found.boxes, [WHOLE, FAR])
    np.testing.assert_allclose(found.scores, [0.9, 0.5])


def test_a_threshold_above_the_overlap_keeps_both():
    found = merge_detections(dets([CUT, WHOLE], [0.6, 0.9]), MergeSettings("nms", "iou", 0.8))
    assert len(found) == 2
    found = merge_detections(dets([CUT, WHOLE], [0.6, 0.9]), MergeSettings("nms", "ios", 0.8))
    assert len(found) == 1


def test_greedy_merging_grows_the_best_box_to_the_union():
    # the cut box scores higher (it was found with more context, say): NMS would keep the cut box,
    # merging keeps its score and grows it to the whole object
    merged = merge_detections(dets([CUT, WHOLE], [0.9, 0.6]), MergeSettings("nmm", "ios", 0.5))
    np.testing.assert_array_equal(merged.boxes, [WHOLE])
    np.testing.assert_allclose(merged.scores, [0.9])
    kept = merge_detections(dets([CUT, WHOLE], [0.9, 0.6]), MergeSettings("nms", "ios", 0.5))
    np.testing.assert_array_equal(kept.boxes, [CUT])


def test_greedy_matches_against_the_kept_box_not_the_growing_union():
    # B matches A (IoU 0.6); C matches the union A+B but not A itself: C stays separate (SAHI's greedy NMM)
    a, b, c = [0, 0, 10, 10], [0, 0, 10, 6], [0, 9, 10, 19]
    merged = merge_detections(dets([a, b, c], [0.9, 0.8, 0.7]), MergeSettings("nmm", "iou", 0.5))
    np.testing.assert_array_equal(merged.boxes, [a, c])


def test_classes_are_merged_separately_unless_agnostic():
    boxes, scores, labels = [WHOLE, WHOLE], [0.9, 0.8], [0, 1]
    for method, metric in (("nms", "iou"), ("nms", "ios"), ("nmm", "iou")):
        aware = merge_detections(dets(boxes, scores, labels), MergeSettings(method, metric, 0.5))
        assert sorted(aware.labels.tolist()) == [0, 1]
        agnostic = merge_detections(dets(boxes, scores, labels), MergeSettings(method, metric, 0.5, True))
        assert agnostic.labels.tolist() == [0] and agnostic.scores.tolist() == pytest.approx([0.9])


def test_output_is_best_first_and_empty_stays_empty():
    boxes = [[0, 0, 5, 5], [50, 50, 60, 60], [20, 20, 30, 30]]
    for method in ("nms", "nmm"):
        found = merge_detections(dets(boxes, [0.2, 0.7, 0.5], [1, 0, 1]), MergeSettings(method, "ios", 0.5))
        assert found.scores.tolist() == pytest.approx([0.7, 0.5, 0.2])
        assert found.labels.tolist() == [0, 1, 1]
    assert len(merge_detections(dets([], []))) == 0


@pytest.mark.parametrize(
    "options", [{"method": "soft"}, {"metric": "giou"}, {"threshold": 1.0}, {"threshold": -0.1}, {"threshold": "x"}]
)
def test_bad_settings_are_config_errors(options):
    with pytest.raises(ConfigError):
        MergeSettings(**options)


def _all_pairs(found: Detections, settings: MergeSettings) -> Detections:
    """The greedy walk comparing each kept box with every box left (the reference for the windowed walk)."""
    order = np.argsort(-found.scores, kind="stable")
    boxes = found.boxes[order].astype(np.float64)
    left = np.ones(len(order), dtype=bool)
    kept = []
    for i in range(len(order)):
        if not left[i]:
            continue
        left[i] = False
        same = left & ((found.labels[order] == found.labels[order[i]]) | settings.class_agnostic)
        rest = np.flatnonzero(same)
        matched = rest[match_scores(boxes[i], boxes[rest], settings.metric) > settings.threshold]
        left[matched] = False
        group = boxes[np.concatenate([[i], matched])] if settings.method == "nmm" else boxes[[i]]
        kept.append((*group[:, :2].min(0), *group[:, 2:].max(0), found.scores[order[i]], found.labels[order[i]]))
    kept.sort(key=lambda row: -row[4])
    return Detections(
        np.array([row[:4] for row in kept], np.float32),
        np.array([row[4] for row in kept], np.float32),
        np.array([row[5] for row in kept], np.int64),
    )


@pytest.mark.parametrize("method,metric,agnostic", [("nmm", "ios", False), ("nmm", "iou", True), ("nms", "ios", True)])
def test_the_windowed_walk_equals_comparing_every_pair(method, metric, agnostic):
    # clusters of boxes of very different widths (a wide one among small ones), as tiles and a whole-image pass give
    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 2000, (60, 2)).repeat(5, axis=0) + rng.normal(0, 6, (300, 2))
    sizes = rng.uniform(4, 60, (300, 2))
    sizes[::37] *= 8
    found = dets(
        np.concatenate([centres, centres + sizes], 1), rng.permutation(300) / 300, list(rng.integers(0, 3, 300))
    )
    settings = MergeSettings(method, metric, 0.3, agnostic)
    merged, reference = merge_detections(found, settings), _all_pairs(found, settings)
    assert 60 <= len(merged) < 300  # groups were merged
    np.testing.assert_array_equal(merged.boxes, reference.boxes)
    np.testing.assert_array_equal(merged.scores, reference.scores)
    np.testing.assert_array_equal(merged.labels, reference.labels)
