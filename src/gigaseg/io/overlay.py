"""Small pictures for people: PNG writing and label-over-image colour overlays.

Everything here works on the *global view*: the image's thumbnail and the mask
resampled (nearest) to the same size, so a 100k x 100k scene costs no more than
its ``max_side`` preview.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .atomic import atomic_output
from .base import ImageSource
from .palette import as_palette, colorize, default_palette


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as a PNG, atomically.

    Args:
        path: the output file (its folder is created if needed).
        array: uint8 ``(H, W)`` / ``(H, W, 1)`` (greyscale), ``(H, W, 3)`` (RGB)
            or ``(H, W, 4)`` (RGBA); or uint16 ``(H, W)`` / ``(H, W, 1)``
            (16-bit greyscale).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: for any other dtype or shape.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.frombuffer(
            "I;16",
            (array.shape[1], array.shape[0]),
            np.ascontiguousarray(array, dtype="<u2").tobytes(),
            "raw",
            "I;16",
            0,
            1,
        )
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        image = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise ValueError(
            f"write_png takes uint8 (H, W), (H, W, 3), (H, W, 4) or uint16 (H, W); got {array.dtype} {array.shape}"
        )
    final = Path(path)
    with atomic_output(final) as tmp:
        image.save(tmp, format="PNG")
    return final


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """An image as RGB uint8 for viewing.

    One or two channels become grey (the first channel); more than three keep the
    first three. bool becomes 0/255; other non-uint8 data are stretched linearly
    from their 2nd to 98th percentile (over the finite values) to 0..255 and
    clipped; non-finite values become 0.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` pixels of any numeric dtype.

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        ValueError: when the image is not 2-D or 3-D.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W[, C]) image, got shape {image.shape}")
    image = np.repeat(image[..., :1], 3, axis=2) if image.shape[2] < 3 else image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    data = image.astype(np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = np.percentile(data[finite], (2, 98))
    if high <= low:
        high = low + 1
    scaled = (np.where(finite, data, low) - low) * (255.0 / (high - low))
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def overlay(
    image_rgb: np.ndarray,
    labels: np.ndarray,
    palette=None,
    alpha: float = 0.5,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colour(label)``, rounded half up, as RGB uint8.

    Args:
        image_rgb: ``(H, W[, C])`` image; converted with :func:`to_display_rgb`.
        labels: ``(H, W)`` or ``(H, W, 1)`` integer label mask of the same size.
        palette: ``(N, 3)`` colours of the classes; None uses ``default_palette(255)``.
        alpha: weight of the label colour, in [0, 1].
        ignore_index: label whose pixels show the image unchanged; None for none.

    Returns:
        ``(H, W, 3)`` uint8 blend.

    Raises:
        ValueError: when ``alpha`` is outside [0, 1], the sizes differ, or a label
            has no palette colour.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image = to_display_rgb(image_rgb)
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[2] == 1:
        labels = labels[..., 0]
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    palette = default_palette(255) if palette is None else as_palette(palette)
    colours = colorize(labels, palette, ignore_index=ignore_index)
    blend = image.astype(np.float32) * (1.0 - alpha) + colours.astype(np.float32) * alpha
    out = np.floor(blend + 0.5).clip(0, 255).astype(np.uint8)
    if ignore_index is not None:
        ignored = labels == ignore_index
        out[ignored] = image[ignored]
    return out


def nearest_indices(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize (pixel centres aligned).

    Args:
        out_size: number of output pixels along the axis.
        in_size: number of source pixels along the axis.

    Returns:
        int64 ``(out_size,)`` indices in ``0 .. in_size - 1``, non-decreasing.
    """
    return np.minimum(((np.arange(out_size) + 0.5) * (in_size / out_size)).astype(np.int64), in_size - 1)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an array along its first two axes.

    Args:
        labels: ``(H, W)`` or ``(H, W, ...)`` array.
        size: the output ``(h, w)``.

    Returns:
        ``(h, w, ...)`` array of the same dtype; ``labels`` itself when it already
        has that size.
    """
    labels = np.asarray(labels)
    if labels.shape[:2] == tuple(size):
        return labels
    rows = nearest_indices(size[0], labels.shape[0])
    cols = nearest_indices(size[1], labels.shape[1])
    return labels[rows[:, None], cols[None, :]]


def read_mask_preview(
    path: str | os.PathLike, size: tuple[int, int], full_size: tuple[int, int] | None = None
) -> np.ndarray:
    """A label mask file resampled (nearest) to ``size``, with bounded memory.

    TIFF masks (``.tif``/``.tiff``) are read through tifffile: the smallest pyramid
    level that is still at least ``size`` is picked, then only the rows that are
    needed are decoded, one band of tiles/strips at a time. Other formats (PNG) are
    small and read whole. Only the first channel of a multi-channel mask is used.

    Args:
        path: the mask file.
        size: the output ``(h, w)``.
        full_size: the expected full-resolution ``(H, W)`` of the mask; None skips
            the check.

    Returns:
        ``(h, w)`` labels in the file's dtype.

    Raises:
        ValueError: when ``full_size`` is given and the mask has another size.
    """
    path = Path(path)
    out_h, out_w = size
    if path.suffix.lower() not in (".tif", ".tiff"):
        with Image.open(path) as image:
            labels = np.asarray(image)
        _check_size(path, labels.shape[:2], full_size)
        return resize_nearest(labels[..., 0] if labels.ndim == 3 else labels, size)
    import zarr

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        _check_size(path, levels[0].shape[:2], full_size)
        chosen = 0
        for index, level in enumerate(levels):
            if level.shape[0] >= out_h and level.shape[1] >= out_w:
                chosen = index
        level_h, level_w = levels[chosen].shape[:2]
        rows = nearest_indices(out_h, level_h)
        cols = nearest_indices(out_w, level_w)
        with tif.aszarr(series=0, level=chosen) as store:
            array = zarr.open_array(store, mode="r")
            band = max(1, int(array.chunks[0]))
            out = np.empty((out_h, out_w), dtype=array.dtype)
            start = 0
            while start < out_h:
                band_top = int(rows[start]) // band * band
                stop = int(np.searchsorted(rows, band_top + band, side="left"))
                block = np.asarray(array[band_top : min(band_top + band, level_h)])
                if block.ndim == 3:
                    block = block[..., 0]
                out[start:stop] = block[rows[start:stop] - band_top][:, cols]
                start = stop
    return out


def _check_size(path, found, expected) -> None:
    if expected is not None and tuple(found) != tuple(expected):
        raise ValueError(f"{path}: mask is {found[0]}x{found[1]}, the image is {expected[0]}x{expected[1]}")


def write_overlay_png(
    path: str | os.PathLike,
    source: ImageSource,
    labels,
    palette=None,
    max_side: int = 2048,
    *,
    alpha: float = 0.5,
    ignore_index: int | None = 255,
) -> Path:
    """Blend the global view of ``source`` with its label mask and write a PNG, atomically.

    Args:
        path: the output PNG.
        source: the image.
        labels: the mask: a 2-D array (any size: resampled by nearest), an
            ``ImageSource`` of the mask, or the path of a mask file (a tiled TIFF
            written by ``MaskWriter`` is read from its pyramid). A source or file
            must have the image's full size.
        palette: ``(N, 3)`` class colours; None uses ``default_palette``.
        max_side: longer side of the picture, in pixels (a smaller image is enlarged to it).
        alpha: weight of the label colours, in [0, 1].
        ignore_index: label shown as the bare image; None for none.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: when the mask's size differs from the image's, the mask is not
            2-D, or a label has no palette colour.
        ImageReadError: when the image cannot be read.
    """
    image = source.thumbnail(max_side)
    size = image.shape[:2]
    if isinstance(labels, (str, os.PathLike)):
        mask = read_mask_preview(labels, size, full_size=(source.height, source.width))
    elif isinstance(labels, ImageSource):
        if (labels.height, labels.width) != (source.height, source.width):
            raise ValueError(f"mask {labels.shape[:2]} and image {source.shape[:2]} differ in size")
        mask = labels.read(None, out_size=size, resample="nearest")[..., 0]
    else:
        mask = np.asarray(labels)
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {mask.shape}")
        mask = resize_nearest(mask, size)
    return write_png(path, overlay(image, mask, palette, alpha=alpha, ignore_index=ignore_index))


__all__ = [
    "write_png",
    "to_display_rgb",
    "overlay",
    "write_overlay_png",
    "read_mask_preview",
    "resize_nearest",
    "nearest_indices",
]
