"""ICNet's (and its PSPNet-50 reference's) training recipe: views, the cascade label guidance loss, the stages.

Training (the paper's reference recipe): SGD, lr 0.01 with the poly schedule (power 0.9),
momentum 0.9, weight decay 1e-4, batch 16, random scaling in [0.5, 2] and mirroring,
``crop_size`` crops (768; the paper used crops of about 720-960), padded with the ignore
label where the scaled image is smaller. 160 epochs is about the paper's 30K iterations
at batch 16 on Cityscapes' 2975 training images. ``crops_per_image`` crops are drawn per
image and epoch (1 as on Cityscapes; more for a few very large images).

Loss (cascade label guidance, :func:`cascade_label_guidance_loss`):
``0.16 CE(1/16) + 0.4 CE(1/8) + 1.0 CE(1/4)`` with the labels downsampled to each
output's size by NEAREST (a label is never interpolated) and the dataset's ignore index
masked. With ICNet's full-resolution head (``output_stride`` 1 or 2) a fourth term adds the
head's output: ``+ 1.0 CE(head)`` against the crop's labels themselves at output stride 1
(at 2 downsampled by nearest to its size), logged as ``loss_1`` (``loss_2``); its weight is
a fourth ``loss_weights`` entry, 1.0 when not given, and the cascade's three keep the
paper's (see ``gigaseg.methods.icnet.model``). PSPNet's loss is ``CE(main) + 0.4 CE(aux)``
on logits upsampled to the labels.

Rare classes (ICNet's options): ``loss`` replaces CE in every term above by another of
``gigaseg.nn.losses.LOSSES`` (same weights, same nearest-downsampled labels; ``weighted_ce``
with the class weights of the training masks), and ``crop_sampling="balanced"`` places the
crops of :class:`ScaledCrops` around a pixel of a class drawn uniformly over the classes
(``sampling_temperature`` between that and by frequency). PSPNet, the reference, keeps CE and
uniform crops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...data.labels import IGNORE_INDEX
from ...geometry import Window
from ...nn.losses import CrossEntropy
from ...training.recipe import Stage, StepContext, prepare_class_balance, stage_loss
from ...training.views import SeededViews, crop_sampler, rng_for, window_around

__all__ = ["ScaledCrops", "cascade_label_guidance_loss", "downsample_labels", "icnet_stages", "pspnet_stages"]

#: the paper's SGD recipe, shared by ICNet and its PSPNet reference
RECIPE = dict(
    epochs=160,
    lr=0.01,
    batch_size=16,
    optimizer="sgd",
    momentum=0.9,
    weight_decay=1e-4,
    schedule="poly",
    poly_power=0.9,
)


# --------------------------------------------------------------------------- loss


def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Labels ``(B, H, W)`` at ``size`` by NEAREST: output pixel ``i`` takes source pixel ``floor(i * H / h)``.

    The same rule as ``F.interpolate(mode="nearest")``, done by indexing so integer labels
    (and the ignore index) are copied, never interpolated.

    Args:
        labels: integer labels ``(..., H, W)``, typically ``(B, H, W)``.
        size: the target ``(h, w)``.

    Returns:
        Labels ``(..., h, w)`` of the same dtype; ``labels`` itself when already at ``size``.
    """
    h, w = int(size[0]), int(size[1])
    H, W = labels.shape[-2:]
    if (h, w) == (H, W):
        return labels
    rows = torch.div(torch.arange(h, device=labels.device) * H, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w, device=labels.device) * W, w, rounding_mode="floor")
    return labels[..., rows[:, None], cols[None, :]]


def cascade_label_guidance_loss(
    outputs,
    labels: torch.Tensor,
    weights=(0.16, 0.4, 1.0),
    ignore_index: int = IGNORE_INDEX,
    names=None,
    loss=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_i weights[i] * loss(outputs[i], nearest(labels, outputs[i]'s size))``, CE by default.

    A term whose labels are all ``ignore_index`` contributes 0. An output at the labels' size
    (the full-resolution head's) is compared with the labels themselves. Each term is computed
    on float32 logits.

    Args:
        outputs: the logits at 1/16, 1/8 and 1/4 (``CascadeOutputs``), and the head's
            (``HeadCascadeOutputs``), each ``(B, C, h, w)``.
        labels: full-resolution labels ``(B, H, W)``.
        weights: one weight per output (the paper's 0.16, 0.4, 1.0; ``ICNet.cascade_loss_weights``).
        ignore_index: the label excluded from the loss.
        names: one name per term (``ICNet.loss_names``); None: ``loss_16``, ``loss_8``,
            ``loss_4`` for three outputs, ``loss_0``, ``loss_1``, ... for other counts.
        loss: the loss of every term, called as ``loss(logits, labels)`` (e.g.
            ``gigaseg.nn.losses.segmentation_loss``'s, which ignore the same ``ignore_index``);
            None: cross-entropy ignoring ``ignore_index``.

    Returns:
        ``(total, parts)``: the weighted float32 sum and the detached unweighted terms by name.

    Raises:
        ValueError: ``outputs``, ``weights`` (or ``names``) differ in length.
    """
    if len(outputs) != len(weights):
        raise ValueError(f"{len(outputs)} outputs but {len(weights)} loss weights")
    if names is None:
        names = ("loss_16", "loss_8", "loss_4") if len(outputs) == 3 else [f"loss_{i}" for i in range(len(outputs))]
    elif len(names) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(names)} loss names")
    loss_fn = CrossEntropy(ignore_index=ignore_index) if loss is None else loss
    total = outputs[0].new_zeros((), dtype=torch.float32)
    parts = {}
    for name, logits, weight in zip(names, outputs, weights):
        target = downsample_labels(labels, logits.shape[-2:])
        term = loss_fn(logits.float(), target)
        parts[name] = term.detach()
        total = total + float(weight) * term
    return total, parts


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of float32 logits; 0 (in the graph, not NaN) when every pixel is ignored."""
    return CrossEntropy(ignore_index=ignore_index)(logits.float(), target)


# --------------------------------------------------------------------------- training views


class ScaledCrops(SeededViews):
    """Random scaling in ``[scale_min, scale_max]``, a random ``crop`` x ``crop`` crop, and mirroring.

    The crop is taken from the scaled image (read at that scale: ``area`` when shrinking,
    ``bilinear`` when enlarging, labels ``nearest``); where the scaled image is smaller than
    the crop, the image is padded with 0 (the normalised mean) and the label with
    ``ignore_index``. ``crops_per_image`` items per image; randomness from
    ``(seed, epoch, index)`` as in ``gigaseg.training.views``. Items: ``image``, ``label``,
    ``index`` and ``scale``.

    Two samplings (as ``gigaseg.training.views.RandomCrops``'s):

    - ``"uniform"`` (the paper's): item ``i`` comes from image ``i // crops_per_image``, its
      scale and then the crop's position drawn uniformly.
    - ``"balanced"``: each item first draws a class and one of its pixels over the whole
      training set (``gigaseg.training.views.BalancedPixels``), then the scale, and places the
      crop's source window (``crop / scale`` pixels, cut to the image) uniformly among those
      holding that pixel (``window_around``). So every crop's source window holds the class
      drawn; a thin class can still vanish when the window is shrunk (nearest resampling of a
      1-px line at scale below 1). ``crops_per_image`` only sets how many items an epoch has.

    Args:
        dataset: the training dataset.
        normalization: how its pixels are normalised.
        crop: the crop side in pixels (of the scaled image).
        scale_range: ``(min, max)`` of the random scale factor.
        crops_per_image: items per image and epoch.
        mirror: whether to flip horizontally at random.
        seed: seed of the per-(seed, epoch, index) randomness.
        ignore_index: the label padding gets; None: the dataset's ``ignore_index``
            (``gigaseg.data.labels.IGNORE_INDEX`` when it has none).
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
        crop: int,
        scale_range=(0.5, 2.0),
        crops_per_image: int = 1,
        mirror: bool = True,
        seed: int = 0,
        ignore_index: int | None = None,
        sampling: str = "uniform",
        temperature: float = 0.0,
        statistics=None,
    ):
        super().__init__(dataset, normalization, seed, crops_per_image)
        self.sampling = sampling
        self.balanced = crop_sampler(dataset, sampling, temperature, statistics)
        self.crop = int(crop)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.mirror = mirror
        self.ignore_index = int(
            getattr(dataset, "ignore_index", IGNORE_INDEX) if ignore_index is None else ignore_index
        )

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        if self.balanced is None:
            sample = self.dataset[index // self.crops_per_image]
        else:
            sample, row, col = self.balanced.draw(self.dataset, rng)
        height, width = sample.image.height, sample.image.width
        scale = float(rng.uniform(*self.scale_range))
        src_h = min(height, max(1, round(self.crop / scale)))
        src_w = min(width, max(1, round(self.crop / scale)))
        if self.balanced is None:
            window = Window(int(rng.integers(height - src_h + 1)), int(rng.integers(width - src_w + 1)), src_h, src_w)
        else:
            window = window_around(row, col, (src_h, src_w), (height, width), rng)
        out = (min(self.crop, max(1, round(src_h * scale))), min(self.crop, max(1, round(src_w * scale))))
        resize = None if out == (src_h, src_w) else out
        image = sample.image.read(window, out_size=resize, resample="area" if scale <= 1 else "bilinear")
        label = sample.mask.read(window, out_size=resize, resample="nearest")[..., 0]
        if self.mirror and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        pixels = torch.from_numpy(self.normalization.apply(np.ascontiguousarray(image)))
        target = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        pad_h, pad_w = self.crop - pixels.shape[-2], self.crop - pixels.shape[-1]
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
            target = F.pad(target, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return {"image": pixels, "label": target, "index": index, "scale": scale}


# --------------------------------------------------------------------------- recipes


def _sub_batches(ctx: StepContext, batch: dict):
    """``(images, labels, fraction)`` chunks of at most ``ctx.sub_batch`` samples."""
    images, labels = batch["image"], batch["label"]
    n = images.shape[0]
    step = max(1, int(ctx.sub_batch))
    for start in range(0, n, step):
        yield images[start : start + step], labels[start : start + step], min(step, n - start) / n


def icnet_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Cascade label guidance with the option ``loss`` over sub-batches (scaled by each chunk's share of the batch).

    Args:
        ctx: the step's context (wrapped model, backward, sub-batch size, stage options).
        batch: a collated batch of :class:`ScaledCrops` items.

    Returns:
        The detached batch ``loss`` and its terms ``loss_16``, ``loss_8``, ``loss_4`` (and
        the full-resolution head's ``loss_1`` or ``loss_2``).
    """
    weights, names = ctx.model.cascade_loss_weights, ctx.model.loss_names
    ignore = ctx.stage.options.get("ignore_index", IGNORE_INDEX)
    loss_fn = stage_loss(ctx, ctx.model.options.get("loss", "ce"))
    logged: dict[str, torch.Tensor] = {}
    for images, labels, fraction in _sub_batches(ctx, batch):
        loss, parts = cascade_label_guidance_loss(ctx.wrapped(images), labels, weights, ignore, names, loss_fn)
        ctx.backward(loss * fraction)
        for key, value in {"loss": loss.detach(), **parts}.items():
            logged[key] = logged.get(key, 0.0) + value * fraction
    return logged


def pspnet_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """PSPNet: CE(main) + aux_weight * CE(aux), logits upsampled bilinearly to the labels.

    Each sub-batch's loss is scaled by its share of the batch.

    Args:
        ctx: the step's context (wrapped model, backward, sub-batch size, stage options).
        batch: a collated batch of :class:`ScaledCrops` items.

    Returns:
        The detached batch ``loss``, ``loss_main`` and ``loss_aux``.
    """
    ignore = ctx.stage.options.get("ignore_index", IGNORE_INDEX)
    aux_weight = ctx.model.options["aux_weight"]
    logged: dict[str, torch.Tensor] = {}
    for images, labels, fraction in _sub_batches(ctx, batch):
        main, aux = ctx.wrapped(images)
        size = labels.shape[-2:]
        main_loss = _cross_entropy(F.interpolate(main, size=size, mode="bilinear", align_corners=False), labels, ignore)
        aux_loss = _cross_entropy(F.interpolate(aux, size=size, mode="bilinear", align_corners=False), labels, ignore)
        loss = main_loss + aux_weight * aux_loss
        ctx.backward(loss * fraction)
        for key, value in {
            "loss": loss.detach(),
            "loss_main": main_loss.detach(),
            "loss_aux": aux_loss.detach(),
        }.items():
            logged[key] = logged.get(key, 0.0) + value * fraction
    return logged


def _stage(model, name: str, step) -> Stage:
    crop = model.options["crop_size"]
    stage = Stage(
        name=name,
        make_data=None,
        step=step,
        sub_batch=RECIPE["batch_size"],
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, crop, crop),),
        **RECIPE,
    )

    def make_data(dataset, normalization, settings):
        # PSPNet has no loss or crop sampling options: CE and uniform crops
        sampling = model.options.get("crop_sampling", "uniform")
        statistics = prepare_class_balance(stage, dataset, model.options.get("loss", "ce"), sampling)
        return ScaledCrops(
            dataset,
            normalization,
            crop,
            (model.options["scale_min"], model.options["scale_max"]),
            crops_per_image=model.options.get("crops_per_image", 1),
            seed=settings.seed,
            sampling=sampling,
            temperature=model.options.get("sampling_temperature", 0.0),
            statistics=statistics,
        )

    stage.make_data = make_data
    return stage


def icnet_stages(model) -> list[Stage]:
    """ICNet's training: one stage, ``"icnet"``, the whole network with the cascade label guidance loss.

    With the full-resolution head the loss has the head's term too (see the module docstring).

    Args:
        model: the ICNet to train.

    Returns:
        The one stage, with the paper's SGD recipe (:data:`RECIPE`) and :class:`ScaledCrops` views.
    """
    return [_stage(model, "icnet", icnet_step)]


def pspnet_stages(model) -> list[Stage]:
    """PSPNet's training: one stage, ``"pspnet"``, main + ``aux_weight`` (0.4) auxiliary loss.

    Args:
        model: the PSPNet to train.

    Returns:
        The one stage, with the same SGD recipe and views as ICNet.
    """
    return [_stage(model, "pspnet", pspnet_step)]
