"""A one-channel image seen with its channel repeated, for networks that take more bands.

A grey scan given to a network trained on RGB images is read with its grey channel copied
into every band (what Pillow-based tools do when they convert "L" images to "RGB"); reads
and thumbnails go to the grey source and are repeated afterwards.
"""

from __future__ import annotations

import numpy as np

from ..geometry import Window
from .base import ImageSource

__all__ = ["RepeatedChannels"]


class RepeatedChannels(ImageSource):
    """The single channel of ``parent`` repeated ``channels`` times.

    Args:
        parent: a one-channel image.
        channels: the channel count to present (at least 1).

    Raises:
        ValueError: when ``parent`` has more than one channel or ``channels`` is below 1.
    """

    def __init__(self, parent: ImageSource, channels: int):
        if parent.channels != 1:
            raise ValueError(f"only a one-channel image can be repeated, this one has {parent.channels}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.parent = parent
        self.path = parent.path
        self._channels = int(channels)

    @property
    def height(self) -> int:
        """The parent's rows."""
        return self.parent.height

    @property
    def width(self) -> int:
        """The parent's columns."""
        return self.parent.width

    @property
    def channels(self) -> int:
        """The repeated channel count."""
        return self._channels

    @property
    def dtype(self) -> np.dtype:
        """The parent's dtype."""
        return self.parent.dtype

    @property
    def name(self) -> str:
        """The parent's name."""
        return self.parent.name

    @property
    def geo_tags(self) -> list:
        """The parent's georeferencing."""
        return self.parent.geo_tags

    @property
    def ome_pixel_size(self) -> dict | None:
        """The parent's OME physical pixel size."""
        return self.parent.ome_pixel_size

    def read(
        self, window: Window | None = None, out_size: tuple[int, int] | None = None, resample: str = "area"
    ) -> np.ndarray:
        """Pixels of ``window`` with the channel repeated (see :meth:`ImageSource.read`).

        Args:
            window: the region to read; None means the whole image.
            out_size: ``(h, w)`` to resample to, or None for full resolution.
            resample: ``"area"``, ``"bilinear"`` or ``"nearest"``.

        Returns:
            ``(h, w, channels)`` in the parent's dtype.
        """
        grey = self.parent.read(window, out_size, resample)
        return np.repeat(grey[..., :1], self._channels, axis=2)

    def close(self) -> None:
        """Close the parent."""
        self.parent.close()
