"""Resampling: exact against brute-force references, streamed bands equal one pass."""

import numpy as np
import pytest

from gigaseg.geometry import Window
from gigaseg.io.resample import axis_plan, band_edges, choose_level, level_box, resample_box, resize


def area_matrix(n_in, start, stop, n_out):
    """Reference box filter: exact overlap of each output pixel with each source pixel."""
    m = np.zeros((n_out, n_in))
    s = (stop - start) / n_out
    for i in range(n_out):
        a, b = start + i * s, start + (i + 1) * s
        for j in range(n_in):
            m[i, j] = max(0.0, min(b, j + 1) - max(a, j)) / (b - a)
    return m


def bilinear_matrix(n_in, start, stop, n_out):
    m = np.zeros((n_out, n_in))
    s = (stop - start) / n_out
    for i in range(n_out):
        c = min(max(start + (i + 0.5) * s - 0.5, 0), n_in - 1)
        j0 = int(np.floor(c))
        f = c - j0
        m[i, j0] += 1 - f
        m[i, min(j0 + 1, n_in - 1)] += f
    return m


def apply(my, a, mx):
    return np.einsum("ij,jkc,lk->ilc", my, a, mx)


SIZES = [(37, 53, 5, 7), (40, 40, 20, 20), (10, 13, 23, 29), (100, 7, 3, 7), (50, 60, 1, 1), (5, 200, 5, 3)]


@pytest.mark.parametrize("h,w,oh,ow", SIZES)
@pytest.mark.parametrize("method,matrix", [("area", area_matrix), ("bilinear", bilinear_matrix)])
def test_matches_reference_whether_banded_or_not(h, w, oh, ow, method, matrix):
    a = np.random.default_rng(0).random((h, w, 3))
    expected = apply(matrix(h, 0, h, oh), a, matrix(w, 0, w, ow))
    for band_bytes in (None, w * 3 * 8 * 3, 1):  # one pass, 3-row bands, 1-row bands
        got = resize(a, (oh, ow), method, band_bytes=band_bytes)
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_fractional_box_area_is_exact():
    a = np.random.default_rng(1).random((37, 53, 2))
    box = (0.5, 1.25, 36.7, 50.25)
    expected = apply(area_matrix(37, box[0], box[2], 6), a, area_matrix(53, box[1], box[3], 9))
    got = resample_box(
        lambda top, bottom, left, right: a[top:bottom, left:right],
        (37, 53),
        box,
        (6, 9),
        "area",
        2,
        a.dtype,
        band_bytes=53 * 2 * 8 * 4,
    )
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_area_integer_factor_is_block_mean_and_keeps_dtype():
    u = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    got = resize(u, (16, 24), "area")
    assert got.dtype == np.uint8
    expected = u.reshape(16, 4, 24, 4, 3).mean(axis=(1, 3))
    assert np.abs(got - expected).max() <= 0.5


def test_integer_output_is_rounded_and_clipped():
    u = np.array([[0, 65535], [65535, 65535]], dtype=np.uint16)
    got = resize(u, (1, 1), "area")
    assert got.dtype == np.uint16 and got.shape == (1, 1)
    assert got[0, 0] == round(3 * 65535 / 4)
    up = resize(np.array([[0, 255]], dtype=np.uint8), (1, 7), "bilinear")
    assert up.min() >= 0 and up.max() <= 255 and up.dtype == np.uint8


def test_float_dtype_kept():
    f = np.random.default_rng(3).random((30, 30)).astype(np.float32)
    got = resize(f, (7, 11), "bilinear")
    assert got.dtype == np.float32 and got.shape == (7, 11)


@pytest.mark.parametrize("out", [(7, 9), (40, 50), (13, 13)])
def test_nearest_returns_only_existing_labels(out):
    labels = np.random.default_rng(4).choice(np.array([0, 3, 17, 200], dtype=np.uint8), size=(29, 31))
    got = resize(labels, out, "nearest", band_bytes=31)
    assert got.dtype == np.uint8 and got.shape == out
    assert set(np.unique(got)) <= {0, 3, 17, 200}


def test_nearest_identity_and_integer_subsample():
    a = np.arange(64, dtype=np.int32).reshape(8, 8)
    np.testing.assert_array_equal(resize(a, (8, 8), "nearest"), a)
    np.testing.assert_array_equal(resize(a, (4, 4), "nearest"), a[1::2, 1::2])


def test_resize_returns_a_copy_for_identity():
    a = np.zeros((4, 4), np.uint8)
    out = resize(a, (4, 4), "area")
    assert not np.shares_memory(out, a)


def test_unknown_resampling_rejected():
    with pytest.raises(ValueError, match="unknown resampling"):
        resize(np.zeros((4, 4)), (2, 2), "cubic")
    with pytest.raises(ValueError):
        resize(np.zeros((4, 4)), (0, 2), "area")


def test_axis_plan_reads_only_the_span():
    plan = axis_plan(10.5, 20.25, 3, 100, "area")
    assert (plan.lo, plan.hi) == (10, 21)
    np.testing.assert_allclose(plan.weight.sum(axis=1), 1.0)


def test_band_edges_align_to_chunks():
    assert band_edges(100, 1000, 300, 256) == [(100, 256), (256, 512), (512, 768), (768, 1000)]
    assert band_edges(0, 1000, 600, 256) == [(0, 512), (512, 1000)]
    assert band_edges(0, 10, 1, 1) == [(i, i + 1) for i in range(10)]


def test_choose_level_picks_coarsest_sufficient_level():
    levels = [(8000, 6000), (4000, 3000), (2000, 1500), (1000, 750)]
    full = Window(0, 0, 8000, 6000)
    assert choose_level(levels, full, (1024, 768)) == 2  # level 3 (1000 px) is too coarse
    assert choose_level(levels, full, (1000, 750)) == 3
    assert choose_level(levels, full, (8000, 6000)) == 0
    assert choose_level(levels, Window(0, 0, 1024, 1024), (512, 512)) == 1
    assert choose_level(levels, Window(0, 0, 1024, 1024), (256, 256)) == 2
    # rounded level sizes (20001 -> 10000) are still used
    assert choose_level([(20001, 20001), (10000, 10000)], Window(0, 0, 20001, 20001), (10001, 10001)) == 1


def test_level_box_maps_window():
    assert level_box(Window(100, 200, 400, 800), (1000, 2000), (500, 1000)) == (50, 100, 250, 500)


def test_area_enlarging_a_window_inside_the_image():
    """Zero-weight taps past the window must not index outside the decoded block."""
    from gigaseg.geometry import Window
    from gigaseg.io.array import ArraySource

    image = np.arange(96 * 96, dtype=np.uint16).reshape(96, 96, 1) % 251
    out = ArraySource(image).read(Window(0, 0, 24, 24), out_size=(32, 32), resample="area")
    assert out.shape == (32, 32, 1)
    # enlarging by 4/3 with area weights: the first output pixel is the first source pixel
    assert out[0, 0, 0] == image[0, 0, 0]
    assert out.max() <= image[:24, :24].max() and out.min() >= image[:24, :24].min()
