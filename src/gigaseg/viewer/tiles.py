"""Deep Zoom tiles of an image and its label masks, cut on demand from their pyramids.

The Deep Zoom layout (what OpenSeadragon's ``DziTileSource`` reads): level ``max_level =
ceil(log2(max(H, W)))`` is full resolution, each level below halves it (sizes rounded up),
level 0 is one pixel; a level is cut into ``tile_size`` squares (smaller at the right and
bottom edges), tile ``(col, row)`` of level ``L`` covering level pixels ``[col * tile_size,
(col + 1) * tile_size)``. No overlap between tiles.

A tile is read when it is asked for: ``ImageSource.read(window, out_size)`` picks the
coarsest pyramid level of the file that is still fine enough and decodes only the file tiles
the window touches. The small levels (longer side up to ``overview_side``) are cut from one
in-memory *overview* instead, read once on first use: a file without a pyramid then costs one
streamed pass for every zoomed-out view, not one per tile. So memory is bounded by the
overview, one tile and the tile cache (:class:`TileCache`), whatever the image's size.

Images are shown as RGB uint8: uint8 as they are (one or two channels as grey, more than three
cut to the first three), other data types stretched linearly between the 2nd and 98th
percentile of the overview (one range for the whole image, so tiles match). Masks become
palette PNGs in their classes' colours, label 255 (no class) transparent.

Per-class areas (:class:`ClassCounter`) are exact: a background thread streams the mask's
full resolution band by band once and counts every label.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..errors import GigasegError, ImageReadError
from ..geometry import Window
from ..io.array import ArraySource
from ..io.base import ImageSource
from ..io.palette import default_palette
from ..io.sources import open_image
from ..io.tiff import TiffSource

#: longest side of the in-memory overview the zoomed-out levels are cut from
OVERVIEW_SIDE = 2048
#: label shown transparent (no class), as the mask writers' ignore index
NO_CLASS = 255
#: bytes of mask rows :class:`ClassCounter` reads at once (at least one row of file tiles or strips)
COUNT_BAND_BYTES = 16 * 2**20
IMAGE_FORMATS = ("jpeg", "png")
#: labels counted by one ``np.bincount`` call
_COUNT_PIECE = 2**20


@dataclass(frozen=True)
class DeepZoomGeometry:
    """The Deep Zoom levels and tiles of a ``height x width`` image.

    Args:
        height: rows of the full-resolution image.
        width: columns of the full-resolution image.
        tile_size: side of a tile in pixels.
    """

    height: int
    width: int
    tile_size: int

    @property
    def max_level(self) -> int:
        """Index of the full-resolution level: ``ceil(log2(max(height, width)))``."""
        return max(0, math.ceil(math.log2(max(self.height, self.width))))

    def level_size(self, level: int) -> tuple[int, int]:
        """``(height, width)`` of a level: the full size divided by ``2 ** (max_level - level)``, rounded up.

        Args:
            level: the level, ``0 .. max_level``.

        Returns:
            The level's size in pixels.
        """
        scale = 2 ** (self.max_level - level)
        return (-(-self.height // scale), -(-self.width // scale))

    def tile_counts(self, level: int) -> tuple[int, int]:
        """Number of tile ``(rows, columns)`` of a level.

        Args:
            level: the level, ``0 .. max_level``.

        Returns:
            ``(rows, columns)`` of its tile grid.
        """
        h, w = self.level_size(level)
        return (-(-h // self.tile_size), -(-w // self.tile_size))

    def has_tile(self, level: int, col: int, row: int) -> bool:
        """Whether ``(level, col, row)`` names a tile of this image.

        Args:
            level: the level.
            col: the tile's column in the level's grid.
            row: the tile's row in the level's grid.

        Returns:
            True when the level exists and the tile lies in its grid.
        """
        if not 0 <= level <= self.max_level:
            return False
        rows, cols = self.tile_counts(level)
        return 0 <= col < cols and 0 <= row < rows

    def tile_window(self, level: int, col: int, row: int) -> Window:
        """The pixels of a tile in its level's coordinates.

        Args:
            level: the level.
            col: the tile's column.
            row: the tile's row.

        Returns:
            The tile's window in level pixels (``tile_size`` square, smaller at the edges).
        """
        h, w = self.level_size(level)
        top, left = row * self.tile_size, col * self.tile_size
        return Window(top, left, min(self.tile_size, h - top), min(self.tile_size, w - left))

    def dzi(self, tile_format: str) -> str:
        """The Deep Zoom descriptor (``.dzi`` XML) of the image.

        Args:
            tile_format: the tiles' file extension (``jpeg``, ``png``).

        Returns:
            The XML text.
        """
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{tile_format}" Overlap="0" '
            f'TileSize="{self.tile_size}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )


class TileCache:
    """A least-recently-used cache of encoded tiles, bounded in bytes; safe to share between threads.

    Args:
        max_bytes: the most the cached tiles may take together; a tile larger than this is
            not cached.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """Bytes the cached tiles take now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> bytes | None:
        """The cached tile of ``key`` (marking it as recently used), or None.

        Args:
            key: the tile's key.

        Returns:
            Its bytes, or None when it is not cached.
        """
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        """Cache a tile, dropping the least recently used ones until the cache fits its bound.

        Args:
            key: the tile's key.
            data: its encoded bytes.
        """
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class Layer:
    """A lazily read raster served as Deep Zoom tiles: the base of :class:`ImageLayer` and :class:`MaskLayer`.

    Reads of the source are serialised by a lock (the server asks for tiles from several
    threads); encoding runs outside it.

    Args:
        source: the raster.
        tile_size: side of a Deep Zoom tile.
        overview_side: longest side of the in-memory overview the small levels are cut from.
    """

    #: ``"area"`` for images, ``"nearest"`` for label masks
    resample = "area"
    #: the tiles' format (file extension)
    tile_format = "png"

    def __init__(self, source: ImageSource, *, tile_size: int = 512, overview_side: int = OVERVIEW_SIDE):
        self.source = source
        self.geometry = DeepZoomGeometry(source.height, source.width, int(tile_size))
        self._lock = threading.Lock()  # reads of the source
        self._overview_lock = threading.Lock()
        max_level = self.geometry.max_level
        # the largest level whose longer side fits in overview_side
        self.overview_level = max(
            (lv for lv in range(max_level + 1) if max(self.geometry.level_size(lv)) <= overview_side), default=0
        )
        self._overview: ArraySource | None = None

    @property
    def content_type(self) -> str:
        """The tiles' MIME type."""
        return f"image/{self.tile_format}"

    def close(self) -> None:
        """Close the raster's file."""
        self.source.close()

    def overview(self) -> ArraySource:
        """The whole raster at level :attr:`overview_level` (read on first use, then kept).

        It is assembled from that level's tiles, each read from the source as any other tile,
        so its pixels line up with the Deep Zoom grid exactly.

        Returns:
            The overview as an in-memory source.
        """
        with self._overview_lock:
            if self._overview is None:
                level = self.overview_level
                height, width = self.geometry.level_size(level)
                pixels = np.empty((height, width, self.source.channels), self.source.dtype)
                rows, cols = self.geometry.tile_counts(level)
                scale = 2 ** (self.geometry.max_level - level)
                for row in range(rows):
                    for col in range(cols):
                        tile = self.geometry.tile_window(level, col, row)
                        with self._lock:
                            pixels[tile.slices] = _read_scaled(self.source, tile, scale, self.resample)
                self._overview = ArraySource(pixels)
            return self._overview

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        """The raw pixels of a tile, in the source's dtype.

        Args:
            level: the Deep Zoom level.
            col: the tile's column.
            row: the tile's row.

        Returns:
            ``(h, w, C)`` pixels of the tile.

        Raises:
            KeyError: when the tile does not exist.
            ImageReadError: when the source cannot be read.
        """
        if not self.geometry.has_tile(level, col, row):
            raise KeyError((level, col, row))
        tile = self.geometry.tile_window(level, col, row)
        if level <= self.overview_level:
            return _read_scaled(self.overview(), tile, 2 ** (self.overview_level - level), self.resample)
        with self._lock:
            return _read_scaled(self.source, tile, 2 ** (self.geometry.max_level - level), self.resample)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """A tile encoded in :attr:`tile_format`.

        Args:
            level: the Deep Zoom level.
            col: the tile's column.
            row: the tile's row.

        Returns:
            The encoded tile.

        Raises:
            KeyError: when the tile does not exist.
            ImageReadError: when the source cannot be read.
        """
        return self.encode(self.read_tile(level, col, row))

    def encode(self, pixels: np.ndarray) -> bytes:
        """Encode a tile's pixels (subclasses say how).

        Args:
            pixels: ``(h, w, C)`` pixels as :meth:`read_tile` returns them.

        Returns:
            The encoded tile.
        """
        raise NotImplementedError


def _read_scaled(source: ImageSource, tile: Window, scale: int, resample: str) -> np.ndarray:
    """The pixels of ``tile``, a window of a level ``scale`` times smaller than ``source``, read from ``source``.

    Level pixel ``i`` covers source pixels ``[i * scale, (i + 1) * scale)``; the last one of an
    axis whose size ``scale`` does not divide covers what is left, so a tile at the right or
    bottom edge is read in up to four parts, each with its own exact scale.
    """
    if scale == 1:
        return source.read(tile)
    out = np.empty((*tile.shape, source.channels), source.dtype)
    for row_out, row_src in _parts(tile.top, tile.bottom, scale, source.height):
        for col_out, col_src in _parts(tile.left, tile.right, scale, source.width):
            window = Window.from_bounds(row_src[0], col_src[0], row_src[1], col_src[1])
            size = (row_out[1] - row_out[0], col_out[1] - col_out[0])
            out[row_out[0] : row_out[1], col_out[0] : col_out[1]] = source.read(window, size, resample)
    return out


def _parts(start: int, stop: int, scale: int, size: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Level pixels ``[start, stop)`` of an axis as ``((out start, out stop), (source start, source stop))`` parts."""
    whole = min(stop, size // scale)  # level pixels that lie wholly inside the source
    parts = []
    if whole > start:
        parts.append(((0, whole - start), (start * scale, whole * scale)))
    if stop > whole:  # the one partial pixel at the edge
        parts.append(((max(whole, start) - start, stop - start), (max(whole, start) * scale, size)))
    return parts


class ImageLayer(Layer):
    """The image, as RGB tiles (JPEG or PNG).

    Args:
        source: the image.
        tile_size: side of a Deep Zoom tile.
        tile_format: ``"jpeg"`` (quality 90, no chroma subsampling; small) or ``"png"`` (exact pixels).
        overview_side: longest side of the overview (see :class:`Layer`).

    Raises:
        ValueError: for an unknown ``tile_format``.
    """

    resample = "area"

    def __init__(
        self,
        source: ImageSource,
        *,
        tile_size: int = 512,
        tile_format: str = "jpeg",
        overview_side: int = OVERVIEW_SIDE,
    ):
        if tile_format not in IMAGE_FORMATS:
            raise ValueError(f"image tiles are one of {IMAGE_FORMATS}, got {tile_format!r}")
        super().__init__(source, tile_size=tile_size, overview_side=overview_side)
        self.tile_format = tile_format
        self._range: tuple[float, float] | None = None

    def display_range(self) -> tuple[float, float] | None:
        """The values shown as black and white: the overview's 2nd and 98th percentiles of finite values.

        Returns:
            ``(low, high)`` with ``high > low``; None for uint8 and bool images, shown as they are.
        """
        dtype = self.source.dtype
        if dtype == np.uint8 or dtype == np.bool_:
            return None
        if self._range is None:
            data = self.overview().array[..., : min(3, self.source.channels)].astype(np.float32)
            finite = data[np.isfinite(data)]
            low, high = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
            self._range = (float(low), float(high) if high > low else float(low) + 1.0)
        return self._range

    def to_rgb(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels as displayed: RGB uint8 (see the module docstring).

        Args:
            pixels: ``(h, w, C)`` pixels of the image.

        Returns:
            ``(h, w, 3)`` uint8.
        """
        pixels = np.repeat(pixels[..., :1], 3, axis=2) if pixels.shape[2] < 3 else pixels[..., :3]
        if pixels.dtype == np.uint8:
            return np.ascontiguousarray(pixels)
        if pixels.dtype == np.bool_:
            return pixels.astype(np.uint8) * 255
        low, high = self.display_range()
        data = pixels.astype(np.float32)
        data = np.where(np.isfinite(data), data, low)
        return np.clip(np.floor((data - low) * (255.0 / (high - low)) + 0.5), 0, 255).astype(np.uint8)

    def encode(self, pixels: np.ndarray) -> bytes:
        """The tile as JPEG or PNG.

        Args:
            pixels: ``(h, w, C)`` pixels of the image.

        Returns:
            The encoded RGB tile.
        """
        from PIL import Image

        buffer = io.BytesIO()
        image = Image.fromarray(self.to_rgb(pixels))
        if self.tile_format == "jpeg":
            image.save(buffer, format="JPEG", quality=90, subsampling=0)
        else:
            image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()


class MaskLayer(Layer):
    """A label mask, as palette PNG tiles in its classes' colours (label 255 transparent).

    Class names and colours come from the mask file when it has them (what ``MaskWriter``
    stores: ``mask_classes`` and ``mask_palette``), else names ``class <i>`` and
    ``default_palette``.

    Args:
        source: the mask: one channel of uint8 (or bool) class ids.
        tile_size: side of a Deep Zoom tile.
        class_names: names by class id; None for none.
        palette: ``(N, 3)`` colours by class id; None for ``default_palette``.
        overview_side: longest side of the overview (see :class:`Layer`).

    Raises:
        ImageReadError: when the mask has more than one channel or another data type.
    """

    resample = "nearest"
    tile_format = "png"

    def __init__(
        self,
        source: ImageSource,
        *,
        tile_size: int = 512,
        class_names: list[str] | None = None,
        palette=None,
        overview_side: int = OVERVIEW_SIDE,
    ):
        if source.channels != 1:
            raise ImageReadError(
                source.path, f"has {source.channels} channels; a label mask has one (class ids 0..255)"
            )
        if source.dtype not in (np.uint8, np.bool_):
            raise ImageReadError(source.path, f"holds {source.dtype} values; a label mask holds uint8 class ids")
        super().__init__(source, tile_size=tile_size, overview_side=overview_side)
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        colours = default_palette(256)
        if palette is not None:
            given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
            colours[: len(given)] = given
        self.palette = colours
        alpha = np.full(256, 255, np.uint8)
        alpha[NO_CLASS] = 0
        self._alpha = alpha.tobytes()

    def class_name(self, label: int) -> str:
        """The name of a class id.

        Args:
            label: the class id.

        Returns:
            Its stored name, ``"no class"`` for 255, else ``"class <label>"``.
        """
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return "no class" if label == NO_CLASS else f"class {label}"

    def color(self, label: int) -> str:
        """The colour a class is drawn in.

        Args:
            label: the class id.

        Returns:
            ``"#rrggbb"``.
        """
        r, g, b = (int(v) for v in self.palette[label])
        return f"#{r:02x}{g:02x}{b:02x}"

    def label_at(self, x: int, y: int) -> int:
        """The class id of one full-resolution pixel.

        Args:
            x: the pixel's column.
            y: the pixel's row.

        Returns:
            Its class id.

        Raises:
            ValueError: when the pixel lies outside the mask.
        """
        if not (0 <= x < self.source.width and 0 <= y < self.source.height):
            raise ValueError(f"pixel ({x}, {y}) lies outside the {self.source.height}x{self.source.width} mask")
        with self._lock:
            return int(self.source.read(Window(y, x, 1, 1))[0, 0, 0])

    def encode(self, pixels: np.ndarray) -> bytes:
        """The tile as a palette PNG.

        Args:
            pixels: ``(h, w, 1)`` class ids.

        Returns:
            The PNG, one byte per pixel, the classes' colours as its palette, label 255 transparent.
        """
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(pixels[..., 0], dtype=np.uint8), mode="P")
        image.putpalette(self.palette.tobytes())
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", transparency=self._alpha, compress_level=1)
        return buffer.getvalue()


def open_mask(path: str | os.PathLike | ImageSource, *, tile_size: int = 512) -> MaskLayer:
    """Open a label mask as a :class:`MaskLayer`, with the class names and colours its file stores.

    Args:
        path: a mask file (TIFF, or PNG read as palette indices), or an ``ImageSource`` of class ids.
        tile_size: side of a Deep Zoom tile.

    Returns:
        The layer.

    Raises:
        ImageReadError: the file is missing, unreadable or not a one-channel uint8 mask.
    """
    source = open_image(path, palette="indices")
    names = palette = None
    if isinstance(source, TiffSource):
        import tifffile

        from ..io.writers import mask_classes, mask_palette

        try:
            with tifffile.TiffFile(source.path) as tif:
                names, palette = mask_classes(tif), mask_palette(tif)
        except Exception as error:  # noqa: BLE001 - the reader opened it; metadata is optional
            raise ImageReadError(source.path, f"cannot read its class names or colour map ({error})") from None
    elif source.path is not None and getattr(source, "palette", None) is not None:
        palette = source.palette
    return MaskLayer(source, tile_size=tile_size, class_names=names, palette=palette)


class ClassCounter:
    """Exact pixel counts per class of a mask, counted in a background thread.

    The mask's full resolution is read once, band by band (:data:`COUNT_BAND_BYTES` of rows,
    rounded to whole rows of file tiles), and every band's labels are counted with
    ``np.bincount``, a million at a time; memory is one band. A mask given as a file is read through its own file
    handle, so counting does not hold up the tiles.

    Args:
        layer: the mask.
        band_bytes: bytes of mask rows read at once.
    """

    def __init__(self, layer: MaskLayer, *, band_bytes: int = COUNT_BAND_BYTES):
        self.layer = layer
        self.band_bytes = int(band_bytes)
        self.counts: np.ndarray | None = None
        self.rows_done = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="gigaseg-view-count", daemon=True)

    def start(self) -> ClassCounter:
        """Start counting in the background.

        Returns:
            The counter itself.
        """
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the count to finish.

        Args:
            timeout: seconds to wait at most; None waits until it is done.

        Returns:
            True when it has finished (or failed).
        """
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        """Whether the counts are complete."""
        return self.counts is not None

    def _run(self) -> None:
        source = self.layer.source
        own = source.path is not None and not isinstance(source, ArraySource)
        try:
            if own:
                source = open_image(source.path, palette="indices")
            counts = np.zeros(256, np.int64)
            chunk_rows = getattr(source, "chunk_shape", (1, 1))[0]
            rows = max(1, self.band_bytes // max(1, source.width))
            rows = max(chunk_rows, rows // chunk_rows * chunk_rows)
            lock = contextlib.nullcontext() if own else self.layer._lock
            for top in range(0, source.height, rows):
                window = Window(top, 0, min(rows, source.height - top), source.width)
                with lock:
                    band = source.read(window)
                flat = band.reshape(-1).view(np.uint8)
                for start in range(0, flat.size, _COUNT_PIECE):  # bincount casts to int64: 8x its input
                    counts += np.bincount(flat[start : start + _COUNT_PIECE], minlength=256)[:256]
                self.rows_done = window.bottom
                del band
            self.counts = counts
        except GigasegError as error:
            self.error = str(error)
        except Exception as error:  # noqa: BLE001 - shown in the legend instead of killing the server
            self.error = f"{type(error).__name__}: {error}"
        finally:
            if own:
                source.close()

    def status(self) -> dict:
        """Where the count stands, for the page.

        Returns:
            ``{"done": bool, "progress": fraction of rows counted, "error": str or None,
            "classes": [{"id", "name", "color", "pixels", "fraction"}, ...]}``; the classes are the
            named ones and every other label that occurs, listed once the count is done.
        """
        layer = self.layer
        total = layer.source.height * layer.source.width
        status = {
            "done": self.done,
            "progress": self.rows_done / layer.source.height,
            "error": self.error,
            "classes": [],
        }
        if self.counts is not None:
            named = len(layer.class_names or [])
            for label in range(256):
                pixels = int(self.counts[label])
                if label < named or pixels:
                    status["classes"].append(
                        {
                            "id": label,
                            "name": layer.class_name(label),
                            "color": layer.color(label),
                            "pixels": pixels,
                            "fraction": pixels / total,
                        }
                    )
        return status
