"""``TiffSource``: lazy, tile-decoding reader for (Big/OME/Geo)TIFF files.

The first series of the file (``tifffile.TiffFile(path).series[0]``) is the
image. Each of its pyramid levels (``series.levels``: SubIFDs, reduced pages in
the main IFD chain, OME levels) is opened on first use as a zarr array (zarr-python 3,
format-2 metadata) over ``series.aszarr(level=i)``, so a read decodes only the tiles or
strips it touches. Uncompressed contiguous data (what ``tifffile.imwrite`` writes by
default: a single strip) is memory-mapped instead, because its single "chunk"
would otherwise be the whole image.

Layouts: after dropping length-1 axes a level must have ``Y``, ``X`` and at most
one more axis, which becomes the channel axis (``YXS`` RGB, ``SYX`` planar RGB,
``CYX`` OME channels, ``QYX`` page stacks); reads return ``(h, w, C)``.

Reads with ``out_size`` and thumbnails use the coarsest level that still has at
least the requested resolution over the window, and stream it in row bands
(see ``gigaseg.io.resample``), so a thumbnail of a 20000 x 20000 image never
holds more than one band plus the output.

The image's total size is not capped (only the chunks a window touches are
decoded), but one chunk is always decoded whole: a stripped TIFF written as a
single strip decodes the whole image for every window. So a file whose strip or
tile (all channels) is larger than the decode budget (``max_memory``, else the
decode cap of ``gigaseg.io.pillow.decode_budget``) is refused when it is opened,
with the command that converts it to a tiled TIFF; such a chunk in a reduced
pyramid level drops that level and the ones after it (with a warning). Chunks
of at least ``CACHE_MIN_CHUNK_BYTES`` that are allowed are kept once decoded, at
most ``CACHED_CHUNKS`` of them and at most a quarter of the budget, so windows
read one after another from the same large strip decode it once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImageReadError
from ..geometry import Window
from ..memory import format_size
from . import resample as rs
from .base import FileSource, check_image_file
from .pillow import decode_budget, raise_hint

#: GeoTIFF / GDAL tags copied by ``geo_tags`` (code -> name)
GEO_TAGS = {
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
    34735: "GeoKeyDirectoryTag",
    34736: "GeoDoubleParamsTag",
    34737: "GeoAsciiParamsTag",
    42112: "GDAL_METADATA",
    42113: "GDAL_NODATA",
}

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff", ".ome.btf", ".svs")

_log = logging.getLogger(__name__)

#: threads decoding tiles of one read (tifffile alone would use 1 below 3 cores)
_DECODE_THREADS = min(8, max(2, os.cpu_count() or 2))
#: decoded chunks (strip or tile, all channels) at least this large are cached once decoded ...
CACHE_MIN_CHUNK_BYTES = 16 * 2**20
#: ... at most this many of them per level (a window may straddle two strips) ...
CACHED_CHUNKS = 2
#: ... and at most the decode budget divided by this
CACHE_BUDGET_DIVISOR = 4


@dataclass
class _Level:
    """One pyramid level: its size, layout and lazy pixel access."""

    index: int
    height: int
    width: int
    axes: str  # full (unsqueezed) axes of the level
    shape: tuple[int, ...]  # full (unsqueezed) shape
    y_axis: int
    x_axis: int
    c_axis: int | None
    chunk_height: int
    series: object  # tifffile.TiffPageSeries
    memmap: tuple[int, np.dtype] | None  # (offset, dtype) of contiguous uncompressed data
    chunk: tuple[int, int] = (1, 1)  # (height, width) of a strip or tile
    chunk_bytes: int = 0  # one chunk decoded, all channels
    cache_slots: int = 0  # decoded chunks kept (0: none, decode per read)
    cache: OrderedDict = field(default_factory=OrderedDict)  # (row, col) of a chunk -> its (h, w, C) pixels
    array: object | None = None  # zarr.Array, opened on first use
    store: object | None = None
    extents: tuple[np.ndarray, np.ndarray] | None = None  # (offsets, ends) of each page's chunks
    truncated: bool | None = None  # some chunk lies past the end of the file

    def selection(self, top: int, bottom: int, left: int, right: int) -> tuple:
        sel: list = []
        for axis in range(len(self.shape)):
            if axis == self.y_axis:
                sel.append(slice(top, bottom))
            elif axis == self.x_axis:
                sel.append(slice(left, right))
            elif axis == self.c_axis:
                sel.append(slice(None))
            else:
                sel.append(0)
        return tuple(sel)

    def describe_window(self, top: int, bottom: int, left: int, right: int) -> str:
        """``window (...)`` plus the pyramid level when it is not full resolution, for error messages."""
        window = Window.from_bounds(top, left, bottom, right)
        return f"window {window}" + (f" of pyramid level {self.index}" if self.index else "")

    def to_yxc(self, data: np.ndarray) -> np.ndarray:
        """Selected data (axes in file order, singletons gone) as ``(h, w, C)``."""
        kept = [a for a in range(len(self.shape)) if a in (self.y_axis, self.x_axis, self.c_axis)]
        order = [kept.index(self.y_axis), kept.index(self.x_axis)]
        if self.c_axis is None:
            return data.transpose(order)[:, :, None]
        order.append(kept.index(self.c_axis))
        return np.ascontiguousarray(data.transpose(order))


def _chunk_shape(page) -> tuple[int, int]:
    """``(height, width)`` of a page's tiles, or of its strips (full width)."""
    if page.is_tiled:
        return int(page.tilelength), int(page.tilewidth)
    rows = page.rowsperstrip or page.imagelength
    return int(min(rows, page.imagelength)), int(page.imagewidth)


@contextlib.contextmanager
def _tifffile_warnings() -> Iterator[list[logging.LogRecord]]:
    """Hold back what tifffile logs while a file is opened.

    tifffile logs what it finds wrong in a file (an IFD offset past the end, say) as warnings, which
    Python prints on stderr next to gigaseg's own one-line error. Held back here, they go into that
    error when the file is refused, and are logged as before when it opens.

    Yields:
        The records tifffile logged, filled in as the block runs.
    """
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger("tifffile"), Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    failed = False
    try:
        yield records
    except BaseException:
        failed = True
        raise
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        if not failed:
            for record in records:
                logger.handle(record)


def _drain_zarr(timeout: float = 10.0) -> None:
    """After a failed zarr read, let its other in-flight chunk reads finish quietly.

    zarr gathers chunk reads concurrently; when one fails the others keep
    running on zarr's I/O loop and later log "Task exception was never
    retrieved" / "Task was destroyed but it is pending". Best effort only.
    """
    try:
        import asyncio

        from zarr.core.sync import _get_loop

        async def settle():
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # mark as retrieved

        asyncio.run_coroutine_threadsafe(settle(), _get_loop()).result(timeout + 1)
    except Exception:  # noqa: BLE001
        pass


class TiffSource(FileSource):
    """A TIFF file read lazily, tile by tile (see the module docstring).

    Opening parses the header and the pyramid levels; pixels are decoded only by
    reads. A level with another channel count than full resolution, or larger than
    it, is ignored together with every level after it (with a warning). A copy in a
    forked process (a DataLoader worker) reopens the file on its first read. After
    :meth:`close`, reads raise ``ValueError``.

    Args:
        path: the TIFF file.
        max_memory: bytes, or a string like ``"2GB"``: the most one strip or tile
            may take decoded (a file with larger ones is refused), and the row
            bands used for streamed resampling are 1/8 of it, but at least 1 MiB
            and at most ``BAND_BYTES``. None means the decode cap
            (``GIGASEG_MAX_DECODE``, else half the machine's memory, capped) for
            the strips and tiles, and ``BAND_BYTES`` bands.

    Raises:
        ImageReadError: when the file is missing, not a readable TIFF, its first
            series has an unsupported sample type or layout, or one strip or tile
            of full resolution decodes to more than the budget.
        ConfigError: when ``max_memory`` is not a valid positive size, or
            ``GIGASEG_MAX_DECODE`` is invalid.
    """

    def __init__(self, path: str | os.PathLike, *, max_memory: int | str | None = None):
        super().__init__(path, max_memory=max_memory)
        self._lock = threading.RLock()
        self._closed = False
        self._open()

    # -- opening -----------------------------------------------------------------

    def _open(self) -> None:
        import tifffile

        check_image_file(self.path)
        self._pid = os.getpid()
        with _tifffile_warnings() as warned:
            try:
                self._tif = tifffile.TiffFile(self.path)
            except tifffile.TiffFileError as exc:
                raise ImageReadError(self.path, f"not a readable TIFF file ({exc})") from exc
            except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError) as exc:
                raise ImageReadError(self.path, f"cannot open TIFF file ({type(exc).__name__}: {exc})") from exc
            try:
                self._levels = self._check_chunks(self._inspect())
            except ImageReadError as exc:
                self._tif.close()
                if not warned:
                    raise
                raise ImageReadError(self.path, f"{exc.problem} (tifffile: {warned[0].getMessage()})") from exc
            except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
                self._tif.close()
                raise ImageReadError(
                    self.path, f"cannot read the TIFF structure ({type(exc).__name__}: {exc})"
                ) from exc
        base = self._levels[0]
        self._height, self._width = base.height, base.width
        self._channels = 1 if base.c_axis is None else base.shape[base.c_axis]
        self._dtype = np.dtype(self._tif.series[0].dtype)

    def _inspect(self) -> list[_Level]:
        if not self._tif.series:
            raise ImageReadError(self.path, "the TIFF file contains no image")
        series = self._tif.series[0]
        if series.dtype is None:
            raise ImageReadError(self.path, "unsupported TIFF sample format (no numpy dtype)")
        dtype = np.dtype(series.dtype)
        if dtype.kind not in "biuf":
            raise ImageReadError(self.path, f"unsupported TIFF sample type {dtype} (need integer or float samples)")
        levels = []
        for index, level in enumerate(series.levels):
            axes = level.get_axes(False)
            shape = tuple(int(n) for n in level.get_shape(False))
            if "Y" not in axes or "X" not in axes:
                raise ImageReadError(self.path, f"unsupported layout: axes {axes!r} have no Y and X")
            y_axis, x_axis = axes.index("Y"), axes.index("X")
            extra = [a for a, n in enumerate(shape) if a not in (y_axis, x_axis) and n > 1]
            if len(extra) > 1:
                squeezed = "".join(axes[a] for a in range(len(axes)) if a in (y_axis, x_axis) or a in extra)
                dims = "x".join(str(shape[a]) for a in range(len(axes)) if a in (y_axis, x_axis) or a in extra)
                raise ImageReadError(
                    self.path,
                    f"unsupported layout: {len(extra) + 2} dimensions after squeezing "
                    f"(axes {squeezed}, shape {dims}); gigaseg reads 2-D images with one channel axis",
                )
            c_axis = extra[0] if extra else None
            if index == 0:
                channels0 = 1 if c_axis is None else shape[c_axis]
            elif (1 if c_axis is None else shape[c_axis]) != channels0:
                _log.warning("%s: pyramid level %d has a different channel count; levels ignored", self.path, index)
                break
            if index > 0 and (shape[y_axis] > levels[0].height or shape[x_axis] > levels[0].width):
                _log.warning("%s: pyramid level %d is larger than the image; levels ignored", self.path, index)
                break
            keyframe = level.keyframe
            chunk = _chunk_shape(keyframe)
            chunk_height = chunk[0]
            memmap = None
            if level.dataoffset is not None and keyframe.is_memmappable and keyframe.compression == 1:
                memmap = (int(level.dataoffset), np.dtype(level.dtype).newbyteorder(self._tif.byteorder))
                chunk_height = 1
            channels = 1 if c_axis is None else shape[c_axis]
            levels.append(
                _Level(
                    index,
                    shape[y_axis],
                    shape[x_axis],
                    axes,
                    shape,
                    y_axis,
                    x_axis,
                    c_axis,
                    chunk_height,
                    level,
                    memmap,
                    chunk=chunk,
                    chunk_bytes=chunk[0] * chunk[1] * channels * dtype.itemsize,
                )
            )
        return levels

    def _check_chunks(self, levels: list[_Level]) -> list[_Level]:
        """Refuse a full resolution whose strips or tiles exceed the decode budget; set up the chunk caches.

        A reduced level with such chunks is dropped with the levels after it. Memory-mapped
        levels decode nothing and are not checked.
        """
        budget, words = decode_budget(self._max_memory)
        kept = []
        for level in levels:
            if level.memmap is None and budget is not None and level.chunk_bytes > budget:
                if level.index == 0:
                    raise self._chunk_too_large(level, budget, words)
                _log.warning(
                    "%s: a %s of pyramid level %d decodes to %s, more than %s; levels ignored",
                    self.path,
                    self._chunk_word(level),
                    level.index,
                    format_size(level.chunk_bytes),
                    words,
                )
                break
            if level.memmap is None and level.chunk_bytes >= CACHE_MIN_CHUNK_BYTES:
                room = (budget // CACHE_BUDGET_DIVISOR) if budget is not None else None
                slots = CACHED_CHUNKS if room is None else min(CACHED_CHUNKS, room // level.chunk_bytes)
                level.cache_slots = int(slots)
            kept.append(level)
        return kept

    @staticmethod
    def _chunk_word(level: _Level) -> str:
        return "tile" if level.series.keyframe.is_tiled else "strip"

    def _chunk_too_large(self, level: _Level, budget: int, words: str) -> ImageReadError:
        word = self._chunk_word(level)
        dtype = np.dtype(self._tif.series[0].dtype)
        channels = 1 if level.c_axis is None else level.shape[level.c_axis]
        whole = level.chunk[0] >= level.height and level.chunk[1] >= level.width
        unit = f"as one {word}" if whole else f"in {word}s of {level.chunk[0]}x{level.chunk[1]}"
        name = os.path.basename(self.path)
        stem = name[: -len(".tif")] if name.lower().endswith(".tif") else os.path.splitext(name)[0]
        return ImageReadError(
            self.path,
            f"its header declares a {level.height}x{level.width}x{channels} {dtype} image stored {unit} "
            f"(one {word} is {format_size(level.chunk_bytes)} decoded, in a file of "
            f"{format_size(os.path.getsize(self.path))}), more than {words}; every window read decodes whole "
            f"{word}s. Convert it to a tiled TIFF, which is read tile by tile (e.g. `gdal_translate -co TILED=YES "
            f"-co COMPRESS=DEFLATE {name} {stem}_tiled.tif` or tifffile.imwrite(..., tile=(512, 512))), or, if the "
            f"image is genuine and the machine has the memory, {raise_hint(level.chunk_bytes, self._max_memory)}",
        )

    # -- properties ----------------------------------------------------------------

    @property
    def levels(self) -> list[tuple[int, int]]:
        """``(height, width)`` of each pyramid level; ``levels[0]`` is full resolution."""
        return [(lv.height, lv.width) for lv in self._levels]

    @property
    def chunk_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the tiles or strips of full resolution (the decode unit)."""
        return _chunk_shape(self._levels[0].series.keyframe)

    @property
    def geo_tags(self) -> list[tuple[int, int, int, object]]:
        """The GeoTIFF/GDAL tags of :data:`GEO_TAGS` found on the first page, as ``(code, dtype, count, value)``."""
        page = self._tif.pages[0]
        tags = []
        for code in GEO_TAGS:
            tag = page.tags.get(code)
            if tag is None:
                continue
            value = tag.value
            if isinstance(value, np.ndarray):
                value = tuple(value.tolist())
            tags.append((int(code), int(tag.dtype), int(tag.count), value))
        return tags

    @property
    def ome_pixel_size(self) -> dict[str, object] | None:
        """The OME-XML ``Pixels`` physical size of the first image (see ``ImageSource.ome_pixel_size``)."""
        if not self._tif.is_ome:
            return None
        import xml.etree.ElementTree as ElementTree

        try:
            root = ElementTree.fromstring(self._tif.ome_metadata)
        except ElementTree.ParseError:
            return {}
        pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
        if pixels is None:
            return {}
        size: dict[str, object] = {}
        for axis in "XY":
            value = pixels.get(f"PhysicalSize{axis}")
            if value is None:
                continue
            with contextlib.suppress(ValueError):
                size[f"PhysicalSize{axis}"] = float(value)
                size[f"PhysicalSize{axis}Unit"] = pixels.get(f"PhysicalSize{axis}Unit", "µm")  # OME's default
        return size

    # -- reading -------------------------------------------------------------------

    def _band_bytes(self) -> int:
        if self._max_memory is None:
            return rs.BAND_BYTES
        return max(1 << 20, min(rs.BAND_BYTES, self._max_memory // 8))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the image source is closed")
        if self._pid != os.getpid():
            # a forked child (e.g. a DataLoader worker) shares the parent's file
            # offset; interleaved seeks would corrupt reads, so reopen the file
            with self._lock:
                if self._pid != os.getpid():
                    self._open()

    def _zarr(self, level: _Level):
        if level.array is None:
            import zarr

            with self._lock:
                if level.array is None:
                    store = self._tif.series[0].aszarr(level=level.index, squeeze=False, maxworkers=_DECODE_THREADS)
                    level.array = zarr.open_array(store, mode="r", zarr_format=2)
                    level.store = store
        return level.array

    def _check_extents(self, level: _Level, top: int, bottom: int, left: int, right: int) -> None:
        """Raise ``ImageReadError`` if a chunk the window needs lies past the end of a truncated file.

        Checked before zarr starts decoding, so a truncated file fails with a
        clear message (and without zarr's half-finished concurrent reads).
        """
        try:
            if level.truncated is None:
                offsets, ends = [], []
                for page in level.series.pages:
                    if page is None:
                        continue
                    off = np.asarray(page.dataoffsets, dtype=np.int64)
                    cnt = np.asarray(page.databytecounts, dtype=np.int64)
                    offsets.append(off)
                    ends.append(np.where((off > 0) & (cnt > 0), off + cnt, 0))
                level.extents = (offsets, ends)
                size = os.path.getsize(self.path)
                level.truncated = any(int(e.max(initial=0)) > size for e in ends)
            if not level.truncated:
                return
            kf = level.series.keyframe
            chunk_h, chunk_w = _chunk_shape(kf)
            grids = []
            for axis, count in zip(kf.axes, kf.chunked):
                if axis == "Y":
                    grids.append(np.arange(top // chunk_h, (bottom - 1) // chunk_h + 1))
                elif axis == "X":
                    grids.append(np.arange(left // chunk_w, (right - 1) // chunk_w + 1))
                else:
                    grids.append(np.arange(count))
            flat = np.ravel_multi_index(np.ix_(*grids), kf.chunked).ravel()
            size = os.path.getsize(self.path)
            needed = max(int(ends[flat].max(initial=0)) for ends in level.extents[1] if len(ends) > flat.max())
        except Exception:  # noqa: BLE001 - best effort; decoding will report problems anyway
            return
        if needed > size:
            raise self._truncated(level, (top, bottom, left, right), size, needed, "tiles")

    def _truncated(
        self, level: _Level, box: tuple[int, int, int, int], size: int, end: int, what: str
    ) -> ImageReadError:
        """The error for a window whose ``what`` (tiles, pixels) end at byte ``end`` of a ``size``-byte file."""
        return ImageReadError(
            self.path,
            f"cannot read {level.describe_window(*box)}: the file is truncated ({format_size(size)} on disk, "
            f"the {what} of this window end at {format_size(end)})",
        )

    def _read_level(self, level: _Level, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Pixels ``[top:bottom, left:right]`` of ``level`` as ``(h, w, C)``, source dtype."""
        if level.memmap is not None:
            return level.to_yxc(self._read_memmap(level, top, bottom, left, right))
        if level.cache_slots:
            return self._read_cached(level, top, bottom, left, right)
        return self._read_zarr(level, top, bottom, left, right)

    def _read_cached(self, level: _Level, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Like ``_read_zarr``, assembled from whole decoded chunks kept in ``level.cache``."""
        chunk_h, chunk_w = level.chunk
        out = np.empty((bottom - top, right - left, self.channels), dtype=self.dtype)
        for row in range(top // chunk_h, (bottom - 1) // chunk_h + 1):
            for col in range(left // chunk_w, (right - 1) // chunk_w + 1):
                y0, x0 = row * chunk_h, col * chunk_w
                pixels = self._cached_chunk(level, row, col)
                y1, y2 = max(top, y0), min(bottom, y0 + chunk_h)
                x1, x2 = max(left, x0), min(right, x0 + chunk_w)
                out[y1 - top : y2 - top, x1 - left : x2 - left] = pixels[y1 - y0 : y2 - y0, x1 - x0 : x2 - x0]
                del pixels  # so an evicted chunk is freed before the next one is decoded
        return out

    def _cached_chunk(self, level: _Level, row: int, col: int) -> np.ndarray:
        """The decoded chunk at ``(row, col)`` of ``level``'s chunk grid, from the cache or decoded into it."""
        key = (row, col)
        with self._lock:
            pixels = level.cache.get(key)
            if pixels is not None:
                level.cache.move_to_end(key)
                return pixels
            chunk_h, chunk_w = level.chunk
            top, left = row * chunk_h, col * chunk_w
            bottom, right = min(level.height, top + chunk_h), min(level.width, left + chunk_w)
            while len(level.cache) >= level.cache_slots:
                level.cache.popitem(last=False)  # free before decoding the next one
            pixels = self._read_zarr(level, top, bottom, left, right)
            level.cache[key] = pixels
            return pixels

    def _read_zarr(self, level: _Level, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Pixels ``[top:bottom, left:right]`` of ``level`` decoded through zarr (whole chunks), ``(h, w, C)``."""
        sel = level.selection(top, bottom, left, right)
        self._check_extents(level, top, bottom, left, right)
        try:
            data = np.asarray(self._zarr(level)[sel])
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoding errors of any kind are a bad file
            _drain_zarr()
            where = level.describe_window(top, bottom, left, right)
            raise ImageReadError(
                self.path,
                f"cannot decode {where}: {type(exc).__name__}: {exc}{self._truncation_note(level)}",
            ) from exc
        return level.to_yxc(data)

    def _read_memmap(self, level: _Level, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Contiguous uncompressed data: map only the bytes the window needs, copy, unmap."""
        offset, dtype = level.memmap
        shape = list(level.shape)
        y = level.y_axis
        row_top, row_bottom = top, bottom
        if int(np.prod(shape[:y])) == 1:
            # rows are the outermost axis: map just rows top..bottom
            offset += top * int(np.prod(shape[y + 1 :])) * dtype.itemsize
            shape[y] = bottom - top
            row_top, row_bottom = 0, bottom - top
        end = offset + int(np.prod(shape)) * dtype.itemsize
        size = os.path.getsize(self.path)
        if end > size:
            raise self._truncated(level, (top, bottom, left, right), size, end, "pixels")
        sel = level.selection(row_top, row_bottom, left, right)
        try:
            mm = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
            try:
                data = np.array(mm[sel])
            finally:
                del mm
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(
                self.path, f"cannot read window {Window.from_bounds(top, left, bottom, right)}: {exc}"
            ) from exc
        return data.astype(data.dtype.newbyteorder("="), copy=False)

    def _truncation_note(self, level: _Level) -> str:
        try:
            size = os.path.getsize(self.path)
            end = 0
            for page in level.series.pages:
                if page is None:
                    continue
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    end = max(end, int(offset) + int(count))
            if end > size:
                return f" (the file is truncated: {format_size(size)} on disk, its pixel data needs {format_size(end)})"
        except Exception:  # noqa: BLE001 - best-effort diagnosis only
            pass
        return " (the file may be truncated or corrupt)"

    def _read_window(self, win: Window) -> np.ndarray:
        self._check_open()
        if win.area == 0:
            return np.empty((win.height, win.width, self.channels), dtype=self.dtype)
        return self._read_level(self._levels[0], win.top, win.bottom, win.left, win.right)

    def _read_resampled(self, win: Window, out_size: tuple[int, int], resample: str) -> np.ndarray:
        self._check_open()
        index = rs.choose_level(self.levels, win, out_size)
        level = self._levels[index]
        box = rs.level_box(win, (self.height, self.width), (level.height, level.width))

        def read_block(top, bottom, left, right):
            return self._read_level(level, top, bottom, left, right)

        return rs.resample_box(
            read_block,
            (level.height, level.width),
            box,
            out_size,
            resample,
            self.channels,
            self.dtype,
            band_bytes=self._band_bytes(),
            row_align=level.chunk_height,
        )

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Close the file and its zarr stores (idempotent); later reads raise ``ValueError``."""
        if self._closed:
            return
        self._closed = True
        for level in getattr(self, "_levels", []):
            if level.store is not None:
                try:
                    level.store.close()
                except Exception:  # noqa: BLE001
                    pass
            level.array = level.store = None
            level.cache.clear()
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
