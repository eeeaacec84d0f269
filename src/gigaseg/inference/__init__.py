"""Whole-image prediction that streams: bounded memory whatever the image size.

``WholeImagePredictor`` is the one thing a method provides; ``predict_image``
drives it block by block and hands finished row bands to the mask writer.
"""

from .interface import WholeImagePredictor
from .stream import PredictionResult, predict_image

__all__ = ["WholeImagePredictor", "PredictionResult", "predict_image"]
