"""The lazy image-source contract shared by every reader.

An ``ImageSource`` knows its size, channel count and dtype without decoding
pixels. ``read`` decodes only what a window needs; ``thumbnail`` gives the
global (downsampled) view with bounded memory. Arrays are always ``(H, W, C)``
in the source's own dtype (uint8, uint16, float32, ...); see
``gigaseg.io.normalize`` for the conversion to network input.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np

from ..window import Window

RESAMPLING = ("area", "bilinear", "nearest")


class ImageSource(ABC):
    """A 2-D raster with ``channels`` bands that is read window by window."""

    #: file the pixels come from (None for in-memory arrays); used in error messages
    path: str | None = None

    @property
    @abstractmethod
    def height(self) -> int: ...

    @property
    @abstractmethod
    def width(self) -> int: ...

    @property
    @abstractmethod
    def channels(self) -> int: ...

    @property
    @abstractmethod
    def dtype(self) -> np.dtype: ...

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def bounds(self) -> Window:
        return Window(0, 0, self.height, self.width)

    @property
    def name(self) -> str:
        """Stem used for output files (``scene.tif`` -> ``scene``)."""
        if self.path is None:
            return "array"
        base = os.path.basename(self.path)
        for suffix in (".ome.tiff", ".ome.tif"):
            if base.lower().endswith(suffix):
                return base[: -len(suffix)]
        return os.path.splitext(base)[0]

    def resolve_window(self, window: Window | None) -> Window:
        """``window`` checked against the image; ``None`` means the whole image.

        Raises ``ValueError`` when the window reaches outside the image (clip it
        first with ``Window.clip``). Empty windows are allowed.
        """
        if window is None:
            return self.bounds
        if not isinstance(window, Window):
            window = Window(*window)
        if not self.bounds.contains(window):
            raise ValueError(
                f"window {window} reaches outside the {self.height}x{self.width} image"
                + (f" {self.path}" if self.path else "")
                + "; clip it first"
            )
        return window

    @abstractmethod
    def read(
        self,
        window: Window | None = None,
        out_size: tuple[int, int] | None = None,
        resample: str = "area",
    ) -> np.ndarray:
        """Pixels of ``window`` (default: the whole image) as ``(h, w, C)``.

        With ``out_size=(h, w)`` the window is resampled to that size, using a
        pyramid level when the file has one. ``resample`` is ``"area"`` (averaging,
        for images), ``"bilinear"`` or ``"nearest"`` (for label masks). Windows
        reaching outside the image are an error; clip them first.
        """

    @abstractmethod
    def thumbnail(self, max_side: int, resample: str = "area") -> np.ndarray:
        """The whole image with its longer side scaled to ``max_side`` (the global view)."""

    @property
    def geo_tags(self) -> list[tuple[int, int, int, object]]:
        """GeoTIFF georeferencing as tifffile ``extratags`` entries ``(code, dtype, count, value)``.

        Empty when the source carries no georeferencing. Writers copy these so a
        predicted mask overlays its scene in GIS tools.
        """
        return []

    def close(self) -> None:
        """Release file handles (sources are also context managers)."""

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "<array>"
        return f"{type(self).__name__}({where!r}, {self.height}x{self.width}x{self.channels}, {self.dtype})"


def thumbnail_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Size of a thumbnail whose longer side is ``max_side`` (aspect kept, at least 1 px)."""
    scale = max_side / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)))
