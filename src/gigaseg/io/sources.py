"""``open_image``: one entry point for every image gigaseg reads.

A path is dispatched on the file's first bytes (its content), falling back on
the suffix only to word the error for files that are not what they claim:

* TIFF / BigTIFF (``.tif``, ``.tiff``, ``.btf``, ``.ome.tif(f)``, ...) -> ``TiffSource``
* PNG, JPEG and other formats Pillow identifies -> ``PillowSource``

Both refuse, when the file is opened, a file whose header declares more than one
decode may take (``max_memory``, else ``GIGASEG_MAX_DECODE``, else half the
machine's memory, capped; see ``gigaseg.io.pillow``): a whole PNG or JPEG, or
one strip or tile of a TIFF. Palette PNGs are expanded to their colours unless
``palette="indices"`` asks for the indices (what label masks need).

A numpy array (``(H, W)`` or ``(H, W, C)``) becomes an ``ArraySource``; an
``ImageSource`` is returned unchanged.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError, ImageReadError
from .array import ArraySource
from .base import ImageSource, check_image_file
from .pillow import PALETTE_CHOICES, PILLOW_SUFFIXES, PillowSource
from .tiff import TIFF_SUFFIXES, TiffSource

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff(path: str | os.PathLike) -> str | None:
    """Recognise a file's format from its first bytes.

    Args:
        path: the file.

    Returns:
        ``"tiff"`` (classic or BigTIFF, either byte order), ``"png"``, ``"jpeg"``,
        or None when the signature is none of these.

    Raises:
        OSError: when the file cannot be opened or read.
    """
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def open_image(source, *, max_memory: int | str | None = None, palette: str = "colors") -> ImageSource:
    """Open ``source`` (a path, an array or an ``ImageSource``) for lazy, windowed reading.

    Args:
        source: a path (``str``, ``bytes`` or ``os.PathLike``), a numpy array (or
            an object with ``__array__``) of shape ``(H, W)`` or ``(H, W, C)``, or
            an ``ImageSource``, which is returned unchanged.
        max_memory: bytes, or e.g. ``"2GB"``, that a file reader may decode at
            once: PNG/JPEG images whose estimated decode peak exceeds it are
            refused (they can only be decoded whole), so are TIFFs with a strip or
            tile larger than it, and TIFF resampled reads and thumbnails stream in
            bands of 1/8 of it (between 1 MiB and ``BAND_BYTES``). None means the
            decode cap (``GIGASEG_MAX_DECODE``, else half the machine's memory,
            capped) for those checks and ``BAND_BYTES`` bands. Ignored for arrays
            and ``ImageSource`` objects.
        palette: how Pillow palette images (PNG modes ``P``/``PA``) are read:
            ``"colors"`` expands them to RGB (RGBA with transparency), what a
            network needs; ``"indices"`` returns the indices with the colours in
            ``.palette``, what label masks need. TIFF files with a colour map are
            always read as indices (gigaseg's predicted masks are such files).
            Ignored for arrays and ``ImageSource`` objects.

    Returns:
        The image source: ``TiffSource``, ``PillowSource``, ``ArraySource`` or
        ``source`` itself.

    Raises:
        ImageReadError: for every problem with a file (missing, a directory,
            empty, unreadable, not the format its suffix claims, unsupported,
            declaring more than the decode budget), naming it.
        ConfigError: when ``max_memory`` is not a valid positive size, ``palette``
            is not ``"colors"`` or ``"indices"``, or ``GIGASEG_MAX_DECODE`` is invalid.
        TypeError: when ``source`` is none of the accepted kinds.
        ValueError: when an array has a bad shape or dtype, or is empty.
    """
    if palette not in PALETTE_CHOICES:
        raise ConfigError(f"palette must be 'colors' or 'indices', got {palette!r}")
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, np.ndarray):
        return ArraySource(source)
    if not isinstance(source, (str, bytes, os.PathLike)):
        if hasattr(source, "__array__"):
            return ArraySource(np.asarray(source))
        raise TypeError(f"cannot open {type(source).__name__!r} as an image; pass a path or an array")
    path = os.fsdecode(os.fspath(source))
    check_image_file(path)
    try:
        kind = sniff(path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if kind == "tiff":
        return TiffSource(path, max_memory=max_memory)
    if kind in ("png", "jpeg"):
        return PillowSource(path, max_memory=max_memory, palette=palette)
    lower = path.lower()
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "file is empty")
    if lower.endswith(TIFF_SUFFIXES):
        raise ImageReadError(path, "not a TIFF file (its content does not start with a TIFF header)")
    if lower.endswith(PILLOW_SUFFIXES):
        what = "PNG" if lower.endswith(".png") else "JPEG"
        raise ImageReadError(path, f"not a {what} file (its content does not start with a {what} signature)")
    # other formats: let Pillow try (BMP, WebP, GIF, ...); it raises ImageReadError if it cannot
    return PillowSource(path, max_memory=max_memory, palette=palette)
