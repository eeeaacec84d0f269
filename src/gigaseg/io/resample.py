"""Resampling shared by every ``ImageSource``: exact, separable and streamed.

A read with ``out_size`` maps an output grid onto a (possibly fractional)
rectangle of source pixels. Each axis gets an :class:`AxisPlan` -- for every
output index, which source indices it draws on and with what weights:

``"area"``
    Box-filter averaging with exact fractional pixel coverage (like OpenCV's
    ``INTER_AREA``): every source pixel contributes in proportion to the part
    of it that falls inside the output pixel. Anti-aliased; the right choice
    for shrinking images. When enlarging it degrades gracefully to a 2-tap
    box overlap.
``"bilinear"``
    Plain bilinear interpolation with half-pixel centres (``align_corners=False``),
    two taps per axis, no anti-aliasing. Near window edges it uses the real
    neighbouring pixels of the image, so adjacent windows blend seamlessly.
``"nearest"``
    The source pixel under each output pixel's centre. Returns only values
    present in the source -- use it for label masks.

Because the filters are separable and linear, a large region is resampled
band by band (:func:`resample_region`): rows of the source are read in bands
of about :data:`BAND_BYTES` (aligned to the file's chunk rows so no chunk is
decoded twice), each band is reduced along x at once, and its rows are added
into the output rows they contribute to. Only a band, its x-reduced copy and
the output are ever in memory, whatever the size of the region.

The output keeps the source dtype: integers are rounded and clipped to their
range, floats are cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..geometry import Window

#: the ``resample`` methods every ``ImageSource.read`` accepts (described above)
RESAMPLING = ("area", "bilinear", "nearest")

#: default size of a decoded band of source rows during streamed resampling
BAND_BYTES = 64 * 2**20

#: a pyramid level may be up to this fraction smaller than the requested output
#: and still be used (level sizes are rounded, e.g. 20001 -> 10000)
LEVEL_TOLERANCE = 0.01

ReadBlock = Callable[[int, int, int, int], np.ndarray]


def check_resample(resample: str) -> str:
    """Check a resampling method name.

    Args:
        resample: the method name.

    Returns:
        ``resample`` unchanged.

    Raises:
        ValueError: when it is not one of :data:`RESAMPLING`.
    """
    if resample not in RESAMPLING:
        raise ValueError(f"unknown resampling {resample!r}; use one of {', '.join(RESAMPLING)}")
    return resample


def check_out_size(out_size) -> tuple[int, int]:
    """Check an output size.

    Args:
        out_size: a pair ``(height, width)`` of values ``int`` accepts.

    Returns:
        ``(height, width)`` as ints.

    Raises:
        ValueError: when it is not a pair or a side is not positive.
    """
    try:
        h, w = (int(v) for v in out_size)
    except (TypeError, ValueError):
        raise ValueError(f"out_size must be a pair (height, width), got {out_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"out_size must be positive, got {out_size!r}")
    return h, w


@dataclass(frozen=True)
class AxisPlan:
    """How one axis of the output is computed from source indices ``lo .. hi``.

    ``idx[i, k]`` (absolute source index) contributes ``weight[i, k]`` to output
    ``i``; unused taps have weight 0. For ``"area"`` shrinking, ``edges`` holds
    the ``n_out + 1`` fractional source boundaries of the output pixels, which
    allows a fast cumulative path.

    Attributes:
        method: ``"area"``, ``"bilinear"`` or ``"nearest"``.
        n_out: number of output pixels along the axis.
        lo: first source index any output uses.
        hi: one past the last source index any output uses.
        idx: int64 ``(n_out, taps)`` absolute source indices, all in ``lo .. hi - 1``.
        weight: float64 ``(n_out, taps)`` weights; each row sums to 1.
        edges: float64 ``(n_out + 1,)`` output pixel boundaries in source
            coordinates for ``"area"`` when not enlarging, else None.
    """

    method: str
    n_out: int
    lo: int
    hi: int
    idx: np.ndarray
    weight: np.ndarray
    edges: np.ndarray | None = None

    @property
    def is_identity(self) -> bool:
        """Output ``i`` is exactly source ``lo + i``."""
        return (
            self.hi - self.lo == self.n_out
            and self.idx.shape[1] == 1
            and bool(np.all(self.idx[:, 0] == np.arange(self.lo, self.hi)))
            and bool(np.all(self.weight == 1.0))
        )

    @property
    def first(self) -> np.ndarray:
        """Smallest source index each output uses (non-decreasing)."""
        w = self.weight != 0
        return np.where(w, self.idx, np.iinfo(np.int64).max).min(axis=1)

    @property
    def last(self) -> np.ndarray:
        """Largest source index each output uses (non-decreasing)."""
        w = self.weight != 0
        return np.where(w, self.idx, -1).max(axis=1)


def axis_plan(start: float, stop: float, n_out: int, size: int, method: str) -> AxisPlan:
    """Plan resampling source coordinates ``[start, stop)`` of an axis of ``size`` pixels to ``n_out``.

    Args:
        start: first source coordinate (may be fractional).
        stop: end source coordinate, ``start < stop <= size`` (may be fractional).
        n_out: number of output pixels (positive).
        size: number of source pixels along the axis; taps never leave ``0 .. size - 1``.
        method: ``"area"``, ``"bilinear"`` or ``"nearest"``.

    Returns:
        The axis's plan.

    Raises:
        ValueError: for an unknown method or a span outside ``[0, size]``.
    """
    check_resample(method)
    if not (0 <= start < stop <= size) or n_out <= 0:
        raise ValueError(f"bad resampling span [{start}, {stop}) of {size} -> {n_out}")
    scale = (stop - start) / n_out
    i = np.arange(n_out, dtype=np.float64)
    if method == "nearest":
        centre = start + (i + 0.5) * scale
        idx = np.clip(np.floor(centre).astype(np.int64), 0, size - 1)[:, None]
        weight = np.ones((n_out, 1))
        edges = None
    elif method == "bilinear":
        centre = np.clip(start + (i + 0.5) * scale - 0.5, 0, size - 1)
        j0 = np.floor(centre).astype(np.int64)
        frac = centre - j0
        j1 = np.minimum(j0 + 1, size - 1)
        idx = np.stack([j0, j1], axis=1)
        weight = np.stack([1.0 - frac, frac], axis=1)
        edges = None
    else:  # area
        edges = start + scale * np.arange(n_out + 1, dtype=np.float64)
        edges[-1] = stop
        first = np.floor(edges[:-1]).astype(np.int64)
        taps = int((np.ceil(edges[1:]) - first).max())
        idx = first[:, None] + np.arange(taps)[None, :]
        lo_edge, hi_edge = edges[:-1, None], edges[1:, None]
        cover = np.minimum(hi_edge, idx + 1) - np.maximum(lo_edge, idx)
        weight = np.clip(cover, 0.0, None) / (hi_edge - lo_edge)
        idx = np.minimum(idx, size - 1)  # taps past the end have zero weight
        if scale < 1.0:
            edges = None
    used = weight != 0
    lo = int(idx[used].min()) if used.any() else int(idx.min())
    hi = int(idx[used].max()) + 1 if used.any() else int(idx.max()) + 1
    # zero-weight taps may point past the window (enlarging a window inside the image):
    # keep every index inside the decoded span [lo, hi)
    idx = np.clip(idx, lo, hi - 1)
    return AxisPlan(method, n_out, lo, hi, idx, weight, edges)


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float results back to the source dtype (integers: round and clip)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return values >= 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


#: bytes of float temporaries per step of the x reduction (numpy casts a whole reduceat input)
_X_STEP_BYTES = 2**20


def _reduce_x(block: np.ndarray, plan: AxisPlan) -> np.ndarray:
    """Resample axis 1 of ``block`` (columns ``plan.lo ..``) to ``plan.n_out``; float result.

    Works through the rows in steps so its float temporaries stay small.
    """
    acc_dtype = _acc_dtype(block.dtype)
    rows, cols, channels = block.shape
    out = np.empty((rows, plan.n_out, channels), dtype=acc_dtype)
    step = max(1, _X_STEP_BYTES // max(1, cols * channels * acc_dtype.itemsize))
    for top in range(0, rows, step):
        out[top : top + step] = _reduce_x_rows(block[top : top + step], plan, acc_dtype)
    return out


def _reduce_x_rows(block: np.ndarray, plan: AxisPlan, acc_dtype: np.dtype) -> np.ndarray:
    if plan.method == "area" and plan.edges is not None:
        # exact box filter in three passes: whole pixels by reduceat, fractional
        # pixels at the left edge added, the over-counted right edge pixel trimmed
        edges = plan.edges - plan.lo
        starts = np.ceil(edges[:-1]).astype(np.int64)
        if starts.size == 1 or np.all(np.diff(starts) > 0):
            n = block.shape[1]
            out = np.add.reduceat(block, starts, axis=1, dtype=acc_dtype)
            left = np.floor(edges[:-1]).astype(np.int64)
            w_left = (starts - edges[:-1]).astype(acc_dtype)  # 0 when the edge is whole
            if np.any(w_left > 0):
                out += block[:, left] * w_left[None, :, None]
            right = np.floor(edges[1:]).astype(np.int64)
            w_right = (edges[1:] - right).astype(acc_dtype)
            trim = (w_right > 0) & (right < n)
            if np.any(trim):
                cols = np.nonzero(trim)[0]
                out[:, cols] -= block[:, right[cols]] * (1.0 - w_right[cols])[None, :, None]
            out /= np.diff(edges).astype(acc_dtype)[None, :, None]
            return out
    out = np.zeros((block.shape[0], plan.n_out, block.shape[2]), dtype=acc_dtype)
    for k in range(plan.idx.shape[1]):
        w = plan.weight[:, k]
        if not np.any(w):
            continue
        out += block[:, plan.idx[:, k] - plan.lo] * w.astype(acc_dtype)[None, :, None]
    return out


#: bytes of combined (float) rows processed at once during streamed resampling
_GROUP_BYTES = 4 * 2**20


def _acc_dtype(dtype: np.dtype) -> np.dtype:
    """Float type that holds weighted sums of ``dtype`` exactly enough."""
    dtype = np.dtype(dtype)
    wide = dtype.itemsize >= 4 and dtype.kind in "iu" or dtype.itemsize > 4
    return np.dtype(np.float64 if wide else np.float32)


def _combine_rows(block: np.ndarray, top: int, py: AxisPlan, g0: int, g1: int, acc_dtype: np.dtype) -> np.ndarray:
    """Weighted sums over the rows of ``block`` (source rows ``top ..``) for outputs ``g0 .. g1``.

    Only the taps inside the block count, so sums for outputs that straddle
    blocks are partial and add up across blocks.
    """
    bottom = top + block.shape[0]
    combined = np.zeros((g1 - g0, block.shape[1], block.shape[2]), dtype=acc_dtype)
    if py.edges is not None and py.idx.shape[1] > 4:
        # area, shrinking a lot: whole rows by one contiguous sum, the fractional
        # first and last rows added with their coverage
        edges = py.edges
        for r, i in enumerate(range(g0, g1)):
            a, b = max(edges[i], top), min(edges[i + 1], bottom)
            if b <= a:
                continue
            row = combined[r]
            fa, ca, fb = math.floor(a), math.ceil(a), math.floor(b)
            if fa == fb:  # a and b inside one source row
                row += block[fa - top] * (b - a)
            else:
                if fb > ca:
                    np.sum(block[ca - top : fb - top], axis=0, dtype=acc_dtype, out=row)
                if ca > a:
                    row += block[fa - top] * (ca - a)
                if b > fb:
                    row += block[fb - top] * (b - fb)
            row /= edges[i + 1] - edges[i]
        return combined
    for k in range(py.idx.shape[1]):
        src = py.idx[g0:g1, k]
        w = py.weight[g0:g1, k]
        sel = np.nonzero((src >= top) & (src < bottom) & (w != 0))[0]
        if sel.size:
            combined[sel] += block[src[sel] - top] * w[sel, None, None].astype(acc_dtype)
    return combined


def band_edges(lo: int, hi: int, rows_per_band: int, row_align: int = 1) -> list[tuple[int, int]]:
    """Split rows ``lo .. hi`` into bands of at most ``rows_per_band`` rows.

    Band boundaries lie on a grid of a multiple of ``row_align`` (the file's chunk
    height) rows, so each chunk row is decoded once; the grid step is never smaller
    than one chunk row, so a band may exceed ``rows_per_band`` when that is smaller.
    The first and last band are cut at ``lo`` and ``hi``.

    Args:
        lo: first row.
        hi: one past the last row.
        rows_per_band: the wanted band height (values below 1 count as 1).
        row_align: the chunk height to align to (values below 1 count as 1).

    Returns:
        ``(top, bottom)`` of each band, in order, covering ``lo .. hi``.
    """
    row_align = max(1, int(row_align))
    step = max(row_align, (max(1, rows_per_band) // row_align) * row_align)
    bands = []
    top = lo
    while top < hi:
        bottom = min(hi, (top // step + 1) * step)
        bands.append((top, bottom))
        top = bottom
    return bands


def _read_bands(read_block: ReadBlock, bands, left: int, right: int, prefetch: bool):
    """Yield ``(top, bottom, block)`` for each band, reading the next one ahead when ``prefetch``."""
    if not prefetch or len(bands) < 2:
        for top, bottom in bands:
            yield top, bottom, read_block(top, bottom, left, right)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigaseg-band") as pool:
        future = pool.submit(read_block, bands[0][0], bands[0][1], left, right)
        try:
            for k, (top, bottom) in enumerate(bands):
                block = future.result()
                future = None
                if k + 1 < len(bands):
                    future = pool.submit(read_block, bands[k + 1][0], bands[k + 1][1], left, right)
                yield top, bottom, block
                del block
        finally:
            if future is not None:
                future.cancel()


def resample_region(
    read_block: ReadBlock,
    py: AxisPlan,
    px: AxisPlan,
    channels: int,
    dtype: np.dtype,
    *,
    band_bytes: int | None = None,
    row_align: int = 1,
    prefetch: bool = True,
) -> np.ndarray:
    """Resample source rows ``py.lo..py.hi`` x columns ``px.lo..px.hi`` to ``(py.n_out, px.n_out, C)``.

    The source is read in bands of about ``band_bytes``, so memory stays bounded
    by one band plus the output (two bands with ``prefetch``). Bands no output
    uses are not read.

    Args:
        read_block: ``read_block(top, bottom, left, right)`` returns those source
            pixels as ``(h, w, C)``.
        py: plan of the rows (axis 0).
        px: plan of the columns (axis 1); same method as ``py``.
        channels: ``C``.
        dtype: dtype of the source and of the output (integers are rounded and
            clipped, floats cast back).
        band_bytes: size of a decoded band; None means :data:`BAND_BYTES`.
        row_align: chunk height of the source, so band edges fall on chunk rows.
        prefetch: decode the next band in a background thread while the current
            one is resampled.

    Returns:
        ``(py.n_out, px.n_out, C)`` array of ``dtype``. When both plans are the
        identity it is ``read_block``'s own result (possibly a view of the source).

    Raises:
        ValueError: when the two plans use different methods.
    """
    dtype = np.dtype(dtype)
    if py.method != px.method:
        raise ValueError("both axes must use the same resampling")
    if py.is_identity and px.is_identity:
        return read_block(py.lo, py.hi, px.lo, px.hi)
    band_bytes = BAND_BYTES if band_bytes is None else int(band_bytes)
    row_bytes = max(1, (px.hi - px.lo) * channels * dtype.itemsize)
    bands = band_edges(py.lo, py.hi, band_bytes // row_bytes, row_align)
    out = np.empty((py.n_out, px.n_out, channels), dtype=dtype)

    if py.method == "nearest":
        src = py.idx[:, 0]
        cols = px.idx[:, 0] - px.lo
        needed = [(t, b) for t, b in bands if np.any((src >= t) & (src < b))]
        for top, bottom, block in _read_bands(read_block, needed, px.lo, px.hi, prefetch):
            rows = np.nonzero((src >= top) & (src < bottom))[0]
            out[rows] = block[src[rows] - top][:, cols]
        return out

    acc_dtype = _acc_dtype(dtype)
    x_identity = px.is_identity
    first, last = py.first, py.last
    group_rows = max(1, _GROUP_BYTES // max(1, (px.hi - px.lo) * channels * acc_dtype.itemsize))
    pending: dict[int, np.ndarray] = {}  # output rows whose source rows span several bands
    # outputs [t0, t1) use rows of band (top, bottom): last >= top and first < bottom
    needed = [
        (t, b) for t, b in bands if np.searchsorted(first, b, side="left") > np.searchsorted(last, t, side="left")
    ]
    for top, bottom, block in _read_bands(read_block, needed, px.lo, px.hi, prefetch):
        t0 = int(np.searchsorted(last, top, side="left"))
        t1 = int(np.searchsorted(first, bottom, side="left"))
        for g0 in range(t0, t1, group_rows):
            g1 = min(t1, g0 + group_rows)
            # rows first (long contiguous sums), then columns on the few combined rows
            combined = _combine_rows(block, top, py, g0, g1, acc_dtype)
            xr = combined if x_identity else _reduce_x(combined, px)
            del combined
            inside = (first[g0:g1] >= top) & (last[g0:g1] < bottom)
            if inside.all():
                out[g0:g1] = _cast(xr, dtype)
                continue
            rows = np.nonzero(inside)[0]
            out[g0 + rows] = _cast(xr[rows], dtype)
            for r in np.nonzero(~inside)[0]:
                i = g0 + int(r)
                part = xr[r].astype(np.float64)
                total = pending.pop(i, None)
                total = part if total is None else total + part
                if last[i] < bottom:
                    out[i] = _cast(total, dtype)
                else:
                    pending[i] = total
        del block
    if pending:  # cannot happen: every output's last row lies in some band
        raise RuntimeError(f"resampling left rows {sorted(pending)} unfinished")
    return out


def resample_box(
    read_block: ReadBlock,
    size: tuple[int, int],
    box: tuple[float, float, float, float],
    out_size: tuple[int, int],
    resample: str,
    channels: int,
    dtype: np.dtype,
    *,
    band_bytes: int | None = None,
    row_align: int = 1,
) -> np.ndarray:
    """Resample the fractional ``box`` of a raster to ``out_size``.

    Args:
        read_block: ``read_block(top, bottom, left, right)`` returns those pixels as ``(h, w, C)``.
        size: ``(H, W)`` of the raster.
        box: ``(top, left, bottom, right)`` in (possibly fractional) raster pixels.
        out_size: the output ``(h, w)``.
        resample: ``"area"``, ``"bilinear"`` or ``"nearest"``.
        channels: ``C``.
        dtype: dtype of the raster and of the output.
        band_bytes: size of a decoded band; None means :data:`BAND_BYTES`.
        row_align: chunk height of the raster.

    Returns:
        ``(h, w, C)`` array of ``dtype`` (see :func:`resample_region`).

    Raises:
        ValueError: for a bad method, ``out_size`` or box.
    """
    check_resample(resample)
    oh, ow = check_out_size(out_size)
    top, left, bottom, right = box
    py = axis_plan(top, bottom, oh, size[0], resample)
    px = axis_plan(left, right, ow, size[1], resample)
    return resample_region(read_block, py, px, channels, dtype, band_bytes=band_bytes, row_align=row_align)


def resize(
    array: np.ndarray,
    out_size: tuple[int, int],
    resample: str = "area",
    *,
    band_bytes: int | None = None,
) -> np.ndarray:
    """Resize an in-memory array.

    Args:
        array: ``(H, W)`` or ``(H, W, C)`` array.
        out_size: the output ``(h, w)``.
        resample: ``"area"``, ``"bilinear"`` or ``"nearest"``.
        band_bytes: size of a band of rows resampled at once; None means
            :data:`BAND_BYTES`.

    Returns:
        ``(h, w)`` or ``(h, w, C)`` (as the input) in the input's dtype; a new
        array, never a view of ``array``.

    Raises:
        ValueError: for a bad shape, method or ``out_size``.
    """
    array = np.asarray(array)
    squeeze = array.ndim == 2
    view = array[:, :, None] if squeeze else array
    if view.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {array.shape}")
    h, w, c = view.shape

    def read_block(top, bottom, left, right):
        return view[top:bottom, left:right]

    out = resample_box(read_block, (h, w), (0, 0, h, w), out_size, resample, c, view.dtype, band_bytes=band_bytes)
    if out.base is not None or out is view:
        out = np.array(out)
    return out[:, :, 0] if squeeze else out


def choose_level(
    level_sizes: list[tuple[int, int]],
    window: Window,
    out_size: tuple[int, int],
) -> int:
    """Index of the coarsest level whose pixels over ``window`` still number >= ``out_size``.

    A level counts as fine enough when it has at least ``1 - LEVEL_TOLERANCE`` of
    the requested pixels along both axes.

    Args:
        level_sizes: ``(H, W)`` of each level; ``level_sizes[0]`` is full
            resolution, later entries are reduced levels (in any order).
        window: the region to read, in full-resolution pixels.
        out_size: the output ``(h, w)``.

    Returns:
        Index into ``level_sizes`` of the fine-enough level with the fewest pixels
        (0 when no reduced level is fine enough).
    """
    h0, w0 = level_sizes[0]
    oh, ow = out_size
    best, best_pixels = 0, h0 * w0
    for i, (h, w) in enumerate(level_sizes):
        have_h = window.height * h / h0
        have_w = window.width * w / w0
        if have_h >= oh * (1 - LEVEL_TOLERANCE) and have_w >= ow * (1 - LEVEL_TOLERANCE) and h * w < best_pixels:
            best, best_pixels = i, h * w
    return best


def level_box(window: Window, full: tuple[int, int], level: tuple[int, int]) -> tuple[float, float, float, float]:
    """``window`` (full-resolution pixels) in the fractional coordinates of a pyramid level.

    Args:
        window: the region, in full-resolution pixels.
        full: ``(H, W)`` of full resolution.
        level: ``(h, w)`` of the level.

    Returns:
        ``(top, left, bottom, right)`` in level pixels, bottom and right clipped to the level.
    """
    fy = level[0] / full[0]
    fx = level[1] / full[1]
    top, left = window.top * fy, window.left * fx
    bottom = min(level[0], window.bottom * fy)
    right = min(level[1], window.right * fx)
    return top, left, bottom, right


__all__ = [
    "BAND_BYTES",
    "AxisPlan",
    "axis_plan",
    "band_edges",
    "check_out_size",
    "check_resample",
    "choose_level",
    "level_box",
    "resample_box",
    "resample_region",
    "resize",
]
