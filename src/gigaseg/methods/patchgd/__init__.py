"""PatchGD / "Resource Efficient Perception": patch-based training with a global patch, for
classification (``patchgd_classifier``, with the ``downsampled_classifier`` baseline) and
segmentation (``patchgd_segmenter``), and detection (``patchgd_detector``)."""

from ..registry import register
from .detector import PatchGDDetector
from .model import DownsampledClassifier, PatchGDClassifier, PatchGDSegmenter
from .predictor import (
    downsampled_classifier_predictor,
    patchgd_classifier_predictor,
    patchgd_detector_predictor,
    patchgd_segmenter_predictor,
)
from .recipe import classifier_stages, detector_stages, downsampled_stages, segmenter_stages

__all__ = ["DownsampledClassifier", "PatchGDClassifier", "PatchGDDetector", "PatchGDSegmenter"]

register(
    "patchgd_classifier", model=PatchGDClassifier, recipe=classifier_stages, predictor=patchgd_classifier_predictor
)
register(
    "downsampled_classifier",
    model=DownsampledClassifier,
    recipe=downsampled_stages,
    predictor=downsampled_classifier_predictor,
)
register("patchgd_segmenter", model=PatchGDSegmenter, recipe=segmenter_stages, predictor=patchgd_segmenter_predictor)
register("patchgd_detector", model=PatchGDDetector, recipe=detector_stages, predictor=patchgd_detector_predictor)
