"""Whole-image prediction with bounded memory whatever the image size.

``contract`` holds the predictor contract of each task (segmentation, classification,
detection); ``stream.predict_image`` drives a segmentation predictor block by block and hands
finished row bands to the mask writer; ``stitch`` merges overlapping patches; ``planner``
turns a memory budget into sub-batch and block sizes; ``heap`` bounds the allocator;
``fingerprint`` identifies what produced a mask, so a resumed prediction never mixes two;
``fast`` is the fast path a predictor can take (folded, channels_last, compiled or ONNX Runtime
networks, the next block decoded in a background thread).
"""

from .contract import ClassificationPredictor, DetectionPredictor, Detections, Predictor, SegmentationPredictor
from .stream import PredictionResult, predict_image

__all__ = [
    "ClassificationPredictor",
    "DetectionPredictor",
    "Detections",
    "PredictionResult",
    "Predictor",
    "SegmentationPredictor",
    "predict_image",
]
