"""A window of an image seen as an image of its own.

Predictors that give each region of a huge image its own context (GLNet's ``"tile"``
global-context policy) run their whole-image code on a region: ``CroppedSource`` reads go to
the parent source, shifted by the region's origin, so a thumbnail of the region uses the
parent's pyramid levels and nothing is copied up front.
"""

from __future__ import annotations

import numpy as np

from ..geometry import Window
from .base import ImageSource

__all__ = ["CroppedSource"]


class CroppedSource(ImageSource):
    """The pixels of ``window`` of ``parent`` (the window must lie inside the parent)."""

    def __init__(self, parent: ImageSource, window: Window):
        self.parent = parent
        self.window = parent.resolve_window(window)
        self.path = parent.path

    @property
    def height(self) -> int:
        return self.window.height

    @property
    def width(self) -> int:
        return self.window.width

    @property
    def channels(self) -> int:
        return self.parent.channels

    @property
    def dtype(self) -> np.dtype:
        return self.parent.dtype

    @property
    def name(self) -> str:
        return self.parent.name

    def read(
        self, window: Window | None = None, out_size: tuple[int, int] | None = None, resample: str = "area"
    ) -> np.ndarray:
        win = self.resolve_window(window)
        shifted = Window(win.top + self.window.top, win.left + self.window.left, win.height, win.width)
        return self.parent.read(shifted, out_size, resample)

    def __repr__(self) -> str:
        return f"CroppedSource({self.parent!r}, {self.window})"
