"""``ArraySource``: an in-memory ``(H, W)`` or ``(H, W, C)`` array as an ``ImageSource``.

The array is wrapped, not copied (a 2-D array is viewed as ``(H, W, 1)``), so
changes to it show through reads -- but not through thumbnails already taken,
which are cached like those of the file sources. Reads return copies.
"""

from __future__ import annotations

import numpy as np

from .base import InMemorySource


class ArraySource(InMemorySource):
    """Wraps an in-memory image array without copying it.

    Args:
        array: ``(H, W)`` or ``(H, W, C)`` array of integer, boolean or float
            pixels; anything ``np.asarray`` accepts. A 2-D array is viewed as
            ``(H, W, 1)``.
        name: stem used for output files; None means ``"array"``.

    Raises:
        ValueError: when the array is not 2-D or 3-D, has another dtype kind
            (complex, object, strings, ...) or is empty.
    """

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

    @property
    def array(self) -> np.ndarray:
        """The wrapped array as ``(H, W, C)`` (a view, not a copy)."""
        return self._array

    @property
    def name(self) -> str:
        """Stem used for output files: the ``name`` given, else ``"array"``."""
        return self._name if self._name is not None else "array"

    @property
    def height(self) -> int:
        """Number of rows ``H``."""
        return self._array.shape[0]

    @property
    def width(self) -> int:
        """Number of columns ``W``."""
        return self._array.shape[1]

    @property
    def channels(self) -> int:
        """Number of channels ``C`` (1 for a 2-D array)."""
        return self._array.shape[2]

    @property
    def dtype(self) -> np.dtype:
        """dtype of the wrapped array."""
        return self._array.dtype

    def _pixels(self) -> np.ndarray:
        return self._array
