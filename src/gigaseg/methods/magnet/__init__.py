"""MagNet: multi-scale segmentation with progressive refinement (Huynh et al., CVPR 2021), and MagNet-Fast."""

from ..registry import register
from .model import MagNet
from .predictor import magnet_predictor
from .recipe import magnet_stages

__all__ = ["MagNet"]

register("magnet", model=MagNet, recipe=magnet_stages, predictor=magnet_predictor)
