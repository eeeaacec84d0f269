"""What a training step sees: views cut from lazy dataset samples.

Every method trains on some mix of three views of an image: the whole image
downsampled (the global view), full-resolution crops (local views), and crops
at an intermediate scale. These datasets produce them as normalised tensors
with the labels resampled by NEAREST, and apply the same random flip/rotation
to image and label (GLNet's paired augmentation). Randomness is derived from
(seed, epoch, index) so a resumed run draws the same crops.

Crops are placed uniformly, or class-balanced (``RandomCrops(sampling="balanced")``) so
that thin, rare classes are in a fixed share of the crops. A method with its own crop
views balances them the same way: :func:`crop_sampler` once (``class_statistics(dataset)``
and the class probabilities), then per item :meth:`BalancedPixels.draw` (a class, then one
of its pixels: ``statistics.draw(rng, probabilities)`` and ``locate_in_cell`` on the mask
read at the drawn cell) and :func:`window_around` the pixel found, at whatever crop size the
view draws for that image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.base import SegmentationDataset
from ..data.statistics import ClassStatistics, class_statistics, locate_in_cell
from ..errors import ConfigError
from ..geometry import Window
from ..io.normalize import Normalization


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one item of one epoch.

    Args:
        seed: the run's seed.
        epoch: the epoch.
        index: the item's index in the views dataset.

    Returns:
        A numpy generator seeded with ``[seed, epoch, index]``: the same triple gives the same draws.
    """
    return np.random.default_rng([seed, epoch, index])


def augment_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Random horizontal flip and rotation by 0/90/180/270, identical for image and label.

    Args:
        image: ``(H, W, C)`` pixels.
        label: ``(H, W)`` class ids.
        rng: the item's generator.

    Returns:
        ``(image, label)``, C-contiguous copies (sides swapped by a 90/270 rotation).
    """
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    k = int(rng.integers(4))
    if k:
        image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class SeededViews(Dataset):
    """The base of every method's training views: ``crops_per_image`` items per sample.

    It keeps the dataset and normalisation the views come from, and the epoch the trainer
    sets so that ``rng_for(seed, epoch, index)`` draws new (and, on resume, the same) views.

    Args:
        dataset: the lazy dataset.
        normalization: how pixels are normalised for the network.
        seed: the run's seed.
        crops_per_image: items per sample; item ``i`` comes from sample ``i // crops_per_image``.
    """

    def __init__(
        self, dataset: SegmentationDataset, normalization: Normalization, seed: int = 0, crops_per_image: int = 1
    ):
        self.dataset = dataset
        self.normalization = normalization
        self.seed = seed
        self.crops_per_image = int(crops_per_image)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the views of the next items are drawn for."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset) * self.crops_per_image


class _Views(SeededViews):
    def __init__(
        self,
        dataset: SegmentationDataset,
        normalization: Normalization,
        augment: bool,
        seed: int,
        crops_per_image: int = 1,
    ):
        super().__init__(dataset, normalization, seed, crops_per_image)
        self.augment = augment

    def _pack(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, **extra) -> dict:
        if self.augment:
            image, label = augment_pair(image, label, rng)
        item = {
            "image": torch.from_numpy(self.normalization.apply(image)),
            "label": torch.from_numpy(label.astype(np.int64)),
        }
        item.update(extra)
        return item


class GlobalViews(_Views):
    """The whole image resized to ``size`` (area averaging) with its label (nearest).

    Items are dicts: ``image`` float32 ``(C, h, w)``, ``label`` int64 ``(h, w)``, ``index``.

    Args:
        dataset: the lazy dataset.
        normalization: how pixels are normalised for the network.
        size: ``(h, w)`` of the view.
        augment: apply :func:`augment_pair` (a 90/270 rotation swaps the sides of a non-square ``size``).
        seed: the run's seed.
        cache: keep each image's resized view in memory after its first read.
    """

    def __init__(self, dataset, normalization, size: tuple[int, int], augment=True, seed=0, cache=True):
        super().__init__(dataset, normalization, augment, seed)
        self.size = tuple(size)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {} if cache else None

    def view(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The resized image and label of one sample, before augmentation.

        Args:
            index: the sample's index.

        Returns:
            ``(image, label)``: ``(h, w, C)`` in the source's dtype and ``(h, w)`` class ids.
        """
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        sample = self.dataset[index]
        image = sample.image.read(out_size=self.size, resample="area")
        label = sample.mask.read(out_size=self.size, resample="nearest")[..., 0]
        if self._cache is not None:
            self._cache[index] = (image, label)
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.view(index)
        return self._pack(image, label, rng_for(self.seed, self.epoch, index), index=index)


#: how :class:`RandomCrops` places its crops
SAMPLINGS = ("uniform", "balanced")


def window_around(
    row: int, col: int, crop: tuple[int, int], image_size: tuple[int, int], rng: np.random.Generator
) -> Window:
    """A ``crop``-sized window holding pixel ``(row, col)``, drawn uniformly among those inside the image.

    Args:
        row: the pixel's row.
        col: the pixel's column.
        crop: ``(h, w)`` of the window, at most the image's size.
        image_size: ``(height, width)`` of the image.
        rng: the item's generator (two numbers are drawn).

    Returns:
        The window: every placement inside the image that holds the pixel is equally likely.
    """
    (ch, cw), (height, width) = crop, image_size
    low_top, high_top = max(0, row - ch + 1), min(row, height - ch)
    low_left, high_left = max(0, col - cw + 1), min(col, width - cw)
    top = low_top + int(rng.integers(high_top - low_top + 1))
    left = low_left + int(rng.integers(high_left - low_left + 1))
    return Window(top, left, ch, cw)


class BalancedPixels:
    """Class-balanced draws of a labelled pixel: the class first, then one of its pixels over the dataset.

    What every balanced crop view shares (:class:`RandomCrops`, and the methods' own crop views):
    the views then place a crop of their own size around the pixel (:func:`window_around`).
    Holds only the statistics and the probabilities (plain arrays), so it pickles into
    DataLoader workers.

    Args:
        dataset: the training dataset (its ``exclude_from_miou`` classes are never drawn).
        temperature: the exponent of the class frequencies in the class draw
            (``ClassStatistics.class_probabilities``): 0 uniform over classes, 1 by frequency.
        statistics: the dataset's ``ClassStatistics`` (None: computed here).

    Raises:
        ConfigError: ``temperature`` outside [0, 1].
        DatasetError: a sample without mask or a dataset without labelled pixels.
    """

    def __init__(self, dataset, temperature: float = 0.0, statistics: ClassStatistics | None = None):
        _check_temperature(temperature)
        self.statistics = statistics if statistics is not None else class_statistics(dataset)
        self.probabilities = self.statistics.class_probabilities(
            float(temperature), exclude=getattr(dataset, "exclude_from_miou", ())
        )

    def draw(self, dataset, rng: np.random.Generator) -> tuple[object, int, int]:
        """Draw a class, then a pixel of it uniformly over the dataset, and open its sample.

        Consumes two numbers of ``rng`` and reads one grid cell of the drawn image's mask.

        Args:
            dataset: the dataset the statistics were computed from.
            rng: the item's generator.

        Returns:
            ``(sample, row, col)``: the drawn image's sample (``dataset[i]``) and the pixel's
            position in the image.

        Raises:
            DatasetError: the mask changed since the statistics were computed.
        """
        draw = self.statistics.draw(rng, self.probabilities)
        sample = dataset[draw.sample]
        row, col = locate_in_cell(sample.mask.read(draw.cell)[..., 0], draw, sample.mask.path)
        return sample, row, col


def _check_temperature(temperature: float) -> None:
    if not 0.0 <= float(temperature) <= 1.0:
        raise ConfigError(
            f"crop sampling temperature must lie in [0, 1] (0 uniform over classes, 1 by frequency), got {temperature}"
        )


def crop_sampler(
    dataset, sampling: str = "uniform", temperature: float = 0.0, statistics: ClassStatistics | None = None
) -> BalancedPixels | None:
    """How a crop view places its crops: None for ``"uniform"``, the balanced draws for ``"balanced"``.

    Args:
        dataset: the training dataset.
        sampling: ``"uniform"`` or ``"balanced"`` (:data:`SAMPLINGS`).
        temperature: with ``"balanced"``, the class draw's exponent (checked for both samplings).
        statistics: with ``"balanced"``, the dataset's ``ClassStatistics`` (None: computed).

    Returns:
        None (uniform placement: no mask is read up front) or a :class:`BalancedPixels`.

    Raises:
        ConfigError: an unknown ``sampling`` or a ``temperature`` outside [0, 1].
        DatasetError: with ``"balanced"``, a sample without mask or a dataset without labelled pixels.
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"unknown crop sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")
    _check_temperature(temperature)
    return BalancedPixels(dataset, temperature, statistics) if sampling == "balanced" else None


class RandomCrops(_Views):
    """``crops_per_image`` random crops per image of ``crop`` source pixels, resized to ``out_size``.

    With ``crop == out_size`` these are full-resolution local views; with a larger
    crop they are views at a coarser scale (MagNet trains its backbone that way).
    Items are dicts: ``image`` float32 ``(C, h, w)``, ``label`` int64 ``(h, w)``, ``index``
    and ``box``, the crop's normalised box ``(y0, x0, y1, x1)`` in the image.

    Two samplings:

    - ``"uniform"``: item ``i`` is a crop of image ``i // crops_per_image`` at a uniformly
      drawn position. A class covering 0.1% of the pixels is in few crops.
    - ``"balanced"``: each item first draws a class (``ClassStatistics.class_probabilities``:
      uniformly among the classes present in the training set, not counting the dataset's
      ``exclude_from_miou`` classes, or with ``temperature`` between uniform and their
      frequency), then a pixel of that class uniformly over the whole training set (its image,
      a cell of the class-count grid, the pixel within the cell), then a crop uniformly among
      those holding that pixel. So every crop holds the class drawn (before resizing to
      ``out_size``), and the rare classes are in a share of the crops set by the draw, not by
      their area. The image is the draw's, not ``i // crops_per_image``: ``crops_per_image``
      only sets how many items an epoch has. The class-count grids are computed once
      (``gigaseg.data.statistics.class_statistics``: every training mask read band by band)
      unless ``statistics`` is given.

    Both are deterministic from ``rng_for(seed, epoch, index)``: a resumed run draws the same crops.

    Args:
        dataset: the lazy dataset.
        normalization: how pixels are normalised for the network.
        crop: the crop side, an ``(h, w)`` pair, or a list of these (one drawn per item); a
            crop larger than the image is cut to the image.
        out_size: ``(h, w)`` the crop is resized to (area averaging; labels nearest); None
            keeps the crop's size.
        crops_per_image: items per sample.
        augment: apply :func:`augment_pair`.
        seed: the run's seed.
        sampling: ``"uniform"`` or ``"balanced"``.
        temperature: with ``"balanced"``, the exponent of the class frequencies in the class
            draw: 0 uniform over classes, 1 in proportion to their pixels, in between both.
        statistics: with ``"balanced"``, the dataset's ``ClassStatistics`` (None: computed here).

    Raises:
        ConfigError: an unknown ``sampling`` or a ``temperature`` outside [0, 1].
        DatasetError: with ``"balanced"``, a sample without mask or a dataset without labelled pixels.
    """

    def __init__(
        self,
        dataset,
        normalization,
        crop,
        out_size=None,
        crops_per_image=1,
        augment=True,
        seed=0,
        sampling: str = "uniform",
        temperature: float = 0.0,
        statistics: ClassStatistics | None = None,
    ):
        super().__init__(dataset, normalization, augment, seed, crops_per_image)
        self.crops = [
            tuple(c) if isinstance(c, (tuple, list)) else (c, c) for c in (crop if isinstance(crop, list) else [crop])
        ]
        self.out_size = tuple(out_size) if out_size is not None else None
        self.balanced = crop_sampler(dataset, sampling, temperature, statistics)
        self.sampling = sampling
        self.temperature = float(temperature)
        self.statistics = self.balanced.statistics if self.balanced is not None else None
        self.class_probabilities = self.balanced.probabilities if self.balanced is not None else None

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        if self.sampling == "uniform":
            sample = self.dataset[index // self.crops_per_image]
            ch, cw = self.crops[int(rng.integers(len(self.crops)))]
            ch, cw = min(ch, sample.image.height), min(cw, sample.image.width)
            top = int(rng.integers(sample.image.height - ch + 1))
            left = int(rng.integers(sample.image.width - cw + 1))
        else:
            ch, cw = self.crops[int(rng.integers(len(self.crops)))]
            sample, row, col = self.balanced.draw(self.dataset, rng)
            ch, cw = min(ch, sample.image.height), min(cw, sample.image.width)
            placed = window_around(row, col, (ch, cw), (sample.image.height, sample.image.width), rng)
            top, left = placed.top, placed.left
        window = Window(top, left, ch, cw)
        out = self.out_size if self.out_size is not None else (ch, cw)
        image = sample.image.read(window, out_size=out if out != (ch, cw) else None, resample="area")
        label = sample.mask.read(window, out_size=out if out != (ch, cw) else None, resample="nearest")[..., 0]
        box = torch.tensor(
            [
                top / sample.image.height,
                left / sample.image.width,
                (top + ch) / sample.image.height,
                (left + cw) / sample.image.width,
            ]
        )
        return self._pack(image, label, rng, index=index, box=box)
