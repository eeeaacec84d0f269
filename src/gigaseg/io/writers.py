"""Streaming writers: tiled BigTIFF with pyramids, and a resumable label-mask writer.

``write_tiled_tiff`` *pulls* pixels: it asks a ``render(window)`` callback for one
band of ``tile`` rows at a time (optionally in column chunks), cuts it into tiles
for tifffile, and never holds more than one band plus the codec's buffers. Pyramid
levels are made without re-rendering: while level ``k`` streams out, each band is
downsampled by 2 and appended to a raw scratch file, from which level ``k+1`` is
streamed in turn.

``MaskWriter`` is *pushed* label bands by whole-image prediction, in any order. It
keeps them in a scratch folder next to the output (a raw uint8 file plus a small
``progress.json``) so an interrupted prediction can resume, and builds the final
tiled, compressed, colour-mapped TIFF only when every band has arrived.

Both write through ``atomic_output``: a file exists under its final name only when
it is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

from ..errors import GigasegError
from ..geometry import Window
from .atomic import atomic_output
from .cog import relayout_cog

#: render(window) -> (window.height, window.width[, channels]) array
Render = Callable[[Window], np.ndarray]
#: progress(done, total), counted in bands (rendered and queued for encoding) over all levels
Progress = Callable[[int, int], None]

PYRAMID_RESAMPLING = ("area", "nearest")
#: where reduced levels go: SubIFDs of the first page, or the main IFD chain in the COG order
PYRAMID_LAYOUTS = ("subifds", "cog")
#: namespace of the OME-XML MapAnnotation that holds an OME-TIFF mask's class names (index -> name)
OME_CLASSES_NAMESPACE = "gigaseg/classes"
_COMPRESSIONS = {
    None: None,
    "none": None,
    "zlib": "zlib",
    "deflate": "zlib",
    "zstd": "zstd",
    "lzw": "lzw",
    "jpeg": "jpeg",
    "lzma": "lzma",
    "packbits": "packbits",
    "webp": "webp",
}
#: columns downsampled at once, so the accumulator of an "area" downsample stays small
_DOWNSAMPLE_COLUMNS = 2048


def pyramid_shapes(height: int, width: int, tile: int, levels: int) -> list[tuple[int, int]]:
    """Shapes of level 0 and of up to ``levels`` halvings (each ``ceil(n / 2)``).

    A level is kept only while its longer side is at least ``tile``: smaller levels
    would be a single tile, and readers gain nothing from them.

    Args:
        height: rows of level 0.
        width: columns of level 0.
        tile: tile side in pixels.
        levels: the most reduced levels wanted.

    Returns:
        ``(height, width)`` of level 0 followed by each reduced level kept.
    """
    shapes = [(height, width)]
    while len(shapes) <= levels:
        h, w = shapes[-1]
        h, w = (h + 1) // 2, (w + 1) // 2
        if max(h, w) < tile:
            break
        shapes.append((h, w))
    return shapes


def write_tiled_tiff(
    path: str | os.PathLike,
    height: int,
    width: int,
    channels: int,
    dtype,
    render: Render,
    *,
    tile: int = 512,
    compression: str | None = "zlib",
    colormap=None,
    pyramid_levels: int = 0,
    pyramid_resample: str = "area",
    geo_tags: Sequence[tuple] = (),
    photometric: str | None = None,
    description: str | None = None,
    progress: Progress | None = None,
    render_width: int | None = None,
    pyramid_layout: str = "subifds",
    ome_metadata: dict | None = None,
) -> Path:
    """Stream a ``height x width x channels`` raster to a tiled, compressed BigTIFF.

    ``render`` is called once per piece of the image, in row-major order: for every
    band of ``tile`` rows, over the full width or in column chunks of
    ``render_width``. The scene is rendered once: reduced levels are made from a
    scratch file next to ``path``. The file appears under ``path`` only when
    complete; on any error, including one raised by ``render``, neither it nor any
    temporary file remains.

    Args:
        path: the output file (its folder is created if needed).
        height: rows of the image.
        width: columns of the image.
        channels: channels of the image.
        dtype: pixel dtype written.
        render: ``render(window)`` returns ``(window.height, window.width)``
            (single channel) or ``(window.height, window.width, channels)`` of
            exactly ``dtype``.
        tile: tile side in pixels, a positive multiple of 16.
        compression: ``"zlib"`` (or ``"deflate"``), ``"zstd"``, ``"lzw"``,
            ``"jpeg"``, ``"lzma"``, ``"packbits"``, ``"webp"``, or ``"none"``/None.
        colormap: an ``(N, 3)`` uint8 palette (N <= 256) for a single-channel uint8
            label mask, stored as the TIFF ColorMap (photometric palette); None for none.
        pyramid_levels: at most this many reduced levels (each half the previous,
            ``subfiletype=1``, stored as ``pyramid_layout`` says), stopping before a
            level whose longer side is below ``tile`` (with ``"cog"``, an image larger
            than one tile keeps at least one level); 0 for none.
        pyramid_resample: ``"area"`` (2x2 mean, rounded, for images) or
            ``"nearest"`` (for label masks).
        geo_tags: tifffile extratags ``(code, dtype, count, value)`` written to the
            first page (GeoTIFF georeferencing).
        photometric: TIFF photometric interpretation; None means ``"palette"``
            with a colormap, ``"rgb"`` for 3 channels, else ``"minisblack"``.
        description: ASCII text for ImageDescription; None for none.
        progress: ``progress(done, total)``, called as each band is rendered,
            counting the bands of all levels.
        render_width: column chunk width, a multiple of ``tile``; it also bounds
            memory to one chunk (use it for very wide images). None renders full
            width.
        pyramid_layout: ``"subifds"``: reduced levels as SubIFDs of the first page
            (OME-TIFF's pyramid); ``"cog"``: reduced levels in the main IFD chain and
            the file in the cloud-optimized GeoTIFF order (every IFD first, then the
            tiles from the smallest level to full resolution; see
            :mod:`gigaseg.io.cog`), which GDAL reads as internal overviews.
        ome_metadata: write an OME-TIFF: these OME-XML attributes (e.g.
            ``PhysicalSizeX``, ``PhysicalSizeXUnit``, ``MapAnnotation``) go to
            tifffile's OME writer, whose OME-XML replaces ``description``; needs
            ``pyramid_layout="subifds"``. None for a plain TIFF.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: for a bad size, ``tile``, ``render_width``,
            ``pyramid_resample``, ``pyramid_layout``, ``compression`` or
            ``colormap``, OME metadata with the COG layout, or when ``render``
            returns the wrong shape or dtype.
    """
    final = Path(path)
    dtype = np.dtype(dtype)
    if height <= 0 or width <= 0 or channels <= 0:
        raise ValueError(f"cannot write an image of shape {height}x{width}x{channels}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if render_width is not None and (render_width <= 0 or render_width % tile):
        raise ValueError(f"render_width must be a positive multiple of tile ({tile}), got {render_width}")
    if pyramid_resample not in PYRAMID_RESAMPLING:
        raise ValueError(f"pyramid_resample must be one of {PYRAMID_RESAMPLING}, got {pyramid_resample!r}")
    if pyramid_layout not in PYRAMID_LAYOUTS:
        raise ValueError(f"pyramid_layout must be one of {PYRAMID_LAYOUTS}, got {pyramid_layout!r}")
    if ome_metadata is not None and pyramid_layout != "subifds":
        raise ValueError("an OME-TIFF keeps its pyramid in SubIFDs: ome_metadata needs pyramid_layout='subifds'")
    key = compression.lower() if isinstance(compression, str) else compression
    if key not in _COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; use one of {sorted(k for k in _COMPRESSIONS if k)}")
    codec = _COMPRESSIONS[key]

    tiff_colormap = None
    if colormap is not None:
        if channels != 1 or dtype != np.uint8:
            raise ValueError(f"a colormap needs a single-channel uint8 image, not {channels} x {dtype}")
        tiff_colormap = _tiff_colormap(colormap)
    if photometric is None:
        photometric = "palette" if tiff_colormap is not None else ("rgb" if channels == 3 else "minisblack")

    shapes = pyramid_shapes(height, width, tile, max(0, int(pyramid_levels)))
    if pyramid_layout == "cog" and pyramid_levels > 0 and len(shapes) == 1 and max(height, width) > tile:
        # a COG larger than one tile gets at least one overview (GDAL's COG driver makes one; rio-cogeo warns
        # without it), even where the rule above would write none
        shapes.append(((height + 1) // 2, (width + 1) // 2))
    total_bands = sum(math.ceil(h / tile) for h, _ in shapes)
    done = [0]

    def band_done() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total_bands)

    options = dict(
        dtype=dtype,
        tile=(tile, tile),
        compression=codec,
        photometric=photometric,
        planarconfig="contig" if channels > 1 else None,
        colormap=tiff_colormap,
        metadata=None,
        # encode at most one band (or one render chunk) of tiles at a time
        buffersize=tile * tile * channels * dtype.itemsize * math.ceil(min(width, render_width or width) / tile),
    )
    cog = pyramid_layout == "cog" and len(shapes) > 1  # one level written in order is already COG-ordered
    first_page = dict(
        description=description if ome_metadata is None else None,
        extratags=[_extratag(tag) for tag in geo_tags],
        subifds=len(shapes) - 1 if len(shapes) > 1 and pyramid_layout == "subifds" else None,
    )
    if ome_metadata is not None:
        first_page["metadata"] = {"axes": "YXS" if channels > 1 else "YX", **ome_metadata}

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(final))
        scratch = None
        if len(shapes) > 1:
            # one fixed name per output (as its partial file has): a run killed while writing the levels
            # leaves it behind, and the next run for the same output clears it instead of adding another
            scratch = pyramid_scratch(final)
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=ome_metadata is not None) as writer:
            source: Render = render
            chunk = render_width
            reader = None
            for level, (h, w) in enumerate(shapes):
                down = None
                if level + 1 < len(shapes):
                    down = stack.enter_context(open(scratch / f"level{level + 1}.raw", "wb"))
                tiles = _level_tiles(h, w, channels, dtype, tile, source, chunk, down, pyramid_resample, band_done)
                extra = first_page if level == 0 else dict(subfiletype=1)
                writer.write(tiles, shape=(h, w, channels) if channels > 1 else (h, w), **{**options, **extra})
                if reader is not None:  # this level's raw file is spent: free the disk now
                    reader.close()
                    os.unlink(reader.name)
                if down is not None:
                    down.close()
                    reader = stack.enter_context(open(down.name, "rb"))
                    source = _raw_render(reader, shapes[level + 1][1], channels, dtype)
                    chunk = None  # a raw level is read a whole band at a time
        if cog:
            # the COG order is made by a second pass that copies the encoded tiles (gigaseg.io.cog)
            relaid = relayout_cog(tmp, scratch / "cog.tif")
            os.replace(relaid, tmp)
    return final


def pyramid_scratch(path: str | os.PathLike) -> Path:
    """The folder where :func:`write_tiled_tiff` keeps the raw reduced levels of ``path`` while it writes it.

    Args:
        path: the final output file.

    Returns:
        ``<folder>/.<name>.pyramid`` for ``path = <folder>/<name>``.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.pyramid")


def _level_tiles(
    height: int,
    width: int,
    channels: int,
    dtype: np.dtype,
    tile: int,
    render: Render,
    chunk_width: int | None,
    down_file,
    resample: str,
    band_done: Callable[[], None],
) -> Iterator[np.ndarray]:
    """Tiles of one level in TIFF order; optionally append its 2x downsample to ``down_file``."""
    chunk_width = chunk_width or width
    for top in range(0, height, tile):
        rows = min(tile, height - top)
        down = None
        if down_file is not None:
            down = np.empty(((rows + 1) // 2, (width + 1) // 2, channels), dtype=dtype)
        for left in range(0, width, chunk_width):
            cols = min(chunk_width, width - left)
            window = Window(top, left, rows, cols)
            block = _checked(render(window), window, channels, dtype)
            if down is not None:
                _downsample_into(down, left // 2, block, resample)
            if left + cols == width:
                # Finish the band before handing out its last tiles: tifffile closes
                # this generator right after the last tile, so code after it never runs.
                if down is not None:
                    down.tofile(down_file)
                    down = None
                band_done()
            for start in range(0, cols, tile):
                piece = block[:, start : start + tile]
                yield piece[..., 0] if channels == 1 else piece
            del block, piece


def _downsample_into(out: np.ndarray, left: int, block: np.ndarray, resample: str) -> None:
    """``out[:, left:...] = downsample2(block)``, a few columns at a time (small temporaries)."""
    for start in range(0, block.shape[1], _DOWNSAMPLE_COLUMNS):
        part = block[:, start : start + _DOWNSAMPLE_COLUMNS]
        first = left + start // 2
        out[:, first : first + (part.shape[1] + 1) // 2] = downsample2(part, resample)


def _checked(block, window: Window, channels: int, dtype: np.dtype) -> np.ndarray:
    block = np.asarray(block)
    if block.ndim == 2 and channels == 1:
        block = block[..., None]
    expected = (window.height, window.width, channels)
    if block.shape != expected:
        raise ValueError(
            f"render({window}) returned shape {block.shape}, expected {expected[:2] if channels == 1 else expected}"
        )
    if block.dtype != dtype:
        raise ValueError(f"render({window}) returned dtype {block.dtype}, expected {dtype}")
    return block


def downsample2(block: np.ndarray, resample: str = "area") -> np.ndarray:
    """Halve a block of pixels.

    ``"nearest"`` keeps every other pixel (labels stay labels; bool blocks always
    do this). ``"area"`` averages 2x2 blocks, rounding half up for integers; an odd
    last row/column is averaged with itself (edge replication).

    Args:
        block: ``(h, w, C)`` (or ``(h, w)``) pixels.
        resample: ``"area"`` or ``"nearest"``.

    Returns:
        ``(ceil(h/2), ceil(w/2), C)`` in the block's dtype (a view for ``"nearest"``).

    Raises:
        ValueError: for another ``resample``.
    """
    if resample == "nearest" or block.dtype == bool:
        return block[::2, ::2]
    if resample != "area":
        raise ValueError(f"resample must be 'area' or 'nearest', got {resample!r}")
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="edge")
    kind = block.dtype.kind
    if kind in "ui":
        wide = (
            np.dtype(f"{kind}{min(8, block.dtype.itemsize * 2)}") if block.dtype.itemsize < 8 else np.dtype(np.float64)
        )
        total = block[0::2].astype(wide)
        total += block[1::2]
        total = total[:, 0::2] + total[:, 1::2]
        if wide.kind == "f":
            return np.floor(total / 4 + 0.5).astype(block.dtype)
        total += 2
        total //= 4
        return total.astype(block.dtype)
    work = np.float32 if block.dtype.itemsize < 4 else block.dtype
    total = block[0::2].astype(work)
    total += block[1::2]
    total = total[:, 0::2] + total[:, 1::2]
    total *= 0.25
    return total.astype(block.dtype, copy=False)


def _raw_render(file, width: int, channels: int, dtype: np.dtype) -> Render:
    """A render callback reading full-width row bands of a raw row-major file."""

    def render(window: Window) -> np.ndarray:
        if window.left != 0 or window.width != width:
            raise ValueError("raw levels are read in full-width bands")
        return read_rows(file, window.top, window.height, width, channels, dtype)

    return render


def read_rows(file, top: int, rows: int, width: int, channels: int, dtype) -> np.ndarray:
    """Rows ``top .. top+rows`` of a raw row-major ``(H, width, channels)`` file.

    Args:
        file: a binary file opened for reading (seekable, with ``readinto``).
        top: first row.
        rows: number of rows.
        width: columns per row.
        channels: channels per pixel.
        dtype: dtype of the stored values (native byte order).

    Returns:
        ``(rows, width, channels)`` array of ``dtype``.

    Raises:
        GigasegError: when the file ends before the last row.
    """
    dtype = np.dtype(dtype)
    out = np.empty((rows, width, channels), dtype=dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    file.seek(top * width * channels * dtype.itemsize)
    filled = 0
    while filled < len(view):
        count = file.readinto(view[filled:])
        if not count:
            raise GigasegError(f"{getattr(file, 'name', 'scratch file')}: truncated (rows {top}..{top + rows})")
        filled += count
    return out


def _write_all(file, data: np.ndarray) -> None:
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    while len(view):
        written = file.write(view)
        view = view[written:]


def _tiff_colormap(colormap) -> np.ndarray:
    """An ``(N, 3)`` uint8 palette as tifffile's ``(3, 256)`` uint16 ColorMap."""
    array = np.asarray(colormap)
    if array.shape == (3, 256) and array.dtype == np.uint16:
        return array
    if array.ndim != 2 or array.shape[1] != 3 or not 0 < len(array) <= 256:
        raise ValueError(f"colormap must be an (N, 3) palette with N <= 256, got shape {array.shape}")
    if array.min() < 0 or array.max() > 255:
        raise ValueError("colormap colours must lie in 0..255")
    table = np.zeros((3, 256), dtype=np.uint16)
    table[:, : len(array)] = array.astype(np.uint16).T * 257
    return table


def _extratag(tag: Sequence) -> tuple:
    """``(code, dtype, count, value)`` -> tifffile's 5-tuple, written to the first page only."""
    if len(tag) == 4:
        return (*tag, True)
    if len(tag) == 5:
        return tuple(tag)
    raise ValueError(f"a TIFF tag is (code, dtype, count, value), got {tag!r}")


class MaskWriter:
    """Collects label bands of a ``height x width`` uint8 mask; writes a tiled TIFF at the end.

    ``write_band(top, labels)`` takes a ``(band_height, width)`` band (shorter at the
    bottom) whose ``top`` is a multiple of ``band_height``, in any order. Each band
    is stored in ``.<name>.scratch/`` next to the output and flushed to disk before
    it is recorded as done, so after a crash ``MaskWriter(..., resume=True)`` knows
    which bands it already has (``done_bands``, ``is_done``). ``close()`` (or
    leaving a ``with`` block normally) checks that every band arrived and writes the
    final TIFF: tiled, compressed, with a nearest-neighbour pyramid, the palette as
    ColorMap, ``geo_tags`` and ``{"classes": [...]}`` as ImageDescription; then the
    scratch folder is removed. After an exception in the ``with`` block the scratch
    folder is kept and nothing appears under ``path``.

    The TIFF is a cloud-optimized GeoTIFF (pyramid as reduced IFDs in the main chain, every
    IFD before the tiles, the smallest level's tiles first: :mod:`gigaseg.io.cog`), which is
    what GIS tools stream best. With ``ome`` it is an OME-TIFF instead: OME-XML (with the
    physical pixel size and the class names, as a ``MapAnnotation`` in namespace
    :data:`OME_CLASSES_NAMESPACE`) as ImageDescription and the pyramid in SubIFDs, as
    OME-TIFF wants; napari and QuPath read it. :func:`mask_classes` reads the class names
    back from either.

    Args:
        path: the output TIFF.
        height: rows of the mask.
        width: columns of the mask.
        palette: ``(N, 3)`` class colours (N <= 256) stored as the ColorMap; None
            for none.
        tile: tile side of the TIFF and height of a band, a positive multiple of 16.
        pyramid: write a nearest-neighbour pyramid (down to tile size).
        geo_tags: tifffile extratags ``(code, dtype, count, value)`` for the first page.
        compression: TIFF compression, as in :func:`write_tiled_tiff`.
        class_names: class names stored as ``{"classes": [...]}`` in
            ImageDescription; None for no description.
        resume: continue from the bands in an existing scratch folder; without one
            (or with ``resume=False``) a fresh, empty scratch folder is made (an
            old one is deleted).
        progress: ``progress(done, total)`` called while the final TIFF is
            written, as in :func:`write_tiled_tiff`.
        producer: fingerprint of what makes the bands (model, options, settings);
            a resume requires the same one.
        ome: write an OME-TIFF with these OME ``Pixels`` attributes (``PhysicalSizeX``,
            ``PhysicalSizeXUnit``, ``PhysicalSizeY``, ``PhysicalSizeYUnit``; what
            ``ImageSource.ome_pixel_size`` gives for an OME-TIFF input, ``{}`` for
            none); None for the cloud-optimized GeoTIFF.

    Raises:
        ValueError: for a bad size or ``tile``, or a bad palette.
        GigasegError: when resuming from a scratch folder that is unreadable or
            inconsistent, holds a mask of another size or band height, or was made
            by another ``producer``.
    """

    _FORMAT = "gigaseg-mask-bands"

    def __init__(
        self,
        path: str | os.PathLike,
        height: int,
        width: int,
        *,
        palette=None,
        tile: int = 512,
        pyramid: bool = True,
        geo_tags: Sequence[tuple] = (),
        compression: str | None = "zlib",
        class_names: Iterable[str] | None = None,
        resume: bool = False,
        progress: Progress | None = None,
        producer: str | None = None,
        ome: dict | None = None,
    ):
        if height <= 0 or width <= 0:
            raise ValueError(f"cannot write a mask of size {height}x{width}")
        if tile <= 0 or tile % 16:
            raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
        self.path = Path(path)
        self.height, self.width, self.tile = int(height), int(width), int(tile)
        self.palette = None if palette is None else _checked_palette(palette)
        self.pyramid = pyramid
        self.geo_tags = list(geo_tags)
        self.compression = compression
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.progress = progress
        # what makes the bands (a fingerprint of model, options and settings): a resume by anything
        # else would stitch two different predictions into one mask
        self.producer = producer
        self.ome = None if ome is None else dict(ome)
        self.scratch_dir = self.path.with_name(f".{self.path.name}.scratch")
        self._raw_path = self.scratch_dir / "labels.raw"
        self._progress_path = self.scratch_dir / "progress.json"
        self._done: set[int] = set()
        self._file = None
        self._closed = False
        self._aborted = False
        if resume and self._progress_path.exists():
            self._resume()
        else:
            self._start()

    # -- scratch area -------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "format": self._FORMAT,
            "version": 1,
            "height": self.height,
            "width": self.width,
            "band_height": self.tile,
            "producer": self.producer,
        }

    def _start(self) -> None:
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        self.scratch_dir.mkdir(parents=True)
        self._file = open(self._raw_path, "w+b", buffering=0)
        self._file.truncate(self.height * self.width)  # sparse where the filesystem allows
        self._save_progress()

    def _resume(self) -> None:
        where = f"{self.path}: cannot resume from {self.scratch_dir}"
        try:
            state = json.loads(self._progress_path.read_text())
        except (OSError, ValueError) as error:
            raise GigasegError(
                f"{where}: unreadable progress.json ({error}); delete the folder or write afresh"
            ) from None
        expected = self._meta()
        found = {k: state.get(k) for k in expected}
        if any(found[k] != expected[k] for k in expected if k != "producer"):
            raise GigasegError(
                f"{where}: it holds a {found['height']}x{found['width']} mask in {found['band_height']}-row bands, "
                f"not {self.height}x{self.width} in {self.tile}-row bands; delete the folder or write afresh"
            )
        if found["producer"] != self.producer:
            raise GigasegError(
                f"{where}: its finished bands were made from another input image, by another model, other "
                f"options or other settings; "
                f"rerun with --restart (resume=False) to start afresh, or with what made them"
            )
        if not self._raw_path.exists():
            raise GigasegError(f"{where}: {self._raw_path.name} is missing; delete the folder or write afresh")
        size = self._raw_path.stat().st_size
        if size != self.height * self.width:
            raise GigasegError(f"{where}: {self._raw_path.name} has {size} bytes, expected {self.height * self.width}")
        done = state.get("done", [])
        if not all(isinstance(t, int) and t in self._tops() for t in done):
            raise GigasegError(f"{where}: progress.json lists bands that do not exist")
        self._done = set(done)
        self._file = open(self._raw_path, "r+b", buffering=0)

    def _save_progress(self) -> None:
        state = {**self._meta(), "done": sorted(self._done)}
        tmp = self._progress_path.with_name("progress.json.tmp")
        with open(tmp, "w") as file:
            json.dump(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self._progress_path)

    def _tops(self) -> range:
        return range(0, self.height, self.tile)

    # -- bands ----------------------------------------------------------------------

    @property
    def band_height(self) -> int:
        """Rows per band (the tile size; the last band may be shorter)."""
        return self.tile

    @property
    def band_tops(self) -> list[int]:
        """Top row of every band, in order."""
        return list(self._tops())

    @property
    def done_bands(self) -> list[int]:
        """Tops of the bands already stored (sorted)."""
        return sorted(self._done)

    @property
    def missing_bands(self) -> list[int]:
        """Tops of the bands not stored yet, in order."""
        return [top for top in self._tops() if top not in self._done]

    def is_done(self, top: int) -> bool:
        """Whether the band starting at row ``top`` is stored.

        Args:
            top: the band's top row.

        Returns:
            True when the band is stored.
        """
        return top in self._done

    def band_window(self, top: int) -> Window:
        """The window of the band starting at ``top`` (full width).

        Args:
            top: the band's top row, a multiple of :attr:`band_height`.

        Returns:
            ``Window(top, 0, rows, width)``; the last band may have fewer rows.

        Raises:
            ValueError: when ``top`` is not a band's top row.
        """
        self._check_top(top)
        return Window(top, 0, min(self.tile, self.height - top), self.width)

    def _check_top(self, top: int) -> None:
        if top not in self._tops():
            raise ValueError(f"band top must be a multiple of {self.tile} in 0..{self.height - 1}, got {top}")

    def write_band(self, top: int, labels: np.ndarray) -> None:
        """Store the labels of a band durably, then record it as done.

        A band written again is overwritten.

        Args:
            top: the band's top row, a multiple of :attr:`band_height`.
            labels: ``(rows, width)`` (or ``(rows, width, 1)``) labels of the band,
                as in :meth:`band_window`; uint8, or integers in 0..255.

        Raises:
            ValueError: when the writer is closed or aborted, ``top`` is not a
                band's top row, or the labels have the wrong shape or values.
        """
        if self._closed or self._aborted or self._file is None:
            raise ValueError(f"MaskWriter for {self.path} is closed")
        window = self.band_window(top)
        labels = np.asarray(labels)
        if labels.ndim == 3 and labels.shape[2] == 1:
            labels = labels[..., 0]
        if labels.shape != window.shape:
            raise ValueError(f"band at row {top} must have shape {window.shape}, got {labels.shape}")
        if labels.dtype != np.uint8:
            if labels.dtype.kind not in "ui" or (labels.size and (labels.min() < 0 or labels.max() > 255)):
                raise ValueError(f"labels must be uint8 (or integers in 0..255), got {labels.dtype}")
            labels = labels.astype(np.uint8)
        self._file.seek(top * self.width)
        _write_all(self._file, labels)
        os.fsync(self._file.fileno())
        self._done.add(top)
        self._save_progress()

    # -- finishing --------------------------------------------------------------------

    def close(self) -> Path:
        """Check that every band arrived, write the final TIFF, remove the scratch folder.

        Closing again does nothing.

        Returns:
            The output path.

        Raises:
            GigasegError: when bands are missing (the scratch folder is kept).
            ValueError: when the writer was aborted.
        """
        if self._closed:
            return self.path
        if self._aborted:
            raise ValueError(f"MaskWriter for {self.path} was aborted; make a new one with resume=True")
        missing = self.missing_bands
        if missing:
            rows = ", ".join(f"{t}-{min(t + self.tile, self.height) - 1}" for t in missing[:8])
            more = f" and {len(missing) - 8} more bands" if len(missing) > 8 else ""
            raise GigasegError(
                f"{self.path}: mask incomplete, {len(missing)} of {len(self._tops())} bands missing: "
                f"rows {rows}{more} were never written (finished bands are kept in {self.scratch_dir})"
            )
        description = ome = None
        if self.ome is not None:
            ome = dict(self.ome)
            if self.class_names is not None:
                names = {str(index): name for index, name in enumerate(self.class_names)}
                ome["MapAnnotation"] = {"Namespace": OME_CLASSES_NAMESPACE, **names}
        elif self.class_names is not None:
            description = json.dumps({"classes": self.class_names})
        write_tiled_tiff(
            self.path,
            self.height,
            self.width,
            1,
            np.uint8,
            _raw_render(self._file, self.width, 1, np.dtype(np.uint8)),
            tile=self.tile,
            compression=self.compression,
            colormap=self.palette,
            pyramid_levels=64 if self.pyramid else 0,
            pyramid_resample="nearest",
            geo_tags=self.geo_tags,
            description=description,
            progress=self.progress,
            pyramid_layout="cog" if ome is None else "subifds",
            ome_metadata=ome,
        )
        self._release()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        self._closed = True
        return self.path

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def abort(self) -> None:
        """Stop without writing the final file; the scratch folder stays for ``resume=True``."""
        self._release()
        self._aborted = True

    def discard(self) -> None:
        """Stop and delete the scratch folder (the finished bands are lost)."""
        self.abort()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        finally:
            self._release()

    def __repr__(self) -> str:
        return (
            f"MaskWriter({str(self.path)!r}, {self.height}x{self.width}, {len(self._done)}/{len(self._tops())} bands)"
        )


def mask_classes(tif) -> list[str] | None:
    """The class names a :class:`MaskWriter` stored in a mask TIFF.

    Args:
        tif: the mask, an open ``tifffile.TiffFile``.

    Returns:
        The names by class index: from the ``{"classes": [...]}`` ImageDescription, or from an
        OME-TIFF's ``MapAnnotation`` in :data:`OME_CLASSES_NAMESPACE`; None when the file holds
        neither (a mask written without names, or by another program).
    """
    if tif.is_ome:
        import xml.etree.ElementTree as ElementTree

        try:
            root = ElementTree.fromstring(tif.ome_metadata)
        except ElementTree.ParseError:
            return None
        for element in root.iter():
            if element.tag.endswith("MapAnnotation") and element.get("Namespace") == OME_CLASSES_NAMESPACE:
                pairs = {m.get("K"): m.text or "" for m in element.iter() if m.tag.endswith("}M") or m.tag == "M"}
                if pairs and all(k is not None and k.isdigit() for k in pairs):
                    names = [""] * (max(int(k) for k in pairs) + 1)
                    for key, name in pairs.items():
                        names[int(key)] = name
                    return names
        return None
    try:
        stored = json.loads(tif.pages[0].description or "null")
    except ValueError:
        return None
    if isinstance(stored, dict) and isinstance(stored.get("classes"), list):
        return [str(name) for name in stored["classes"]]
    return None


def mask_palette(tif) -> np.ndarray | None:
    """The class colours of a mask TIFF: its ColorMap as ``(256, 3)`` uint8, or None without one.

    Args:
        tif: the mask, an open ``tifffile.TiffFile``.

    Returns:
        Row ``i`` is class ``i``'s colour.
    """
    colormap = tif.pages[0].colormap
    if colormap is None:
        return None
    colormap = np.asarray(colormap)
    if colormap.dtype == np.uint16:
        colormap = colormap // 257
    return colormap.T.astype(np.uint8)


def _checked_palette(palette) -> np.ndarray:
    """``palette`` as ``(N, 3)`` uint8, or a ValueError: a colour outside 0..255 would wrap in the ColorMap."""
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or not 0 < len(array) <= 256:
        raise ValueError(f"palette must be an (N, 3) array with 1 <= N <= 256, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"palette colours must be integers 0..255, got dtype {array.dtype}")
    bad = (array < 0) | (array > 255) | (array != np.round(array))
    if bad.any():
        row, channel = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"palette colours must be integers 0..255, got {array[row, channel].item()!r} in entry {row} "
            f"({array[row].tolist()})"
        )
    return array.astype(np.uint8)
