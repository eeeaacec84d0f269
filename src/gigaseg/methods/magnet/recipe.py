"""MagNet's training recipe: the backbone, then the refinement module.

Training (``gigaseg train --method magnet --stage backbone|refinement|all``):

1. ``backbone``: the backbone alone on :class:`BackboneCrops` — random crops at a random
   scale (any of them, the coarsest being the whole frame) resized to the network input —
   with cross-entropy (the option ``loss`` picks another of ``gigaseg.nn.losses.LOSSES``, e.g.
   ``weighted_ce`` with the training masks' class weights; ``crop_sampling="balanced"`` places
   the crops class-balanced). Defaults are the authors' backbone run: SGD lr 1e-3, momentum 0.9,
   weight decay 5e-4, batch 12, 484 epochs, poly schedule. The loss is at the input size,
   against the crop's labels read at that size (nearest), whatever the backbone's
   ``output_stride``: at 4 its 1/4 logits are upsampled to the labels first
   (``FPNSegmenter.forward``), at 1 they are made at that size.
2. ``refinement``: the backbone frozen (eval mode), the refinement module trained on
   :class:`RefinementPairs` — the coarse view (the whole frame at input size) and a fine
   crop at a random finer scale resized to input size; the coarse probabilities are
   cropped to the fine box (``gigaseg.geometry.crop_resize``) and resized to input size;
   loss: OHEM cross-entropy (threshold 0.7, at least 100000 pixels) at the input size, where
   the refinement module predicts (the backbone's probabilities of both views are at the
   input size too: made there at ``output_stride`` 1, upsampled from 1/4 at 4), whatever the
   option ``loss``; its pairs are placed uniformly (a fine crop inside a frame: the options
   ``crop_sampling`` and ``sampling_temperature`` are the backbone stage's). SGD lr 1e-3,
   momentum 0.9, weight decay 5e-4, batch 8, 50 epochs, lr x0.1 at epochs 10/20/30/40/45.
   Starting the stage sets the model's ``refinement_trained`` flag, so validation (and
   prediction) switch from the backbone alone to the whole method.

The stages hand over through checkpoints: ``--stage refinement --init <backbone run>``.
``--stage all`` runs both in one run folder (``best-backbone.ckpt`` then holds the best
backbone alone — MagNet's coarsest-scale prediction — and ``best.ckpt`` the best MagNet).
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.labels import IGNORE_INDEX
from ...errors import ConfigError
from ...geometry import Window, crop_resize
from ...io.base import read_resized
from ...nn.losses import FocalLoss, ohem_cross_entropy
from ...training.recipe import Stage, StepContext, prepare_class_balance, stage_loss
from ...training.views import SeededViews, crop_sampler, rng_for, window_around

__all__ = ["BackboneCrops", "RefinementPairs", "backbone_loss", "backbone_step", "magnet_stages", "refinement_step"]

#: OHEM settings of the refinement loss (MagNet, after HRNet-OCR)
OHEM_THRESH = 0.7
OHEM_MIN_KEPT = 100_000


# --------------------------------------------------------------------------- training views


def _flip(array: np.ndarray, axis: int) -> np.ndarray:
    return np.flip(array, axis=axis)


class _MagNetViews(SeededViews):
    """Shared plumbing: per-(seed, epoch, index) randomness, frames, normalisation."""

    def __init__(self, dataset, normalization, model, crops_per_image: int = 1, augment: bool = True, seed: int = 0):
        super().__init__(dataset, normalization, seed, crops_per_image)
        self.model = model
        self.augment = augment
        self.input_size = tuple(model.input_size)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.normalization.apply(np.ascontiguousarray(image)))

    def _frame(self, sample, rng) -> Window:
        """A frame of the image: the whole image, or a random finest-scale window of a large one."""
        height, width = sample.image.height, sample.image.width
        fh, fw = self.model.frame_size(height, width)
        return Window(int(rng.integers(height - fh + 1)), int(rng.integers(width - fw + 1)), fh, fw)

    def _read(self, sample, window: Window) -> tuple[np.ndarray, np.ndarray]:
        size = self.input_size
        image = read_resized(sample.image, window, size)
        label = sample.mask.read(window, out_size=size if size != window.shape else None, resample="nearest")[..., 0]
        return image, label


class BackboneCrops(_MagNetViews):
    """Backbone views: a random crop at a random scale (any of them), resized to the input size.

    At scale ``i`` a crop has the size of that scale's patches in frame pixels (the whole
    frame at scale 0). Augmentation: a random horizontal flip and a rotation by 0/90/180/270
    (0/180 when the input is not square), identical for image and label. Items: ``image``,
    ``label``, ``index``, ``scale`` and ``window`` (the crop as image pixels
    ``[top, left, height, width]``).

    Two samplings (as ``gigaseg.training.views.RandomCrops``'s):

    - ``"uniform"`` (the paper's): item ``i`` is a crop of image ``i // crops_per_image``, its
      scale and then its position drawn uniformly.
    - ``"balanced"``: each item first draws a class and one of its pixels over the whole
      training set (``gigaseg.training.views.BalancedPixels``), then the scale uniformly, and
      places the crop of that scale's size uniformly among those inside the image that hold
      the pixel (``window_around``). So every crop holds the class drawn (before it is resized
      to the input size), whatever its scale; ``crops_per_image`` only sets how many items an
      epoch has.

    Args:
        dataset: the training dataset.
        normalization: how its pixels are normalised.
        model: the MagNet being trained (its scales and input size are read).
        crops_per_image: items per image and epoch.
        augment: whether to apply the random flips and rotations.
        seed: seed of the per-(seed, epoch, index) randomness.
        sampling: ``"uniform"`` or ``"balanced"``.
        temperature: with ``"balanced"``, the exponent of the class frequencies in the class
            draw (0 uniform over classes, 1 by frequency).
        statistics: with ``"balanced"``, the dataset's ``ClassStatistics`` (None: computed here).

    Raises:
        ConfigError: an unknown ``sampling`` or a ``temperature`` outside [0, 1].
        DatasetError: with ``"balanced"``, a sample without mask or a dataset without labelled pixels.
    """

    def __init__(
        self,
        dataset,
        normalization,
        model,
        crops_per_image: int = 1,
        augment: bool = True,
        seed: int = 0,
        sampling: str = "uniform",
        temperature: float = 0.0,
        statistics=None,
    ):
        super().__init__(dataset, normalization, model, crops_per_image, augment, seed)
        self.sampling = sampling
        self.balanced = crop_sampler(dataset, sampling, temperature, statistics)

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        if self.balanced is None:
            sample = self.dataset[index // self.crops_per_image]
        else:
            sample, row, col = self.balanced.draw(self.dataset, rng)
        height, width = sample.image.height, sample.image.width
        geometry = self.model.frame_geometry(self.model.frame_size(height, width))
        scale = int(rng.integers(geometry.num_scales))
        ch, cw = geometry.windows(scale)[0].shape
        if self.balanced is None:
            window = Window(int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1)), ch, cw)
        else:
            window = window_around(row, col, (ch, cw), (height, width), rng)
        image, label = self._read(sample, window)
        if self.augment:
            if rng.random() < 0.5:
                image, label = _flip(image, 1), _flip(label, 1)
            square = self.input_size[0] == self.input_size[1]
            k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
            if k:
                image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
        return {
            "image": self._tensor(image),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
            "index": index,
            "scale": scale,
            "window": torch.tensor([window.top, window.left, ch, cw]),
        }


class RefinementPairs(_MagNetViews):
    """Refinement views: (coarse whole frame, fine random crop at a random finer scale).

    Items: ``coarse`` (the frame at input size), ``image`` (the fine crop at input size),
    ``label`` (the fine crop's labels at input size, nearest), ``box`` (the crop as a
    normalised box of the frame), and ``frame`` / ``window`` (both as image pixels
    ``[top, left, height, width]``), plus ``index`` and ``scale``. Augmentation: random
    horizontal and vertical flips of the whole pair (the box mirrored with them).

    Args:
        dataset: the training dataset.
        normalization: how its pixels are normalised.
        model: the MagNet being trained (its scales and input size are read).
        crops_per_image: items per image and epoch.
        augment: whether to apply the random flips.
        seed: seed of the per-(seed, epoch, index) randomness.

    Raises:
        ConfigError: the model has fewer than two scales.
    """

    def __init__(self, dataset, normalization, model, crops_per_image: int = 1, augment: bool = True, seed: int = 0):
        super().__init__(dataset, normalization, model, crops_per_image, augment, seed)
        if model.num_scales < 2:
            raise ConfigError("magnet: the refinement stage needs at least two scales")

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        sample = self.dataset[index // self.crops_per_image]
        frame = self._frame(sample, rng)
        geometry = self.model.frame_geometry(frame.shape)
        scale = int(rng.integers(1, geometry.num_scales))
        ch, cw = geometry.windows(scale)[0].shape
        top, left = int(rng.integers(frame.height - ch + 1)), int(rng.integers(frame.width - cw + 1))
        crop = Window(frame.top + top, frame.left + left, ch, cw)
        size = self.input_size
        coarse = read_resized(sample.image, frame, size)
        fine, label = self._read(sample, crop)
        y0, x0, y1, x1 = top / frame.height, left / frame.width, (top + ch) / frame.height, (left + cw) / frame.width
        if self.augment:
            if rng.random() < 0.5:
                coarse, fine, label = _flip(coarse, 1), _flip(fine, 1), _flip(label, 1)
                x0, x1 = 1.0 - x1, 1.0 - x0
            if rng.random() < 0.5:
                coarse, fine, label = _flip(coarse, 0), _flip(fine, 0), _flip(label, 0)
                y0, y1 = 1.0 - y1, 1.0 - y0
        return {
            "coarse": self._tensor(coarse),
            "image": self._tensor(fine),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
            "box": torch.tensor([y0, x0, y1, x1], dtype=torch.float64),
            "index": index,
            "scale": scale,
            "frame": torch.tensor([frame.top, frame.left, frame.height, frame.width]),
            "window": torch.tensor([crop.top, crop.left, crop.height, crop.width]),
        }


# --------------------------------------------------------------------------- steps


def backbone_loss(ctx: StepContext):
    """The backbone stage's loss: the model's option ``loss`` (``"ce"``, MagNet's, by default).

    ``"ce"`` is :class:`~gigaseg.nn.losses.FocalLoss` with gamma 0, exactly cross-entropy and the
    loss this stage has always computed (to the last bit); the other names are
    ``gigaseg.training.recipe.stage_loss``'s.

    Args:
        ctx: the step's context (the stage's options hold the ignore index and class weights).

    Returns:
        The loss module, called as ``loss(logits, labels)``.

    Raises:
        ConfigError: an unknown loss, or a weighted loss whose weights were not prepared.
    """
    name = ctx.model.options.get("loss", "ce")
    if name == "ce":  # needs no stage options: a context without a stage trains as before
        options = ctx.stage.options if ctx.stage is not None else {}
        return FocalLoss(gamma=0, ignore_index=int(options.get("ignore_index", IGNORE_INDEX)))
    return stage_loss(ctx, name)


def backbone_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """The backbone's loss (option ``loss``) on its logits (training-mode forward), sub-batch by sub-batch.

    Each sub-batch's loss is weighted by its share of the batch and backpropagated at once.

    Args:
        ctx: the step's context (wrapped model, backward, sub-batch size).
        batch: a collated batch of :class:`BackboneCrops` items.

    Returns:
        ``{"loss": ...}``, the detached batch loss.
    """
    images, labels = batch["image"], batch["label"]
    loss_fn = backbone_loss(ctx)
    total = images.new_zeros(())
    size = images.shape[0]
    for start in range(0, size, ctx.sub_batch):
        part = slice(start, start + ctx.sub_batch)
        weight = images[part].shape[0] / size
        loss = loss_fn(ctx.wrapped(images[part]), labels[part]) * weight
        ctx.backward(loss)
        total = total + loss.detach()
    return {"loss": total}


def refinement_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """OHEM cross-entropy of ``refinement(coarse crop, fine)`` against the fine crop's labels.

    The frozen backbone's probabilities of the coarse frame are cropped to each item's box
    and resized to the input size; each sub-batch's loss is weighted by its share of the
    batch and backpropagated at once.

    Args:
        ctx: the step's context (wrapped model, backward, sub-batch size).
        batch: a collated batch of :class:`RefinementPairs` items.

    Returns:
        ``{"loss": ...}``, the detached batch loss.
    """
    model = ctx.model
    size = tuple(model.input_size)
    coarse_images, images, labels = batch["coarse"], batch["image"], batch["label"]
    with torch.no_grad():
        coarse = torch.softmax(model.backbone(coarse_images).float(), dim=1)
        coarse = crop_resize(coarse, batch["box"], size)
    total = images.new_zeros(())
    count = images.shape[0]
    for start in range(0, count, ctx.sub_batch):
        part = slice(start, start + ctx.sub_batch)
        weight = images[part].shape[0] / count
        logits = ctx.wrapped(images[part], coarse[part])
        loss = (
            ohem_cross_entropy(
                logits, labels[part], thresh=OHEM_THRESH, min_kept=OHEM_MIN_KEPT, ignore_index=IGNORE_INDEX
            )
            * weight
        )
        ctx.backward(loss)
        total = total + loss.detach()
    return {"loss": total}


def magnet_stages(model) -> list[Stage]:
    """MagNet's training stages, with the paper's hyperparameters as defaults.

    Args:
        model: the MagNet to train.

    Returns:
        ``[backbone, refinement]``, or ``[backbone]`` when only one scale is configured.
    """
    ih, iw = model.input_size
    crops = model.options["crops_per_image"]
    backbone = Stage(
        name="backbone",
        epochs=484,
        lr=1e-3,
        batch_size=12,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=5e-4,
        schedule="poly",
        sub_batch=12,
        make_data=None,
        step=backbone_step,
        trainable=lambda m: [m.backbone],
        frozen_eval=lambda m: [m.refinement],
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, ih, iw),),
    )

    def backbone_crops(data, norm, settings):
        sampling = model.options["crop_sampling"]
        statistics = prepare_class_balance(backbone, data, model.options["loss"], sampling)
        return BackboneCrops(
            data,
            norm,
            model,
            crops_per_image=crops,
            seed=settings.seed,
            sampling=sampling,
            temperature=model.options["sampling_temperature"],
            statistics=statistics,
        )

    backbone.make_data = backbone_crops
    stages = [backbone]
    if model.num_scales > 1:
        stages.append(
            Stage(
                name="refinement",
                epochs=50,
                lr=1e-3,
                batch_size=8,
                optimizer="sgd",
                momentum=0.9,
                weight_decay=5e-4,
                schedule="step",
                milestones=(10, 20, 30, 40, 45),
                gamma=0.1,
                sub_batch=8,
                make_data=lambda data, norm, settings: RefinementPairs(
                    data, norm, model, crops_per_image=crops, seed=settings.seed
                ),
                step=refinement_step,
                trainable=lambda m: [m.refinement],
                frozen_eval=lambda m: [m.backbone],
                sample_inputs=lambda m: (
                    torch.zeros(1, m.in_channels, ih, iw),
                    torch.full((1, m.num_classes, ih, iw), 1.0 / m.num_classes),
                ),
                before_stage=lambda m: m.mark_refinement_trained(),
            )
        )
    return stages
