"""PatchGD's training recipe: whole-image views, the inner-iteration training step, memory planning.

Training step (one mini-batch of ``B`` whole images, :func:`classifier_step` /
:func:`segmenter_step`):

1. fill ``Z`` for every patch without gradients (``model.fill``, ``fill_batch`` patches
   per pass);
2. for each of ``inner_iterations`` iterations: draw ``k`` patches per image at random
   (without replacement), re-encode them *with* gradients (theta1 learns) together with
   the global patch, write them into ``Z`` (classification: into the detached running
   ``Z``, so refreshed patches stay refreshed; segmentation: into a fresh copy of the
   filled ``Z0``, as in the paper), compute the loss of theta2's prediction, divide it by
   the number of backward passes per optimiser step (``inner_iterations x
   settings.accumulate``) and backward;
3. the engine's loop steps the optimiser once per ``settings.accumulate`` batches, i.e.
   after ``inner_iterations x accumulate`` backward passes (the paper's accumulation
   steps; the engine cannot step in the middle of a batch).

``k = round(sampling_fraction x patches)`` (at least 1), capped by ``--max-memory``:
:func:`plan_patches` estimates, from shapes on the meta device, the bytes of theta1's
training activations per patch, the fixed cost (parameters, gradients, optimiser state,
runtime) and the batch's image tensors (and, for segmentation, the full-resolution maps
of ``Z`` and theta2), and picks the largest ``k`` and no-grad sub-batch that fit.
The chosen ``k`` is logged as ``train_k`` in metrics.csv.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...budget import OPTIMIZER_STATES, inference_estimate, parameter_bytes, runtime_bytes, training_estimate
from ...data.labels import IGNORE_INDEX
from ...errors import BudgetError, DatasetError
from ...io.array import ArraySource
from ...memory import format_size
from ...nn.losses import dice_loss
from ...training.detection_views import WholeImageDetections
from ...training.recipe import Stage, StepContext
from ...training.views import SeededViews, augment_pair, rng_for
from .model import DEFAULT_FILL_BATCH, MAX_FILL_BATCH

__all__ = [
    "PatchPlan",
    "WholeImageViews",
    "classifier_stages",
    "classifier_step",
    "detector_stages",
    "detector_step",
    "downsampled_stages",
    "plan_patches",
    "segmentation_loss",
    "segmenter_stages",
    "segmenter_step",
]

#: share of a training budget left to the allocator's cached blocks
ALLOCATOR_MARGIN = 0.1


# ------------------------------------------------------------------------------- views


class WholeImageViews(SeededViews):
    """Whole images (full resolution, or resized to ``size``) with their label and global patch.

    Items: ``image`` (normalised ``(C, H, W)``), ``label`` (class id for classification
    samples, ``(H, W)`` int64 class ids for segmentation samples), ``index`` and, with
    ``global_size``, ``global``: the image resized to ``global_size`` x ``global_size`` by
    area averaging (after augmentation), as the predictors read it.

    Args:
        dataset: a classification or segmentation dataset (every image labelled).
        normalization: how the images' pixels are normalised.
        size: (height, width) every image is resized to by area averaging (labels by
            nearest neighbour); None keeps full resolution.
        global_size: the global patch's side; None adds no ``global`` item.
        augment: paired random flip and rot90 of image and label (off by default: it changes
            digits' meaning).
        seed: the seed of the augmentation, with the epoch and the item's index.

    Raises:
        DatasetError: a classification dataset has unlabelled images (here), or a sample
            without a label is read.
    """

    def __init__(
        self,
        dataset,
        normalization,
        *,
        size: tuple[int, int] | None = None,
        global_size: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ):
        super().__init__(dataset, normalization, seed)
        self.size = tuple(size) if size is not None else None
        self.global_size = global_size
        self.augment = augment
        labels = getattr(dataset, "require_labels", None)
        if labels is not None:
            labels("training")

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        sample = self.dataset[index]
        try:
            image = sample.image.read(out_size=self.size, resample="area")
            if sample.mask is not None:
                label = sample.mask.read(out_size=self.size, resample="nearest")[..., 0]
                if self.augment:
                    image, label = augment_pair(image, label, rng)
                label = torch.from_numpy(label.astype(np.int64))
            else:
                if sample.label is None:
                    raise DatasetError(getattr(sample.image, "path", None), "image has no label")
                if self.augment:
                    image, _ = augment_pair(image, np.zeros(image.shape[:2], np.uint8), rng)
                label = torch.tensor(int(sample.label), dtype=torch.int64)
        finally:
            sample.close()
        item = {"image": torch.from_numpy(self.normalization.apply(image)), "label": label, "index": index}
        if self.global_size is not None:
            thumb = ArraySource(image).read(out_size=(self.global_size, self.global_size), resample="area")
            item["global"] = torch.from_numpy(self.normalization.apply(thumb))
        return item


# ------------------------------------------------------------------------------- memory plan


@dataclass(frozen=True)
class PatchPlan:
    """Patches per image re-encoded with gradients per inner iteration, patches per no-grad pass.

    Attributes:
        k: patches per image re-encoded with gradients per inner iteration.
        fill_batch: patches per no-grad theta1 pass (filling ``Z``).
        fixed: the estimate's fixed bytes (parameters, gradients, optimiser state, runtime);
            0 without a budget.
        data: the estimate's bytes of the batch's images (and, for segmentation, its
            full-resolution maps); 0 without a budget.
        per_patch: the estimated bytes of one patch's training activations; 0 without a budget.
    """

    k: int
    fill_batch: int
    fixed: int = 0
    data: int = 0
    per_patch: int = 0

    def as_dict(self) -> dict:
        """The plan as a dict of its fields (for logging).

        Returns:
            ``{"k", "fill_batch", "fixed", "data", "per_patch"}`` -> int.
        """
        return {
            "k": self.k,
            "fill_batch": self.fill_batch,
            "fixed": self.fixed,
            "data": self.data,
            "per_patch": self.per_patch,
        }


def plan_patches(
    model,
    image_shape: tuple[int, int, int],
    batch: int,
    max_memory: int | None,
    device="cpu",
    optimizer: str = "adam",
    default_fill: int = DEFAULT_FILL_BATCH,
) -> PatchPlan:
    """k and the fill sub-batch for ``batch`` images of ``image_shape`` within ``max_memory``.

    Without a budget: ``k = model.num_sampled(patches)`` and ``default_fill``. With one, k is
    capped so that fixed + data + ``B x (k + global)`` patches' training activations fit in
    90% of it (``ALLOCATOR_MARGIN``), and the fill sub-batch is the most no-grad patches
    (at most ``MAX_FILL_BATCH``) that fit the same room. The activations are estimated from
    shapes on the meta device.

    Args:
        model: a PatchGD classifier or segmenter.
        image_shape: (C, H, W) of the images.
        batch: images per mini-batch.
        max_memory: the budget in bytes; None: no cap.
        device: where training runs; on CPU the budget is the whole process's (its resident
            memory now, and the next batch read while this one lives, count too).
        optimizer: the optimiser's name (for its state per parameter).
        default_fill: the fill sub-batch without a budget.

    Returns:
        The ``PatchPlan``.

    Raises:
        BudgetError: not even ``k = 1`` fits (the message names the smallest budget).
    """
    channels, height, width = image_shape
    rows, cols = model.grid((height, width))
    wanted = model.num_sampled(rows * cols)
    if max_memory is None:
        return PatchPlan(k=wanted, fill_batch=default_fill)
    p = model.patch_size
    # two patches (BatchNorm in training mode needs more than one value per channel), halved
    sample = (torch.zeros(2, channels, p, p),)
    per_patch = training_estimate(model.theta1, sample, optimizer).per_sample // 2
    per_fill = inference_estimate(model.theta1, sample).per_sample // 2
    params = parameter_bytes(model)
    states = OPTIMIZER_STATES.get(optimizer, 2)
    pixels = batch * height * width
    image_bytes = pixels * channels * 4
    if torch.device(device).type == "cpu":
        # the budget is the whole process's: its resident memory now (runtime, parameters, the
        # loaded batch) + gradients and optimiser state + the next batch read while this one lives
        # and a transient copy of it
        fixed = runtime_bytes(device) + params * (1 + states)
        data = 2 * image_bytes
    else:
        fixed = params * (2 + states)
        data = image_bytes
    if getattr(model, "task", "") == "segmentation":
        classes = model.theta2.out_channels
        latent = model.latent_channels
        # labels (int64, twice) + Z0, its copy and that copy's gradient, the upsampled global
        # features and their gradient, the fused map, logits, probabilities and loss terms
        data += pixels * (16 + 4 * (3 * latent + 2 * latent + 2 * latent + 8 * max(classes, 2)))
    elif getattr(model, "task", "") == "detection":
        data += model.map_bytes(batch, height, width)  # the pyramids' Z, theta2 and FCOS's heads
    extra = 1 if model.options["global_patch"] else 0
    # a share of the budget is left to the allocator: a CPU process's resident size grows over
    # training as freed blocks stay cached
    available = int(max_memory * (1 - ALLOCATOR_MARGIN)) - fixed - data
    need = batch * (1 + extra) * per_patch
    if available < need:
        raise BudgetError(
            f"a memory budget of {format_size(max_memory)} is too small to train {model.method_name} on "
            f"{batch} image(s) of {height}x{width} with {p}-px patches: the smallest that works is about "
            f"{format_size(int((fixed + data + need) / (1 - ALLOCATOR_MARGIN)))} "
            f"({format_size(fixed)} parameters/optimiser/runtime + "
            f"{format_size(data)} images and full-size maps + {format_size(per_patch)} per patch with "
            f"gradients); use a smaller batch, patch size or encoder"
        )
    k = int(max(1, min(wanted, available // (batch * per_patch) - extra)))
    fill = int(max(1, min(MAX_FILL_BATCH, available // max(per_fill, 1))))
    return PatchPlan(k=k, fill_batch=fill, fixed=int(fixed), data=int(data), per_patch=int(per_patch))


def _plan_for(ctx: StepContext, x: torch.Tensor, cache: dict) -> PatchPlan:
    """The plan for this image size, made at its first (full) batch and kept: a smaller batch
    (the epoch's last) needs less, and re-planning later would count memory the process has
    only cached since (its resident size grows as the allocator keeps freed blocks)."""
    key = (tuple(x.shape[1:]), ctx.settings.max_memory)
    if key not in cache:
        cache[key] = plan_patches(
            ctx.model,
            tuple(x.shape[1:]),
            x.shape[0],
            ctx.settings.max_memory,
            device=x.device,
            optimizer=ctx.stage.optimizer,
            default_fill=ctx.sub_batch,
        )
    return cache[key]


def _sample_indices(batch: int, num_patches: int, k: int, device) -> torch.Tensor:
    """``(B, k)`` distinct random grid indices per image (torch's RNG: the loop seeds and checkpoints it)."""
    return torch.stack([torch.randperm(num_patches)[:k] for _ in range(batch)]).to(device)


def _sync_only_last(ctx: StepContext, last: bool):
    """Skip DDP's gradient all-reduce on all but the last inner backward (no-op on one device)."""
    if last:
        return contextlib.nullcontext()
    return ctx.fabric.no_backward_sync(ctx.wrapped, enabled=True)


# ------------------------------------------------------------------------------- steps


def _inner_iterations(ctx: StepContext, batch: dict, cache: dict | None, iterate) -> dict:
    """The inner-iteration loop both PatchGD steps share (see the module docstring).

    Plans ``k``, fills Z once, then per iteration samples ``k`` patches and calls
    ``iterate(x, global_view, z, indices)``, which returns the loss and the latents the
    next iteration starts from. Each loss is back-propagated at once, divided by the
    backward passes per optimiser step (``inner_iterations x settings.accumulate``).
    """
    model = ctx.model
    x = batch["image"]
    global_view = batch.get("global") if model.options["global_patch"] else None
    plan = _plan_for(ctx, x, cache if cache is not None else {})
    rows, cols = model.grid(x)
    iterations = model.options["inner_iterations"]
    scale = 1.0 / (iterations * max(1, ctx.settings.accumulate))
    z = model.fill(x, plan.fill_batch)
    total = torch.zeros(())
    for iteration in range(iterations):
        indices = _sample_indices(x.shape[0], rows * cols, plan.k, x.device)
        with _sync_only_last(ctx, iteration == iterations - 1):
            loss, z = iterate(x, global_view, z, indices)
            ctx.backward(loss * scale)
        total += loss.detach().cpu()
    return {"loss": total / iterations, "k": float(plan.k)}


def classifier_step(ctx: StepContext, batch: dict, cache: dict | None = None) -> dict:
    """PatchGD's inner-iteration loop for one classification mini-batch (see the module docstring).

    The latents updated in one inner iteration (detached) are those the next one starts
    from, so refreshed patches stay refreshed.

    Args:
        ctx: the step's context (model, backward, settings).
        batch: ``image`` ``(B, C, H, W)``, ``label`` ``(B,)`` and, with the global patch,
            ``global`` ``(B, C, p, p)``.
        cache: keeps the memory plan per image size across steps; None plans anew.

    Returns:
        ``{"loss": the mean cross-entropy over the inner iterations, "k": k}``.
    """

    def iterate(x, global_view, z, indices):
        logits, z_new = ctx.wrapped(x, global_view, latents=z, indices=indices)
        # the updated latents carry over to the next iteration, without their graph
        return F.cross_entropy(logits.float(), batch["label"]), z_new.detach()

    return _inner_iterations(ctx, batch, cache, iterate)


def segmentation_loss(
    model, logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The segmenter's loss: BCE + Dice on a single logit, or CE + Dice.

    With ``model.binary`` (two classes, single logit ``l = logits[:, 1] - logits[:, 0]``):
    BCE + Dice on ``l``; otherwise cross-entropy + multi-class Dice. Ignored pixels count
    nowhere; with every pixel ignored the loss is 0 (connected to the graph).

    Args:
        model: the ``patchgd_segmenter`` network (``binary``, ``num_classes``).
        logits: ``(B, num_classes, H, W)``.
        label: int64 class ids ``(B, H, W)``.
        ignore_index: the label value of pixels to ignore.

    Returns:
        The scalar loss (float32).
    """
    logits = logits.float()
    if model.binary:
        single = logits[:, 1:] - logits[:, :1]
        valid = label != ignore_index
        if valid.any():
            bce = F.binary_cross_entropy_with_logits(single[:, 0][valid], (label[valid] == 1).float())
        else:
            bce = single.sum() * 0
        return bce + dice_loss(single, torch.where(valid, (label == 1).long(), ignore_index), ignore_index=ignore_index)
    ce = F.cross_entropy(logits, label, ignore_index=ignore_index)
    if not torch.isfinite(ce):  # every pixel ignored
        ce = logits.sum() * 0
    return ce + dice_loss(logits, label, model.num_classes, ignore_index=ignore_index)


def segmenter_step(ctx: StepContext, batch: dict, cache: dict | None = None) -> dict:
    """The segmentation framework's inner iterations: Z0 filled once, k patches replaced in a copy each time.

    Every iteration starts from the filled ``Z0``, as in the paper.

    Args:
        ctx: the step's context (model, backward, settings).
        batch: ``image`` ``(B, C, H, W)``, ``label`` ``(B, H, W)`` and, with the global
            patch, ``global`` ``(B, C, p, p)``.
        cache: keeps the memory plan per image size across steps; None plans anew.

    Returns:
        ``{"loss": the mean loss over the inner iterations, "k": k}``.
    """

    def iterate(x, global_view, z0, indices):
        logits = ctx.wrapped(x, global_view, latents=z0, indices=indices)
        return segmentation_loss(ctx.model, logits, batch["label"]), z0  # every iteration starts from Z0

    return _inner_iterations(ctx, batch, cache, iterate)


def detector_step(ctx: StepContext, batch: dict, cache: dict | None = None) -> dict:
    """The detection framework's inner iterations: Z filled once, k patches re-encoded into a copy each time.

    Every iteration starts from the filled ``Z`` (as for segmentation); the loss is the sum of
    FCOS's three losses on the canvas's targets.

    Args:
        ctx: the step's context (model, backward, settings).
        batch: ``image`` ``(B, C, S, S)`` and ``targets`` (B dicts with ``boxes`` and
            ``labels``), as ``gigaseg.training.detection_views.collate_detections`` makes them.
        cache: keeps the memory plan per image size across steps; None plans anew.

    Returns:
        ``{"loss": the mean summed FCOS loss over the inner iterations, "k": k}``.
    """
    device = batch["image"].device
    targets = [{key: value.to(device) for key, value in t.items()} for t in batch["targets"]]

    def iterate(x, global_view, z, indices):
        losses = ctx.wrapped(x, targets, global_view=global_view, latents=z, indices=indices)
        return sum(losses.values()), z  # every iteration starts from the filled Z

    return _inner_iterations(ctx, batch, cache, iterate)


def downsampled_step(ctx: StepContext, batch: dict) -> dict:
    """One training step of the downsampled baseline: cross-entropy on the resized images.

    Args:
        ctx: the step's context.
        batch: ``image`` ``(B, C, input_size, input_size)`` and ``label`` ``(B,)``.

    Returns:
        ``{"loss": the detached loss}``.
    """
    logits = ctx.wrapped(batch["image"])
    loss = F.cross_entropy(logits.float(), batch["label"])
    ctx.backward(loss)
    return {"loss": loss.detach()}


# ------------------------------------------------------------------------------- recipes


def classifier_stages(model) -> list[Stage]:
    """PatchGD (classification): Adam 1e-3, 100 epochs, batch 4, whole images at full resolution.

    Args:
        model: the ``patchgd_classifier`` network.

    Returns:
        One stage running :func:`classifier_step`.
    """
    cache: dict = {}
    p = model.patch_size
    return [
        Stage(
            name="patchgd",
            epochs=100,
            lr=1e-3,
            batch_size=4,
            optimizer="adam",
            make_data=lambda data, norm, settings: WholeImageViews(
                data, norm, global_size=p if model.options["global_patch"] else None, seed=settings.seed
            ),
            step=lambda ctx, batch: classifier_step(ctx, batch, cache),
            sub_batch=DEFAULT_FILL_BATCH,
        )
    ]


def segmenter_stages(model) -> list[Stage]:
    """The segmentation framework: AdamW 1e-4 (the paper's), 100 epochs, batch 2, paired flip/rot90.

    Args:
        model: the ``patchgd_segmenter`` network.

    Returns:
        One stage running :func:`segmenter_step` (weight decay 1e-2).
    """
    cache: dict = {}
    p = model.patch_size
    return [
        Stage(
            name="patchgd",
            epochs=100,
            lr=1e-4,
            batch_size=2,
            optimizer="adamw",
            weight_decay=1e-2,
            make_data=lambda data, norm, settings: WholeImageViews(
                data, norm, global_size=p if model.options["global_patch"] else None, augment=True, seed=settings.seed
            ),
            step=lambda ctx, batch: segmenter_step(ctx, batch, cache),
            sub_batch=DEFAULT_FILL_BATCH,
        )
    ]


def detector_stages(model) -> list[Stage]:
    """The detection framework: AdamW 1e-4 (weight decay 1e-4, as fcos), 24 epochs, batch 2, flips.

    Images are resized (longer side) and padded to ``canvas_size`` x ``canvas_size`` with their
    boxes (``gigaseg.training.detection_views.WholeImageDetections``); the global patch is made
    from the canvas by area averaging in the step.

    Args:
        model: the ``patchgd_detector`` network.

    Returns:
        One stage running :func:`detector_step`.
    """
    cache: dict = {}
    canvas = model.options["canvas_size"]
    return [
        Stage(
            name="patchgd",
            epochs=24,
            lr=1e-4,
            batch_size=2,
            optimizer="adamw",
            weight_decay=1e-4,
            make_data=lambda data, norm, settings: WholeImageDetections(data, norm, canvas, seed=settings.seed),
            step=lambda ctx, batch: detector_step(ctx, batch, cache),
            sub_batch=DEFAULT_FILL_BATCH,
        )
    ]


def downsampled_stages(model) -> list[Stage]:
    """The downsampled baseline, on the same schedule as PatchGD: whole images resized to ``input_size``.

    Args:
        model: the ``downsampled_classifier`` network.

    Returns:
        One stage running :func:`downsampled_step`.
    """
    size = model.options["input_size"]
    return [
        Stage(
            name="downsampled",
            epochs=100,
            lr=1e-3,
            batch_size=4,
            optimizer="adam",
            make_data=lambda data, norm, settings: WholeImageViews(data, norm, size=(size, size), seed=settings.seed),
            step=downsampled_step,
            sample_inputs=lambda m: (torch.zeros(1, m.in_channels, size, size),),
        )
    ]
