"""``PillowSource``: PNG, JPEG (and other Pillow formats), decoded whole on first read.

Pillow cannot decode part of a PNG or JPEG, so the whole image is decoded the
first time pixels are needed and kept. Decoding takes more than the decoded
array (``decoded_bytes = H * W * C * itemsize``): Pillow holds its own buffer
while the array is filled, and some decoders (progressive JPEG) keep the whole
image's coefficients. ``estimated_peak_bytes`` scales ``decoded_bytes`` by
``DECODE_PEAK_FACTOR`` (per format) and adds ``DECODE_PEAK_FIXED_BYTES``, both
taken from ``benchmarks/pillow_decode.py``.

That estimate is checked from the header when the file is opened, before
anything is decoded, against a decode budget:

* ``max_memory`` when given (``--max-memory`` on the command line);
* else the environment variable ``GIGASEG_MAX_DECODE`` (a size such as
  ``"8GB"``, or ``"none"`` for no cap);
* else a default cap of half the machine's memory (the smaller of the physical
  memory and a cgroup limit), at most ``DEFAULT_CAP_LIMIT``.

A file whose header declares more (a few-byte "decompression bomb" declaring
100000 x 100000 pixels, or a genuine but huge image) is refused with an
``ImageReadError`` that names the file, its declared size and the two ways on:
convert it to a tiled TIFF (which ``TiffSource`` reads tile by tile) or raise
the budget. ``TiffSource`` checks its strips and tiles against the same budget
(:func:`decode_budget`). Pillow's own pixel-count guard is off: this check
replaces it.

Modes: ``L`` (1 channel), ``LA`` (2), ``RGB`` (3), ``RGBA`` (4), ``1`` (bilevel,
as uint8 0/1), ``I;16*`` (uint16), ``I`` (int32), ``F`` (float32).
``CMYK``/``YCbCr``/``LAB``/``HSV`` are converted to RGB. Palette images (``P``,
``PA``) are expanded to their colours by default (``palette="colors"``): RGB,
or RGBA for ``PA`` and for ``P`` with transparency. ``palette="indices"`` reads
the palette indices instead (1 channel, ``PA``: index + alpha), with the
colours in ``.palette``: what label masks need. Pixels are returned as stored
(no EXIF rotation); for animated formats only the first frame is read.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings

import numpy as np

from ..errors import ConfigError, ImageReadError
from ..memory import format_size, parse_size
from .base import FileSource, InMemorySource, check_image_file

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif")

#: peak memory of decoding a file through ``PillowSource`` (Pillow's buffer, the decoder's own
#: buffers and the array gigaseg keeps), as a multiple of ``decoded_bytes``, per format: the largest
#: ratio benchmarks/pillow_decode.py measured for that format (PNG: RGB, grey, 16-bit grey, palette;
#: JPEG: RGB and grey, baseline and progressive), rounded up. Rerun the script to update.
DECODE_PEAK_FACTOR = {"PNG": 2.45, "JPEG": 2.45, "JPEG (progressive)": 3.4}
#: plus this many bytes: the largest peak benchmarks/pillow_decode.py measured above the factor's share
#: (small images, where the decoders' own buffers dominate), rounded up
DECODE_PEAK_FIXED_BYTES = 5 * 10**6
#: factor for formats the benchmark does not measure (BMP, WebP, GIF, TIFF through Pillow, ...)
OTHER_FORMAT_FACTOR = max(DECODE_PEAK_FACTOR.values())

#: environment variable that sets the decode budget when no ``max_memory`` is given
DECODE_CAP_ENV = "GIGASEG_MAX_DECODE"
#: the default decode cap (no ``max_memory``, no ``GIGASEG_MAX_DECODE``) is the machine's memory divided by this ...
DEFAULT_CAP_DIVISOR = 2
#: ... but at most this many bytes
DEFAULT_CAP_LIMIT = 16 * 10**9
#: the default cap where the machine's memory cannot be read
DEFAULT_CAP_UNKNOWN = 4 * 10**9
#: values of ``GIGASEG_MAX_DECODE`` that switch the cap off
_NO_CAP = ("none", "off", "unlimited")
#: rows of the whole image are copied out of Pillow's buffer in bands of about this many bytes
_BAND_BYTES = 2**20

#: Pillow mode -> (channels, numpy dtype) of the array gigaseg returns (palette modes: their indices)
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
PALETTE_CHOICES = ("colors", "indices")

_bomb_lock = threading.Lock()


@contextlib.contextmanager
def _no_pixel_limit():
    """Pillow's decompression-bomb guard off: gigaseg checks the header against its decode budget."""
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


# -- the decode budget ----------------------------------------------------------------------


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None when there is none or it cannot be read."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 2**60:  # v1 reports "no limit" as a huge number
            return int(text)
    return None


@functools.cache
def machine_memory() -> int | None:
    """Memory this process can have: the physical memory, or its cgroup's limit when smaller.

    Returns:
        Bytes, or None where neither can be read.
    """
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        physical = None
    sizes = [s for s in (physical, _cgroup_limit()) if s is not None and s > 0]
    return min(sizes) if sizes else None


def default_decode_cap() -> int:
    """The decode budget when neither ``max_memory`` nor ``GIGASEG_MAX_DECODE`` is given.

    Returns:
        Bytes: :func:`machine_memory` divided by ``DEFAULT_CAP_DIVISOR``, at most
        ``DEFAULT_CAP_LIMIT``; ``DEFAULT_CAP_UNKNOWN`` where the machine's memory is unknown.
    """
    memory = machine_memory()
    if memory is None:
        return DEFAULT_CAP_UNKNOWN
    return min(DEFAULT_CAP_LIMIT, memory // DEFAULT_CAP_DIVISOR)


def decode_budget(max_memory: int | None) -> tuple[int | None, str]:
    """The bytes one decode may take, and how to name that budget in a message.

    Args:
        max_memory: the reader's ``max_memory`` in bytes, or None.

    Returns:
        ``(budget, words)``: ``max_memory`` when given; else ``GIGASEG_MAX_DECODE`` when set
        (None when it says ``"none"``); else :func:`default_decode_cap`. ``words`` names the
        budget and how to change it, e.g. ``"the memory budget of 2.00 GB (max_memory / --max-memory)"``.

    Raises:
        ConfigError: when ``GIGASEG_MAX_DECODE`` is set to something that is not a size or ``"none"``.
    """
    if max_memory is not None:
        return max_memory, f"the memory budget of {format_size(max_memory)} (max_memory / --max-memory)"
    text = os.environ.get(DECODE_CAP_ENV, "").strip()
    if text:
        if text.lower() in _NO_CAP:
            return None, f"no decode cap ({DECODE_CAP_ENV}={text})"
        try:
            cap = parse_size(text)
        except ConfigError as exc:
            raise ConfigError(
                f"{DECODE_CAP_ENV}={text!r}: {exc}; give a size such as '8GB', or 'none' for no cap"
            ) from exc
        return cap, f"the decode cap {DECODE_CAP_ENV}={text} ({format_size(cap)})"
    cap = default_decode_cap()
    how = (
        f"half the machine's memory, at most {format_size(DEFAULT_CAP_LIMIT)}"
        if machine_memory() is not None
        else "the machine's memory is unknown"
    )
    return cap, f"the default decode cap of {format_size(cap)} ({how}; set {DECODE_CAP_ENV} or max_memory to change it)"


def raise_hint(needed: int, max_memory: int | None) -> str:
    """How to give a decode of ``needed`` bytes enough budget, for the end of an error message.

    Args:
        needed: bytes the decode needs.
        max_memory: the reader's ``max_memory`` (None when the decode cap applied).

    Returns:
        E.g. ``"raise max_memory / --max-memory to 3GB or more"`` or
        ``"set GIGASEG_MAX_DECODE=3GB (or pass max_memory / --max-memory)"``.
    """
    size = f"{max(1, math.ceil(needed / 1e9))}GB"
    if max_memory is not None:
        return f"raise max_memory / --max-memory to {size} or more"
    return f"set {DECODE_CAP_ENV}={size} (or pass max_memory / --max-memory)"


# -- the source -------------------------------------------------------------------------------


class PillowSource(FileSource, InMemorySource):
    """An image Pillow decodes whole (PNG, JPEG, ...); see the module docstring.

    Opening reads only the header (and checks the decode budget); the pixels are
    decoded on the first read and kept.

    Args:
        path: the image file.
        max_memory: bytes, or a size string such as ``"2GB"``, that decoding may
            take; an image whose :attr:`estimated_peak_bytes` exceeds it is refused.
            None means the decode cap (``GIGASEG_MAX_DECODE``, else half the
            machine's memory, at most ``DEFAULT_CAP_LIMIT``).
        palette: how palette images (Pillow modes ``P``, ``PA``) are read:
            ``"colors"`` (images: RGB, or RGBA with transparency) or ``"indices"``
            (label masks: the indices, colours in :attr:`palette`). Other modes
            ignore it.

    Raises:
        ImageReadError: when the file is missing, not an image Pillow can identify,
            in an unsupported mode, or declares a size beyond the decode budget.
        ConfigError: when ``max_memory`` is not a valid positive size, ``palette`` is
            not one of ``"colors"``, ``"indices"``, or ``GIGASEG_MAX_DECODE`` is invalid.
    """

    def __init__(self, path: str | os.PathLike, *, max_memory: int | str | None = None, palette: str = "colors"):
        from PIL import Image, UnidentifiedImageError

        if palette not in PALETTE_CHOICES:
            raise ConfigError(f"palette must be 'colors' or 'indices', got {palette!r}")
        super().__init__(path, max_memory=max_memory)
        self._palette_mode = palette
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()
        check_image_file(self.path)
        try:
            with _no_pixel_limit():
                image = Image.open(self.path)
        except UnidentifiedImageError as exc:
            raise ImageReadError(self.path, "not an image file gigaseg can read (PNG, JPEG or TIFF)") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageReadError(self.path, f"cannot open image ({type(exc).__name__}: {exc})") from exc
        # only the header is read here; the file is reopened to decode on first read
        with image:
            self._format = image.format
            self._progressive = bool(image.info.get("progressive") or image.info.get("progression"))
            mode = image.mode
            self._convert = None  # Pillow mode the pixels are converted to, if any
            if mode in _TO_RGB:
                self._convert, channels, dtype = "RGB", 3, np.uint8
            elif mode in ("P", "PA") and palette == "colors":
                transparent = mode == "PA" or "transparency" in image.info
                transparent = transparent or getattr(image.palette, "mode", "RGB") == "RGBA"
                self._convert = "RGBA" if transparent else "RGB"
                channels, dtype = len(self._convert), np.uint8
            elif mode in _MODES:
                channels, dtype = _MODES[mode]
            else:
                raise ImageReadError(self.path, f"unsupported image mode {mode!r}")
            self._mode = mode
            self._width, self._height = image.size
            self._channels = channels
            self._dtype = np.dtype(dtype)
            self._check_budget()
            self._palette = self._read_palette(image)

    def _check_budget(self) -> None:
        """Refuse the file when decoding it would take more than the decode budget (see the module docstring)."""
        budget, words = decode_budget(self._max_memory)
        needed = self.estimated_peak_bytes
        if budget is None or needed <= budget:
            return
        what = self._format or "this"
        name = os.path.basename(self.path)
        stem = os.path.splitext(name)[0] or "image"
        raise ImageReadError(
            self.path,
            f"its header declares a {what} image of {self._height}x{self._width}x{self._channels} {self._dtype} "
            f"({format_size(self.decoded_bytes)} decoded, about {format_size(needed)} to decode, in a file of "
            f"{format_size(os.path.getsize(self.path))}), more than {words}; PNG and JPEG can only be decoded whole. "
            f"Convert it to a tiled TIFF, which is read tile by tile (e.g. `gdal_translate -co TILED=YES "
            f"-co COMPRESS=DEFLATE {name} {stem}.tif` or tifffile.imwrite(..., tile=(512, 512))), or, if the "
            f"image is genuine and the machine has the memory, {raise_hint(needed, self._max_memory)}",
        )

    @staticmethod
    def _read_palette(image) -> np.ndarray | None:
        if image.mode not in ("P", "PA"):
            return None
        values = image.getpalette()
        if not values:
            return None
        return np.asarray(values, dtype=np.uint8)[: len(values) // 3 * 3].reshape(-1, 3)

    def with_palette(self, palette: str) -> PillowSource:
        """This file read with another palette handling.

        Args:
            palette: ``"colors"`` or ``"indices"`` (see the class).

        Returns:
            ``self`` when it already reads palettes so, else a new source on the same file
            and budget (only its header is read).

        Raises:
            ConfigError: when ``palette`` is not one of the two.
            ImageReadError: when the file can no longer be opened.
        """
        if palette == self._palette_mode:
            return self
        return PillowSource(self.path, max_memory=self._max_memory, palette=palette)

    # -- properties --------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """Pillow mode of the file (``"RGB"``, ``"P"``, ``"I;16"``, ...), before any conversion."""
        return self._mode

    @property
    def format(self) -> str | None:
        """Pillow's name of the file format (``"PNG"``, ``"JPEG"``, ...)."""
        return self._format

    @property
    def palette_mode(self) -> str:
        """How palette images are read: ``"colors"`` or ``"indices"``."""
        return self._palette_mode

    @property
    def palette(self) -> np.ndarray | None:
        """``(N, 3)`` uint8 colours of a palette (``P``/``PA``) file, else None.

        With ``palette="indices"`` the pixels are indices into it; with ``"colors"`` they are
        already these colours.
        """
        return None if self._palette is None else self._palette.copy()

    @property
    def decoded_bytes(self) -> int:
        """Memory the decoded image occupies (``H * W * C * itemsize``)."""
        return self._height * self._width * self._channels * self._dtype.itemsize

    @property
    def decode_peak_factor(self) -> float:
        """``DECODE_PEAK_FACTOR`` of this file's format (``OTHER_FORMAT_FACTOR`` for unmeasured formats)."""
        key = "JPEG (progressive)" if self._format == "JPEG" and self._progressive else self._format
        return DECODE_PEAK_FACTOR.get(key, OTHER_FORMAT_FACTOR)

    @property
    def estimated_peak_bytes(self) -> int:
        """Memory decoding the file takes at its peak.

        :attr:`decoded_bytes` times :attr:`decode_peak_factor`, plus ``DECODE_PEAK_FIXED_BYTES``.
        """
        return math.ceil(self.decoded_bytes * self.decode_peak_factor) + DECODE_PEAK_FIXED_BYTES

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
            self._array = self._decode()
            return self._array

    def _decode(self) -> np.ndarray:
        """Decode the file into a new ``(H, W, C)`` array.

        Pillow decodes into its own buffer; the rows are then copied out in bands, so the
        peak is that buffer plus the array (not also a whole-image ``tobytes`` copy).
        """
        from PIL import Image

        with _no_pixel_limit():
            try:
                image = Image.open(self.path)
            except Exception as exc:  # noqa: BLE001 - the file changed since opening
                raise ImageReadError(self.path, f"cannot open image ({type(exc).__name__}: {exc})") from exc
        with image:
            if image.size != (self._width, self._height) or image.mode != self._mode:
                raise ImageReadError(
                    self.path,
                    f"the file changed since it was opened ({image.size[1]}x{image.size[0]} {image.mode}, "
                    f"was {self._height}x{self._width} {self._mode})",
                )
            try:
                with _no_pixel_limit():
                    image.load()
                array = np.empty(self.shape, dtype=self._dtype)
                rows = max(1, _BAND_BYTES // max(1, self._width * self._channels * self._dtype.itemsize))
                for top in range(0, self._height, rows):
                    bottom = min(self._height, top + rows)
                    band = image.crop((0, top, self._width, bottom))
                    if self._convert is not None:
                        band = band.convert(self._convert)
                    values = np.asarray(band)
                    array[top:bottom] = values.reshape(bottom - top, self._width, -1)
                    band.close()
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any kind
                raise ImageReadError(
                    self.path,
                    f"cannot decode image ({type(exc).__name__}: {exc}); the file may be truncated or corrupt",
                ) from exc
        return array

    def close(self) -> None:
        """Drop the decoded pixels; a later read decodes the file again."""
        self._array = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "palette": self._palette_mode}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], max_memory=state["max_memory"], palette=state.get("palette", "colors"))
