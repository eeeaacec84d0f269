"""Tiling geometry: 1-D grids, PatchGrid, coordinate maps, crop/paste, blending."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gigaseg.geometry import (
    PasteAverager,
    PatchGrid,
    Window,
    blend_weights,
    box_on_grid,
    ceil_starts,
    crop_resize,
    glnet_starts,
    normalized_box,
    paste_average,
    sliding_starts,
)

lengths = st.integers(1, 5000)
patches = st.integers(1, 700)


def covered(starts: list[int], patch: int, length: int) -> np.ndarray:
    hits = np.zeros(length, dtype=int)
    for s in starts:
        hits[max(s, 0) : min(s + patch, length)] += 1
    return hits


# --------------------------------------------------------------------------- 1-D grids


def test_glnet_deepglobe_numbers():
    starts = glnet_starts(2448, 508)
    assert starts == [0, 388, 776, 1164, 1552, 1940]
    assert 508 - (starts[1] - starts[0]) == 120


def test_glnet_small_side_and_bad_overlap():
    assert glnet_starts(300, 508) == [0]
    assert glnet_starts(508, 508) == [0]
    with pytest.raises(ValueError):
        glnet_starts(1000, 100, min_overlap=100)
    with pytest.raises(ValueError):
        glnet_starts(0, 100)


@settings(max_examples=300, deadline=None)
@given(lengths, patches, st.integers(0, 699))
def test_glnet_properties(length, patch, min_overlap):
    min_overlap = min_overlap % patch
    starts = glnet_starts(length, patch, min_overlap)
    assert starts[0] == 0
    assert covered(starts, patch, length).min() >= 1
    if length <= patch:
        assert starts == [0]
        return
    n = len(starts)
    assert starts[-1] == length - patch  # flush, hence every tile inside
    assert all(0 <= s <= length - patch for s in starts)
    gaps = np.diff(starts)
    assert (patch - gaps).min() >= min_overlap
    step = (length - patch) / (n - 1)
    assert starts == [int(np.floor(i * step + 0.5 + 1e-9)) for i in range(n)]
    # minimal: one tile fewer would cover too little or overlap too little
    if n > 2:
        assert (length - patch) / (n - 2) > patch - min_overlap
    assert n >= -(-length // patch)


@settings(max_examples=300, deadline=None)
@given(lengths, patches, st.booleans())
def test_ceil_properties(length, patch, flush):
    starts = ceil_starts(length, patch, flush)
    assert len(starts) == -(-length // patch)
    assert covered(starts, patch, length).min() >= 1
    if not flush:
        assert starts == [i * patch for i in range(len(starts))]
    elif length >= patch:
        assert all(0 <= s <= length - patch for s in starts)
        assert starts[-1] == length - patch


def test_ceil_examples():
    assert ceil_starts(1000, 512) == [0, 512]  # last tile reaches 1024: pad
    assert ceil_starts(1000, 512, flush=True) == [0, 488]
    assert ceil_starts(2448, 612) == [0, 612, 1224, 1836]
    assert ceil_starts(100, 512, flush=True) == [0]


@settings(max_examples=300, deadline=None)
@given(lengths, patches, st.data())
def test_sliding_properties(length, patch, data):
    stride = data.draw(st.integers(1, patch))
    starts = sliding_starts(length, patch, stride)
    assert covered(starts, patch, length).min() >= 1
    if length <= patch:
        assert starts == [0]
        return
    assert starts[-1] == length - patch
    assert all(0 <= s <= length - patch for s in starts)
    gaps = np.diff(starts)
    assert (gaps[:-1] == stride).all() if len(gaps) > 1 else True
    assert 0 < gaps[-1] <= stride


def test_sliding_rejects_gaps():
    with pytest.raises(ValueError):
        sliding_starts(1000, 100, 101)
    assert sliding_starts(1000, 256, 200) == [0, 200, 400, 600, 744]


# --------------------------------------------------------------------------- PatchGrid


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 1500),
    st.integers(1, 1500),
    st.integers(16, 300),
    st.sampled_from(["glnet", "ceil", "flush", "sliding"]),
)
def test_grid_covers_image(h, w, patch, kind):
    if kind == "glnet":
        grid = PatchGrid.glnet(h, w, patch, min_overlap=patch // 4)
    elif kind == "ceil":
        grid = PatchGrid.ceil(h, w, patch)
    elif kind == "flush":
        grid = PatchGrid.ceil(h, w, patch, flush=True)
    else:
        grid = PatchGrid.sliding(h, w, patch, max(1, patch // 2))
    rows, cols = grid.shape
    assert len(grid) == rows * cols == len(grid.windows)
    hits = np.zeros((h, w), dtype=int)
    for win in grid:
        assert win.shape == (patch, patch)
        inside = win.clip(h, w)
        hits[inside.slices] += 1
        pad_bottom, pad_right = grid.padding(win)
        assert (inside.height + pad_bottom, inside.width + pad_right) == (patch, patch)
        if kind != "ceil" and h >= patch and w >= patch:
            assert Window(0, 0, h, w).contains(win)
    assert hits.min() >= 1
    assert grid.needs_padding == (grid.padded_shape != (h, w))
    if kind in ("glnet", "flush", "sliding"):
        assert grid.needs_padding == (h < patch or w < patch)


def test_grid_row_major_and_rectangular_patch():
    grid = PatchGrid.ceil(100, 250, (50, 100))
    assert grid.shape == (2, 3)
    assert [(win.top, win.left) for win in grid] == [(0, 0), (0, 100), (0, 200), (50, 0), (50, 100), (50, 200)]
    assert grid.padded_shape == (100, 300) and grid.needs_padding
    small = PatchGrid.glnet(300, 200, 508)
    assert len(small) == 1 and small[0] == Window(0, 0, 508, 508)
    assert small.padding(small[0]) == (208, 308)


# --------------------------------------------------------------------------- coordinate maps


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.data())
def test_box_round_trip_on_image_grid(h, w, data):
    top = data.draw(st.integers(0, h - 1))
    left = data.draw(st.integers(0, w - 1))
    win = Window(top, left, data.draw(st.integers(1, h - top)), data.draw(st.integers(1, w - left)))
    box = normalized_box(win, h, w)
    assert all(0 <= v <= 1 for v in box)
    assert box_on_grid(box, h, w) == win


def test_box_on_grid_glnet_rule():
    grid = PatchGrid.glnet(2448, 2448, 508)
    cells = [box_on_grid(box, 127, 127) for box in grid.normalized_boxes()]
    assert {c.shape for c in cells} == {(26, 26)}  # round(127 * 508 / 2448) = round(26.35)
    assert cells[0].top == 0 and cells[-1].top == 101  # round(1940 / 2448 * 127) = round(100.64)
    # half-up rounding, never banker's: 0.5 -> 1, 2.5 -> 3
    assert box_on_grid((0.5 / 10, 2.5 / 10, 1.0, 1.0), 10, 10) == Window(1, 3, 10, 8)
    # at least one cell
    assert box_on_grid((0.0, 0.0, 0.001, 0.001), 10, 10).shape == (1, 1)


def coordinate_map(h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w): channel 0 = row index, channel 1 = column index."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([ys, xs])[None]


def test_crop_resize_identity_coordinates():
    fmap = coordinate_map(40, 60)
    boxes = [(0.25, 0.5, 0.5, 0.75), (0.0, 0.0, 1.0, 1.0), (0.5, 0.0, 1.0, 0.5)]
    out = crop_resize(fmap, boxes, (10, 15))
    assert out.shape == (3, 2, 10, 15)
    # same-size crops are exact copies of the region
    np.testing.assert_array_equal(out[0, 0].numpy(), np.repeat(np.arange(10, 20.0)[:, None], 15, 1))
    np.testing.assert_array_equal(out[0, 1].numpy(), np.repeat(np.arange(30, 45.0)[None], 10, 0))
    # a downsampled crop keeps the region's centre and extent
    assert out[1, 0].mean().item() == pytest.approx(19.5)
    assert out[1, 1].mean().item() == pytest.approx(29.5)
    assert out[2, 0].min().item() >= 20 and out[2, 0].max().item() <= 39
    assert out[2, 1].min().item() >= 0 and out[2, 1].max().item() <= 29


def test_crop_resize_upsamples_and_batches():
    fmap = coordinate_map(127, 127)
    grid = PatchGrid.glnet(2448, 2448, 508)
    out = crop_resize(fmap, grid.normalized_boxes(), 127)
    assert out.shape == (36, 2, 127, 127)
    for k in (0, 7, 35):
        cells = box_on_grid(grid.normalized_boxes()[k], 127, 127)
        expected = torch.nn.functional.interpolate(
            fmap[:, :, cells.slices[0], cells.slices[1]], size=(127, 127), mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(out[k : k + 1], expected)
    # per-box maps (B == N) and explicit batch_index
    two = torch.cat([fmap, fmap + 1000])
    out2 = crop_resize(two, [(0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)], 8)
    torch.testing.assert_close(out2[1], out2[0] + 1000)
    out3 = crop_resize(two, [(0, 0, 0.5, 0.5)], 8, batch_index=[1])
    torch.testing.assert_close(out3[0], out2[1])
    with pytest.raises(ValueError):
        crop_resize(two, [(0, 0, 1, 1)] * 3, 8)


def test_crop_resize_mixed_sizes_keep_order_and_grad():
    fmap = coordinate_map(30, 30).requires_grad_(True)
    boxes = [(0, 0, 0.5, 0.5), (0, 0, 0.2, 0.2), (0.5, 0.5, 1.0, 1.0), (0.1, 0.1, 0.3, 0.3)]
    out = crop_resize(fmap, boxes, 6)
    for k, box in enumerate(boxes):
        torch.testing.assert_close(out[k : k + 1], crop_resize(fmap, [box], 6))
    out.sum().backward()
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0


def test_crop_resize_clips_box_past_border():
    fmap = coordinate_map(10, 10)
    out = crop_resize(fmap, [(0.5, 0.5, 1.2, 1.2)], 5)  # 7 cells from row 5: clipped to rows 5..9
    np.testing.assert_array_equal(out[0, 0, :, 0].numpy(), np.arange(5, 10.0))
    with pytest.raises(ValueError):
        crop_resize(fmap, [(1.5, 1.5, 2.0, 2.0)], 5)


@settings(max_examples=50, deadline=None)
@given(st.integers(20, 400), st.integers(20, 400), st.integers(8, 200), st.integers(4, 64), st.floats(-5, 5))
def test_paste_average_constant_is_constant_where_covered(h, w, patch, grid_side, value):
    grid = PatchGrid.sliding(h, w, patch, max(1, patch // 3))
    maps = torch.full((len(grid), 3, 7, 9), value)
    merged = paste_average(maps, grid.normalized_boxes(), (grid_side, grid_side + 3))
    assert merged.shape == (1, 3, grid_side, grid_side + 3)
    counts = paste_average(torch.ones(len(grid), 1, 7, 9), grid.normalized_boxes(), (grid_side, grid_side + 3))
    covered_cells = counts[0, 0] > 0
    # float32 sums of up to hundreds of patches per cell: a naive sum of n terms is off by at most
    # n unit roundoffs (2^-24) relative, n the most patches pasted on one cell (a flat 1e-5 failed
    # for h=282, w=283, patch=8, 4x7 cells: 1.06e-5)
    per_cell = np.zeros((grid_side, grid_side + 3), dtype=int)
    for box in grid.normalized_boxes():
        per_cell[box_on_grid(box, grid_side, grid_side + 3).clip(grid_side, grid_side + 3).slices] += 1
    rtol = max(1e-5, int(per_cell.max()) * 2.0**-24)
    torch.testing.assert_close(
        merged[0][:, covered_cells], torch.full_like(merged[0][:, covered_cells], value), rtol=rtol, atol=1e-6
    )
    if h >= patch and w >= patch:  # flush grid: every cell covered
        assert covered_cells.all()


def test_paste_average_overlap_and_sub_batches():
    boxes = [(0.0, 0.0, 1.0, 0.6), (0.0, 0.4, 1.0, 1.0)]  # columns 0..5 and 4..9 of 10
    maps = torch.stack([torch.full((1, 10, 6), 1.0), torch.full((1, 10, 6), 3.0)])
    merged = paste_average(maps, boxes, 10)[0, 0]
    np.testing.assert_array_equal(merged[0].numpy(), [1, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    paster = PasteAverager(10)
    paster.add(maps[:1], boxes[:1])
    paster.add(maps[1:], boxes[1:])
    torch.testing.assert_close(paster.result()[0, 0], merged)
    # cells no patch covers stay zero
    np.testing.assert_array_equal(paste_average(maps[:1], boxes[:1], 10)[0, 0, 0].numpy(), [1] * 6 + [0] * 4)


def test_paste_inverts_crop_of_smooth_map():
    fmap = coordinate_map(127, 127)
    grid = PatchGrid.glnet(2448, 2448, 508)
    crops = crop_resize(fmap, grid.normalized_boxes(), 26)  # same size as the footprint: exact crops
    torch.testing.assert_close(paste_average(crops, grid.normalized_boxes(), 127), fmap)


# --------------------------------------------------------------------------- blending


def test_blend_weights():
    uniform = blend_weights(4, 6)
    assert uniform.dtype == np.float32 and uniform.shape == (4, 6) and (uniform == 1).all()
    g = blend_weights(65, 33, "gaussian")
    assert g.shape == (65, 33) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0) and g[32, 16] == pytest.approx(1.0)
    assert g.min() >= 1e-3 and g[0, 0] == pytest.approx(1e-3)
    np.testing.assert_allclose(g, g[::-1, ::-1])  # symmetric
    assert g[32, 20] == pytest.approx(np.exp(-0.5 * (4 / (0.125 * 33)) ** 2), rel=1e-5)
    even = blend_weights(8, 8, "gaussian", sigma_scale=1.0)
    assert even.max() == pytest.approx(1.0) and (even > 0.5).all()
    with pytest.raises(ValueError):
        blend_weights(4, 4, "cosine")
