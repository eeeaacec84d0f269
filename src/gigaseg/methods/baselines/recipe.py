"""The training recipes of the two naive baselines: GLNet's global-only and patch-only schedules."""

from __future__ import annotations

import torch

from ...training.recipe import Stage, StepContext, prepare_class_balance, stage_loss
from ...training.views import GlobalViews, RandomCrops


def supervised_step(ctx: StepContext, batch: dict) -> dict[str, float]:
    """Forward the stage's views in sub-batches of ``ctx.sub_batch``, one backward each.

    Each sub-batch's mean loss is weighted by its share of the batch, so the summed
    gradients equal the whole batch's (BatchNorm aside, whose statistics are per sub-batch).

    Args:
        ctx: the step's context (``ctx.sub_batch``: views per backward).
        batch: ``image`` (normalised views ``(B, C, H, W)``) and ``label`` (``(B, H, W)``).

    Returns:
        ``{"loss": the batch's loss}`` (the weighted sub-batch losses summed), a float.
    """
    loss_fn = stage_loss(ctx, ctx.model.options.get("loss", "focal"))
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
    """GLNet's global-branch schedule (Adam 5e-5, 120 epochs, batch 6) on whole-image views.

    Args:
        model: the ``global`` network (its ``input_size`` sizes the views).

    Returns:
        The one stage, ``global`` (poly schedule, weight decay 5e-4).
    """
    size = model.options["input_size"]
    stage = Stage(
        name="global",
        epochs=120,
        lr=5e-5,
        batch_size=6,
        weight_decay=5e-4,
        make_data=None,
        step=supervised_step,
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, size, size),),
    )

    def make_data(data, norm, settings):
        prepare_class_balance(stage, data, model.options["loss"])
        return GlobalViews(data, norm, (size, size), seed=settings.seed)

    stage.make_data = make_data
    return [stage]


def patch_stages(model) -> list[Stage]:
    """GLNet's local-branch schedule (Adam 2e-5, 50 epochs, batch 6) on full-resolution random crops.

    Args:
        model: the ``patch`` network (its ``patch_size`` and ``crops_per_image`` shape the crops).

    Returns:
        The one stage, ``patch`` (poly schedule, weight decay 5e-4).
    """
    patch = model.options["patch_size"]
    stage = Stage(
        name="patch",
        epochs=50,
        lr=2e-5,
        batch_size=6,
        weight_decay=5e-4,
        make_data=None,
        step=supervised_step,
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, patch, patch),),
    )

    def make_data(data, norm, settings):
        sampling = model.options["crop_sampling"]
        statistics = prepare_class_balance(stage, data, model.options["loss"], sampling)
        return RandomCrops(
            data,
            norm,
            crop=patch,
            crops_per_image=model.options["crops_per_image"],
            seed=settings.seed,
            sampling=sampling,
            temperature=model.options["sampling_temperature"],
            statistics=statistics,
        )

    stage.make_data = make_data
    return [stage]
