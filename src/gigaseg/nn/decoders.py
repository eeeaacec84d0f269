"""A light decoder that takes any method's 1/4-resolution features to 1/2 or full resolution.

Every FPN head of the papers (GLNet, MagNet's backbone, the baselines) predicts at 1/4 of its
input and the logits are only upsampled bilinearly afterwards, which cannot draw a structure
narrower than a few 1/4-resolution cells (a 2-px road, a cell membrane): even a perfect
1/4-resolution prediction of a 2-px line covers it with 4-px-wide blobs.
:class:`FullResolutionHead` recovers that detail the way U-Net's last stages and DeepLabV3+'s
low-level branch do, from features that still have it:

1. ``reduce``: 1x1 conv-BN-ReLU of the 1/4-resolution features (e.g. the FPN's ps3, before its
   classifier) to ``channels``. The BatchNorm also rescales the FPN's small, unnormalised maps.
2. upsample (bilinear) to the stride-2 skip's exact size, concatenate the skip, ``fuse2``:
   3x3 conv-BN-ReLU to ``channels``. The skip is the encoder's own stride-2 level when it has
   one (timm ResNets' stem activation, EfficientNets' first block:
   ``Encoder(..., stride2=True)``); otherwise (ConvNeXt, Swin, ViT) ``stem2``, a 3x3 stride-2
   conv-BN-ReLU on the pixels to ``stem_channels``, stands in.
3. ``output_stride=2``: a 1x1 classifier here: logits at the skip's size (1/2).
   ``output_stride=1``: upsample to the input's exact size, concatenate ``stem1`` (a shallow
   full-resolution stem on the pixels: 3x3 conv-BN-ReLU to ``stem_channels``), ``fuse1``: 3x3
   conv-BN-ReLU to ``fine_channels``, then the 1x1 classifier: logits at the input's size.
4. ``coarse_kernel > 0`` (optional): ``coarse``, a ``coarse_kernel`` x ``coarse_kernel`` conv
   classifier on the 1/4-resolution features themselves (a paper's own head, e.g. GLNet's 3x3
   ensemble conv), whose logits are upsampled (bilinear) and added to the classifier's. The
   features then reach the logits directly, as they do with the paper's head, and the
   full-resolution stages learn what to add to them (the detail) instead of carrying the
   features' whole meaning through ``reduce``'s ``channels``.

Every size is taken from the tensors themselves, so inputs whose sides are not multiples of
4 (or of 2) work: each upsampling goes to the next map's exact size
(:func:`gigaseg.geometry.resize`), as the FPN's top-down path does.

Parameters, with ``C`` input channels, ``K`` classes, ``k`` image bands, ``w = channels``,
``f = fine_channels``, ``s = stem_channels`` and ``k2`` the skip's channels (``k2 = s`` when
``stem2`` stands in); convolutions before a BatchNorm have no bias, and each BatchNorm has
two parameters per channel:

- reduce: ``C*w + 2*w``
- stem2 (only without an encoder skip): ``9*k*s + 2*s``
- fuse2: ``9*(w + k2)*w + 2*w``
- output_stride 2: classifier ``w*K + K``
- output_stride 1: stem1 ``9*k*s + 2*s``, fuse1 ``9*(w + s)*f + 2*f``, classifier ``f*K + K``
- coarse (only with ``coarse_kernel = q > 0``): ``q*q*C*K + K``

With the defaults (``w = 32``, ``f = s = 16``) on a ResNet-50 + GLNet FPN (``C = 512``,
``k2 = 64``, ``k = 3``) that is about 52 thousand parameters, against the FPN's 4.5 million.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..geometry import resize

__all__ = ["HEAD_OUTPUT_STRIDES", "ConvBNReLU", "FullResolutionHead", "add_coarse_logits", "init_conv"]

#: the resolutions :class:`FullResolutionHead` predicts at (input pixels per logit pixel)
HEAD_OUTPUT_STRIDES = (1, 2)


def init_conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    """A ``kernel`` x ``kernel`` convolution (same padding) initialised N(0, 0.01) with zero bias, as GLNet's.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: the kernel side (odd, for same padding).

    Returns:
        The convolution.
    """
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class ConvBNReLU(nn.Sequential):
    """A convolution without bias (same padding), BatchNorm and ReLU.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: the kernel side (odd).
        stride: the convolution's stride.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class FullResolutionHead(nn.Module):
    """Logits at 1/2 or full resolution from 1/4-resolution features; see the module docstring.

    Args:
        in_channels: channels of the 1/4-resolution features (``C``; the GLNet FPN's ps3 has
            ``4 * smooth_channels``).
        num_classes: output logits (``K``).
        image_channels: bands of the input pixels (``k``).
        skip_channels: channels of the encoder's stride-2 map (``k2``), or None when the
            encoder has none: a stride-2 conv stem on the pixels (``stem2``) stands in.
        output_stride: 1 (logits at the input's size) or 2 (at the stride-2 map's size).
        channels: width of ``reduce`` and ``fuse2`` (``w``).
        fine_channels: width of ``fuse1``, the full-resolution stage (``f``).
        stem_channels: width of the pixel stems (``s``).
        coarse_kernel: side of the ``coarse`` classifier on the 1/4-resolution features whose
            upsampled logits are added to the head's (odd); 0 (the default): none.

    Raises:
        ConfigError: an output stride other than 1 or 2, a width that is not a positive integer,
            or a ``coarse_kernel`` that is not 0 or a positive odd integer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        image_channels: int,
        skip_channels: int | None,
        output_stride: int = 1,
        channels: int = 32,
        fine_channels: int = 16,
        stem_channels: int = 16,
        coarse_kernel: int = 0,
    ):
        super().__init__()
        if output_stride not in HEAD_OUTPUT_STRIDES:
            raise ConfigError(f"the full-resolution head predicts at output_stride 1 or 2, got {output_stride!r}")
        widths = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "image_channels": image_channels,
            "channels": channels,
            "fine_channels": fine_channels,
            "stem_channels": stem_channels,
        }
        if skip_channels is not None:
            widths["skip_channels"] = skip_channels
        for name, value in widths.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"the full-resolution head's {name} must be a positive integer, got {value!r}")
        if (
            isinstance(coarse_kernel, bool)
            or not isinstance(coarse_kernel, int)
            or coarse_kernel < 0
            or (coarse_kernel > 0 and coarse_kernel % 2 == 0)
        ):
            raise ConfigError(
                f"the full-resolution head's coarse_kernel must be 0 or a positive odd integer, got {coarse_kernel!r}"
            )
        self.output_stride = output_stride
        #: the classifier on the 1/4-resolution features whose logits are added (None: none), initialised as
        #: the papers' FPN classifiers
        self.coarse = init_conv(in_channels, num_classes, coarse_kernel) if coarse_kernel else None
        self.reduce = ConvBNReLU(in_channels, channels, 1)
        #: the stride-2 stem on the pixels, built only when the encoder has no stride-2 map
        self.stem2 = ConvBNReLU(image_channels, stem_channels, 3, stride=2) if skip_channels is None else None
        self.fuse2 = ConvBNReLU(channels + (stem_channels if skip_channels is None else skip_channels), channels)
        if output_stride == 1:
            self.stem1 = ConvBNReLU(image_channels, stem_channels, 3)
            self.fuse1 = ConvBNReLU(channels + stem_channels, fine_channels)
            last = fine_channels
        else:
            self.stem1 = self.fuse1 = None
            last = channels
        self.classifier = nn.Conv2d(last, num_classes, 1)

    @property
    def uses_encoder_skip(self) -> bool:
        """Whether ``forward`` needs the encoder's stride-2 map (else its own stem makes one)."""
        return self.stem2 is None

    def forward(self, features: torch.Tensor, image: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at 1/``output_stride`` of ``image``.

        Args:
            features: the 1/4-resolution maps ``(B, in_channels, h, w)`` (any coarser size works too).
            image: the network's input pixels ``(B, image_channels, H, W)`` (normalised).
            skip: the encoder's stride-2 map ``(B, skip_channels, ~H/2, ~W/2)``; needed exactly
                when the head was built with ``skip_channels``.

        Returns:
            Logits ``(B, num_classes, H, W)`` for output stride 1, or at ``skip``'s size (the
            stride-2 stem's, ``ceil(H / 2)`` x ``ceil(W / 2)``, without an encoder skip) for 2.

        Raises:
            ValueError: ``skip`` missing for a head built with ``skip_channels``, or given to
                one built without.
        """
        if self.stem2 is None:
            if skip is None:
                raise ValueError("this head was built with skip_channels: pass the encoder's stride-2 map as skip=")
        else:
            if skip is not None:
                raise ValueError("this head was built without skip_channels (it makes its own stride-2 stem)")
            skip = self.stem2(image)
        coarse = None if self.coarse is None else self.coarse(features)
        x = self.reduce(features)
        x = self.fuse2(torch.cat([resize(x, skip.shape[-2:]), skip], dim=1))
        del skip
        if self.fuse1 is not None:
            x = self.fuse1(torch.cat([resize(x, image.shape[-2:]), self.stem1(image)], dim=1))
        logits = self.classifier(x)
        return logits if coarse is None else add_coarse_logits(logits, coarse)


def add_coarse_logits(logits: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``logits + coarse`` upsampled (bilinear) to ``logits``' size; in place without autograd.

    Args:
        logits: the full-resolution head's logits ``(B, K, H, W)``.
        coarse: the coarse classifier's logits ``(B, K, h, w)``.

    Returns:
        The sum ``(B, K, H, W)``.
    """
    up = resize(coarse, logits.shape[-2:])
    if torch.is_grad_enabled():
        return logits + up
    return logits.add_(up)
