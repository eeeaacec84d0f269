"""The two naive baselines every paper compares against, on the shared engine.

``global``: the whole image downsampled to ``input_size``, segmented, upsampled.
``patch``: full-resolution sliding windows with overlap and blended stitching.
Both use the same network (``gigaseg.models.baselines.FPNSegmenter``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..inference.interface import WholeImagePredictor
from ..inference.patches import stitch_block
from ..inference.upsample import upsample_window
from ..models.losses import FocalLoss
from ..tiling import PatchGrid
from ..train.budget import inference_estimate, plan_sub_batch, runtime_bytes
from ..train.recipe import Stage, StepContext
from ..train.views import GlobalViews, RandomCrops


def segmentation_loss(name: str, ignore_index: int = 255):
    if name == "focal":
        return FocalLoss(gamma=3, ignore_index=ignore_index)
    if name == "ce":
        return torch.nn.CrossEntropyLoss(ignore_index=ignore_index)
    raise ValueError(f"unknown loss {name!r}; use 'focal' or 'ce'")


def supervised_step(ctx: StepContext, batch: dict) -> dict[str, float]:
    """Forward the stage's views in sub-batches of ``ctx.sub_batch``, one backward each.

    Each sub-batch's mean loss is weighted by its share of the batch, so the summed
    gradients equal the whole batch's (BatchNorm aside, whose statistics are per sub-batch).
    """
    loss_fn = segmentation_loss(ctx.model.options.get("loss", "focal"))
    images, labels = batch["image"], batch["label"]
    total = images.shape[0]
    logged = 0.0
    for start in range(0, total, ctx.sub_batch):
        part = slice(start, start + ctx.sub_batch)
        loss = loss_fn(ctx.wrapped(images[part]), labels[part]) * (images[part].shape[0] / total)
        ctx.backward(loss)
        logged += float(loss.detach())
    return {"loss": logged}


def global_stages(model) -> list[Stage]:
    """GLNet's global-branch schedule (Adam 5e-5, 120 epochs, batch 6) on whole-image views."""
    size = model.options["input_size"]
    return [Stage(
        name="global", epochs=120, lr=5e-5, batch_size=6, weight_decay=5e-4,
        make_data=lambda data, norm, settings: GlobalViews(data, norm, (size, size), seed=settings.seed),
        step=supervised_step,
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, size, size),),
    )]


def patch_stages(model) -> list[Stage]:
    """GLNet's local-branch schedule (Adam 2e-5, 50 epochs, batch 6) on full-resolution random crops."""
    patch = model.options["patch_size"]
    return [Stage(
        name="patch", epochs=50, lr=2e-5, batch_size=6, weight_decay=5e-4,
        make_data=lambda data, norm, settings: RandomCrops(data, norm, crop=patch,
                                                           crops_per_image=model.options["crops_per_image"],
                                                           seed=settings.seed),
        step=supervised_step,
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, patch, patch),),
    )]


class GlobalPredictor(WholeImagePredictor):
    """Segment the thumbnail once; every block is an exact crop of its bilinear upsampling."""

    def prepare(self, source):
        size = self.model.options["input_size"]
        view = source.read(out_size=(size, size), resample="area")
        with torch.inference_mode(), self.autocast():
            logits = self.model(self.to_tensor(view))
        return torch.softmax(logits.float(), dim=1)

    def predict_block(self, source, context, window):
        with torch.inference_mode():
            probs = upsample_window(context, (source.height, source.width), window)
        return probs[0].cpu().numpy()


class PatchPredictor(WholeImagePredictor):
    """Sliding windows over the whole image, blended with gaussian weights, predicted per block."""

    @property
    def patch_size(self) -> int:
        return self.model.options["patch_size"]

    @property
    def stride(self) -> int:
        return max(1, self.patch_size - self.model.options["overlap"])

    def prepare(self, source):
        grid = PatchGrid.sliding(source.height, source.width, self.patch_size, self.stride)
        return {"grid": grid, "cache": {}}

    def predict_block(self, source, context, window):
        def logits(batch, _windows):
            with torch.inference_mode(), self.autocast():
                return self.model(batch)

        with torch.inference_mode():
            return stitch_block(source, context["grid"], window, logits, self.to_tensor, self.num_classes,
                                (self.patch_size, self.patch_size), self.sub_batch, self.model.options["blend"],
                                cache=context["cache"])


def inference_sub_batch(model, patch: int, device, max_memory: int | None, default: int = 4,
                        block_size: int | None = None) -> int:
    """Patches per forward pass that fit ``max_memory`` (``default`` without a budget).

    The budget also holds one block's working buffers (class probabilities, their
    blending sums, the block's pixels with a patch of margin): see ``block_bytes``.
    """
    sample = (torch.zeros(1, model.in_channels, patch, patch),)
    extra = block_bytes(block_size, patch, model.num_classes, model.in_channels) if block_size else 0
    estimate = inference_estimate(model, sample, runtime=runtime_bytes(device), extra=extra)
    return plan_sub_batch(max_memory, estimate, f"{model.method_name} prediction with {patch}-px patches",
                          default=default, maximum=32)


def block_bytes(block: int, patch: int, num_classes: int, channels: int) -> int:
    """Working memory of one streamed block: probabilities (accumulated, normalised, argmax copy),
    blending weights, and the block's float pixels with a patch of margin on each side."""
    probs = 3 * num_classes * block * block * 4
    pixels = channels * (block + 2 * patch) ** 2 * (4 + 1)  # float32 tensor + the decoded uint8 read
    return probs + block * block * 4 + pixels
