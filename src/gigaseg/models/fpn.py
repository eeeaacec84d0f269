"""GLNet's feature pyramid network: the neck and head of one GLNet branch.

Shared by GLNet (both branches), MagNet's DeepGlobe backbone and the baselines. As in
GLNet (methods.md, section 1), for four encoder maps c2..c5:

- no BatchNorm and no ReLU anywhere;
- laterals: 1x1 conv of each c_i to ``lateral_channels`` (256);
- top-down: p5 = lateral(c5); p_i = up(p_{i+1}) + lateral(c_i), upsampled bilinearly to the
  lateral map's exact size (so odd sizes such as 127 -> 64 -> 32 -> 16 work);
- smoothing in two steps per level: "ps1" 3x3 256 -> 256, then "ps2" 3x3 256 -> 128;
- head: the four 128-channel maps upsampled to p2's size and concatenated ("ps3", 512
  channels), then a 3x3 conv 512 -> num_classes: logits at c2's resolution (1/4 of the input
  for a ResNet);
- every conv initialised N(0, 0.01) with zero bias.

Feature sharing (GLNet's local branch and the global branch's "_ext" layers): with
``shared_inputs=True`` every stage consumes ``concat(own maps, shared maps)``, so its input
channels double at the four sharing points — ``"c"`` (before the laterals), ``"p"`` (the
top-down sums, before ps1), ``"ps1"`` (before ps2) and ``"ps2"`` (before the final
concatenation, which then has 1024 channels and passes an extra 3x3 1024 -> 512 conv before
the classifier). ``forward(c, share=fn)`` calls ``fn(point, own_maps)`` at each point; it
returns the four maps to concatenate (typically crops of the other branch's maps, resized to
the own maps' sizes). The stages are also public methods (``laterals``, ``top_down``,
``smooth1``, ``smooth2``, ``merge``, ``classify``) for compositions that need more control,
and ``return_features=True`` returns every intermediate as an :class:`FPNFeatures`.

Upsampling is ``F.interpolate(..., mode="bilinear", align_corners=False)`` throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .encoders import Encoder, PretrainedSpec

__all__ = ["FPN", "FPNBranch", "FPNFeatures", "SHARING_POINTS", "Share"]

#: the four points where GLNet shares feature maps between branches, in forward order
SHARING_POINTS = ("c", "p", "ps1", "ps2")

#: ``share(point, own_maps) -> maps to concatenate`` (same count and sizes as ``own_maps``)
Share = Callable[[str, list[torch.Tensor]], Sequence[torch.Tensor]]


@dataclass
class FPNFeatures:
    """Every intermediate of one FPN pass, levels ordered fine to coarse (2, 3, 4, 5).

    ``c``, ``p``, ``ps1``, ``ps2`` are this branch's own maps (before any shared maps are
    concatenated), i.e. exactly what another branch would crop and share.
    """

    c: list[torch.Tensor]       # encoder maps c2..c5
    p: list[torch.Tensor]       # top-down sums, lateral_channels each
    ps1: list[torch.Tensor]     # after the first smoothing, lateral_channels each
    ps2: list[torch.Tensor]     # after the second smoothing, smooth_channels each
    ps3: torch.Tensor           # merged at p2's size, 4 * smooth_channels
    logits: torch.Tensor        # num_classes at p2's size


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (no-op when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class FPN(nn.Module):
    """GLNet's FPN over four encoder maps; see the module docstring.

    Args:
        in_channels: channels of c2..c5 (a ResNet-50: ``[256, 512, 1024, 2048]``).
        num_classes: output logits.
        lateral_channels: width of the laterals and ps1 (256 in GLNet).
        smooth_channels: width of ps2 (128 in GLNet); ps3 has four times this.
        shared_inputs: every stage takes ``concat(own, shared)`` (GLNet feature sharing).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, lateral_channels: int = 256,
                 smooth_channels: int = 128, shared_inputs: bool = False):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) != 4:
            raise ConfigError(f"the FPN needs four encoder levels (c2..c5), got {len(in_channels)}: {in_channels}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.shared_inputs = shared_inputs
        k = 2 if shared_inputs else 1
        merged = 4 * smooth_channels
        self.lateral_convs = nn.ModuleList(_conv(k * c, lateral_channels, 1) for c in in_channels)
        self.smooth1_convs = nn.ModuleList(_conv(k * lateral_channels, lateral_channels, 3) for _ in in_channels)
        self.smooth2_convs = nn.ModuleList(_conv(k * lateral_channels, smooth_channels, 3) for _ in in_channels)
        self.merge_conv = _conv(k * merged, merged, 3) if shared_inputs else None
        self.classifier = _conv(merged, num_classes, 3)

    # ---- stages (lists are ordered fine to coarse: level 2, 3, 4, 5)

    def laterals(self, c: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.lateral_convs, c, strict=True)]

    def top_down(self, laterals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """p5 = lateral5; p_i = up(p_{i+1} to lateral_i's size) + lateral_i."""
        p = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            p.append(resize(p[-1], lateral.shape[-2:]) + lateral)
        return p[::-1]

    def smooth1(self, p: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.smooth1_convs, p, strict=True)]

    def smooth2(self, ps1: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.smooth2_convs, ps1, strict=True)]

    def merge(self, ps2: Sequence[torch.Tensor]) -> torch.Tensor:
        """ps3: the maps upsampled to the finest level's size and concatenated (+ merge conv when shared)."""
        size = ps2[0].shape[-2:]
        ps3 = torch.cat([resize(x, size) for x in ps2], dim=1)
        return self.merge_conv(ps3) if self.merge_conv is not None else ps3

    def classify(self, ps3: torch.Tensor) -> torch.Tensor:
        return self.classifier(ps3)

    # ---- the whole pass

    def forward(self, c: Sequence[torch.Tensor], share: Share | None = None,
                return_features: bool = False) -> torch.Tensor | FPNFeatures:
        """Logits at c2's size (or every intermediate with ``return_features``)."""
        c = list(c)
        if len(c) != 4:
            raise ValueError(f"the FPN takes four feature maps (c2..c5), got {len(c)}")
        if self.shared_inputs and share is None:
            raise ValueError("this FPN was built with shared_inputs=True: pass share=")
        if share is not None and not self.shared_inputs:
            raise ValueError("share= needs an FPN built with shared_inputs=True")

        def joined(point: str, own: list[torch.Tensor]) -> list[torch.Tensor]:
            if share is None:
                return own
            other = list(share(point, own))
            if len(other) != len(own):
                raise ValueError(f"share({point!r}) returned {len(other)} maps for {len(own)}")
            return [torch.cat([a, b], dim=1) for a, b in zip(own, other)]

        p = self.top_down(self.laterals(joined("c", c)))
        ps1 = self.smooth1(joined("p", p))
        ps2 = self.smooth2(joined("ps1", ps1))
        ps3 = self.merge(joined("ps2", ps2))
        logits = self.classify(ps3)
        if return_features:
            return FPNFeatures(c=c, p=p, ps1=ps1, ps2=ps2, ps3=ps3, logits=logits)
        return logits


class FPNBranch(nn.Module):
    """Encoder + FPN: one GLNet branch (ResNet-50 + FPN by default), logits at 1/4.

    ``forward(x, share=None, return_features=False)`` passes ``share`` and
    ``return_features`` on to :meth:`FPN.forward`.
    """

    def __init__(self, encoder: str = "resnet50", *, num_classes: int, in_channels: int = 3,
                 pretrained: PretrainedSpec = False, shared_inputs: bool = False,
                 lateral_channels: int = 256, smooth_channels: int = 128):
        super().__init__()
        self.encoder = Encoder(encoder, in_channels=in_channels, pretrained=pretrained)
        self.fpn = FPN(self.encoder.out_channels, num_classes, lateral_channels=lateral_channels,
                       smooth_channels=smooth_channels, shared_inputs=shared_inputs)

    @property
    def output_stride(self) -> int:
        """Input pixels per logit pixel (the finest encoder level's reduction: 4 for a ResNet)."""
        return self.encoder.reductions[0]

    def forward(self, x: torch.Tensor, share: Share | None = None,
                return_features: bool = False) -> torch.Tensor | FPNFeatures:
        return self.fpn(self.encoder(x), share=share, return_features=return_features)
