"""FCOS, the one-stage anchor-free detector: on the whole image downsampled, or sliced into tiles
whose detections are merged (SAHI's baseline for small objects in large images)."""

from ..registry import register
from .model import FCOSDetector
from .predictor import fcos_predictor
from .recipe import fcos_stages

__all__ = ["FCOSDetector"]

register("fcos", model=FCOSDetector, recipe=fcos_stages, predictor=fcos_predictor)
