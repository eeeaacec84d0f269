"""The FCOS detector's training recipe: one stage on resized whole images or on random crops."""

from __future__ import annotations

import torch

from ...training.detection_views import RandomDetectionCrops, WholeImageDetections
from ...training.recipe import Stage, StepContext


def detection_step(ctx: StepContext, batch: dict) -> dict[str, float]:
    """Forward the batch in sub-batches of ``ctx.sub_batch`` images, one backward each.

    Each sub-batch's losses are weighted by its share of the batch (FCOS normalises each
    sub-batch's sums by its own positive points), so a batch split by a memory budget trains
    like the whole batch up to that normalisation.

    Args:
        ctx: the step's context.
        batch: ``image`` (normalised views ``(B, C, H, W)``) and ``targets`` (B dicts with
            ``boxes`` and ``labels``), as ``gigaseg.training.detection_views.collate_detections``
            makes them.

    Returns:
        ``loss`` (the total) and each named loss (``loss_classification``, ...), floats.
    """
    images, targets = batch["image"], batch["targets"]
    total = images.shape[0]
    logged: dict[str, float] = {"loss": 0.0}
    for start in range(0, total, ctx.sub_batch):
        part = slice(start, start + ctx.sub_batch)
        share = images[part].shape[0] / total
        device = images.device
        part_targets = [{k: v.to(device) for k, v in t.items()} for t in targets[part]]
        losses = ctx.wrapped(images[part], part_targets)
        loss = sum(losses.values()) * share
        ctx.backward(loss)
        logged["loss"] += float(loss.detach())
        for name, value in losses.items():
            logged[f"loss_{name}"] = logged.get(f"loss_{name}", 0.0) + float(value.detach()) * share
    return logged


def _sample_inputs(side: int):
    """One image of ``side`` x ``side`` for the memory planner (the raw heads' pass, no targets)."""
    return lambda m: (torch.zeros(1, m.in_channels, side, side),)


def fcos_stages(model) -> list[Stage]:
    """One stage, ``fcos``: AdamW 1e-4 (weight decay 1e-4), 24 epochs, batch 8, poly schedule.

    ``mode="whole"`` trains on whole images resized to ``input_size`` (longer side);
    ``mode="sliced"`` on ``crops_per_image`` random ``crop_size`` crops per image and epoch,
    half of them placed around an object, boxes cut to less than ``min_visible`` of their area
    dropped. Both flip at random.

    Args:
        model: the ``fcos`` network.

    Returns:
        The stage.
    """
    o = model.options
    whole = o["mode"] == "whole"
    side = o["input_size"] if whole else o["crop_size"]
    stage = Stage(
        name="fcos",
        epochs=24,
        lr=1e-4,
        batch_size=8,
        optimizer="adamw",
        weight_decay=1e-4,
        make_data=None,
        step=detection_step,
        sample_inputs=_sample_inputs(side),
    )

    def make_data(data, norm, settings):
        if whole:
            return WholeImageDetections(data, norm, side, seed=settings.seed)
        return RandomDetectionCrops(
            data,
            norm,
            side,
            crops_per_image=o["crops_per_image"],
            seed=settings.seed,
            min_visible=o["min_visible"],
        )

    stage.make_data = make_data
    return [stage]
