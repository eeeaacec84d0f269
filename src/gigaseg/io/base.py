"""The lazy image-source contract shared by every reader.

An ``ImageSource`` knows its size, channel count and dtype without decoding
pixels. ``read`` decodes only what a window needs; ``thumbnail`` gives the
global (downsampled) view with bounded memory. Arrays are always ``(H, W, C)``
in the source's own dtype (uint8, uint16, float32, ...); see
``gigaseg.io.normalize`` for the conversion to network input.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod

import numpy as np

from ..errors import ImageReadError
from ..geometry import Window
from ..memory import parse_size
from .resample import RESAMPLING, axis_plan, check_out_size, check_resample, resample_region

__all__ = [
    "RESAMPLING",
    "FileSource",
    "ImageSource",
    "InMemorySource",
    "broken_link_problem",
    "check_image_file",
    "read_resized",
    "thumbnail_size",
]


class ImageSource(ABC):
    """A 2-D raster with ``channels`` bands that is read window by window.

    Subclasses provide ``height``, ``width``, ``channels`` and ``dtype`` and either
    implement ``_read_window`` and ``_read_resampled`` or override ``read``.
    """

    #: file the pixels come from (None for in-memory arrays); used in error messages
    path: str | None = None

    @property
    @abstractmethod
    def height(self) -> int:
        """Number of rows of the full-resolution image."""

    @property
    @abstractmethod
    def width(self) -> int:
        """Number of columns of the full-resolution image."""

    @property
    @abstractmethod
    def channels(self) -> int:
        """Number of channels (bands) ``C`` of every read."""

    @property
    @abstractmethod
    def dtype(self) -> np.dtype:
        """dtype of the pixels reads return (the file's own, e.g. uint8 or uint16)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)``."""
        return (self.height, self.width, self.channels)

    @property
    def bounds(self) -> Window:
        """The window covering the whole image."""
        return Window(0, 0, self.height, self.width)

    @property
    def name(self) -> str:
        """Stem used for output files (``scene.v1.tif`` -> ``scene.v1``; see :func:`output_stem`)."""
        return "array" if self.path is None else output_stem(self.path)

    def resolve_window(self, window: Window | None) -> Window:
        """``window`` checked against the image.

        Args:
            window: a ``Window``, a ``(top, left, height, width)`` tuple, or None
                for the whole image. Empty windows are allowed.

        Returns:
            The window as a ``Window``.

        Raises:
            ValueError: when the window reaches outside the image (clip it first
                with ``Window.clip``).
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

    def read(
        self,
        window: Window | None = None,
        out_size: tuple[int, int] | None = None,
        resample: str = "area",
    ) -> np.ndarray:
        """Pixels of ``window``, optionally resampled.

        Args:
            window: the region to read, in full-resolution pixels; None means the
                whole image. It must lie inside the image (clip it first).
            out_size: ``(h, w)`` to resample the window to, using a pyramid level
                when the file has one; None (or the window's own size) reads it
                at full resolution.
            resample: ``"area"`` (averaging, for images), ``"bilinear"`` or
                ``"nearest"`` (for label masks); see ``gigaseg.io.resample``.

        Returns:
            ``(h, w, C)`` array in the source's dtype, owned by the caller.

        Raises:
            ValueError: for an unknown ``resample``, a window reaching outside the
                image, a bad ``out_size``, or resampling an empty window.
            ImageReadError: when the file cannot be read or decoded.
        """
        # the checks live here so every reader rejects the same arguments with the same words
        check_resample(resample)
        win = self.resolve_window(window)
        if out_size is not None:
            out_size = check_out_size(out_size)
        if out_size is None or out_size == win.shape:
            return self._read_window(win)
        if win.area == 0:
            raise ValueError(f"cannot resample the empty window {win}")
        return self._read_resampled(win, out_size, resample)

    def _read_window(self, win: Window) -> np.ndarray:
        """Pixels of the checked window ``win`` at full resolution, as a new array the caller owns."""
        raise NotImplementedError(f"{type(self).__name__} must implement _read_window or override read")

    def _read_resampled(self, win: Window, out_size: tuple[int, int], resample: str) -> np.ndarray:
        """The checked, non-empty window ``win`` resampled to ``out_size`` (a checked pair)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _read_resampled or override read")

    def thumbnail(self, max_side: int, resample: str = "area") -> np.ndarray:
        """The whole image with its longer side scaled to ``max_side`` (the global view).

        Cached per ``(max_side, resample)``; each call returns a copy the caller may modify.

        Args:
            max_side: length in pixels of the thumbnail's longer side (the image is
                enlarged when it is smaller).
            resample: ``"area"``, ``"bilinear"`` or ``"nearest"``, as in :meth:`read`.

        Returns:
            ``(h, w, C)`` array in the source's dtype, of size
            :func:`thumbnail_size` ``(height, width, max_side)``.

        Raises:
            ValueError: for an unknown ``resample``.
            ImageReadError: when the file cannot be read or decoded.
        """
        check_resample(resample)
        key = (int(max_side), resample)
        thumbs = self.__dict__.setdefault("_thumbs", {})
        if key not in thumbs:
            size = thumbnail_size(self.height, self.width, int(max_side))
            thumbs[key] = self.read(None, size, resample)
        return thumbs[key].copy()

    @property
    def geo_tags(self) -> list[tuple[int, int, int, object]]:
        """GeoTIFF georeferencing as tifffile ``extratags`` entries ``(code, dtype, count, value)``.

        Empty when the source carries no georeferencing. Writers copy these so a
        predicted mask overlays its scene in GIS tools.
        """
        return []

    @property
    def ome_pixel_size(self) -> dict[str, object] | None:
        """The physical pixel size of an OME-TIFF, as OME ``Pixels`` attributes.

        ``PhysicalSizeX``, ``PhysicalSizeXUnit``, ``PhysicalSizeY``, ``PhysicalSizeYUnit`` (those
        the file states; ``{}`` for an OME image that states none); None when the source is
        not OME. Mask writers copy these so a mask of a slide keeps its scale.
        """
        return None

    def close(self) -> None:  # noqa: B027 - sources without file handles have nothing to release
        """Release file handles (sources are also context managers)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "<array>"
        return f"{type(self).__name__}({where!r}, {self.height}x{self.width}x{self.channels}, {self.dtype})"


def output_stem(path: str | os.PathLike) -> str:
    """The name outputs made from an image file take: the whole file name minus its image extension.

    ``scene.v1.tif`` -> ``scene.v1``; ``slide.ome.tiff`` -> ``slide``; ``a.b`` -> ``a`` (any
    other last suffix is taken as the extension too).

    Args:
        path: the image file.

    Returns:
        The stem.
    """
    base = os.path.basename(os.fspath(path))
    for suffix in (".ome.tiff", ".ome.tif"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def read_resized(source: ImageSource, window: Window, size: tuple[int, int]) -> np.ndarray:
    """The pixels of ``window`` resized to ``size``.

    Area averaging when neither side grows, bilinear when either side is enlarged;
    a plain read when ``size`` is the window's own size.

    Args:
        source: the image.
        window: the region to read (inside the image).
        size: the output ``(height, width)``.

    Returns:
        ``(height, width, channels)`` in the source's dtype.
    """
    size = tuple(size)
    if size == window.shape:
        return source.read(window)
    shrinking = size[0] <= window.height and size[1] <= window.width
    return source.read(window, out_size=size, resample="area" if shrinking else "bilinear")


def thumbnail_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Size of a thumbnail whose longer side is ``max_side`` (aspect kept, at least 1 px).

    Args:
        height: rows of the image.
        width: columns of the image.
        max_side: length of the thumbnail's longer side.

    Returns:
        ``(h, w)``, each rounded to the nearest integer and at least 1.
    """
    scale = max_side / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def check_image_file(path: str) -> None:
    """Check that ``path`` names an existing file (not a directory).

    Args:
        path: the image file.

    Raises:
        ImageReadError: when the file does not exist (a symbolic link that leads nowhere, or
            into a loop of links, says so) or is a directory.
    """
    if not os.path.exists(path):
        raise ImageReadError(path, broken_link_problem(path) or "file not found")
    if os.path.isdir(path):
        raise ImageReadError(path, "is a directory, not an image file")


def broken_link_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with ``path`` when it is a symbolic link that does not lead to a file.

    Args:
        path: a path that does not exist (``os.path.exists`` is False).

    Returns:
        "is a symbolic link in a loop of links ..." or "is a symbolic link to <target>, which does
        not exist"; None when ``path`` is not a symbolic link.
    """
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link in a loop of links (it never reaches a file)"
    return f"is a symbolic link to {os.readlink(path)}, which does not exist"


class InMemorySource(ImageSource):
    """A source whose whole ``(H, W, C)`` array is in memory (or decoded into it on demand).

    Subclasses only provide ``_pixels``; windows are sliced from it and
    resampled without copying the source.
    """

    @abstractmethod
    def _pixels(self) -> np.ndarray:
        """The whole image as ``(H, W, C)`` in the source dtype (may be a view; never modified)."""

    def _read_window(self, win: Window) -> np.ndarray:
        return self._pixels()[win.slices].copy()

    def _read_resampled(self, win: Window, out_size: tuple[int, int], resample: str) -> np.ndarray:
        array = self._pixels()

        def read_block(top, bottom, left, right):
            return array[top:bottom, left:right]

        py = axis_plan(win.top, win.bottom, out_size[0], self.height, resample)
        px = axis_plan(win.left, win.right, out_size[1], self.width, resample)
        return resample_region(read_block, py, px, self.channels, self.dtype)


class FileSource(ImageSource):
    """A source reading a file whose header gave its size, channels and dtype.

    Subclasses set ``_height``, ``_width``, ``_channels`` and ``_dtype`` when they
    open the file. Open file handles do not pickle, so a copy sent to another
    process (a DataLoader worker) pickles as ``(path, max_memory)`` and reopens
    the file.

    Args:
        path: the image file.
        max_memory: bytes, or a size string such as ``"2GB"``, that the reader may
            decode at once (what it bounds depends on the reader); None means no
            bound.

    Raises:
        ConfigError: when ``max_memory`` is not a valid positive size.
    """

    def __init__(self, path: str | os.PathLike, *, max_memory: int | str | None = None):
        self.path = os.fspath(path)
        self._max_memory = None if max_memory is None else parse_size(max_memory)

    @property
    def height(self) -> int:
        """Number of rows, from the file's header."""
        return self._height

    @property
    def width(self) -> int:
        """Number of columns, from the file's header."""
        return self._width

    @property
    def channels(self) -> int:
        """Number of channels, from the file's header."""
        return self._channels

    @property
    def dtype(self) -> np.dtype:
        """Pixel dtype, from the file's header."""
        return self._dtype

    def __getstate__(self) -> dict:
        return {"path": self.path, "max_memory": self._max_memory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], max_memory=state["max_memory"])
