"""ICNet: image cascade network for real-time segmentation (Zhao et al., ECCV 2018).

Three branches on three resolutions of the input, fused coarse to fine:

- **sub4 / sub2** share one half-width PSPNet-50 (``encoder="icnet_resnet50_half"``, see
  ``gigaseg.methods.icnet.pspnet.DilatedResNet50`` with ``base=32``). The 1/2 image runs the stem
  (3x3 s2 32 -> 3x3 32 -> 3x3 64, max-pool 3x3 s2), ``conv2_x`` (3 bottlenecks, 128) and
  ``conv3_1`` (bottleneck, stride 2, 256): that map, at 1/16 of the input, is the sub2
  feature. It is then downsampled x0.5 (bilinear, to 1/32) and continues through
  ``conv3_2..3_4`` (256), ``conv4_x`` (6 blocks, 512, dilation 2) and ``conv5_x`` (3 blocks,
  1024, dilation 4); a pyramid pooling that SUMS the input with its average pools to bins
  1, 2, 3, 6 (each upsampled back, no per-bin convolution) and a 1x1 conv 1024 -> 256 + BN
  + ReLU give the sub4 feature at 1/32.
- **sub1**: the full image through three 3x3 stride-2 convs (32, 32, 64) + BN + ReLU: 1/8.
- **CFF** (cascade feature fusion, :class:`CascadeFeatureFusion`) of a low-resolution F1
  and a 2x finer F2: bilinear x2 upsampling of F1, 3x3 conv with dilation 2 -> 128 + BN
  (no ReLU); F2 -> 1x1 conv -> 128 + BN (no ReLU); sum, then ReLU. CFF(sub4, sub2) gives
  1/16, CFF(that, sub1) gives 1/8; the head upsamples x2 and applies a 1x1 classifier:
  logits at 1/4 of the input.
- Auxiliary 1x1 classifiers on each CFF's upsampled F1 (1/16 and 1/8) exist only for the
  cascade label guidance loss: in eval mode they are not run (and not exported).

``forward`` in training mode returns :class:`CascadeOutputs` ``(x16, x8, x4)`` — the logits
at 1/16, 1/8 and 1/4, matched with the loss weights 0.16, 0.4, 1.0; in eval mode it returns
the 1/4 logits upsampled bilinearly to the input size (what ``predict``, the whole-image
predictor and the ONNX export use). ``decode(x)`` gives the 1/4 logits in either mode.

Encoders: ``"icnet_resnet50_half"`` (default) is the faithful backbone above. Any other
name is a timm encoder (``gigaseg.nn.encoders.Encoder``) built with ``output_stride=8``
(dilated last stages, as the paper's); channel counts come from timm's ``feature_info``.
The sub2 feature is the first feature level at stride 8 of the 1/2 image (for a ResNet:
``layer2``, i.e. all of conv3_x, since timm splits only between stages); the sub4 branch
continues from it, downsampled x0.5, through the remaining stages (``layer3``, ``layer4``),
so the computation is shared as in the paper. timm models that cannot be run stage by
stage (not a ``FeatureDictNet``, or NHWC features) run twice instead: on the 1/2 image for
sub2 and on the 1/4 image for sub4 (same resolutions, no sharing).

``width`` (default 1.0 = the published network) scales every channel count of the
faithful backbone, the light branch, the 256-channel reduction and the CFF's 128: tests
use 0.25. Training views and loss live in ``gigaseg.methods.icnet.recipe``, the predictor in
``gigaseg.methods.icnet.predictor``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ...errors import ConfigError
from ...nn.base import SegmentationModel
from ...nn.encoders import PretrainedSpec
from .pspnet import (
    PYRAMID_BINS,
    ConvBN,
    DilatedResNet50,
    PSPNet,
    _timm_encoder,
    adaptive_avg_pool,
    check_common_options,
    load_backbone_weights,
    scaled,
    upsample_to,
)

__all__ = [
    "ICNet",
    "CascadeOutputs",
    "CascadeFeatureFusion",
    "PyramidPoolingSum",
    "ICNetResNet50Half",
    "TimmCascade",
    "PSPNet",
    "half_size",
]

#: the loss weights of the 1/16, 1/8 and 1/4 outputs (cascade label guidance)
LOSS_WEIGHTS = (0.16, 0.4, 1.0)


class CascadeOutputs(NamedTuple):
    """ICNet's training outputs: logits at 1/16, 1/8 and 1/4 of the input."""

    x16: torch.Tensor
    x8: torch.Tensor
    x4: torch.Tensor


def half_size(x: torch.Tensor) -> tuple[int, int]:
    """Side lengths of a x0.5 resize of ``x`` (rounded up).

    Args:
        x: a tensor whose last two dimensions are ``(h, w)``.

    Returns:
        ``(ceil(h / 2), ceil(w / 2))``.
    """
    h, w = x.shape[-2:]
    return (h + 1) // 2, (w + 1) // 2


class PyramidPoolingSum(nn.Module):
    """ICNet's pyramid pooling: ``x + sum_b up(avgpool_b(x))`` with no per-bin convolution (no parameters).

    Args:
        bins: output sides of the adaptive average pools (1, 2, 3, 6).
    """

    def __init__(self, bins=PYRAMID_BINS):
        super().__init__()
        self.bins = tuple(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input plus its pooled maps, each upsampled bilinearly back to its size.

        Args:
            x: features ``(N, C, h, w)``.

        Returns:
            ``(N, C, h, w)``.
        """
        size = x.shape[-2:]
        out = x
        for b in self.bins:
            out = out + upsample_to(adaptive_avg_pool(x, b), size)
        return out

    def extra_repr(self) -> str:
        """The pooling bins."""
        return f"bins={self.bins}"


class CascadeFeatureFusion(nn.Module):
    """CFF: ``relu(BN(dilated3x3(up2(F1))) + BN(1x1(F2)))``; no ReLU on either branch before the sum.

    ``forward(f1, f2)`` returns ``(fused, aux_logits)``; ``aux_logits`` (the 1x1 auxiliary
    classifier on the upsampled F1) is computed in training mode only, else ``None``.

    Args:
        low_channels: channels of F1, the low-resolution input.
        high_channels: channels of F2, the 2x finer input.
        out_channels: channels of the fused output (128 in the paper).
        num_classes: classes of the auxiliary classifier.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, num_classes: int):
        super().__init__()
        self.low = ConvBN(low_channels, out_channels, 3, dilation=2, relu=False)
        self.high = ConvBN(high_channels, out_channels, 1, relu=False)
        self.relu = nn.ReLU()
        self.aux = nn.Conv2d(low_channels, num_classes, 1)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fuse F1 upsampled to F2's size with F2.

        Args:
            f1: low-resolution features ``(N, low_channels, h, w)``.
            f2: finer features ``(N, high_channels, 2h, 2w)``.

        Returns:
            ``(fused, aux_logits)``: ``(N, out_channels, 2h, 2w)`` and, in training mode,
            ``(N, num_classes, 2h, 2w)`` (else None).
        """
        up = upsample_to(f1, f2.shape[-2:])  # exactly x2 in the faithful network
        fused = self.relu(self.low(up) + self.high(f2))
        return fused, (self.aux(up) if self.training else None)


class ICNetResNet50Half(DilatedResNet50):
    """The half-width dilated PSPNet-50 run as ICNet's shared sub2/sub4 cascade.

    Args:
        width: scales every channel count (1.0: the published network, stem 32).
        in_channels: input channels.
    """

    def __init__(self, width: float = 1.0, in_channels: int = 3):
        super().__init__(scaled(32, width), in_channels)
        self.sub2_channels = self.out_channels[1]
        self.sub4_channels = self.out_channels[3]

    def forward(self, x_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sub2 and sub4 features of the half-resolution image.

        Args:
            x_half: the input resized to half its size, ``(N, C_in, H/2, W/2)``.

        Returns:
            ``(sub2, sub4)``: conv3_1 at 1/16 and conv5_3 at 1/32 of the full input.
        """
        sub2 = self.layer2[0](self.layer1(self.stem(x_half)))
        x = upsample_to(sub2, half_size(sub2))
        sub4 = self.layer4(self.layer3(self.layer2[1:](x)))
        return sub2, sub4


class TimmCascade(nn.Module):
    """A timm encoder (dilated to output stride 8) split after its first stride-8 stage; see the module docstring.

    Args:
        name: the timm model name.
        in_channels: input channels.
        pretrained: the encoder's weights: False/None random, True timm's, or a local weights file.

    Raises:
        ConfigError: the encoder cannot be built with output stride 8, or has no feature
            level at stride 8.
    """

    def __init__(self, name: str, in_channels: int = 3, pretrained: PretrainedSpec = False):
        super().__init__()
        self.encoder = _timm_encoder(name, in_channels, pretrained)
        reductions = self.encoder.reductions
        if max(reductions) < 8:
            raise ConfigError(f"encoder {name!r} has no feature level at stride 8 for ICNet's sub2 branch")
        self.split = next(i for i, r in enumerate(reductions) if r >= 8)
        self.sub2_channels = self.encoder.out_channels[self.split]
        self.sub4_channels = self.encoder.out_channels[-1]
        from timm.models._features import FeatureDictNet

        features = self.encoder.model
        self.shared = isinstance(features, FeatureDictNet) and not self.encoder._channels_last_output
        if self.shared:
            layers = list(features.return_layers)  # module names, in the order of the returned levels
            names = list(features.keys())
            cut = names.index(layers[self.split]) + 1
            self._head = names[:cut]
            self._tail = names[cut : names.index(layers[-1]) + 1]

    def forward(self, x_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sub2 and sub4 features of the half-resolution image.

        Args:
            x_half: the input resized to half its size, ``(N, C_in, H/2, W/2)``.

        Returns:
            ``(sub2, sub4)``: the first stride-8 level (1/16 of the full input) and the
            last level (1/32).
        """
        if not self.shared:
            sub2 = self.encoder(x_half)[self.split]
            return sub2, self.encoder(upsample_to(x_half, half_size(x_half)))[-1]
        modules = self.encoder.model
        x = x_half
        for name in self._head:
            x = modules[name](x)
        sub2 = x
        x = upsample_to(sub2, half_size(sub2))
        for name in self._tail:
            x = modules[name](x)
        return sub2, x


class ICNet(SegmentationModel):
    """ICNet; see the module docstring. ``create_model("icnet", encoder="icnet_resnet50_half", num_classes=19)``.

    Args:
        encoder: ``"icnet_resnet50_half"`` (the paper's backbone) or a timm encoder name.
        num_classes: class count.
        in_channels: input channels.
        pretrained: for ``"icnet_resnet50_half"`` False/None or a local file holding the
            backbone's state dict; for a timm encoder also True (timm's weights).
        **options: ``width``, ``loss_weights`` (1/16, 1/8, 1/4), the training views'
            ``crop_size``, ``scale_min``, ``scale_max``, ``crops_per_image``, and the
            predictor's ``tile_size``, ``tile_overlap``, ``blend``.

    Raises:
        ConfigError: an unknown option or one out of range, an unusable encoder, or an
            unreadable weights file.
    """

    default_encoder: ClassVar[str] = "icnet_resnet50_half"
    default_options: dict[str, Any] = {
        "width": 1.0,
        "loss_weights": list(LOSS_WEIGHTS),
        "crop_size": 768,
        "scale_min": 0.5,
        "scale_max": 2.0,
        "crops_per_image": 1,
        "tile_size": [1024, 2048],
        "tile_overlap": 128,
        "blend": "gaussian",
    }
    option_choices = {"blend": ("gaussian", "uniform")}
    inference_options = ("tile_size", "tile_overlap", "blend")
    #: input pixels per pixel of ``decode``'s logits
    output_stride: ClassVar[int] = 4

    def __init__(
        self,
        encoder: str = "icnet_resnet50_half",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options: Any,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        width = self.options["width"]
        if encoder == "icnet_resnet50_half":
            self.backbone: nn.Module = ICNetResNet50Half(width, in_channels)
            load_backbone_weights(self.backbone, pretrained, encoder)
        else:
            self.backbone = TimmCascade(encoder, in_channels, pretrained)
        c_sub1, c_sub4, c_cff = scaled(64, width), scaled(256, width), scaled(128, width)
        self.pyramid = PyramidPoolingSum()
        self.reduce = ConvBN(self.backbone.sub4_channels, c_sub4, 1)
        self.sub1 = nn.Sequential(
            ConvBN(in_channels, scaled(32, width), 3, stride=2),
            ConvBN(scaled(32, width), scaled(32, width), 3, stride=2),
            ConvBN(scaled(32, width), c_sub1, 3, stride=2),
        )
        self.cff_sub24 = CascadeFeatureFusion(c_sub4, self.backbone.sub2_channels, c_cff, num_classes)
        self.cff_sub12 = CascadeFeatureFusion(c_cff, c_sub1, c_cff, num_classes)
        self.classifier = nn.Conv2d(c_cff, num_classes, 1)

    def check_options(self) -> None:
        """Check ``width``, the three ``loss_weights`` and the options shared with PSPNet."""
        self._require_positive("width")
        weights = self.options["loss_weights"]
        if (
            not isinstance(weights, list)
            or len(weights) != 3
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
        ):
            raise ConfigError(
                f"icnet: option loss_weights must be three non-negative numbers (1/16, 1/8, 1/4), got {weights!r}"
            )
        check_common_options(self)

    def _cascade(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        sub2, sub4 = self.backbone(upsample_to(x, half_size(x)))
        sub4 = self.reduce(self.pyramid(sub4))
        sub1 = self.sub1(x)
        fused16, aux16 = self.cff_sub24(sub4, sub2)
        fused8, aux8 = self.cff_sub12(fused16, sub1)
        h, w = fused8.shape[-2:]
        logits4 = self.classifier(upsample_to(fused8, (2 * h, 2 * w)))
        return logits4, aux8, aux16

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at 1/4 of the input (the auxiliary heads run only in training mode).

        Args:
            x: normalised images ``(N, C_in, H, W)``.

        Returns:
            Logits ``(N, num_classes, h, w)``, about ``H/4 x W/4``.
        """
        return self._cascade(x)[0]

    def forward(self, x: torch.Tensor):
        """ICNet's outputs (see the module docstring).

        Args:
            x: normalised images ``(N, C_in, H, W)``.

        Returns:
            Training mode: :class:`CascadeOutputs` (logits at 1/16, 1/8, 1/4). Eval mode:
            logits ``(N, num_classes, H, W)``.
        """
        logits4, aux8, aux16 = self._cascade(x)
        if self.training:
            return CascadeOutputs(aux16, aux8, logits4)
        return upsample_to(logits4, x.shape[-2:])
