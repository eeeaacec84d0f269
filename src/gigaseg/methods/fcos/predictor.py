"""The FCOS detector's whole-image predictor: the downsampled image, or overlapping tiles merged.

``mode="whole"``: ``gigaseg.inference.sliced.WholeImageDetectionPredictor`` at ``input_size``
(the image's longer side resized to it, boxes scaled back). ``mode="sliced"``:
``gigaseg.inference.sliced.SlicedDetectionPredictor`` with ``tile_size`` tiles (``crop_size``
when 0) sharing ``overlap_ratio`` of their side, the tiles' detections merged by the model's merge options
and, with ``full_image_size`` > 0, a downsampled whole-image pass merged in.

Under ``max_memory`` the tiles per forward pass are planned from the network's measured
activations (``gigaseg.budget.inference_estimate``) plus a band of tiles' pixels; the whole-image
pass must fit with one image.
"""

from __future__ import annotations

import torch

from ...budget import MemoryEstimate, inference_estimate, runtime_bytes
from ...inference.contract import DetectionPredictor
from ...inference.planner import block_size_for, plan_inference
from ...io.normalize import Normalization
from .model import FCOSDetector

__all__ = ["band_bytes", "fcos_predictor"]


def band_bytes(tile: int, width: int, channels: int) -> int:
    """Working memory of one band of tiles: ``tile`` rows of ``width`` pixels, decoded and as float32.

    Args:
        tile: the tile side (the band's height).
        width: the band's width in pixels.
        channels: the input bands.

    Returns:
        Bytes.
    """
    return channels * tile * width * (1 + 4)


def fcos_predictor(
    model: FCOSDetector,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
    default_sub_batch: int = 4,
) -> DetectionPredictor:
    """The ``fcos`` method's predictor for its ``mode``, sized by ``max_memory``.

    Args:
        model: an ``fcos`` network.
        normalization: how the images' pixels are normalised.
        device: where the network runs.
        max_memory: the budget in bytes (None: ``default_sub_batch`` tiles per pass).
        precision: "32", "bf16-mixed" or "16-mixed".
        default_sub_batch: tiles per forward pass without a budget.

    Returns:
        A ``WholeImageDetectionPredictor`` (``mode="whole"``) or ``SlicedDetectionPredictor``.

    Raises:
        BudgetError: not even one tile (or the resized image) fits ``max_memory``.
    """
    from ...inference.merge import MergeSettings
    from ...inference.sliced import SlicedDetectionPredictor, WholeImageDetectionPredictor

    o = model.options
    common = {
        "score_threshold": o["score_threshold"],
        "max_detections": o["image_max_detections"],
        "device": device,
        "precision": precision,
    }
    if o["mode"] == "whole":
        size = o["input_size"]
        sample = (torch.zeros(1, model.in_channels, size, size),)

        def whole_estimate(_block: int) -> MemoryEstimate:
            extra = band_bytes(size, size, model.in_channels)
            return inference_estimate(model, sample, runtime=runtime_bytes(device), extra=extra)

        plan_inference(max_memory, whole_estimate, f"fcos prediction at {size} px", default=1, maximum=1)
        return WholeImageDetectionPredictor(model, normalization, size=size, sub_batch=1, **common)

    tile = model.tile_size
    full = o["full_image_size"] or None
    sample = (torch.zeros(1, model.in_channels, tile, tile),)

    def estimate(block: int) -> MemoryEstimate:
        extra = band_bytes(tile, max(block, tile), model.in_channels)
        if full is not None:  # the whole-image pass's pixels
            extra += band_bytes(full, full, model.in_channels)
        return inference_estimate(model, sample, runtime=runtime_bytes(device), extra=extra)

    plan = plan_inference(max_memory, estimate, f"fcos prediction with {tile}-px tiles", default=default_sub_batch)
    merge = MergeSettings(
        method=o["merge"], metric=o["merge_metric"], threshold=o["merge_threshold"], class_agnostic=o["class_agnostic"]
    )
    predictor = SlicedDetectionPredictor(
        model,
        normalization,
        tile_size=tile,
        overlap=model.overlap,
        merge=merge,
        full_image_size=full,
        sub_batch=plan.sub_batch,
        **common,
    )
    if max_memory is not None:
        predictor.block_size = block_size_for(max_memory)
    return predictor
