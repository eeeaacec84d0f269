"""default_palette, colorize and rgb_to_index on hand-made arrays."""

import numpy as np
import pytest

from gigaseg.io.palette import colorize, default_palette, rgb_to_index

PALETTE = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)


def test_default_palette_fixed_start_distinct_and_not_black():
    assert default_palette(0).shape == (0, 3)
    first = default_palette(3)
    assert first.dtype == np.uint8
    assert first.tolist() == [[31, 119, 180], [255, 127, 14], [44, 160, 44]]
    big = default_palette(300)
    assert big.shape == (300, 3)
    np.testing.assert_array_equal(big[:3], first)  # a longer palette starts the same way
    assert len({tuple(c) for c in big.tolist()}) == 300
    assert [0, 0, 0] not in big.tolist()
    np.testing.assert_array_equal(default_palette(300), big)  # deterministic
    with pytest.raises(ValueError):
        default_palette(-1)


def test_colorize_hand_made():
    labels = np.array([[0, 1, 255], [2, 0, 1]], dtype=np.uint8)
    out = colorize(labels, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out.tolist() == [
        [[10, 20, 30], [40, 50, 60], [0, 0, 0]],
        [[70, 80, 90], [10, 20, 30], [40, 50, 60]],
    ]
    out = colorize(labels.astype(np.int64), PALETTE, ignore_color=(1, 2, 3))
    assert out[0, 2].tolist() == [1, 2, 3]
    assert out[1, 0].tolist() == [70, 80, 90]


def test_colorize_label_without_colour_is_an_error():
    with pytest.raises(ValueError, match=r"labels \[3, 7\] have no colour"):
        colorize(np.array([[0, 3], [7, 255]], np.uint8), PALETTE)
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.array([[255]], np.uint8), PALETTE, ignore_index=None)
    with pytest.raises(ValueError, match="negative"):
        colorize(np.array([[-1]], np.int32), PALETTE)


def test_rgb_to_index_hand_made_with_unknown_colours():
    rgb = np.array(
        [[[70, 80, 90], [10, 20, 30], [1, 2, 3]], [[40, 50, 60], [40, 50, 61], [70, 80, 90]]], dtype=np.uint8
    )
    labels, unknown = rgb_to_index(rgb, PALETTE)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[2, 0, 255], [1, 255, 2]]
    assert unknown.tolist() == [[False, False, True], [False, True, False]]
    labels, _ = rgb_to_index(rgb, PALETTE, unknown_value=9)
    assert labels[0, 2] == 9 and labels[1, 1] == 9


def test_rgb_to_index_inverts_colorize_for_unsorted_palette():
    palette = np.array([[200, 0, 0], [0, 0, 5], [0, 200, 0], [0, 0, 0]], dtype=np.uint8)  # not sorted by colour
    labels = np.random.default_rng(0).integers(0, 4, size=(31, 17)).astype(np.uint8)
    back, unknown = rgb_to_index(colorize(labels, palette), palette)
    np.testing.assert_array_equal(back, labels)
    assert not unknown.any()


def test_rgb_to_index_rejects_ambiguous_palette_and_bad_input():
    with pytest.raises(ValueError, match="twice"):
        rgb_to_index(np.zeros((2, 2, 3), np.uint8), [[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_index(np.zeros((2, 2, 3), np.float32), PALETTE)
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_index(np.zeros((2, 2), np.uint8), PALETTE)
