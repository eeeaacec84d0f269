"""FCOS, the one-stage anchor-free detector: on the whole image downsampled, or sliced into tiles
whose detections are merged (SAHI's baseline for small objects in large images).

Registered as ``fcos`` once its predictors' machinery (``gigaseg.inference.sliced``) is in place.
"""

from .model import FCOSDetector
from .recipe import fcos_stages

__all__ = ["FCOSDetector", "fcos_stages"]
