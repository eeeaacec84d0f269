"""Encoder-decoder segmentation networks that several methods build on.

:class:`FPNSegmenter` is a timm encoder with a segmentation decoder, chosen by its
``decoder`` option:

- ``"fpn"`` (default): GLNet's FPN (``gigaseg.nn.fpn``). Its ``output_stride`` option says
  where the logits are made: 4 (the default, the papers' head: the FPN's classifier at 1/4 of
  the input, kept for reproducing them), 2 or 1 (a
  :class:`~gigaseg.nn.decoders.FullResolutionHead` on the FPN's ps3 with the encoder's
  stride-2 map and the pixels: logits at 1/2 or full resolution, which thin structures such
  as 2-px roads need). With those strides ``coarse_logits=True`` keeps the FPN's own 3x3
  classifier on ps3 beside the head and adds its upsampled logits to the head's, so the
  classes that the 1/4 features already separate do not depend on the head's narrow fine
  stages alone (no effect at 4);
- ``"smp_unet"`` / ``"smp_fpn"``: segmentation_models_pytorch's U-Net / FPN on the same timm
  encoder (``encoder_name="tu-<timm name>"``), logits at full resolution: ``output_stride``
  is 1 for them (the value they take when it is not given; 2 and 4 are refused). smp's FPN
  needs sides divisible by the encoder's output stride (32), so the network's input side
  must be a multiple of it (e.g. 512).

``forward(x)`` returns logits at the input's resolution (bilinear from the decoder's
resolution); ``decode(x)`` returns them at the decoder's own resolution (1/``output_stride``,
the ``output_stride`` attribute), for losses computed there. The ``global`` and ``patch``
baselines are FPNSegmenters, and so is MagNet's backbone.

:func:`smp_network` builds any segmentation_models_pytorch architecture on a timm encoder,
with pretrained weights loaded through :class:`~gigaseg.nn.encoders.Encoder` (timm's or a
local file), never downloaded by smp.
"""

from __future__ import annotations

from typing import Any, ClassVar

import segmentation_models_pytorch as smp
import torch
from torch import nn

from ..errors import ConfigError
from ..geometry import resize
from .base import SegmentationModel
from .encoders import Encoder, PretrainedSpec, check_encoder_name
from .fpn import OUTPUT_STRIDES, FPNBranch

__all__ = ["DECODERS", "OUTPUT_STRIDES", "SMP_ARCHITECTURES", "FPNSegmenter", "check_decoder_options", "smp_network"]

#: the decoders of FPNSegmenter
DECODERS = ("fpn", "smp_unet", "smp_fpn")

#: segmentation_models_pytorch architectures by the names gigaseg's options use
SMP_ARCHITECTURES = {"unet": smp.Unet, "fpn": smp.FPN, "deeplabv3": smp.DeepLabV3}


def smp_network(
    arch: str, encoder: str, in_channels: int, classes: int, pretrained: PretrainedSpec, **kwargs: Any
) -> nn.Module:
    """A segmentation_models_pytorch network on timm encoder ``encoder``.

    Built with ``encoder_weights=None`` (smp downloads nothing); pretrained weights go through
    :class:`Encoder`, so ``True`` and local files behave exactly as for gigaseg's own decoders.

    Args:
        arch: a key of ``SMP_ARCHITECTURES`` ("unet", "fpn", "deeplabv3").
        encoder: a timm model name.
        in_channels: input bands.
        classes: output channels.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        **kwargs: more arguments of the smp architecture (``encoder_depth``, ``decoder_channels``).

    Returns:
        The smp network.

    Raises:
        ConfigError: an unknown encoder, or smp cannot build the architecture on it.
    """
    check_encoder_name(encoder)
    try:
        net = SMP_ARCHITECTURES[arch](
            encoder_name=f"tu-{encoder}", encoder_weights=None, in_channels=in_channels, classes=classes, **kwargs
        )
    except (ValueError, KeyError, RuntimeError, TypeError, AssertionError) as error:
        settings = "".join(f", {key}={value}" for key, value in kwargs.items())
        raise ConfigError(
            f"segmentation_models_pytorch cannot build {arch} on encoder {encoder!r}{settings} "
            f"({type(error).__name__}: {error})"
        ) from None
    if pretrained not in (False, None):
        features = net.encoder.model  # the timm features_only model inside smp's TimmUniversalEncoder
        source = Encoder(
            encoder, in_channels=in_channels, pretrained=pretrained, out_indices=features.feature_info.out_indices
        )
        features.load_state_dict(source.model.state_dict())
    return net


def check_decoder_options(name: str, decoder: str, output_stride: int, coarse_logits: bool) -> None:
    """Check that ``decoder`` can predict at ``output_stride`` and take ``coarse_logits``.

    Args:
        name: what the error messages start with (the method's name).
        decoder: one of :data:`DECODERS`.
        output_stride: the requested output stride.
        coarse_logits: whether the FPN's classifier is to be added to the full-resolution head.

    Raises:
        ConfigError: an smp decoder with an output stride other than 1, or with ``coarse_logits``.
    """
    if decoder != "fpn" and output_stride != 1:
        raise ConfigError(
            f"{name}: decoder {decoder!r} predicts at full resolution, so output_stride must be 1, got {output_stride}"
        )
    if decoder != "fpn" and coarse_logits:
        raise ConfigError(
            f"{name}: coarse_logits adds the FPN's classifier to its full-resolution head, so it needs "
            f"decoder 'fpn', got {decoder!r}"
        )


class FPNSegmenter(SegmentationModel):
    """A timm encoder with GLNet's FPN or an smp U-Net / FPN; see the module docstring.

    Args:
        encoder: a timm model name.
        num_classes: output classes.
        in_channels: input bands.
        pretrained: False, True or a local weights file for the encoder.
        **options: ``decoder``, ``fpn_channels`` (the FPN's lateral width; its smoothing
            width is half), ``output_stride`` (1, 2 or 4 with "fpn"; 1 with the smp
            decoders) and ``coarse_logits`` ("fpn" only), and a subclass's own options.

    Raises:
        ConfigError: bad options, an output stride the decoder cannot give, ``coarse_logits``
            with an smp decoder, or an input side (``size_option``) the decoder cannot take.
    """

    default_options: dict[str, Any] = {
        "decoder": "fpn",
        "fpn_channels": 256,
        "output_stride": 4,
        "coarse_logits": False,
    }
    option_choices = {"decoder": DECODERS, "output_stride": OUTPUT_STRIDES}
    #: the option holding the network's input side, checked against ``size_multiple``
    size_option: ClassVar[str | None] = None

    def __init__(
        self,
        encoder: str = "resnet50",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options: Any,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        decoder = self.options["decoder"]
        stride = self.options.get("output_stride", 4)
        coarse_logits = self.options.get("coarse_logits", False)
        check_decoder_options(self.method_name or type(self).__name__, decoder, stride, coarse_logits)
        if decoder == "fpn":
            # GLNet's FPN: 256 lateral / 128 smoothing channels; smaller widths make a light CPU decoder
            width = self.options["fpn_channels"]
            self.net: nn.Module = FPNBranch(
                encoder,
                num_classes=num_classes,
                in_channels=in_channels,
                pretrained=pretrained,
                lateral_channels=width,
                smooth_channels=max(1, width // 2),
                output_stride=stride,
                coarse_logits=coarse_logits,
            )
            #: input pixels per logit pixel of ``decode``
            self.output_stride: int = self.net.output_stride
            #: input sides must be a multiple of this
            self.size_multiple: int = 1
        else:
            self.net = smp_network(decoder.removeprefix("smp_"), encoder, in_channels, num_classes, pretrained)
            self.output_stride = 1
            divisible = getattr(self.net, "requires_divisible_input_shape", True)  # smp < 0.5 always checks
            self.size_multiple = self.net.encoder.output_stride if divisible else 1
        size = self.options.get(self.size_option) if self.size_option else None
        if size is not None and size % self.size_multiple:
            raise ConfigError(
                f"{self.method_name}: decoder {decoder!r} needs {self.size_option} to be a "
                f"multiple of {self.size_multiple}, got {size}"
            )

    @classmethod
    def _resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The smp decoders' ``output_stride`` is 1 when not given (their only value)."""
        decoder = options.get("decoder", cls.default_options.get("decoder"))
        if (
            "output_stride" in cls.default_options
            and "output_stride" not in options
            and isinstance(decoder, str)
            and decoder.startswith("smp_")
        ):
            options = {**options, "output_stride": 1}
        return super()._resolve_options(options)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the decoder's resolution.

        Args:
            x: normalised images ``(B, in_channels, H, W)``.

        Returns:
            Logits ``(B, num_classes, ~H / output_stride, ~W / output_stride)``: 1/4 of ``x``
            for "fpn" with output_stride 4 (with a ResNet), ``ceil(H / 2)`` x ``ceil(W / 2)``
            for 2, ``x``'s size for 1 and for smp.
        """
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at ``x``'s resolution (bilinear from the decoder's).

        Args:
            x: normalised images ``(B, in_channels, H, W)``.

        Returns:
            Logits ``(B, num_classes, H, W)``.
        """
        return resize(self.decode(x), x.shape[-2:])
