"""The two naive baselines' network: an encoder and a segmentation decoder.

``FPNSegmenter`` is registered twice, with the options of its method:

- ``"global"``: the whole image downsampled to ``input_size`` x ``input_size`` (GLNet's
  global-only baseline). Defaults follow GLNet's global stage: 120 epochs, lr 5e-5, batch 6.
- ``"patch"``: full-resolution ``patch_size`` windows; at prediction neighbouring windows
  overlap by ``overlap`` pixels (stride ``patch_size - overlap``; 120 is GLNet's overlap on a
  2448 px DeepGlobe side) and are stitched with ``blend`` weights ("gaussian" or "uniform",
  see ``gigaseg.tiling.blend_weights``). Training uses ``crops_per_image`` random crops per
  image and epoch. Defaults follow GLNet's local stage: 50 epochs, lr 2e-5, batch 6.

Both take ``loss`` ("focal": GLNet's focal loss with gamma 3, or "ce") and ``decoder``:

- ``"fpn"`` (default): GLNet's FPN (``gigaseg.models.fpn``), logits at 1/4 of the input;
- ``"smp_unet"`` / ``"smp_fpn"``: segmentation_models_pytorch's U-Net / FPN on the same timm
  encoder (``encoder_name="tu-<timm name>"``), logits at full resolution. smp's FPN needs
  sides divisible by the encoder's output stride (32), so ``input_size`` / ``patch_size``
  must be a multiple of it (e.g. 512).

``forward(x)`` returns logits at the input's resolution (bilinear from the decoder's
resolution); ``decode(x)`` returns them at the decoder's own resolution (1/``output_stride``),
for losses computed at 1/4 as in GLNet.
"""

from __future__ import annotations

from typing import Any, ClassVar

import segmentation_models_pytorch as smp
import torch
from torch import nn

from ..errors import ConfigError
from .base import SegmentationModel
from .encoders import Encoder, PretrainedSpec, check_encoder_name
from .fpn import FPNBranch, resize
from .registry import register_method

__all__ = ["FPNSegmenter", "GlobalSegmenter", "PatchSegmenter", "DECODERS"]

DECODERS = ("fpn", "smp_unet", "smp_fpn")
LOSSES = ("focal", "ce")
BLEND_MODES = ("gaussian", "uniform")

_SMP_ARCHS = {"smp_unet": smp.Unet, "smp_fpn": smp.FPN}


class FPNSegmenter(SegmentationModel):
    """A timm encoder with GLNet's FPN (or an smp U-Net / FPN); see the module docstring."""

    default_options: dict[str, Any] = {"decoder": "fpn", "fpn_channels": 256}
    option_choices = {"decoder": DECODERS}
    #: the option holding the network's input side, checked against ``size_multiple``
    size_option: ClassVar[str | None] = None

    def __init__(self, encoder: str = "resnet50", *, num_classes: int, in_channels: int = 3,
                 pretrained: PretrainedSpec = False, **options: Any):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        decoder = self.options["decoder"]
        if decoder == "fpn":
            # GLNet's FPN: 256 lateral / 128 smoothing channels; smaller widths make a light CPU decoder
            width = self.options["fpn_channels"]
            self.net: nn.Module = FPNBranch(encoder, num_classes=num_classes, in_channels=in_channels,
                                            pretrained=pretrained, lateral_channels=width,
                                            smooth_channels=max(1, width // 2))
            #: input pixels per logit pixel of ``decode``
            self.output_stride: int = self.net.output_stride
            #: input sides must be a multiple of this
            self.size_multiple: int = 1
        else:
            self.net = smp_model(decoder, encoder, num_classes, in_channels, pretrained)
            self.output_stride = 1
            divisible = getattr(self.net, "requires_divisible_input_shape", True)  # smp < 0.5 always checks
            self.size_multiple = self.net.encoder.output_stride if divisible else 1
        size = self.options.get(self.size_option) if self.size_option else None
        if size is not None and size % self.size_multiple:
            raise ConfigError(f"{self.method_name}: decoder {decoder!r} needs {self.size_option} to be a "
                              f"multiple of {self.size_multiple}, got {size}")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the decoder's resolution: 1/4 of ``x`` for "fpn", ``x``'s size for smp."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` at ``x``'s resolution."""
        return resize(self.decode(x), x.shape[-2:])


def smp_model(decoder: str, encoder: str, num_classes: int, in_channels: int,
              pretrained: PretrainedSpec) -> nn.Module:
    """segmentation_models_pytorch's U-Net or FPN on timm encoder ``encoder``.

    Built with ``encoder_weights=None`` (no download); pretrained weights go through
    :class:`Encoder`, so ``True`` and local files behave exactly as for the FPN decoder.
    """
    check_encoder_name(encoder)
    try:
        net = _SMP_ARCHS[decoder](encoder_name=f"tu-{encoder}", encoder_weights=None,
                                  in_channels=in_channels, classes=num_classes)
    except (ValueError, KeyError, RuntimeError, TypeError, AssertionError) as error:
        raise ConfigError(f"segmentation_models_pytorch cannot build {decoder} on encoder {encoder!r} "
                          f"({type(error).__name__}: {error})") from None
    if pretrained not in (False, None):
        features = net.encoder.model  # the timm features_only model inside smp's TimmUniversalEncoder
        source = Encoder(encoder, in_channels=in_channels, pretrained=pretrained,
                         out_indices=features.feature_info.out_indices)
        features.load_state_dict(source.model.state_dict())
    return net


@register_method("global")
class GlobalSegmenter(FPNSegmenter):
    """Global-only baseline: the whole image at ``input_size`` x ``input_size``."""

    default_options = {"input_size": 508, "decoder": "fpn", "fpn_channels": 256, "loss": "focal"}
    option_choices = {"decoder": DECODERS, "loss": LOSSES}
    size_option = "input_size"

    def check_options(self) -> None:
        self._require_positive("input_size", "fpn_channels")

    def training_stages(self) -> list:
        from ..methods.baselines import global_stages

        return global_stages(self)

    def whole_image_predictor(self, normalization, device="cpu", max_memory=None, precision="32"):
        from ..methods.baselines import GlobalPredictor

        return GlobalPredictor(self, normalization, device=device, precision=precision)


@register_method("patch")
class PatchSegmenter(FPNSegmenter):
    """Patch-only baseline: full-resolution ``patch_size`` windows, ``overlap`` px apart at prediction."""

    default_options = {"patch_size": 508, "overlap": 120, "blend": "gaussian", "decoder": "fpn", "fpn_channels": 256,
                       "loss": "focal", "crops_per_image": 8}
    option_choices = {"decoder": DECODERS, "loss": LOSSES, "blend": BLEND_MODES}
    inference_options = ("overlap", "blend")
    size_option = "patch_size"

    def training_stages(self) -> list:
        from ..methods.baselines import patch_stages

        return patch_stages(self)

    def whole_image_predictor(self, normalization, device="cpu", max_memory=None, precision="32"):
        from ..inference.stream import block_size_for
        from ..methods.baselines import PatchPredictor, inference_sub_batch

        sub_batch = inference_sub_batch(self, self.options["patch_size"], device, max_memory,
                                        block_size=block_size_for(max_memory))
        return PatchPredictor(self, normalization, device=device, sub_batch=sub_batch, precision=precision)

    def check_options(self) -> None:
        self._require_positive("patch_size", "crops_per_image", "fpn_channels")
        if not 0 <= self.options["overlap"] < self.options["patch_size"]:
            raise ConfigError(f"patch: option overlap must be in [0, patch_size={self.options['patch_size']}), "
                              f"got {self.options['overlap']}")
