"""Lazy readers and streaming writers for images far larger than RAM.

Readers: ``open_image`` returns an ``ImageSource`` (TIFF/BigTIFF/OME/GeoTIFF via
tifffile + zarr, PNG/JPEG via Pillow, numpy arrays). Writers: ``write_tiled_tiff``
(pull-based) and ``MaskWriter`` (push-based, resumable) in ``gigaseg.io.writers``.
"""

from .base import ImageSource
from .normalize import Normalization
from .sources import open_image

__all__ = ["ImageSource", "Normalization", "open_image"]
