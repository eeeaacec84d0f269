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

What resolution the branches really yield: the finest features of the cascade are sub1's
and the last CFF's, at 1/8 of the input (sub1's three stride-2 convs; its first conv makes
a 1/2 map on the way). The 1/4 logits are a 1x1 classifier on those 1/8 features upsampled
x2, which equals the 1/8 logits upsampled x2 (a 1x1 convolution commutes with bilinear
interpolation, whose weights sum to 1; a test checks it): the paper's output carries 1/8
detail, upsampled x8 in all at inference. A structure narrower than a few 1/8 cells (a 2-px
road is a quarter of one) cannot be drawn.

Output stride (option ``output_stride``):

- 4 (the default): the paper's network, unchanged (the same modules, state dict and outputs).
  ``forward`` in training mode returns :class:`CascadeOutputs` ``(x16, x8, x4)`` — the logits
  at 1/16, 1/8 and 1/4, matched with ``loss_weights`` 0.16, 0.4, 1.0; in eval mode it
  returns the 1/4 logits upsampled bilinearly to the input size (what ``predict``, the
  whole-image predictor and the ONNX export use).
- 1 (or 2): ``head``, the shared :class:`gigaseg.nn.decoders.FullResolutionHead`, on the
  final fused 1/4 features (the last CFF's output upsampled x2, what the 1/4 classifier
  reads), with the full-resolution branch's stride-2 map (sub1's first conv) as its skip and
  the pixels: logits at the input's size (at 1/2 for 2). The encoder's own stride-2 level
  (``Encoder(stride2=True)``) is not used: the encoder runs on the 1/2 image, so that level
  lies at 1/4 of the input; sub1's first map is the only stride-2 map of the input the
  network computes. In training mode ``forward`` returns :class:`HeadCascadeOutputs`
  ``(x16, x8, x4, head)``: the cascade's three outputs, still supervised (the 1/4 classifier
  is kept for that, and run only in training), and the head's logits. Eval mode: the head's
  logits at the input's size. The head adds ``C*w + 9*(w + k2)*w + 9*k*s + 9*(w + s)*f + f*K
  + K`` weights and ``2*(2*w + s + f)`` BatchNorm parameters (``C`` the CFF width, ``k2``
  sub1's first width, ``k`` the bands, ``K`` the classes, ``w = 32``, ``f = s = 16``): about
  30 thousand on the published network (6.7 million).

``decode(x)`` gives the logits at 1/``output_stride`` (the ``output_stride`` attribute) in
either mode.

Cascade label guidance (``gigaseg.methods.icnet.recipe``): ``loss_weights`` holds the
paper's three weights (0.16, 0.4, 1.0 for 1/16, 1/8, 1/4) at every output stride. At 1 and
2 the head's output adds a fourth term, cross-entropy against the labels at its own size
(the crop's labels themselves at 1), weighted by a fourth ``loss_weights`` entry, 1.0 when
not given: the head's output is the prediction, so it gets the main output's weight, and
the cascade stays supervised exactly as in the paper (the head reads the same fused
features the 1/4 classifier reads).

Rare classes: the option ``loss`` (``gigaseg.nn.losses.LOSSES``; ``"ce"``, the paper's, by
default) is the loss of every term of the cascade label guidance, with the same weights and
the labels nearest-downsampled to each output as before; ``crop_sampling="balanced"`` (with
``sampling_temperature``) places the training crops class-balanced
(``gigaseg.methods.icnet.recipe.ScaledCrops``). Checkpoints written before these options load
with their defaults (``"ce"``, ``"uniform"``, 0).

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
faithful backbone, the light branch, the 256-channel reduction and the CFF's 128 (not the
full-resolution head's): tests use 0.25. Training views and loss live in
``gigaseg.methods.icnet.recipe``, the predictor in ``gigaseg.methods.icnet.predictor``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ...data.statistics import CROP_SAMPLINGS
from ...errors import ConfigError
from ...nn.base import SegmentationModel
from ...nn.decoders import FullResolutionHead, add_coarse_logits
from ...nn.encoders import PretrainedSpec
from ...nn.losses import LOSSES
from ...nn.segmenters import OUTPUT_STRIDES
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
    "HeadCascadeOutputs",
    "CascadeFeatureFusion",
    "PyramidPoolingSum",
    "ICNetResNet50Half",
    "TimmCascade",
    "PSPNet",
    "half_size",
]

#: the loss weights of the 1/16, 1/8 and 1/4 outputs (cascade label guidance)
LOSS_WEIGHTS = (0.16, 0.4, 1.0)
#: the loss weight of the full-resolution head's output (output_stride 1 or 2) when ``loss_weights`` has three
HEAD_LOSS_WEIGHT = 1.0


class CascadeOutputs(NamedTuple):
    """ICNet's training outputs: logits at 1/16, 1/8 and 1/4 of the input."""

    x16: torch.Tensor
    x8: torch.Tensor
    x4: torch.Tensor


class HeadCascadeOutputs(NamedTuple):
    """ICNet's training outputs with the full-resolution head: the cascade's three and the head's logits.

    ``head`` is at 1/``output_stride`` of the input: its size for output stride 1.
    """

    x16: torch.Tensor
    x8: torch.Tensor
    x4: torch.Tensor
    head: torch.Tensor


class _Cascade(NamedTuple):
    """One pass's logits; those a mode does not need are None."""

    logits4: torch.Tensor | None
    aux8: torch.Tensor | None
    aux16: torch.Tensor | None
    head: torch.Tensor | None


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
        **options: ``width``, ``output_stride`` (4, 2 or 1), ``loss_weights`` (1/16, 1/8,
            1/4, and optionally the head's at output stride 1 or 2), ``loss`` (every term's,
            ``gigaseg.nn.losses.LOSSES``), the training views' ``crop_size``, ``scale_min``,
            ``scale_max``, ``crops_per_image``, ``crop_sampling`` (``"uniform"`` or
            ``"balanced"``), ``sampling_temperature`` (0 to 1), the predictor's
            ``tile_size``, ``tile_overlap``, ``blend``, and ``coarse_logits`` (with output stride
            1 or 2, the head's logits plus the paper's 1/4 classifier's, upsampled: the
            cascade's semantics reach the output directly and the head adds the detail; False,
            the default and what checkpoints written before the option load as: the head alone).

    Raises:
        ConfigError: an unknown option or one out of range, an unusable encoder, or an
            unreadable weights file.
    """

    default_encoder: ClassVar[str] = "icnet_resnet50_half"
    default_options: dict[str, Any] = {
        "width": 1.0,
        "output_stride": 4,
        "loss_weights": list(LOSS_WEIGHTS),
        "loss": "ce",
        "crop_size": 768,
        "scale_min": 0.5,
        "scale_max": 2.0,
        "crops_per_image": 1,
        "crop_sampling": "uniform",
        "sampling_temperature": 0.0,
        "tile_size": [1024, 2048],
        "tile_overlap": 128,
        "blend": "gaussian",
        "coarse_logits": False,
    }
    option_choices = {
        "blend": ("gaussian", "uniform"),
        "output_stride": OUTPUT_STRIDES,
        "loss": LOSSES,
        "crop_sampling": CROP_SAMPLINGS,
    }
    inference_options = ("tile_size", "tile_overlap", "blend")

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
        stride = self.options["output_stride"]
        #: the full-resolution head (output_stride 1 or 2), else None (the paper's 1/4 classifier)
        self.head: FullResolutionHead | None = None
        if stride < 4:
            self.head = FullResolutionHead(
                c_cff,
                num_classes,
                image_channels=in_channels,
                skip_channels=self.sub1[0][0].out_channels,
                output_stride=stride,
            )
        #: input pixels per pixel of ``decode``'s logits (the option ``output_stride``)
        self.output_stride: int = stride

    def check_options(self) -> None:
        """Check ``width``, ``loss_weights`` (three, or four with the head), ``sampling_temperature`` and PSPNet's."""
        self._require_positive("width")
        self._require_sampling_temperature()
        weights = self.options["loss_weights"]
        head = self.options["output_stride"] < 4
        if (
            not isinstance(weights, list)
            or len(weights) not in ((3, 4) if head else (3,))
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
        ):
            raise ConfigError(
                f"icnet: option loss_weights must be three non-negative numbers (1/16, 1/8, 1/4), or four at "
                f"output_stride 1 or 2 (the fourth for the full-resolution head), got {weights!r} at output_stride "
                f"{self.options['output_stride']}"
            )
        check_common_options(self)

    @property
    def cascade_loss_weights(self) -> tuple[float, ...]:
        """The weights of the training outputs' cross-entropies, in their order.

        Returns:
            ``loss_weights`` (1/16, 1/8, 1/4), and with the head its weight (the fourth
            ``loss_weights`` entry, :data:`HEAD_LOSS_WEIGHT` when there are three).
        """
        weights = tuple(float(w) for w in self.options["loss_weights"])
        if self.head is None:
            return weights
        return weights if len(weights) == 4 else (*weights, HEAD_LOSS_WEIGHT)

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The names of the training outputs' loss terms, in their order.

        Returns:
            ``("loss_16", "loss_8", "loss_4")``, and with the head ``loss_1`` (or ``loss_2``).
        """
        names = ("loss_16", "loss_8", "loss_4")
        return names if self.head is None else (*names, f"loss_{self.output_stride}")

    def _cascade(self, x: torch.Tensor) -> _Cascade:
        sub2, sub4 = self.backbone(upsample_to(x, half_size(x)))
        sub4 = self.reduce(self.pyramid(sub4))
        if self.head is None:
            skip, sub1 = None, self.sub1(x)
        else:
            skip = self.sub1[0](x)  # the full-resolution branch's stride-2 map: the head's skip
            sub1 = self.sub1[1:](skip)
        fused16, aux16 = self.cff_sub24(sub4, sub2)
        del sub2, sub4
        fused8, aux8 = self.cff_sub12(fused16, sub1)
        del fused16, sub1
        h, w = fused8.shape[-2:]
        features4 = upsample_to(fused8, (2 * h, 2 * w))
        del fused8
        # with the head the 1/4 classifier feeds the cascade loss (training), and the head's logits
        # with coarse_logits
        coarse = self.head is not None and self.options["coarse_logits"]
        logits4 = self.classifier(features4) if self.head is None or self.training or coarse else None
        head = self.head(features4, x, skip) if self.head is not None else None
        if coarse:
            head = add_coarse_logits(head, logits4)
        return _Cascade(logits4, aux8, aux16, head)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at 1/``output_stride`` of the input (the auxiliary heads run only in training mode).

        Args:
            x: normalised images ``(N, C_in, H, W)``.

        Returns:
            Logits ``(N, num_classes, h, w)``: about ``H/4 x W/4`` for output stride 4 (the
            paper's), ``H x W`` for 1, ``ceil(H/2) x ceil(W/2)`` for 2.
        """
        out = self._cascade(x)
        return out.logits4 if self.head is None else out.head

    def forward(self, x: torch.Tensor):
        """ICNet's outputs (see the module docstring).

        Args:
            x: normalised images ``(N, C_in, H, W)``.

        Returns:
            Training mode: :class:`CascadeOutputs` (logits at 1/16, 1/8, 1/4), or with the
            head :class:`HeadCascadeOutputs` (those and the head's logits). Eval mode: logits
            ``(N, num_classes, H, W)``.
        """
        out = self._cascade(x)
        if self.training:
            if self.head is None:
                return CascadeOutputs(out.aux16, out.aux8, out.logits4)
            return HeadCascadeOutputs(out.aux16, out.aux8, out.logits4, out.head)
        return upsample_to(out.logits4 if self.head is None else out.head, x.shape[-2:])
