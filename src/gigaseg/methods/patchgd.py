"""PatchGD with a global patch on the shared engine: training views, the inner-iteration
training step, memory planning, and whole-image prediction.

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

Prediction: :class:`PatchGDImageClassifier` fills ``Z`` reading one row band of patches
at a time from the (lazy) image, so memory does not grow with the image beyond ``Z``;
:class:`PatchGDSegmentationPredictor` predicts any block from the whole-image grid's
patches touching it plus the global patch (exact, since theta2 is 1x1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BudgetError, DatasetError
from ..inference.interface import WholeImagePredictor
from ..inference.upsample import upsample_window
from ..io.array import ArraySource
from ..memory import format_size
from ..models.losses import dice_loss
from ..models.patchgd import patch_at
from ..train.budget import (OPTIMIZER_STATES, inference_estimate, parameter_bytes, plan_sub_batch, runtime_bytes,
                            training_estimate)
from ..train.recipe import Stage, StepContext
from ..train.views import SeededViews, augment_pair, rng_for
from ..window import Window

__all__ = ["DownsampledImageClassifier", "PatchGDImageClassifier", "PatchGDSegmentationPredictor", "PatchPlan",
           "WholeImageViews", "classifier_stages", "classifier_step", "downsampled_stages", "plan_patches",
           "segmentation_loss", "segmenter_stages", "segmenter_step"]

#: share of a training budget left to the allocator's cached blocks
ALLOCATOR_MARGIN = 0.1
#: patches per no-grad pass without a memory budget
DEFAULT_FILL_BATCH = 16
MAX_FILL_BATCH = 64


# ------------------------------------------------------------------------------- views


class WholeImageViews(SeededViews):
    """Whole images (full resolution, or resized to ``size``) with their label and global patch.

    Items: ``image`` (normalised ``(C, H, W)``), ``label`` (class id for classification
    samples, ``(H, W)`` int64 class ids for segmentation samples), ``index`` and, with
    ``global_size``, ``global``: the image resized to ``global_size`` x ``global_size`` by
    area averaging (after augmentation), as the predictors read it. ``augment``: paired
    flip / rot90 (off by default: it changes digits' meaning).
    """

    def __init__(self, dataset, normalization, *, size: tuple[int, int] | None = None,
                 global_size: int | None = None, augment: bool = False, seed: int = 0):
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
    """Patches per image re-encoded with gradients per inner iteration (``k``), patches per
    no-grad pass (``fill_batch``) and the estimate behind them (bytes)."""

    k: int
    fill_batch: int
    fixed: int = 0
    data: int = 0
    per_patch: int = 0

    def as_dict(self) -> dict:
        return {"k": self.k, "fill_batch": self.fill_batch, "fixed": self.fixed, "data": self.data,
                "per_patch": self.per_patch}


def plan_patches(model, image_shape: tuple[int, int, int], batch: int, max_memory: int | None,
                 device="cpu", optimizer: str = "adam", default_fill: int = DEFAULT_FILL_BATCH) -> PatchPlan:
    """k and the fill sub-batch for ``batch`` images of ``image_shape`` (C, H, W) within ``max_memory``.

    Without a budget: ``k = model.num_sampled(patches)`` and ``default_fill``. With one, k is
    capped so that fixed + data + ``B x (k + global)`` patches' training activations fit in
    90% of it (``ALLOCATOR_MARGIN``);
    BudgetError (naming the smallest budget) when not even ``k = 1`` does.
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
    extra = 1 if model.options["global_patch"] else 0
    # a share of the budget is left to the allocator: a CPU process's resident size grows over
    # training as freed blocks stay cached (measured: up to ~9% over six epochs)
    available = int(max_memory * (1 - ALLOCATOR_MARGIN)) - fixed - data
    need = batch * (1 + extra) * per_patch
    if available < need:
        raise BudgetError(
            f"a memory budget of {format_size(max_memory)} is too small to train {model.method_name} on "
            f"{batch} image(s) of {height}x{width} with {p}-px patches: the smallest that works is about "
            f"{format_size(int((fixed + data + need) / (1 - ALLOCATOR_MARGIN)))} ({format_size(fixed)} parameters/optimiser/runtime + "
            f"{format_size(data)} images and full-size maps + {format_size(per_patch)} per patch with "
            f"gradients); use a smaller batch, patch size or encoder")
    k = int(max(1, min(wanted, available // (batch * per_patch) - extra)))
    fill = int(max(1, min(MAX_FILL_BATCH, available // max(per_fill, 1))))
    return PatchPlan(k=k, fill_batch=fill, fixed=int(fixed), data=int(data), per_patch=int(per_patch))


def _plan_for(ctx: StepContext, x: torch.Tensor, cache: dict) -> PatchPlan:
    """The plan for this image size, made at its first (full) batch and kept: a smaller batch
    (the epoch's last) needs less, and re-planning later would count memory the process has
    only cached since (its resident size grows as the allocator keeps freed blocks)."""
    key = (tuple(x.shape[1:]), ctx.settings.max_memory)
    if key not in cache:
        cache[key] = plan_patches(ctx.model, tuple(x.shape[1:]), x.shape[0], ctx.settings.max_memory,
                                  device=x.device, optimizer=ctx.stage.optimizer, default_fill=ctx.sub_batch)
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
    """PatchGD's inner-iteration loop for one mini-batch (see the module docstring)."""

    def iterate(x, global_view, z, indices):
        logits, z_new = ctx.wrapped(x, global_view, latents=z, indices=indices)
        # the updated latents carry over to the next iteration, without their graph
        return F.cross_entropy(logits.float(), batch["label"]), z_new.detach()

    return _inner_iterations(ctx, batch, cache, iterate)


def segmentation_loss(model, logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """BCE + Dice (two classes, single logit ``l = logits[:, 1] - logits[:, 0]``) or CE + Dice."""
    logits = logits.float()
    if model.binary:
        single = logits[:, 1:] - logits[:, :1]
        valid = label != ignore_index
        if valid.any():
            bce = F.binary_cross_entropy_with_logits(single[:, 0][valid], (label[valid] == 1).float())
        else:
            bce = single.sum() * 0
        return bce + dice_loss(single, torch.where(valid, (label == 1).long(), ignore_index),
                               ignore_index=ignore_index)
    ce = F.cross_entropy(logits, label, ignore_index=ignore_index)
    if not torch.isfinite(ce):  # every pixel ignored
        ce = logits.sum() * 0
    return ce + dice_loss(logits, label, model.num_classes, ignore_index=ignore_index)


def segmenter_step(ctx: StepContext, batch: dict, cache: dict | None = None) -> dict:
    """The segmentation framework's inner iterations: Z0 filled once, k patches replaced in a copy each time."""

    def iterate(x, global_view, z0, indices):
        logits = ctx.wrapped(x, global_view, latents=z0, indices=indices)
        return segmentation_loss(ctx.model, logits, batch["label"]), z0  # every iteration starts from Z0

    return _inner_iterations(ctx, batch, cache, iterate)


def downsampled_step(ctx: StepContext, batch: dict) -> dict:
    logits = ctx.wrapped(batch["image"])
    loss = F.cross_entropy(logits.float(), batch["label"])
    ctx.backward(loss)
    return {"loss": loss.detach()}


# ------------------------------------------------------------------------------- recipes


def classifier_stages(model) -> list[Stage]:
    """PatchGD (classification): Adam 1e-3, 100 epochs, batch 4, whole images at full resolution."""
    cache: dict = {}
    p = model.patch_size
    return [Stage(
        name="patchgd", epochs=100, lr=1e-3, batch_size=4, optimizer="adam",
        make_data=lambda data, norm, settings: WholeImageViews(
            data, norm, global_size=p if model.options["global_patch"] else None, seed=settings.seed),
        step=lambda ctx, batch: classifier_step(ctx, batch, cache),
        sub_batch=DEFAULT_FILL_BATCH,
    )]


def segmenter_stages(model) -> list[Stage]:
    """The segmentation framework: AdamW 1e-4 (the paper's), 100 epochs, batch 2, paired flip/rot90."""
    cache: dict = {}
    p = model.patch_size
    return [Stage(
        name="patchgd", epochs=100, lr=1e-4, batch_size=2, optimizer="adamw", weight_decay=1e-2,
        make_data=lambda data, norm, settings: WholeImageViews(
            data, norm, global_size=p if model.options["global_patch"] else None, augment=True, seed=settings.seed),
        step=lambda ctx, batch: segmenter_step(ctx, batch, cache),
        sub_batch=DEFAULT_FILL_BATCH,
    )]


def downsampled_stages(model) -> list[Stage]:
    """The downsampled baseline, on the same schedule as PatchGD: whole images resized to ``input_size``."""
    size = model.options["input_size"]
    return [Stage(
        name="downsampled", epochs=100, lr=1e-3, batch_size=4, optimizer="adam",
        make_data=lambda data, norm, settings: WholeImageViews(data, norm, size=(size, size), seed=settings.seed),
        step=downsampled_step,
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, size, size),),
    )]


# ------------------------------------------------------------------------------- prediction


class ImageClassifier:
    """Class probabilities of a whole (possibly huge) image: ``predict(source) -> (num_classes,)``."""

    def __init__(self, model, normalization, device="cpu", sub_batch: int = DEFAULT_FILL_BATCH, precision="32"):
        self.model = model.eval()
        self.normalization = normalization
        self.device = torch.device(device)
        self.sub_batch = max(1, int(sub_batch))
        self.precision = precision

    to_tensor = WholeImagePredictor.to_tensor
    autocast = WholeImagePredictor.autocast

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def predict(self, source) -> np.ndarray:
        raise NotImplementedError


def _inference_sub_batch(model, channels: int, device, max_memory: int | None, extra: int = 0) -> int:
    p = model.patch_size
    estimate = inference_estimate(model.theta1, (torch.zeros(1, channels, p, p),), runtime=runtime_bytes(device),
                                  extra=extra)
    return plan_sub_batch(max_memory, estimate, f"{model.method_name} prediction with {p}-px patches",
                          default=DEFAULT_FILL_BATCH, maximum=MAX_FILL_BATCH)


def segmentation_block_bytes(model, block: int) -> int:
    """Working memory of one streamed block: its pixels and Z with a patch of margin, the
    upsampled global features, the fused map, logits and probabilities (float32)."""
    p, c = model.patch_size, model.latent_channels
    margin = (block + 2 * p) ** 2
    return margin * (model.in_channels * 5 + c * 4) + block * block * 4 * (3 * c + 4 * model.num_classes)


class PatchGDImageClassifier(ImageClassifier):
    """Fill Z without gradients, one row band of patches at a time, add the global patch, classify."""

    def __init__(self, model, normalization, device="cpu", max_memory=None, precision="32"):
        super().__init__(model, normalization, device,
                         _inference_sub_batch(model, model.in_channels, device, max_memory), precision)

    def latents(self, source) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Z ``(1, d, m, n)``, g ``(1, d)`` or None) of a whole image, read band by band."""
        model, p = self.model, self.model.patch_size
        rows, cols = model.grid((source.height, source.width))
        z = torch.empty((1, model.latent_channels, rows, cols), device=self.device)
        with torch.inference_mode(), self.autocast():
            for r in range(rows):
                band = Window(r * p, 0, min(p, source.height - r * p), source.width)
                pixels = self.to_tensor(source.read(band))[0]
                for start in range(0, cols, self.sub_batch):
                    chunk = range(start, min(cols, start + self.sub_batch))
                    patches = torch.stack([patch_at(pixels, 0, c * p, p) for c in chunk])
                    z[0, :, r, chunk.start:chunk.stop] = model.theta1(patches).float().T
            g = None
            if model.options["global_patch"]:
                thumb = source.read(out_size=(p, p), resample="area")
                g = model.encode_global(self.to_tensor(thumb)).float()
        return z, g

    def predict(self, source) -> np.ndarray:
        z, g = self.latents(source)
        with torch.inference_mode():
            logits = self.model.classify(z, g)
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


class DownsampledImageClassifier(ImageClassifier):
    """The whole image read at ``input_size`` x ``input_size`` (area averaging), classified."""

    def predict(self, source) -> np.ndarray:
        size = self.model.options["input_size"]
        view = source.read(out_size=(size, size), resample="area")
        with torch.inference_mode(), self.autocast():
            logits = self.model(self.to_tensor(view))
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


class PatchGDSegmentationPredictor(WholeImagePredictor):
    """Blocks of the image from the whole-image patch grid's patches that touch them plus the global patch."""

    def __init__(self, model, normalization, device="cpu", max_memory=None, precision="32"):
        super().__init__(model, normalization, device=device,
                         sub_batch=_inference_sub_batch(model, model.in_channels, device, max_memory),
                         precision=precision)
        self.max_memory = max_memory
        self.halo = model.patch_size

    def prepare(self, source):
        from ..inference.stream import block_size_for

        model, p = self.model, self.model.patch_size
        if self.max_memory is not None:
            # the budget also holds one block's buffers; a block is at most the image
            block = min(block_size_for(self.max_memory), max(source.height, source.width))
            self.sub_batch = _inference_sub_batch(model, model.in_channels, self.device, self.max_memory,
                                                  segmentation_block_bytes(model, block))
        if not model.options["global_patch"]:
            return None
        thumb = source.read(out_size=(p, p), resample="area")
        with torch.inference_mode(), self.autocast():
            return model.global_features(self.to_tensor(thumb)).float()

    def predict_block(self, source, context, window: Window) -> np.ndarray:
        model, p = self.model, self.model.patch_size
        r0, r1 = window.top // p, (window.bottom - 1) // p + 1
        c0, c1 = window.left // p, (window.right - 1) // p + 1
        region = Window(r0 * p, c0 * p, (r1 - r0) * p, (c1 - c0) * p)
        readable = region.clip(source.height, source.width)
        with torch.inference_mode():
            pixels = self.to_tensor(source.read(readable))[0]
            z = torch.zeros((1, model.latent_channels, region.height, region.width), device=self.device)
            corners = [(r * p - region.top, c * p - region.left) for r in range(r0, r1) for c in range(c0, c1)]
            for start in range(0, len(corners), self.sub_batch):
                chunk = corners[start:start + self.sub_batch]
                with self.autocast():
                    out = model.encode(torch.stack([patch_at(pixels, top, left, p) for top, left in chunk])).float()
                for (top, left), patch_out in zip(chunk, out):
                    z[0, :, top:top + p, left:left + p] = patch_out
            inside = window.relative_to(region)
            z = z[:, :, inside.top:inside.bottom, inside.left:inside.right]
            g_up = None if context is None else upsample_window(context, (source.height, source.width), window)
            logits = model.head(z, g_up)
            return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float32)
