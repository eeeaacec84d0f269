"""Boundary F1 and thin-structure recall: hand-computed cases, ignored pixels, and banded == whole image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import skeletonize

from gigaseg.geometry import Window
from gigaseg.metrics import DetailMetrics


def square_pair(shift: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 square of class 1 on class 0 (12x12), and the same square shifted by ``shift``."""
    target = np.zeros((12, 12), np.uint8)
    target[3:7, 3:7] = 1
    pred = np.zeros_like(target)
    pred[3 + shift[0] : 7 + shift[0], 3 + shift[1] : 7 + shift[1]] = 1
    return pred, target


# ---------------------------------------------------------------- boundary F1 by hand


def test_square_shifted_by_one_pixel():
    pred, target = square_pair((0, 1))
    # class 1's boundary is the square's 12-pixel ring; shifted right by 1 the rings share
    # their top and bottom rows except one pixel each: 6 of 12. Class 0's boundary is the
    # 16 pixels around the square; shifted, 3 + 3 of them coincide.
    exact = DetailMetrics(2, tolerance=0).update_image(pred, target)
    assert exact.counts["boundary"].tolist() == [16, 12]
    assert exact.counts["boundary_matched"].tolist() == [6, 6]
    np.testing.assert_allclose(exact.boundary_precision(), [6 / 16, 6 / 12])
    np.testing.assert_allclose(exact.boundary_recall(), [6 / 16, 6 / 12])
    np.testing.assert_allclose(exact.boundary_f1(), [0.375, 0.5])
    assert exact.mean_boundary_f1() == pytest.approx(0.4375)
    # every shifted boundary pixel has one of the target's at distance 1
    for tolerance in (1, 2):
        np.testing.assert_allclose(
            DetailMetrics(2, tolerance=tolerance).update_image(pred, target).boundary_f1(), [1, 1]
        )


def test_square_shifted_diagonally_needs_tolerance_2_at_its_far_corner():
    pred, target = square_pair((1, 1))
    # tolerance 0: the rings cross at 2 pixels (class 1: of 12; class 0: of 16)
    np.testing.assert_allclose(DetailMetrics(2, tolerance=0).update_image(pred, target).boundary_f1(), [2 / 16, 2 / 12])
    # tolerance 1: all but the far corners, at distance sqrt(2): class 0 misses (8, 7) and
    # (7, 8) (and the target's (2, 3), (3, 2)), class 1 misses (7, 7) (and the target's (3, 3))
    one = DetailMetrics(2, tolerance=1).update_image(pred, target)
    np.testing.assert_allclose(one.boundary_precision(), [14 / 16, 11 / 12])
    np.testing.assert_allclose(one.boundary_recall(), [14 / 16, 11 / 12])
    assert one.mean_boundary_f1() == pytest.approx((14 / 16 + 11 / 12) / 2)
    np.testing.assert_allclose(DetailMetrics(2, tolerance=2).update_image(pred, target).boundary_f1(), [1, 1])


def test_a_class_on_one_side_only_scores_0_and_an_absent_one_nan():
    target = np.zeros((6, 6), np.uint8)
    target[:, 3:] = 1
    pred = np.where(target == 1, 2, 0).astype(np.uint8)  # class 1 predicted as 2
    metrics = DetailMetrics(4).update_image(pred, target)
    f1 = metrics.boundary_f1()
    assert f1[0] == 1.0 and f1[1] == 0.0 and f1[2] == 0.0 and np.isnan(f1[3])
    assert np.isnan(metrics.boundary_precision()[1]) and np.isnan(metrics.boundary_recall()[2])
    assert metrics.mean_boundary_f1() == pytest.approx(1 / 3)
    assert metrics.mean_boundary_f1(exclude=[1, 2]) == 1.0


def test_ignored_pixels_are_neither_boundary_nor_scored():
    target = np.zeros((5, 9), np.uint8)
    target[:, 5:] = 1
    target[:, 4] = 255  # a column of unknown between the classes: no boundary there
    pred = target.copy()
    pred[:, 4] = 1
    metrics = DetailMetrics(2, ignore_index=255).update_image(pred, target)
    assert metrics.counts["boundary"].tolist() == [0, 0]
    assert metrics.counts["predicted_boundary"].tolist() == [0, 0]
    # whatever is predicted on the ignored column changes nothing
    for fill in (0, 1):
        pred[:, 4] = fill
        again = DetailMetrics(2, ignore_index=255).update_image(pred, target)
        assert all(np.array_equal(again.counts[k], metrics.counts[k]) for k in metrics.counts)
    # the image's edge is no boundary either: one class everywhere has none
    assert DetailMetrics(2).update_image(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)).counts[
        "boundary"
    ].tolist() == [0, 0]


# ---------------------------------------------------------------- thin-structure recall by hand


def test_a_one_pixel_line_half_covered_has_recall_one_half():
    target = np.zeros((9, 20), np.uint8)
    target[4, 2:12] = 1
    pred = np.zeros_like(target)
    pred[4, 2:7] = 1
    metrics = DetailMetrics(2).update_image(pred, target)
    assert metrics.counts["skeleton"][1] == 10 and metrics.counts["skeleton_covered"][1] == 5
    assert metrics.thin_recall()[1] == 0.5
    # a skeleton pixel that is ignored in the target does not exist
    target[4, 11] = 255
    assert DetailMetrics(2).update_image(pred, target).thin_recall()[1] == pytest.approx(5 / 9)


def test_thin_recall_skeletonises_structures_up_to_max_width():
    target = np.zeros((80, 80), np.uint8)
    target[10:15, 5:75] = 1  # a road 5 px wide
    target[30:70, 20:60] = 2  # a 40 x 40 field
    pred = np.zeros_like(target)
    pred[12, 5:40] = 1  # half of the road's centreline
    metrics = DetailMetrics(3, max_width=32).update_image(pred, target)
    road = skeletonize(target == 1)
    assert metrics.counts["skeleton"][1] == road.sum()  # the road is thin: its whole skeleton
    assert metrics.thin_recall()[1] == pytest.approx((road & (pred == 1)).sum() / road.sum())
    assert 0.45 < metrics.thin_recall()[1] < 0.55
    # the field is wider than max_width: only its corners, where no 33-px octagon reaches, count
    assert 0 < metrics.counts["skeleton"][2] <= 4 * 16
    # with max_width 48 the field is thin: its whole (Zhang) skeleton
    wide = DetailMetrics(3, max_width=48).update_image(pred, target)
    assert wide.counts["skeleton"][2] == skeletonize(target == 2).sum()
    assert DetailMetrics(3, thin_classes=[1]).update_image(pred, target).counts["skeleton"].tolist()[2] == 0


# ---------------------------------------------------------------- banded == whole


def random_masks(rng, shape, classes=4):
    """Blobs at several scales, lines up to 40 px wide, noise, and ignored patches."""
    fields = [ndimage.gaussian_filter(rng.random(shape), rng.uniform(2, 30)) for _ in range(classes - 1)]
    target = np.argmax(fields, axis=0).astype(np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(3):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(0, shape[0])
        distance = np.abs(np.cos(angle) * (yy - offset) + np.sin(angle) * (xx - shape[1] / 2))
        target[distance < rng.integers(1, 40) / 2] = classes - 1
    pred = target.copy()
    flips = ndimage.binary_dilation(rng.random(shape) < 0.03, iterations=2)
    pred[flips] = rng.integers(0, classes, int(flips.sum()))
    target[ndimage.gaussian_filter(rng.random(shape), 6) > 0.56] = 255
    return pred, target


def feed_bands(metrics: DetailMetrics, pred, target, band: int) -> DetailMetrics:
    height = target.shape[0]
    for top in range(0, height, band):
        rows = slice(top, min(height, top + band))
        metrics.update(Window(top, 0, rows.stop - top, target.shape[1]), pred[rows], target[rows], image_height=height)
    return metrics


@pytest.mark.parametrize("seed", range(4))
def test_banded_equals_whole_image(seed):
    rng = np.random.default_rng(seed)
    images = [random_masks(rng, (int(rng.integers(120, 260)), int(rng.integers(40, 160)))) for _ in range(2)]
    settings = [{"tolerance": 2}, {"tolerance": 0, "max_width": 8}, {"tolerance": 3, "thin_classes": ()}]
    for options in settings:
        whole = DetailMetrics(4, **options)
        for pred, target in images:
            whole.update_image(pred, target)
        assert whole.counts["boundary"].sum() > 0 and (not whole.thin_classes or whole.counts["skeleton"].sum() > 0)
        for band in (1, 3, 16, 37, 100, 1000):
            banded = DetailMetrics(4, **options)
            for pred, target in images:  # two images, one after the other
                feed_bands(banded, pred, target, band)
            assert not banded.in_progress
            for key, counts in whole.counts.items():
                np.testing.assert_array_equal(banded.counts[key], counts, err_msg=f"{options} band {band} {key}")


def test_bands_keep_only_a_halo_of_rows():
    metrics = DetailMetrics(3)
    assert metrics.halo == 5 * 16 + 8 and DetailMetrics(3, thin_classes=()).halo == 3
    pred, target = random_masks(np.random.default_rng(5), (400, 50), classes=3)
    for top in range(0, 300, 10):
        metrics.update(Window(top, 0, 10, 50), pred[top : top + 10], target[top : top + 10], image_height=400)
        assert len(metrics._image["pred"]) <= 3 * metrics.halo + 10


# ---------------------------------------------------------------- the accumulator


def test_summary_is_strict_json_and_merge_adds_counts():
    pred, target = square_pair((0, 1))
    metrics = DetailMetrics(3, tolerance=0).update_image(pred, target)
    summary = metrics.summary(class_names=["ground", "house", "road"], exclude=["ground"])
    json.dumps(summary, allow_nan=False)
    assert summary["per_class"]["house"]["boundary_f1"] == 0.5 and summary["per_class"]["road"]["boundary_f1"] is None
    assert summary["mean_boundary_f1"] == 0.5 and summary["excluded"] == ["ground"]
    assert summary["per_class"]["house"]["boundary_pixels"] == 12 and summary["tolerance"] == 0
    assert set(summary["per_class"]["house"]) == {
        "boundary_f1",
        "boundary_precision",
        "boundary_recall",
        "boundary_pixels",
        "predicted_boundary_pixels",
        "thin_recall",
        "skeleton_pixels",
    }
    other = DetailMetrics(3, tolerance=0).update_image(*square_pair((0, 0)))
    metrics.merge(other)
    assert metrics.counts["boundary_matched"].tolist() == [6 + 16, 6 + 12, 0]
    with pytest.raises(ValueError, match="cannot merge"):
        metrics.merge(DetailMetrics(3, tolerance=1))
    metrics.reset()
    assert metrics.counts["boundary"].sum() == 0 and np.isnan(metrics.mean_boundary_f1())


def test_bands_out_of_order_and_bad_ids_are_refused():
    metrics = DetailMetrics(2)
    band = np.zeros((4, 6), np.uint8)
    with pytest.raises(ValueError, match="first band must start at row 0"):
        metrics.update(Window(4, 0, 4, 6), band, band, image_height=8)
    metrics.update(Window(0, 0, 4, 6), band, band, image_height=8)
    with pytest.raises(ValueError, match="does not continue"):
        metrics.update(Window(5, 0, 3, 6), band[:3], band[:3], image_height=8)
    with pytest.raises(ValueError, match="still being fed"):
        metrics.summary()
    with pytest.raises(ValueError, match="outside 0..1"):
        metrics.update(Window(4, 0, 4, 6), band + 2, band, image_height=8)
    with pytest.raises(ValueError, match="not the ignore index"):
        metrics.update(Window(4, 0, 4, 6), band, band + 7, image_height=8)
    metrics.update(Window(4, 0, 4, 6), band, np.full_like(band, 255), image_height=8)
    assert not metrics.in_progress and metrics.summary()["mean_boundary_f1"] is None
