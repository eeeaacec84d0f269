"""PSPNet-50 (CVPR 2017) and the dilated ResNet-50 family that ICNet prunes.

``DilatedResNet50(base)`` is the PSPNet-style ResNet-50: a "deep stem" of three 3x3
convolutions (``base, base, 2*base``; the first with stride 2), a 3x3 stride-2 max-pool,
then four stages of bottlenecks (3, 4, 6, 3 blocks) with outputs ``4*base * (1, 2, 4, 8)``;
stage 2 (``conv3_x``) has stride 2 in its first block, stages 3 and 4 (``conv4_x``,
``conv5_x``) keep stride 1 with dilation 2 and 4, so the last map is at 1/8 of the input.
``base=64`` is PSPNet-50 (256 ... 2048 channels); ``base=32`` is ICNet's half-width
version (128 ... 1024). A bottleneck's stride sits on its 3x3 convolution (the
"ResNet v1.5" placement; the Caffe models put it on the first 1x1).

``PSPNet`` (registered as method ``"pspnet"``) is the reference ICNet is compared
against: that backbone at full width, the pyramid pooling module that CONCATENATES the
input with four pooled branches (bins 1, 2, 3, 6; each 1x1 conv to 512 + BN + ReLU,
upsampled), a 3x3 conv to 512 + BN + ReLU, dropout 0.1 and a 1x1 classifier at 1/8,
upsampled bilinearly to the input. A training-only auxiliary classifier on ``conv4_x``
(3x3 conv 256 + BN + ReLU, dropout 0.1, 1x1) is weighted 0.4 in the loss.

``encoder="pspnet_resnet50"`` (the default for this method) is that faithful backbone;
any other name is a timm encoder built with ``output_stride=8`` whose last feature level
feeds the pyramid and whose second-to-last feeds the auxiliary head.
``width`` scales every channel count (1.0 = the published network; smaller for tests).
PSPNet has no ``output_stride`` option: as the reference for ICNet it keeps the paper's
classifier at 1/8 (ICNet's full-resolution head is not offered here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...nn.base import SegmentationModel
from ...nn.encoders import Encoder, PretrainedSpec

__all__ = [
    "ConvBN",
    "Bottleneck",
    "DilatedResNet50",
    "PSPNet",
    "PyramidPoolingConcat",
    "adaptive_avg_pool",
    "scaled",
    "upsample_to",
    "load_backbone_weights",
]

#: the PSPNet pyramid bins
PYRAMID_BINS = (1, 2, 3, 6)
#: (blocks, stride, dilation) of conv2_x .. conv5_x
RESNET50_STAGES = ((3, 1, 1), (4, 2, 1), (6, 1, 2), (3, 1, 4))


def scaled(channels: int, width: float) -> int:
    """A channel count scaled by the ``width`` option.

    Args:
        channels: the published network's channel count.
        width: the scale factor (1.0: the published network).

    Returns:
        ``channels * width`` rounded, at least 1.
    """
    return max(1, int(round(channels * width)))


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False); a no-op when already that size.

    Args:
        x: maps ``(N, C, h, w)``.
        size: the target ``(h, w)``.

    Returns:
        ``x`` resized to ``size``, or ``x`` itself when it has that size.
    """
    if tuple(x.shape[-2:]) == tuple(int(s) for s in size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)``; under ONNX export, the same windows as two matrix products.

    The TorchScript ONNX exporter only supports adaptive pooling whose output size divides
    the input size (bins 3 and 6 on a 32x64 map do not); averaging matrices with exactly
    PyTorch's windows (start ``floor(i*n/bins)``, end ``ceil((i+1)*n/bins)``) export as MatMul.

    Args:
        x: maps ``(N, C, h, w)``.
        bins: the output side.

    Returns:
        The pooled maps ``(N, C, bins, bins)``.
    """
    if not torch.onnx.is_in_onnx_export():
        return F.adaptive_avg_pool2d(x, bins)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    rows = _pool_matrix(h, bins, x.dtype, x.device)  # (bins, h)
    cols = _pool_matrix(w, bins, x.dtype, x.device)  # (bins, w)
    return torch.matmul(torch.matmul(rows, x), cols.t())


def _pool_matrix(n: int, bins: int, dtype, device) -> torch.Tensor:
    matrix = torch.zeros(bins, n, dtype=dtype, device=device)
    for i in range(bins):
        start, end = (i * n) // bins, -((-(i + 1) * n) // bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, followed by ReLU when ``relu``.

    The padding, ``dilation * (kernel // 2)``, keeps the size at stride 1.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: the convolution's side.
        stride: the convolution's stride.
        dilation: the convolution's dilation.
        relu: whether a ReLU follows the batch norm.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1, relu: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(
                cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False
            ),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand, + shortcut (1x1 projection when shapes change), ReLU.

    Args:
        cin: input channels.
        cout: output channels; the inner width is ``cout // 4``.
        stride: stride of the 3x3 convolution (and of the projection).
        dilation: dilation of the 3x3 convolution.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        mid = max(1, cout // 4)
        self.reduce = ConvBN(cin, mid, 1)
        self.conv = ConvBN(mid, mid, 3, stride=stride, dilation=dilation)
        self.expand = ConvBN(mid, cout, 1, relu=False)
        self.shortcut = ConvBN(cin, cout, 1, stride=stride, relu=False) if (cin != cout or stride != 1) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output.

        Args:
            x: features ``(N, cin, h, w)``.

        Returns:
            ``(N, cout, h / stride, w / stride)`` (rounded up).
        """
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.expand(self.conv(self.reduce(x))) + identity)


class DilatedResNet50(nn.Module):
    """PSPNet's dilated ResNet-50 with stem width ``base`` (64: PSPNet-50, 32: ICNet's half width).

    ``forward`` returns ``(conv4_x, conv5_x)`` outputs, both at 1/8. ICNet runs the parts itself.
    ``out_channels`` lists the four stages' channels, ``4*base * (1, 2, 4, 8)``.

    Args:
        base: stem width.
        in_channels: input channels.
    """

    def __init__(self, base: int = 64, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            ConvBN(in_channels, base, 3, stride=2),
            ConvBN(base, base, 3),
            ConvBN(base, 2 * base, 3),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        cin = 2 * base
        stages = []
        for i, (blocks, stride, dilation) in enumerate(RESNET50_STAGES):
            cout = 4 * base * 2**i
            layers = [Bottleneck(cin, cout, stride=stride, dilation=dilation)]
            layers += [Bottleneck(cout, cout, dilation=dilation) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = [4 * base * 2**i for i in range(4)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last two stages' features.

        Args:
            x: images ``(N, in_channels, H, W)``.

        Returns:
            ``(conv4_x, conv5_x)``: ``16*base`` and ``32*base`` channels, both at 1/8 of ``x``.
        """
        c4 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return c4, self.layer4(c4)


class PyramidPoolingConcat(nn.Module):
    """PSPNet's pyramid pooling: concat(x, up(conv1x1(pool_b(x))) for b in bins) -> 3x3 conv + BN + ReLU.

    Args:
        cin: input channels.
        branch: channels of each pooled branch's 1x1 conv (+ BN + ReLU).
        out: channels of the 3x3 bottleneck.
        bins: output sides of the adaptive average pools.
    """

    def __init__(self, cin: int, branch: int, out: int, bins: Sequence[int] = PYRAMID_BINS):
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(ConvBN(cin, branch, 1) for _ in self.bins)
        self.bottleneck = ConvBN(cin + branch * len(self.bins), out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled context fused with the input.

        Args:
            x: features ``(N, cin, h, w)``.

        Returns:
            ``(N, out, h, w)``.
        """
        size = x.shape[-2:]
        pooled = [upsample_to(conv(adaptive_avg_pool(x, b)), size) for b, conv in zip(self.bins, self.branches)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


def tile_shape(model) -> tuple[int, int]:
    """The ``tile_size`` option as (height, width).

    Args:
        model: an ICNet or PSPNet.

    Returns:
        ``(height, width)``; an int option means a square tile.
    """
    size = model.options["tile_size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_common_options(model) -> None:
    """Checks of the options ICNet and PSPNet share (views and predictor).

    Args:
        model: an ICNet or PSPNet whose ``options`` are resolved.

    Raises:
        ConfigError: ``tile_size`` is not a positive integer or ``[height, width]``,
            ``tile_overlap`` not in ``[0, min(tile))``, ``crop_size`` or ``crops_per_image``
            not positive, or not ``0 < scale_min <= scale_max``.
    """
    name = model.method_name or type(model).__name__
    o = model.options
    size = o["tile_size"]
    valid = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    )
    if not valid:
        raise ConfigError(f"{name}: option tile_size must be a positive integer or [height, width], got {size!r}")
    th, tw = tile_shape(model)
    if not (isinstance(o["tile_overlap"], int) and 0 <= o["tile_overlap"] < min(th, tw)):
        raise ConfigError(
            f"{name}: option tile_overlap must be an integer in [0, {min(th, tw)}), got {o['tile_overlap']!r}"
        )
    for key in ("crop_size", "crops_per_image"):
        if key in o and not (isinstance(o[key], int) and o[key] > 0):
            raise ConfigError(f"{name}: option {key} must be a positive integer, got {o[key]!r}")
    if not 0 < o["scale_min"] <= o["scale_max"]:
        raise ConfigError(
            f"{name}: options scale_min and scale_max need 0 < scale_min <= scale_max, "
            f"got {o['scale_min']} and {o['scale_max']}"
        )


def load_backbone_weights(backbone: nn.Module, pretrained: PretrainedSpec, encoder: str) -> None:
    """Load a local weights file into one of gigaseg's own backbones (they have no hub weights).

    A checkpoint holding ``{"state_dict": ...}`` is unwrapped; the keys must match exactly.

    Args:
        backbone: the backbone to load into.
        pretrained: False/None (nothing to load) or the path of a file holding exactly
            ``backbone.state_dict()``.
        encoder: the encoder's name, for messages.

    Raises:
        ConfigError: ``pretrained`` is True, the file cannot be read, or it is not this
            backbone's state dict.
    """
    if pretrained in (False, None):
        return
    if pretrained is True:
        raise ConfigError(
            f"encoder {encoder!r} is gigaseg's own implementation: there are no downloadable "
            f"pretrained weights; pass a local file holding its backbone state dict"
        )
    try:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise ConfigError(f"{pretrained}: not a readable weights file ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"{pretrained}: not a state dict of {encoder!r}'s backbone ({error})") from None


class PSPNet(SegmentationModel):
    """PSPNet-50: see the module docstring. Training forward returns ``(logits_1/8, aux_1/8)``.

    Args:
        encoder: ``"pspnet_resnet50"`` (the faithful backbone) or a timm encoder name.
        num_classes: class count.
        in_channels: input channels.
        pretrained: for ``"pspnet_resnet50"`` False/None or a local file holding the
            backbone's state dict; for a timm encoder also True (timm's weights).
        **options: ``width``, ``dropout``, ``aux_weight``, the training views'
            ``crop_size``, ``scale_min``, ``scale_max``, ``crops_per_image``, and the
            predictor's ``tile_size``, ``tile_overlap``, ``blend``.

    Raises:
        ConfigError: an unknown option or one out of range, an unusable encoder, or an
            unreadable weights file.
    """

    default_encoder: ClassVar[str] = "pspnet_resnet50"
    default_options: dict[str, Any] = {
        "width": 1.0,
        "dropout": 0.1,
        "aux_weight": 0.4,
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

    def __init__(
        self,
        encoder: str = "pspnet_resnet50",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options: Any,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        width = self.options["width"]
        if encoder == "pspnet_resnet50":
            self.backbone: nn.Module = DilatedResNet50(scaled(64, width), in_channels)
            load_backbone_weights(self.backbone, pretrained, encoder)
            c4, c5 = self.backbone.out_channels[2:]
            self._timm = False
        else:
            self.backbone = _timm_encoder(encoder, in_channels, pretrained)
            c4, c5 = self.backbone.out_channels[-2:]
            self._timm = True
        self.ppm = PyramidPoolingConcat(c5, scaled(512, width), scaled(512, width))
        self.classifier = nn.Sequential(
            nn.Dropout2d(self.options["dropout"]), nn.Conv2d(scaled(512, width), num_classes, 1)
        )
        self.aux = nn.Sequential(
            ConvBN(c4, scaled(256, width), 3),
            nn.Dropout2d(self.options["dropout"]),
            nn.Conv2d(scaled(256, width), num_classes, 1),
        )

    def check_options(self) -> None:
        """Check ``width``, ``dropout`` and the options shared with ICNet."""
        self._require_positive("width")
        if not 0 <= self.options["dropout"] < 1:
            raise ConfigError(f"pspnet: option dropout must be in [0, 1), got {self.options['dropout']}")
        check_common_options(self)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's last two feature levels.

        Args:
            x: normalised images ``(N, C_in, H, W)``.

        Returns:
            ``(c4, c5)``: the auxiliary head's input and the pyramid's, both at 1/8.
        """
        if self._timm:
            feats = self.backbone(x)
            return feats[-2], feats[-1]
        return self.backbone(x)

    def forward(self, x: torch.Tensor):
        """PSPNet's logits.

        Args:
            x: normalised images ``(N, C_in, H, W)``.

        Returns:
            Training mode: ``(main, aux)`` logits at 1/8. Eval mode: the main logits upsampled
            to ``(N, num_classes, H, W)``.
        """
        c4, c5 = self.features(x)
        main = self.classifier(self.ppm(c5))
        if self.training:
            return main, self.aux(c4)
        return upsample_to(main, x.shape[-2:])


def _timm_encoder(encoder: str, in_channels: int, pretrained: PretrainedSpec, **kwargs) -> Encoder:
    """A timm encoder dilated to output stride 8 (PSPNet's and ICNet's setting)."""
    try:
        return Encoder(encoder, in_channels=in_channels, pretrained=pretrained, output_stride=8, **kwargs)
    except ConfigError as error:
        if "output_stride" in str(error):
            raise ConfigError(
                f"{error}; these networks need an encoder that timm can dilate to output "
                f"stride 8 (ResNet/ResNeXt/RegNet-style CNNs)"
            ) from None
        raise
