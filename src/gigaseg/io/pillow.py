"""``PillowSource``: PNG, JPEG (and other Pillow formats), decoded whole on first read.

Pillow cannot decode part of a PNG or JPEG, so the whole image is decoded the
first time pixels are needed and kept. With ``max_memory`` the decoded size
``H * W * C * itemsize`` is checked when the file is opened, and an image that
would not fit is refused with advice to convert it to a tiled TIFF (which
``TiffSource`` reads tile by tile).

Modes: ``L`` (1 channel), ``LA`` (2), ``RGB`` (3), ``RGBA`` (4), ``P``
(palette: the indices, 1 channel; the colours are ``.palette``), ``PA``
(index + alpha), ``1`` (bilevel, as uint8 0/1), ``I;16*`` (uint16), ``I``
(int32), ``F`` (float32). ``CMYK``/``YCbCr``/``LAB``/``HSV`` are converted to
RGB. Pixels are returned as stored (no EXIF rotation); for animated formats
only the first frame is read.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import numpy as np

from ..errors import ImageReadError
from ..memory import format_size
from .base import FileSource, InMemorySource, check_image_file

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif")

#: Pillow mode -> (channels, numpy dtype) of the array gigaseg returns
_MODES = {
    "1": (1, np.uint8),
    "L": (1, np.uint8),
    "P": (1, np.uint8),
    "LA": (2, np.uint8),
    "La": (2, np.uint8),
    "PA": (2, np.uint8),
    "RGB": (3, np.uint8),
    "RGBA": (4, np.uint8),
    "RGBa": (4, np.uint8),
    "RGBX": (4, np.uint8),
    "I;16": (1, np.uint16),
    "I;16L": (1, np.uint16),
    "I;16B": (1, np.uint16),
    "I;16N": (1, np.uint16),
    "I": (1, np.int32),
    "F": (1, np.float32),
}
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")

_bomb_lock = threading.Lock()


@contextlib.contextmanager
def _no_pixel_limit():
    """Pillow's decompression-bomb guard off: gigaseg checks memory itself."""
    from PIL import Image

    with _bomb_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class PillowSource(FileSource, InMemorySource):
    """An image Pillow decodes whole (PNG, JPEG, ...); see the module docstring.

    Opening reads only the header; the pixels are decoded on the first read and kept.

    Args:
        path: the image file.
        max_memory: bytes, or a size string such as ``"2GB"``; an image whose
            decoded size (:attr:`decoded_bytes`) exceeds it is refused. None means
            no limit.

    Raises:
        ImageReadError: when the file is missing, not an image Pillow can identify,
            in an unsupported mode, or too large for ``max_memory``.
        ConfigError: when ``max_memory`` is not a valid positive size.
    """

    def __init__(self, path: str | os.PathLike, *, max_memory: int | str | None = None):
        from PIL import Image, UnidentifiedImageError

        super().__init__(path, max_memory=max_memory)
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()
        self._image = None  # an open PIL image, only between header parsing and close
        check_image_file(self.path)
        try:
            with _no_pixel_limit():
                image = Image.open(self.path)
        except UnidentifiedImageError as exc:
            raise ImageReadError(self.path, "not an image file gigaseg can read (PNG, JPEG or TIFF)") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageReadError(self.path, f"cannot open image ({type(exc).__name__}: {exc})") from exc
        self._image = image
        self._format = image.format
        mode = image.mode
        if mode in _TO_RGB:
            channels, dtype = 3, np.uint8
        elif mode in _MODES:
            channels, dtype = _MODES[mode]
        else:
            image.close()
            raise ImageReadError(self.path, f"unsupported image mode {mode!r}")
        self._mode = mode
        self._width, self._height = image.size
        self._channels = channels
        self._dtype = np.dtype(dtype)
        if self._max_memory is not None and self.decoded_bytes > self._max_memory:
            image.close()
            self._image = None
            raise ImageReadError(
                self.path,
                f"{self._format or 'this'} image of {self._height}x{self._width}x{self._channels} "
                f"{self._dtype} needs {format_size(self.decoded_bytes)} decoded, more than the memory "
                f"budget of {format_size(self._max_memory)}; PNG and JPEG can only be decoded whole. "
                f"Convert it to a tiled TIFF (e.g. `gdal_translate -co TILED=YES -co COMPRESS=DEFLATE "
                f"in out.tif` or tifffile.imwrite(..., tile=(512, 512))), which is read tile by tile",
            )
        self._palette = self._read_palette(image)
        # only the header is read here; the file is reopened to decode on first read
        image.close()
        self._image = None

    @staticmethod
    def _read_palette(image) -> np.ndarray | None:
        if image.mode not in ("P", "PA"):
            return None
        values = image.getpalette()
        if not values:
            return None
        return np.asarray(values, dtype=np.uint8)[: len(values) // 3 * 3].reshape(-1, 3)

    # -- properties --------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """Pillow mode of the file (``"RGB"``, ``"P"``, ``"I;16"``, ...)."""
        return self._mode

    @property
    def palette(self) -> np.ndarray | None:
        """``(N, 3)`` uint8 colours of a palette (``P``) image, else None; pixels are indices into it."""
        return None if self._palette is None else self._palette.copy()

    @property
    def decoded_bytes(self) -> int:
        """Memory the decoded image occupies (``H * W * C * itemsize``)."""
        return self._height * self._width * self._channels * self._dtype.itemsize

    @property
    def is_decoded(self) -> bool:
        """Whether the pixels are decoded and held in memory."""
        return self._array is not None

    # -- decoding -------------------------------------------------------------------------

    def _pixels(self) -> np.ndarray:
        """The whole image, decoded on first use and kept (reads slice and resample it)."""
        if self._array is not None:
            return self._array
        with self._lock:
            if self._array is not None:
                return self._array
            from PIL import Image

            image = self._image
            if image is None:
                with _no_pixel_limit():
                    try:
                        image = Image.open(self.path)
                    except Exception as exc:  # noqa: BLE001 - the file changed since opening
                        raise ImageReadError(self.path, f"cannot open image ({type(exc).__name__}: {exc})") from exc
            try:
                with _no_pixel_limit():
                    image.load()
                if self._mode in _TO_RGB:
                    image = image.convert("RGB")
                array = np.asarray(image)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any kind
                raise ImageReadError(
                    self.path,
                    f"cannot decode image ({type(exc).__name__}: {exc}); the file may be truncated or corrupt",
                ) from exc
            finally:
                image.close()
                self._image = None
            if array.dtype == np.bool_:
                array = array.astype(np.uint8)
            elif array.dtype != self._dtype:
                array = array.astype(self._dtype)
            if array.ndim == 2:
                array = array[:, :, None]
            if array.shape != self.shape:
                raise ImageReadError(self.path, f"decoded shape {array.shape} differs from the header's {self.shape}")
            self._array = array
            return array

    def close(self) -> None:
        """Drop the decoded pixels (and any open Pillow image); a later read decodes the file again."""
        if self._image is not None:
            self._image.close()
            self._image = None
        self._array = None
