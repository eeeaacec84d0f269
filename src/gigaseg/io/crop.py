"""A window of an image seen as an image of its own.

Predictors that give each region of a huge image its own context (GLNet's ``"tile"``
global-context policy in ``gigaseg.methods.glnet.predictor``) run their whole-image code
on a region: ``CroppedSource`` reads go to the parent source, shifted by the region's
origin, so a thumbnail of the region uses the parent's pyramid levels and nothing is
copied up front.
"""

from __future__ import annotations

import numpy as np

from ..geometry import Window
from .base import ImageSource

__all__ = ["CroppedSource"]


class CroppedSource(ImageSource):
    """The pixels of ``window`` of ``parent``, as an image of their own.

    Reads (and so thumbnails) go to the parent, shifted by the window's origin.
    The path and name are the parent's; no georeferencing is reported
    (``geo_tags`` is empty); ``close`` leaves the parent open.

    Args:
        parent: the image the window lies in.
        window: the region of ``parent``, in its full-resolution pixels (a
            ``Window`` or a ``(top, left, height, width)`` tuple).

    Raises:
        ValueError: when the window reaches outside the parent.
    """

    def __init__(self, parent: ImageSource, window: Window):
        self.parent = parent
        self.window = parent.resolve_window(window)
        self.path = parent.path

    @property
    def height(self) -> int:
        """Rows of the window."""
        return self.window.height

    @property
    def width(self) -> int:
        """Columns of the window."""
        return self.window.width

    @property
    def channels(self) -> int:
        """The parent's channel count."""
        return self.parent.channels

    @property
    def dtype(self) -> np.dtype:
        """The parent's dtype."""
        return self.parent.dtype

    @property
    def name(self) -> str:
        """The parent's name."""
        return self.parent.name

    def read(
        self, window: Window | None = None, out_size: tuple[int, int] | None = None, resample: str = "area"
    ) -> np.ndarray:
        """Pixels of ``window`` of the crop, read from the parent (see :meth:`ImageSource.read`).

        Args:
            window: the region to read, in the crop's coordinates (``(0, 0)`` is
                the crop's top-left corner); None means the whole crop.
            out_size: ``(h, w)`` to resample to, or None for full resolution.
            resample: ``"area"``, ``"bilinear"`` or ``"nearest"``.

        Returns:
            ``(h, w, C)`` array in the parent's dtype.

        Raises:
            ValueError: when the window reaches outside the crop, or for bad
                ``out_size`` or ``resample``.
            ImageReadError: when the parent's file cannot be read.
        """
        win = self.resolve_window(window)
        shifted = Window(win.top + self.window.top, win.left + self.window.left, win.height, win.width)
        return self.parent.read(shifted, out_size, resample)

    def __repr__(self) -> str:
        return f"CroppedSource({self.parent!r}, {self.window})"
