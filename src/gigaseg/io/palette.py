"""Class colours: a default palette, label -> colour, and colour -> label.

A palette is an ``(N, 3)`` uint8 array; row ``i`` is the RGB colour of class ``i``.
Label masks are integer arrays (uint8 in files); ``ignore_index`` (255 by default)
marks pixels that belong to no class.
"""

from __future__ import annotations

import colorsys

import numpy as np

#: the first colours, fixed so that class 0, 1, 2... look the same in every run and
#: every figure: Tableau 10 followed by its light variants (none of them black, so
#: the default ignore colour stays distinct).
_FIXED = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
        (174, 199, 232),
        (255, 187, 120),
        (152, 223, 138),
        (255, 152, 150),
        (197, 176, 213),
        (196, 156, 148),
        (247, 182, 210),
        (199, 199, 199),
        (219, 219, 141),
        (158, 218, 229),
    ],
    dtype=np.uint8,
)

_GOLDEN = 0.618033988749895


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct class colours, none of them black.

    The first 20 are fixed (Tableau 10 and its light variants); further ones walk
    the hue circle by the golden ratio with a few saturation/value steps. The
    result is deterministic, and a longer palette starts with the shorter one.

    Args:
        num_classes: number of colours, ``0 .. 2**24 - 1``.

    Returns:
        ``(num_classes, 3)`` uint8 RGB colours, all different.

    Raises:
        ValueError: when ``num_classes`` is negative or above ``2**24 - 1``.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes > 2**24 - 1:
        raise ValueError(f"cannot make {num_classes} distinct colours")
    colours = [tuple(int(v) for v in c) for c in _FIXED[:num_classes]]
    seen = set(colours)
    seen.add((0, 0, 0))
    step = 0
    while len(colours) < num_classes:
        hue = (step * _GOLDEN) % 1.0
        sat = (0.65, 0.9, 0.45, 0.8)[step % 4]
        val = (0.95, 0.75, 0.85, 0.6)[(step // 4) % 4]
        r, g, b = (int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, sat, val))
        step += 1
        if (r, g, b) in seen:
            # a crowded palette: nudge through nearby colours until one is free
            base = (r << 16) | (g << 8) | b
            while (r, g, b) in seen:
                base = (base + 0x010307) % (1 << 24)
                r, g, b = base >> 16, (base >> 8) & 255, base & 255
        seen.add((r, g, b))
        colours.append((r, g, b))
    return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def as_palette(palette) -> np.ndarray:
    """``palette`` as a checked ``(N, 3)`` uint8 array.

    Args:
        palette: ``(N, 3)`` RGB colours (any array-like with values in 0..255).

    Returns:
        The palette as uint8 (the input itself when it is already a uint8 array).

    Raises:
        ValueError: when the shape is not ``(N, 3)`` or a value lies outside 0..255.
    """
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"a palette is an (N, 3) array of RGB colours, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("palette colours must lie in 0..255")
        array = array.astype(np.uint8)
    return array


def colorize(
    labels: np.ndarray,
    palette,
    ignore_index: int | None = 255,
    ignore_color: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Colour picture of an integer label mask.

    Args:
        labels: ``(H, W)`` (or any shape) integer label mask, no negative values.
        palette: ``(N, 3)`` RGB colours; label ``i`` gets row ``i``.
        ignore_index: label that gets ``ignore_color``; None for none.
        ignore_color: RGB colour of ``ignore_index`` pixels.

    Returns:
        ``(H, W, 3)`` uint8 (``labels.shape + (3,)``).

    Raises:
        ValueError: when the labels are not integers or are negative, or a label
            is neither a palette row nor ``ignore_index`` (the palette is too short).
    """
    palette = as_palette(palette)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "ui":
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    size = max(len(palette), 0 if ignore_index is None else ignore_index + 1)
    if labels.dtype == np.uint8:
        size = max(size, 256)  # a full table: no range check needed to index it
    elif labels.size:
        lowest = int(labels.min())
        if lowest < 0:
            raise ValueError(f"labels contain negative values (min {lowest})")
        size = max(size, int(labels.max()) + 1)
    lut = np.zeros((size, 3), dtype=np.uint8)
    valid = np.zeros(size, dtype=bool)
    lut[: len(palette)] = palette
    valid[: len(palette)] = True
    if ignore_index is not None and 0 <= ignore_index < size:
        lut[ignore_index] = ignore_color
        valid[ignore_index] = True
    if not valid.all():
        bad_pixels = ~valid[labels]
        if bad_pixels.any():
            bad = np.unique(labels[bad_pixels])[:10].tolist()
            raise ValueError(
                f"labels {bad} have no colour: the palette has {len(palette)} entries"
                + (f" and ignore_index is {ignore_index}" if ignore_index is not None else "")
            )
    return lut[labels]


def rgb_to_index(rgb: np.ndarray, palette, unknown_value: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Map an ``(H, W, 3)`` colour-coded mask to class indices.

    Vectorised: colours are packed into uint32 and looked up in the sorted palette.

    Args:
        rgb: uint8 ``(..., 3)`` colours; a 4th (alpha) channel is ignored.
        palette: ``(N, 3)`` class colours, all different; row ``i`` is class ``i``.
        unknown_value: label given to colours not in the palette.

    Returns:
        ``(labels, unknown)``: ``labels`` is uint8 (int32 for palettes longer than
        256 or an ``unknown_value`` outside 0..255) with the palette row of each
        pixel's colour, and ``unknown_value`` where the colour is not in the
        palette; ``unknown`` is the boolean mask of those pixels, so a dataset
        loader can report or ignore them.

    Raises:
        ValueError: when ``rgb`` is not uint8 with 3 or 4 channels, or the palette
            lists a colour twice.
    """
    palette = as_palette(palette)
    rgb = np.asarray(rgb)
    if rgb.ndim < 1 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (..., 3) RGB array, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB array, got {rgb.dtype}")
    keys = _pack(palette)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if len(sorted_keys) > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        dup = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]][0]
        raise ValueError(f"the palette lists colour {_unpack(dup)} twice; it cannot be inverted")
    out_dtype = np.uint8 if len(palette) <= 256 and 0 <= unknown_value <= 255 else np.int32
    packed = _pack(rgb[..., :3])
    if len(sorted_keys) == 0:
        unknown = np.ones(packed.shape, dtype=bool)
        return np.full(packed.shape, unknown_value, dtype=out_dtype), unknown
    position = np.searchsorted(sorted_keys, packed)
    np.minimum(position, len(sorted_keys) - 1, out=position)
    unknown = sorted_keys[position] != packed
    labels = order[position].astype(out_dtype)
    labels[unknown] = unknown_value
    return labels, unknown


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _unpack(key) -> tuple[int, int, int]:
    key = int(key)
    return (key >> 16, (key >> 8) & 255, key & 255)
