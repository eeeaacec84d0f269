"""``ArraySource``: an in-memory ``(H, W)`` or ``(H, W, C)`` array as an ``ImageSource``.

The array is wrapped, not copied (a 2-D array is viewed as ``(H, W, 1)``), so
changes to it show through reads -- but not through thumbnails already taken,
which are cached like those of the file sources. Reads return copies.
"""

from __future__ import annotations

import numpy as np

from ..window import Window
from . import resample as rs
from .base import ImageSource, thumbnail_size


class ArraySource(ImageSource):
    """Wraps an in-memory image array without copying it."""

    path = None

    def __init__(self, array: np.ndarray, *, name: str | None = None):
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"expected an (H, W) or (H, W, C) image array, got shape {array.shape}")
        if array.dtype.kind not in "biuf":
            raise ValueError(f"expected an integer, boolean or float image array, got dtype {array.dtype}")
        if 0 in array.shape:
            raise ValueError(f"image array is empty: shape {array.shape}")
        self._array = array
        self._name = name
        self._thumbs: dict[tuple[int, str], np.ndarray] = {}

    @property
    def array(self) -> np.ndarray:
        """The wrapped array as ``(H, W, C)`` (a view, not a copy)."""
        return self._array

    @property
    def name(self) -> str:
        return self._name if self._name is not None else "array"

    @property
    def height(self) -> int:
        return self._array.shape[0]

    @property
    def width(self) -> int:
        return self._array.shape[1]

    @property
    def channels(self) -> int:
        return self._array.shape[2]

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    def read(
        self,
        window: Window | None = None,
        out_size: tuple[int, int] | None = None,
        resample: str = "area",
    ) -> np.ndarray:
        rs.check_resample(resample)
        win = self.resolve_window(window)
        if out_size is not None:
            out_size = rs.check_out_size(out_size)
        if out_size is None or out_size == win.shape:
            return self._array[win.slices].copy()
        if win.area == 0:
            raise ValueError(f"cannot resample the empty window {win}")
        array = self._array

        def read_block(top, bottom, left, right):
            return array[top:bottom, left:right]

        py = rs.axis_plan(win.top, win.bottom, out_size[0], self.height, resample)
        px = rs.axis_plan(win.left, win.right, out_size[1], self.width, resample)
        return rs.resample_region(read_block, py, px, self.channels, self.dtype)

    def thumbnail(self, max_side: int, resample: str = "area") -> np.ndarray:
        rs.check_resample(resample)
        key = (int(max_side), resample)
        if key not in self._thumbs:
            size = thumbnail_size(self.height, self.width, int(max_side))
            self._thumbs[key] = self.read(None, size, resample)
        return self._thumbs[key].copy()
