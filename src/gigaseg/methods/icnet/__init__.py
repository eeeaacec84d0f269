"""ICNet: the image cascade network for real-time segmentation (Zhao et al., ECCV 2018), and the
PSPNet-50 the paper compares it with (``pspnet``)."""

from ..registry import register
from .model import ICNet
from .predictor import tile_predictor
from .pspnet import PSPNet
from .recipe import icnet_stages, pspnet_stages

__all__ = ["ICNet", "PSPNet"]

register("icnet", model=ICNet, recipe=icnet_stages, predictor=tile_predictor)
register("pspnet", model=PSPNet, recipe=pspnet_stages, predictor=tile_predictor)
