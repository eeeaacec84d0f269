"""The two naive baselines every paper compares against: ``global`` (the whole image downsampled,
segmented, upsampled) and ``patch`` (full-resolution sliding windows, blended)."""

from ..registry import register
from .model import GlobalSegmenter, PatchSegmenter
from .predictor import global_predictor, patch_predictor
from .recipe import global_stages, patch_stages

__all__ = ["GlobalSegmenter", "PatchSegmenter"]

register("global", model=GlobalSegmenter, recipe=global_stages, predictor=global_predictor)
register("patch", model=PatchSegmenter, recipe=patch_stages, predictor=patch_predictor)
