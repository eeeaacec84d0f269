"""GLNet: collaborative global-local networks (Chen et al., CVPR 2019), on any timm encoder."""

from ..registry import register
from .model import GLNet
from .predictor import glnet_predictor
from .recipe import glnet_stages

__all__ = ["GLNet"]

register("glnet", model=GLNet, recipe=glnet_stages, predictor=glnet_predictor)
