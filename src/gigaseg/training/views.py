"""What a training step sees: views cut from lazy dataset samples.

Every method trains on some mix of three views of an image: the whole image
downsampled (the global view), full-resolution crops (local views), and crops
at an intermediate scale. These datasets produce them as normalised tensors
with the labels resampled by NEAREST, and apply the same random flip/rotation
to image and label (GLNet's paired augmentation). Randomness is derived from
(seed, epoch, index) so a resumed run draws the same crops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.base import SegmentationDataset
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


class RandomCrops(_Views):
    """``crops_per_image`` random crops per image of ``crop`` source pixels, resized to ``out_size``.

    With ``crop == out_size`` these are full-resolution local views; with a larger
    crop they are views at a coarser scale (MagNet trains its backbone that way).
    Items are dicts: ``image`` float32 ``(C, h, w)``, ``label`` int64 ``(h, w)``, ``index``
    and ``box``, the crop's normalised box ``(y0, x0, y1, x1)`` in the image.

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
    """

    def __init__(self, dataset, normalization, crop, out_size=None, crops_per_image=1, augment=True, seed=0):
        super().__init__(dataset, normalization, augment, seed, crops_per_image)
        self.crops = [
            tuple(c) if isinstance(c, (tuple, list)) else (c, c) for c in (crop if isinstance(crop, list) else [crop])
        ]
        self.out_size = tuple(out_size) if out_size is not None else None

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        sample = self.dataset[index // self.crops_per_image]
        ch, cw = self.crops[int(rng.integers(len(self.crops)))]
        ch, cw = min(ch, sample.image.height), min(cw, sample.image.width)
        top = int(rng.integers(sample.image.height - ch + 1))
        left = int(rng.integers(sample.image.width - cw + 1))
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
