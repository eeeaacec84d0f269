"""Drive a ``SegmentationPredictor`` over a whole image, block by block, into files.

Memory: one row of blocks of labels (``block_size`` rows x image width, uint8),
one block of probabilities, and whatever the predictor holds (its context and
one block's work). Nothing scales with the image's area. Finished row bands go
to ``MaskWriter``, which keeps them in a scratch area, so a killed run resumes
where it stopped and its result equals an uninterrupted run. With the ``ome-zarr``
format they go to an OME-Zarr store instead (``gigaseg.io.omezarr``), from which a TIFF
mask, when also asked for, is converted by streaming when every band is there.

A row of blocks is predicted by :func:`predict_band` from the predictor's
``band_context``, so it does not depend on the rows predicted before it: the
distributed driver (``gigaseg.inference.distributed``) predicts rows in other
processes with the same function and gets the same labels.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, GigasegError, ImageReadError
from ..geometry import Window
from ..io.base import ImageSource
from ..io.omezarr import OmeZarrMaskWriter, ome_zarr_path
from ..io.writers import MaskWriter
from ..progress import progress_bar
from .contract import SegmentationPredictor
from .heap import bound_heap_growth, release_free_memory

#: bands handed to the mask writer are multiples of its tile height
WRITER_TILE = 512
#: mask formats: the tiled (cloud-optimized) GeoTIFF and the OME-Zarr label store
MASK_FORMATS = ("tiff", "ome-zarr")


def parse_formats(formats) -> tuple[str, ...]:
    """The mask formats asked for, checked.

    Args:
        formats: ``"tiff"``, ``"ome-zarr"``, a comma-separated list of them (``"tiff,ome-zarr"``)
            or a sequence of them.

    Returns:
        The formats, each once, in the order of :data:`MASK_FORMATS`.

    Raises:
        ConfigError: an unknown format, or none.
    """
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in MASK_FORMATS]
    if unknown or not names:
        raise ConfigError(
            f"unknown mask format {', '.join(map(repr, unknown)) or repr(formats)}; use {' or '.join(MASK_FORMATS)} "
            f"or both, comma-separated"
        )
    return tuple(f for f in MASK_FORMATS if f in names)


@dataclass
class PredictionResult:
    """What :func:`predict_image` did.

    Attributes:
        mask_path: the label-mask TIFF, or None when nothing was written (``out=None``).
        height: image height in pixels.
        width: image width in pixels.
        seconds: wall time of the whole prediction.
        blocks_predicted: blocks computed in this run.
        blocks_resumed: blocks skipped because an earlier run had finished their bands.
        overlay_path: the overlay PNG, when asked for.
        probabilities_path: the ``_probabilities.zarr`` array, when asked for.
        vector_path: the polygons (GeoPackage or GeoJSON), when asked for.
        ome_zarr_path: the OME-Zarr store (labels, and probabilities when asked for), with the
            ``ome-zarr`` format.
        extra: anything else a caller wants to attach.
    """

    mask_path: Path | None
    height: int
    width: int
    seconds: float
    blocks_predicted: int
    blocks_resumed: int
    overlay_path: Path | None = None
    probabilities_path: Path | None = None
    vector_path: Path | None = None
    ome_zarr_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def megapixels_per_second(self) -> float:
        """Image megapixels per wall-clock second (resumed blocks count as done)."""
        return self.height * self.width / 1e6 / max(self.seconds, 1e-9)


def effective_block_size(predictor, requested: int) -> int:
    """The block side a prediction runs with.

    Args:
        predictor: the predictor; its ``SegmentationPredictor.block_size`` is the side it
            planned its memory for (duck-typed predictors may have none).
        requested: the side to use when the predictor has none.

    Returns:
        The predictor's block side, else ``requested``.
    """
    return getattr(predictor, "block_size", None) or requested


def block_grid(height: int, width: int, block_size: int) -> list[list[Window]]:
    """Rows of blocks covering the image.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        block_size: the wanted block side; rounded down to a multiple of ``WRITER_TILE``
            (at least one tile), so that block rows are whole writer bands.

    Returns:
        One list of blocks per row band, left to right; the last row and column are cut at the border.
    """
    block = max(WRITER_TILE, (block_size // WRITER_TILE) * WRITER_TILE)
    rows = []
    for top in range(0, height, block):
        h = min(block, height - top)
        rows.append([Window(top, left, h, min(block, width - left)) for left in range(0, width, block)])
    return rows


def predict_image(
    predictor: SegmentationPredictor,
    source: ImageSource,
    out: str | os.PathLike | None,
    *,
    block_size: int = 2048,
    palette: np.ndarray | None = None,
    class_names: list[str] | None = None,
    probabilities: bool = False,
    overlay: bool = False,
    resume: bool = True,
    on_band: Callable[[Window, np.ndarray], None] | None = None,
    progress: bool = True,
    producer: str | None = None,
    formats=("tiff",),
) -> PredictionResult:
    """Predict ``source`` into a label-mask TIFF at ``out`` (and/or an OME-Zarr store next to it).

    Args:
        predictor: computes the class probabilities of each block.
        source: the image.
        out: the mask's path; None writes nothing and only calls ``on_band``.
        block_size: the block side, used when the predictor planned none (see
            :func:`effective_block_size`).
        palette: ``(N, 3)`` uint8 colours stored as the mask's colormap (and used by the overlay).
        class_names: stored with the mask.
        probabilities: also write a float16 zarr array ``(C, H, W)`` next to the mask as
            ``<stem>_probabilities.zarr`` (needs ``out``).
        overlay: also write ``<stem>_overlay.png`` (needs ``out``).
        resume: keep the finished bands of an interrupted run at ``out``; False starts afresh.
        on_band: ``on_band(window, labels)`` receives each finished row band (uint8 labels,
            e.g. to update a streaming confusion matrix); with it, every band is predicted
            even when already done.
        progress: show a progress bar (on a terminal).
        producer: a :func:`gigaseg.inference.fingerprint.prediction_fingerprint`, kept with the
            finished bands: resuming them with a different one is an error.
        formats: the mask formats (:func:`parse_formats`): ``"tiff"`` writes ``out``;
            ``"ome-zarr"`` writes the store ``<stem>.ome.zarr`` next to it
            (:func:`gigaseg.io.omezarr.ome_zarr_path`), which then also keeps the bands of an
            interrupted run and the probabilities (as its ``probabilities`` image, instead of
            ``<stem>_probabilities.zarr``); with both, the TIFF is converted from the store.

    Returns:
        The paths written and the counts and time.

    Raises:
        GigasegError: the bands at ``out`` cannot be resumed (another producer, other size,
            damaged scratch files), or a block's class scores are not finite (an
            ``ImageReadError`` when the image holds NaN or infinite pixels there): such a
            block has no class, and no mask is painted from it.
        RuntimeError: the predictor returned a block of the wrong shape.

    After an error the finished bands stay in the scratch folder for a resume; a run that
    finished none leaves no scratch folder behind.
    """
    start = time.perf_counter()
    bound_heap_growth()  # see gigaseg.inference.heap: activations reused, peak RSS flat with image size
    out = Path(out) if out is not None else None
    formats = parse_formats(formats)
    block_size = effective_block_size(predictor, block_size)
    rows = block_grid(source.height, source.width, block_size)
    writer = store = None
    if out is not None and "ome-zarr" in formats:
        store = OmeZarrMaskWriter(
            ome_zarr_path(out),
            source.height,
            source.width,
            palette=palette,
            class_names=class_names,
            chunk=WRITER_TILE,
            num_classes=predictor.num_classes if probabilities else None,
            resume=resume,
            producer=producer,
            name=source.name,
        )
    elif out is not None:
        writer = mask_writer(out, source, palette=palette, class_names=class_names, resume=resume, producer=producer)
    probs_store = None
    if probabilities and out is not None and store is None:
        probs_store = _ProbabilityStore(out, predictor.num_classes, source, resume)
    on_block = probs_store.write if probs_store is not None else None
    if store is not None and probabilities:
        on_block = store.write_probabilities
    try:
        predicted, resumed = _predict_rows(
            predictor, source, rows, writer or store, probs_store, on_band, progress, on_block
        )
    except BaseException:
        # the finished bands stay for a resume; a run that finished none leaves nothing behind
        if writer is not None and not writer.done_bands:
            writer.discard()
        if store is not None and not store.has_done_bands():
            store.discard()
        if probs_store is not None and not probs_store.has_done_bands():
            probs_store.discard()
        raise
    result = PredictionResult(None, source.height, source.width, 0.0, predicted, resumed)
    if writer is not None:
        writer.close()
        result.mask_path = out
    if store is not None:
        finish_store(store, result, out, source, formats, palette=palette, class_names=class_names, producer=producer)
    if probs_store is not None:
        result.probabilities_path = probs_store.finish()
    if overlay and out is not None:
        write_overlay(result, out, source, palette)
    result.seconds = time.perf_counter() - start
    return result


def mask_writer(
    out: Path,
    source: ImageSource,
    *,
    palette: np.ndarray | None,
    class_names: list[str] | None,
    resume: bool,
    producer: str | None,
) -> MaskWriter:
    """The writer of the TIFF mask of ``source`` at ``out``, as every prediction makes it.

    Args:
        out: the mask's path.
        source: the image (its georeferencing and OME pixel size are copied).
        palette: the class colours.
        class_names: the class names.
        resume: keep the finished bands of an interrupted run.
        producer: the prediction's fingerprint.

    Returns:
        The ``MaskWriter`` (bands of ``WRITER_TILE`` rows).
    """
    return MaskWriter(
        out,
        source.height,
        source.width,
        palette=palette,
        tile=WRITER_TILE,
        geo_tags=source.geo_tags,
        ome=getattr(source, "ome_pixel_size", None),  # an OME-TIFF input gets an OME-TIFF mask
        class_names=class_names,
        resume=resume,
        producer=producer,
    )


def finish_store(
    store: OmeZarrMaskWriter,
    result: PredictionResult,
    out: Path,
    source: ImageSource,
    formats: tuple[str, ...],
    *,
    palette: np.ndarray | None,
    class_names: list[str] | None,
    producer: str | None,
) -> None:
    """Turn a store whose bands are all there into the outputs asked for.

    With ``"tiff"`` the TIFF mask is converted from the store band by band (through the same
    ``MaskWriter`` as a direct prediction, so the file is the same); then, with ``"ome-zarr"``, the
    store is finished (pyramid, metadata, renamed into place), else it is deleted (it only held the
    bands). The TIFF comes first: a run killed in between still has the complete partial store, and
    its rerun converts again without predicting.

    Args:
        store: the writer of the store, every band written.
        result: filled in: ``mask_path``, ``ome_zarr_path``, ``probabilities_path``.
        out: the TIFF mask's path.
        source: the image.
        formats: the formats asked for (:func:`parse_formats`).
        palette: the class colours.
        class_names: the class names.
        producer: the prediction's fingerprint (kept by the TIFF's scratch bands).

    Raises:
        GigasegError: bands are missing from the store.
    """
    missing = store.missing_bands
    if missing:
        store.close()  # raises, naming the missing rows
    if "tiff" in formats:
        # from scratch: the store has every band, and an older conversion's scratch may be another run's
        writer = mask_writer(out, source, palette=palette, class_names=class_names, resume=False, producer=producer)
        labels = store.labels(0)
        for top in writer.band_tops:
            window = writer.band_window(top)
            writer.write_band(top, labels[window.top : window.bottom])
        result.mask_path = writer.close()
    if "ome-zarr" in formats:
        result.ome_zarr_path = store.close()
        if store.num_classes is not None:
            result.probabilities_path = result.ome_zarr_path / "probabilities"
    else:
        store.discard()


def write_overlay(result: PredictionResult, out: Path, source: ImageSource, palette: np.ndarray | None) -> Path:
    """Write ``<stem>_overlay.png`` next to ``out`` from the finished mask (the TIFF, else the OME-Zarr store).

    Args:
        result: the prediction's result, with ``mask_path`` or ``ome_zarr_path``; ``overlay_path`` is set.
        out: the TIFF mask's path (names the overlay).
        source: the image.
        palette: the class colours.

    Returns:
        The overlay's path.
    """
    from ..io.overlay import write_overlay_png

    result.overlay_path = out.with_name(f"{out.stem}_overlay.png")
    if result.mask_path is not None:
        labels = result.mask_path
    else:  # the store's smallest level that still has the overlay's size (a few MB at most)
        import zarr

        group = zarr.open_group(str(result.ome_zarr_path), mode="r")
        levels = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
        level = next((k for k in reversed(levels) if max(group[k].shape) >= 2048), levels[0])
        labels = np.asarray(group[level][:])
    write_overlay_png(result.overlay_path, source, labels, palette)
    return result.overlay_path


def predict_band(
    predictor: SegmentationPredictor,
    source: ImageSource,
    context,
    row: list[Window],
    *,
    on_block: Callable[[Window, np.ndarray], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The labels of one row of blocks (the unit of work, in this process or on a Dask worker).

    The blocks are predicted left to right from ``predictor.band_context(context)``, so the result
    does not depend on what this process predicted before.

    Args:
        predictor: the predictor.
        source: the image.
        context: what ``predictor.prepare(source)`` returned.
        row: the row's blocks, left to right (one row of :func:`block_grid`).
        on_block: ``on_block(block, probs)`` sees each block's probabilities (to store them).
        advance: ``advance(1)`` after each block (a progress bar).

    Returns:
        uint8 labels of the band, ``(row height, image width)``.

    Raises:
        GigasegError: a block's class scores are not finite (see :func:`predict_image`).
        RuntimeError: the predictor returned a block of the wrong shape.
    """
    band = Window(row[0].top, 0, row[0].height, source.width)
    band_context = getattr(predictor, "band_context", None)  # duck-typed predictors may have none
    context = band_context(context) if band_context is not None else context
    labels = np.empty(band.shape, dtype=np.uint8)
    for block, reader in _blocks_with_reader(predictor, source, row):
        probs = predictor.predict_block(reader, context, block)
        expected = (predictor.num_classes, block.height, block.width)
        if probs.shape != expected:
            raise RuntimeError(
                f"{type(predictor).__name__} returned {probs.shape} for block {block}, expected {expected}"
            )
        if not np.isfinite(probs.max()):  # max propagates NaN: one pass, no temporary
            raise _non_finite_scores(source, block)
        labels[:, block.left : block.right] = _argmax(probs)
        if on_block is not None:
            on_block(block, probs)
        del probs
        release_free_memory()
        if advance is not None:
            advance(1)
    return labels


def _argmax(probs: np.ndarray) -> np.ndarray:
    """``probs.argmax(axis=0)`` as uint8 (the first class of a tie, as numpy) for finite class scores.

    A running maximum over the class planes in torch (one comparison, one maximum and one masked
    fill per class, each over contiguous memory on torch's threads), instead of an argmax reducing
    over the outer axis of a ``(C, H, W)`` array, which walks the planes with a stride of ``H * W``.
    Falls back to numpy's argmax for more than 256 classes or arrays torch cannot view.
    """
    import torch

    if probs.shape[0] > 256:
        return probs.argmax(axis=0)
    try:
        scores = torch.from_numpy(probs)
    except (ValueError, TypeError):  # strides torch cannot view (negative), a dtype it lacks
        return probs.argmax(axis=0).astype(np.uint8)
    best = scores[0].clone()
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8)
    for index in range(1, scores.shape[0]):
        higher = scores[index] > best  # strictly: a tie keeps the earlier class
        labels.masked_fill_(higher, index)
        torch.maximum(best, scores[index], out=best)
    return labels.numpy()


#: the fast path prefetches a block's pixels only when their region (block and read margin) is at most
#: this many times the block's area (MagNet's frames around a block would be many times more)
PREFETCH_MAX_AREA = 4


def _blocks_with_reader(predictor, source: ImageSource, row: list[Window]):
    """``(block, source to read it from)`` for each block of the row.

    On the fast path (``predictor.fast.prefetch``) the next block's pixels, with the predictor's
    read margin, are decoded in a background thread while the current block is predicted
    (``gigaseg.inference.fast.prefetch``); otherwise every block reads ``source`` itself.
    """
    fast = getattr(predictor, "fast", None)
    margin = predictor.read_margin() if hasattr(predictor, "read_margin") else 0
    block_area = max(1, row[0].height * row[0].width)
    if (
        fast is None
        or not fast.prefetch
        or (row[0].height + 2 * margin) * (row[0].width + 2 * margin) > (PREFETCH_MAX_AREA * block_area)
    ):
        for block in row:
            yield block, source
        return
    from .fast import PrefetchedSource, prefetch

    reader = PrefetchedSource(source, margin)
    try:
        for block, loaded in prefetch(row, reader.load):
            reader.use(loaded)
            yield block, reader
            reader.use(None)
    finally:
        reader.use(None)


def _predict_rows(predictor, source, rows, writer, probs_store, on_band, progress, on_block) -> tuple[int, int]:
    """Predict every row of blocks not finished yet; (blocks predicted, blocks resumed)."""
    context = predictor.prepare(source)
    predicted = resumed = 0
    total_blocks = sum(len(r) for r in rows)
    with progress_bar(f"predict {source.name}", total_blocks, enabled=progress) as advance:
        for row in rows:
            band = Window(row[0].top, 0, row[0].height, source.width)
            if (
                writer is not None
                and not on_band
                and band_done(writer, band)
                and (probs_store is None or probs_store.is_done(band))
            ):
                resumed += len(row)
                advance(len(row))
                continue
            labels = predict_band(predictor, source, context, row, on_block=on_block, advance=advance)
            predicted += len(row)
            if probs_store is not None:
                probs_store.mark_done(band)
            if writer is not None:
                write_band_rows(writer, band, labels)
            if on_band is not None:
                on_band(band, labels)
    return predicted, resumed


def _non_finite_scores(source: ImageSource, block: Window) -> GigasegError:
    """The error for a block whose class scores hold NaN or infinity: bad pixels, or the model overflowing."""
    pixels = source.read(block)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        count = int(np.count_nonzero(~np.isfinite(pixels)))
        return ImageReadError(
            source.path,
            f"holds {count} NaN or infinite pixel values in {block} (no-data?), which give no class; "
            f"fill them (e.g. with 0) or crop them out before predicting",
        )
    return GigasegError(
        f"{source.path or 'image'}: the model's class scores are not finite in {block} although its pixels are; "
        f"the network overflows (under --precision 16-mixed, try bf16-mixed or 32)"
    )


def band_done(writer: MaskWriter | OmeZarrMaskWriter, band: Window) -> bool:
    """Whether every writer band inside a row of blocks is stored.

    Args:
        writer: the mask's writer.
        band: the row of blocks, full width.

    Returns:
        True when the row needs no prediction.
    """
    return all(writer.is_done(top) for top in range(band.top, band.bottom, writer.band_height))


def write_band_rows(writer: MaskWriter | OmeZarrMaskWriter, band: Window, labels: np.ndarray) -> None:
    """Hand the labels of a row of blocks to the writer, one of its bands at a time (those not stored yet).

    Args:
        writer: the mask's writer (its bands divide the row).
        band: the row, full width.
        labels: the row's labels.
    """
    for top in range(band.top, band.bottom, writer.band_height):
        if not writer.is_done(top):
            writer.write_band(top, labels[top - band.top : top - band.top + writer.band_height])


class _ProbabilityStore:
    """Per-class probabilities as a chunked float16 zarr array, built under a partial name."""

    def __init__(self, mask_path: Path, num_classes: int, source: ImageSource, resume: bool):
        import zarr

        self.final = mask_path.with_name(f"{mask_path.stem}_probabilities.zarr")
        self.partial = mask_path.with_name(f".{self.final.name}.partial")
        self._done_dir = self.partial / ".gigaseg_done_bands"
        if not resume and self.partial.exists():
            shutil.rmtree(self.partial)
        mode = "a" if self.partial.exists() else "w"
        chunk = min(WRITER_TILE, max(source.height, 1)), min(WRITER_TILE, max(source.width, 1))
        self.array = zarr.open_array(
            str(self.partial),
            mode=mode,
            shape=(num_classes, source.height, source.width),
            chunks=(num_classes, *chunk),
            dtype="float16",
        )
        self._done_dir.mkdir(parents=True, exist_ok=True)

    def is_done(self, band: Window) -> bool:
        return (self._done_dir / str(band.top)).exists()

    def write(self, block: Window, probs: np.ndarray) -> None:
        self.array[:, block.top : block.bottom, block.left : block.right] = probs.astype(np.float16)

    def mark_done(self, band: Window) -> None:
        (self._done_dir / str(band.top)).touch()

    def has_done_bands(self) -> bool:
        return self._done_dir.is_dir() and any(self._done_dir.iterdir())

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self) -> Path:
        shutil.rmtree(self._done_dir)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        return self.final
