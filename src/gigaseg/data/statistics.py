"""How often each class occurs in a dataset's masks, overall and where: class frequencies and coarse count grids.

:func:`class_statistics` reads every mask of a dataset once, band by band (a band of about
``STATISTICS_BAND_BYTES`` of labels at a time, so memory does not grow with the image), and
keeps, per image, a coarse grid of per-class pixel counts: cells of ``cell`` x ``cell`` pixels
(``DEFAULT_CELL``), widened for images so large that the grid would exceed ``MAX_CELLS`` cells.
The grid is small (``C`` counts per cell: a 20000 x 20000 image with 7 classes and 64-px cells
is under 1.4 MB) and is all a class-balanced crop sampler needs (``ClassStatistics.draw``):
it never rereads masks to find where a class is, only the one cell it draws.

What is cached where: a ``ClassStatistics`` is plain numpy arrays and numbers, so it pickles
into DataLoader workers with the views that hold it; within a process the last few are kept
(``_CACHE_SIZE``), keyed by the mask files (path, size, modification time), the label
encoding and the cell, so the stages of one training (and :func:`class_frequencies`) read
the masks once. Nothing is written to disk: dataset folders are inputs, never written.

:func:`class_frequencies` is the pixel share per class (ignored pixels excluded): what a
checkpoint records (``training.checkpoint.data_info``) and what ``nn.losses.class_weights``
turns into loss weights.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import DatasetError
from ..geometry import Window
from ..io.resample import band_edges

__all__ = [
    "DEFAULT_CELL",
    "ClassDraw",
    "ClassStatistics",
    "class_frequencies",
    "class_statistics",
    "locate_in_cell",
]

#: side of a grid cell, in pixels
DEFAULT_CELL = 64

#: how training crops are drawn (``gigaseg.training.views.RandomCrops``'s ``sampling``): uniformly over
#: the image, or balanced over the classes with these statistics
CROP_SAMPLINGS = ("uniform", "balanced")

#: the most cells one image's grid has; larger images get wider cells
MAX_CELLS = 2**20

#: bytes of decoded labels counted at once
STATISTICS_BAND_BYTES = 16 * 2**20

#: how many statistics a process keeps in memory (each a few grids)
_CACHE_SIZE = 4
_cache: OrderedDict[tuple, ClassStatistics] = OrderedDict()


@dataclass(frozen=True)
class ClassDraw:
    """One class-balanced draw: a pixel of ``class_id``, located to its grid cell.

    Attributes:
        sample: the dataset index of the image.
        class_id: the class drawn.
        cell: the cell holding the pixel (image coordinates; cut at the image's edges).
        rank: which of the cell's pixels of ``class_id`` it is (0-based, in row-major order):
            :func:`locate_in_cell` turns it into a position.
    """

    sample: int
    class_id: int
    cell: Window
    rank: int


class ClassStatistics:
    """Per-class pixel counts of a dataset's masks: per image, on a coarse grid, and in total.

    Built by :func:`class_statistics`; plain arrays, so it pickles.

    Args:
        names: the sample names, in dataset order.
        sizes: ``(height, width)`` of every image.
        cells: the cell side of every image's grid.
        grids: per image, ``(C, rows, cols)`` counts (uint16 or uint32): ``grids[i][c, r, k]`` is
            the number of pixels of class ``c`` in cell ``(r, k)`` of image ``i``.
        ignore_index: the label value that was not counted.

    Raises:
        ValueError: the lists differ in length or the grids in class count.
    """

    def __init__(
        self,
        names: list[str],
        sizes: list[tuple[int, int]],
        cells: list[int],
        grids: list[np.ndarray],
        ignore_index: int,
    ):
        if not (len(names) == len(sizes) == len(cells) == len(grids)) or not grids:
            raise ValueError("ClassStatistics needs one name, size, cell and grid per image, and at least one image")
        if len({g.shape[0] for g in grids}) != 1:
            raise ValueError("every grid must have the same class count")
        self.names = list(names)
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.cells = [int(c) for c in cells]
        self.grids = grids
        self.ignore_index = int(ignore_index)
        #: ``(N, C)`` int64: pixels of each class in each image
        self.totals = np.stack([g.sum(axis=(1, 2), dtype=np.int64) for g in grids])

    def __repr__(self) -> str:
        return (
            f"ClassStatistics({len(self.names)} images, {self.num_classes} classes, "
            f"{self.nbytes / 2**20:.2f} MiB of grids)"
        )

    @property
    def num_classes(self) -> int:
        """The class count."""
        return int(self.grids[0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the grids take."""
        return int(sum(g.nbytes for g in self.grids))

    @property
    def pixel_counts(self) -> np.ndarray:
        """``(C,)`` int64: pixels of each class over the whole dataset (ignored pixels not counted)."""
        return self.totals.sum(axis=0)

    @property
    def frequencies(self) -> np.ndarray:
        """``(C,)`` float64: each class's share of the labelled pixels (summing to 1)."""
        counts = self.pixel_counts
        return counts / counts.sum()

    def class_probabilities(self, temperature: float = 0.0, exclude: Iterable[int] = ()) -> np.ndarray:
        """How often a balanced sampler draws each class: ``p_c ~ frequency_c ** temperature``.

        Over the classes present (frequency > 0) and not excluded: ``temperature`` 0 draws them
        uniformly (a 0.1% class as often as a 40% one), 1 in proportion to their pixels (as a
        uniformly drawn labelled pixel would), and values between interpolate (0.5: a class 100
        times rarer is drawn 10 times less often). Classes absent or excluded get 0. When every
        present class is excluded, the exclusion is dropped.

        Args:
            temperature: the exponent, from 0 (uniform over classes) to 1 (as frequent as in the data).
            exclude: class ids never drawn (e.g. the classes left out of mIoU).

        Returns:
            float64 ``(C,)`` probabilities summing to 1.

        Raises:
            ValueError: ``temperature`` is outside [0, 1].
        """
        if not 0.0 <= float(temperature) <= 1.0:
            raise ValueError(
                f"temperature must lie in [0, 1] (0 uniform over classes, 1 by frequency), got {temperature}"
            )
        frequencies = self.frequencies
        drawn = frequencies > 0
        excluded = np.zeros_like(drawn)
        for c in exclude:
            if 0 <= int(c) < self.num_classes:
                excluded[int(c)] = True
        if (drawn & ~excluded).any():
            drawn &= ~excluded
        weights = np.zeros_like(frequencies)
        weights[drawn] = frequencies[drawn] ** float(temperature)
        return weights / weights.sum()

    def draw(self, rng: np.random.Generator, probabilities: np.ndarray) -> ClassDraw:
        """Draw a class from ``probabilities``, then one of its pixels uniformly over the dataset.

        The pixel is located to its image, its cell and its rank within the cell (the grid
        holds counts, not positions: :func:`locate_in_cell` reads the one cell to find it).
        Consumes two numbers of ``rng``, so the same generator state gives the same draw.

        Args:
            rng: the generator (e.g. the item's ``rng_for(seed, epoch, index)``).
            probabilities: ``(C,)`` class probabilities (:meth:`class_probabilities`).

        Returns:
            The draw.
        """
        class_id = int(rng.choice(self.num_classes, p=probabilities))
        rank = int(rng.integers(int(self.pixel_counts[class_id])))
        per_image = np.cumsum(self.totals[:, class_id])
        sample = int(np.searchsorted(per_image, rank, side="right"))
        rank -= int(per_image[sample - 1]) if sample else 0
        counts = self.grids[sample][class_id]
        per_cell = np.cumsum(counts.ravel(), dtype=np.int64)
        flat = int(np.searchsorted(per_cell, rank, side="right"))
        rank -= int(per_cell[flat - 1]) if flat else 0
        row, col = divmod(flat, counts.shape[1])
        cell = self.cells[sample]
        height, width = self.sizes[sample]
        window = Window.from_bounds(row * cell, col * cell, min(height, (row + 1) * cell), min(width, (col + 1) * cell))
        return ClassDraw(sample, class_id, window, rank)


def locate_in_cell(labels: np.ndarray, draw: ClassDraw, path: str | os.PathLike | None = None) -> tuple[int, int]:
    """The image position of a drawn pixel, from the labels of its cell.

    Args:
        labels: ``(h, w)`` class ids of ``draw.cell`` (the mask read at that window).
        draw: what :meth:`ClassStatistics.draw` returned.
        path: the mask file, named by the error.

    Returns:
        ``(row, col)`` of the pixel in the image.

    Raises:
        DatasetError: the cell holds fewer pixels of the class than the statistics counted (the
            mask changed since they were computed).
    """
    found = np.flatnonzero(np.asarray(labels).reshape(draw.cell.height, draw.cell.width) == draw.class_id)
    if draw.rank >= found.size:
        raise DatasetError(
            path,
            f"mask holds {found.size} pixels of class {draw.class_id} in {draw.cell} but its class statistics "
            f"counted more: the mask changed since they were computed",
        )
    dy, dx = divmod(int(found[draw.rank]), draw.cell.width)
    return draw.cell.top + dy, draw.cell.left + dx


def _cell_for(height: int, width: int, cell: int) -> int:
    """``cell``, widened so the grid of a ``height`` x ``width`` image has at most ``MAX_CELLS`` cells."""
    cell = max(int(cell), math.ceil(math.sqrt(height * width / MAX_CELLS)))
    while -(-height // cell) * -(-width // cell) > MAX_CELLS:
        cell += 1
    return cell


def _count_grid(mask, num_classes: int, cell: int) -> np.ndarray:
    """``(C, rows, cols)`` per-class counts of a mask (a ``LabelSource``), read band by band."""
    height, width = mask.height, mask.width
    rows, cols = -(-height // cell), -(-width // cell)
    dtype = np.uint16 if cell * cell <= np.iinfo(np.uint16).max else np.uint32
    grid = np.zeros((num_classes, rows, cols), dtype=dtype)
    rows_per_band = max(1, STATISTICS_BAND_BYTES // max(1, width))
    padded_width = cols * cell
    for top, bottom in band_edges(0, height, rows_per_band, row_align=cell):
        labels = mask.read(Window(top, 0, bottom - top, width))[..., 0]
        band_rows = -(-(bottom - top) // cell)
        if labels.shape != (band_rows * cell, padded_width):
            padded = np.full((band_rows * cell, padded_width), 255, dtype=np.uint8)
            padded[: labels.shape[0], :width] = labels
            labels = padded
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256)[:num_classes])
        first = top // cell
        for c in present:
            counts = (labels == c).reshape(band_rows, cell, cols, cell).sum(axis=(1, 3))
            grid[c, first : first + band_rows] = counts
    return grid


def _key(dataset, cell: int) -> tuple | None:
    """What identifies ``dataset``'s masks for the cache, or None when they cannot be identified."""
    pairs = getattr(dataset, "pairs", None)
    encoding = getattr(dataset, "encoding", None)
    if pairs is None or encoding is None:
        return None
    files = []
    for pair in pairs:
        if pair.mask is None:
            return None
        try:
            stat = os.stat(pair.mask)
        except OSError:
            return None
        files.append((os.fspath(pair.mask), stat.st_size, stat.st_mtime_ns))
    return (json.dumps(encoding.to_dict(), sort_keys=True, default=str), int(cell), tuple(files))


def class_statistics(dataset, cell: int = DEFAULT_CELL) -> ClassStatistics:
    """Per-image grids of per-class pixel counts, read band by band from every mask of ``dataset``.

    Args:
        dataset: a labelled ``SegmentationDataset`` (its ``classes``, ``ignore_index`` and samples).
        cell: the grid's cell side in pixels (widened for images whose grid would exceed
            ``MAX_CELLS`` cells).

    Returns:
        The statistics (the same object for the same, unchanged masks within a process).

    Raises:
        DatasetError: a sample has no mask, or no pixel of the dataset is labelled.
        ValueError: ``cell`` is below 1.
    """
    if int(cell) < 1:
        raise ValueError(f"cell must be at least 1 pixel, got {cell}")
    key = _key(dataset, cell)
    if key is not None and key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    num_classes = len(dataset.classes)
    names, sizes, cells, grids = [], [], [], []
    for index in range(len(dataset)):
        with dataset[index] as sample:
            if sample.mask is None:
                raise DatasetError(
                    getattr(dataset, "root", None), f"{sample.name} has no mask: class statistics need labels"
                )
            image_cell = _cell_for(sample.mask.height, sample.mask.width, cell)
            names.append(sample.name)
            sizes.append((sample.mask.height, sample.mask.width))
            cells.append(image_cell)
            grids.append(_count_grid(sample.mask, num_classes, image_cell))
    if not sum(int(g.sum(dtype=np.int64)) for g in grids):
        raise DatasetError(getattr(dataset, "root", None), "no labelled pixel: every mask pixel is the ignore index")
    statistics = ClassStatistics(names, sizes, cells, grids, dataset.ignore_index)
    if key is not None:
        _cache[key] = statistics
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return statistics


def class_frequencies(dataset) -> np.ndarray:
    """Each class's share of the labelled pixels of ``dataset``'s masks (ignored pixels excluded).

    Reads the masks band by band through :func:`class_statistics` (so a balanced sampler built
    afterwards on the same dataset reads nothing more).

    Args:
        dataset: a labelled ``SegmentationDataset``, typically the training split.

    Returns:
        float64 ``(C,)`` summing to 1 (0 for classes that never occur).

    Raises:
        DatasetError: a sample has no mask, or no pixel is labelled.
    """
    return class_statistics(dataset).frequencies
