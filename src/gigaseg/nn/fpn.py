"""GLNet's feature pyramid network: the neck and head of one GLNet branch.

Shared by GLNet (both branches), MagNet's DeepGlobe backbone and the baselines. As in
GLNet ("Collaborative Global-Local Networks for Memory-Efficient Segmentation of
Ultra-High Resolution Images", CVPR 2019), for four encoder maps c2..c5:

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

Finer logits: ``FPN(..., num_classes=None)`` builds no classifier (ps3 is then the pass's
output), and ``FPNBranch(..., output_stride=1 or 2)`` puts a
:class:`~gigaseg.nn.decoders.FullResolutionHead` on ps3 instead, fed with the encoder's
stride-2 map (``Encoder(..., stride2=True)``) and the pixels: logits at full or half
resolution; with ``coarse_logits=True`` that head also keeps GLNet's 3x3 classifier on ps3
and adds its upsampled logits. ``output_stride=4`` (the default) is GLNet's head, unchanged
(the same modules, state dict and outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..geometry import resize
from .decoders import FullResolutionHead, init_conv
from .encoders import Encoder, PretrainedSpec

__all__ = ["FPN", "FPNBranch", "FPNFeatures", "OUTPUT_STRIDES", "SHARING_POINTS", "Share"]

#: the output strides an FPNBranch predicts at: 4 (GLNet's head on p2's level), 2 and 1 (FullResolutionHead)
OUTPUT_STRIDES = (1, 2, 4)

#: the four points where GLNet shares feature maps between branches, in forward order
SHARING_POINTS = ("c", "p", "ps1", "ps2")

#: ``share(point, own_maps) -> maps to concatenate`` (same count and sizes as ``own_maps``;
#: an item may be a zero-argument callable that makes the map when it is used)
Share = Callable[[str, list[torch.Tensor]], Sequence[torch.Tensor]]

#: every map an FPN pass can keep (``fpn_pass``'s ``keep``)
ALL_MAPS = frozenset((*SHARING_POINTS, "ps3", "logits"))


@dataclass
class FPNFeatures:
    """Every intermediate of one FPN pass, levels ordered fine to coarse (2, 3, 4, 5).

    ``c``, ``p``, ``ps1``, ``ps2`` are this branch's own maps (before any shared maps are
    concatenated), i.e. exactly what another branch would crop and share.
    """

    c: list[torch.Tensor]  # encoder maps c2..c5
    p: list[torch.Tensor]  # top-down sums, lateral_channels each
    ps1: list[torch.Tensor]  # after the first smoothing, lateral_channels each
    ps2: list[torch.Tensor]  # after the second smoothing, smooth_channels each
    ps3: torch.Tensor  # merged at p2's size, 4 * smooth_channels
    logits: torch.Tensor  # num_classes at p2's size (FPNBranch with a FullResolutionHead: at the head's)


def conv_cat(conv: nn.Conv2d, parts: list, size: Sequence[int] | None = None) -> torch.Tensor:
    """``conv(torch.cat([resize(x, size) for x in parts], 1))``; parts may be zero-argument callables.

    Without autograd it is computed as a sum of convolutions over the weight's input-channel
    slices, making (callables) and resizing one part at a time and dropping each from
    ``parts`` once used, so the concatenation (1024 channels at 1/4 of the patch for GLNet's
    merge and ensemble convs) never exists: the same numbers (up to float summation order)
    at a lower peak. With autograd it is the plain concatenation.

    Args:
        conv: the convolution over the concatenated channels.
        parts: maps ``(B, C_i, h_i, w_i)`` or zero-argument callables that make them; without
            autograd the items are set to None as they are used.
        size: the (h, w) every part is resized to (bilinear); None: the first part's size.

    Returns:
        ``(B, conv.out_channels, ...)``: the convolution's output at ``size``.

    Raises:
        ValueError: the parts' channels do not add up to ``conv.in_channels`` (without autograd).
    """

    def get(i: int) -> torch.Tensor:
        x = parts[i]
        return x() if callable(x) else x

    if size is None:
        size = get(0).shape[-2:]
    if len(parts) == 1:
        return conv(resize(get(0), size))
    if torch.is_grad_enabled():
        return conv(torch.cat([resize(get(i), size) for i in range(len(parts))], dim=1))
    out = None
    start = 0
    for i in range(len(parts)):
        x = resize(get(i), size)
        parts[i] = None  # the caller's list no longer holds it
        n = x.shape[1]
        y = F.conv2d(x, conv.weight[:, start : start + n], None, conv.stride, conv.padding, conv.dilation, conv.groups)
        del x
        out = y if out is None else out.add_(y)
        del y
        start += n
    if start != conv.in_channels:
        raise ValueError(f"parts have {start} channels, the convolution takes {conv.in_channels}")
    return out if conv.bias is None else out.add_(conv.bias.view(1, -1, 1, 1).to(out.dtype))


def fpn_pass(
    fpn: FPN,
    c: list[torch.Tensor],
    share: Share | None = None,
    classifier: nn.Module | None = None,
    keep: frozenset[str] | set[str] = ALL_MAPS,
) -> FPNFeatures:
    """One FPN pass over encoder maps ``c`` (GLNet's order of stages), keeping only ``keep``.

    The same computation as ``FPN.forward(c, share)`` (laterals, top-down sums, two
    smoothings, merge, classifier), with ``share(point, own)`` returning the maps to
    concatenate at each sharing point (``fpn`` must have ``shared_inputs``); ``share`` also
    sees this branch's own maps there (the local -> global merge reads them that way).
    ``classifier`` replaces ``fpn.classifier`` (the global ``_ext`` layers use the stage-1
    classifier); with neither (an FPN built with ``num_classes=None``) no logits are made.
    Maps not in ``keep`` are released as soon as the pass no longer needs them and, without
    autograd, concatenations are never built (:func:`conv_cat`); both lower the inference
    peak. Without ``"ps3"`` and ``"logits"`` in ``keep`` the pass stops after ps2
    (the merge conv is its costliest layer).

    Args:
        fpn: the FPN whose layers run.
        c: the four encoder maps c2..c5.
        share: ``share(point, own)`` at each sharing point; None for an FPN without
            ``shared_inputs``.
        classifier: the final conv to use instead of ``fpn.classifier``.
        keep: the maps to keep (a subset of ``"c"``, ``"p"``, ``"ps1"``, ``"ps2"``, ``"ps3"``,
            ``"logits"``).

    Returns:
        The kept maps as :class:`FPNFeatures`; dropped list fields are empty lists, dropped
        ``ps3``/``logits`` are None (``logits`` also without a classifier).

    Raises:
        ValueError: ``share`` given for an FPN without ``shared_inputs`` or missing for one
            with it, or ``share`` returning another number of maps.
    """
    if (share is not None) != fpn.shared_inputs:
        raise ValueError("share= is needed exactly for an FPN built with shared_inputs=True")

    def shared(point: str, own: list[torch.Tensor]) -> list[list]:
        if share is None:
            return [[x] for x in own]
        other = share(point, own)  # a sequence; items may be callables (made when used)
        if len(other) != len(own):
            raise ValueError(f"share({point!r}) returned {len(other)} maps for {len(own)}")
        return [[a, other[i]] for i, a in enumerate(own)]

    def convs(modules, parts) -> list[torch.Tensor]:
        outs = []
        for i, conv in enumerate(modules):
            outs.append(conv_cat(conv, parts[i]))
            parts[i] = None  # release this level's inputs before the next level
        return outs

    out: dict[str, Any] = {}
    parts = shared("c", c)
    out["c"] = c if "c" in keep else []
    del c
    laterals = convs(fpn.lateral_convs, parts)
    del parts
    p = fpn.top_down(laterals)
    del laterals
    parts = shared("p", p)
    out["p"] = p if "p" in keep else []
    del p
    ps1 = convs(fpn.smooth1_convs, parts)
    del parts
    parts = shared("ps1", ps1)
    out["ps1"] = ps1 if "ps1" in keep else []
    del ps1
    ps2 = convs(fpn.smooth2_convs, parts)
    del parts
    if "ps3" not in keep and "logits" not in keep:  # stop before the (costly) merge conv
        if share is not None:
            share("ps2", ps2)  # the caller may watch the ps2 maps (local -> global merge)
        return FPNFeatures(
            c=out["c"], p=out["p"], ps1=out["ps1"], ps2=ps2 if "ps2" in keep else [], ps3=None, logits=None
        )
    size = ps2[0].shape[-2:]
    if fpn.merge_conv is None:
        ps3 = fpn.merge(ps2)  # the plain FPN's ps3 is the concatenation itself
        out["ps2"] = ps2 if "ps2" in keep else []
        del ps2
    else:
        parts = shared("ps2", ps2)
        out["ps2"] = ps2 if "ps2" in keep else []
        del ps2
        flat = [x for level in parts for x in level]
        del parts
        ps3 = conv_cat(fpn.merge_conv, flat, size)
        del flat
    head = classifier if classifier is not None else fpn.classifier
    logits = head(ps3) if "logits" in keep and head is not None else None
    return FPNFeatures(
        c=out["c"], p=out["p"], ps1=out["ps1"], ps2=out["ps2"], ps3=ps3 if "ps3" in keep else None, logits=logits
    )


class FPN(nn.Module):
    """GLNet's FPN over four encoder maps; see the module docstring.

    Args:
        in_channels: channels of c2..c5 (a ResNet-50: ``[256, 512, 1024, 2048]``).
        num_classes: output logits; None: no classifier (a head on ps3 makes the logits).
        lateral_channels: width of the laterals and ps1 (256 in GLNet).
        smooth_channels: width of ps2 (128 in GLNet); ps3 has four times this.
        shared_inputs: every stage takes ``concat(own, shared)`` (GLNet feature sharing).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int | None,
        lateral_channels: int = 256,
        smooth_channels: int = 128,
        shared_inputs: bool = False,
    ):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) != 4:
            raise ConfigError(f"the FPN needs four encoder levels (c2..c5), got {len(in_channels)}: {in_channels}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.shared_inputs = shared_inputs
        k = 2 if shared_inputs else 1
        merged = 4 * smooth_channels
        self.lateral_convs = nn.ModuleList(init_conv(k * c, lateral_channels, 1) for c in in_channels)
        self.smooth1_convs = nn.ModuleList(init_conv(k * lateral_channels, lateral_channels, 3) for _ in in_channels)
        self.smooth2_convs = nn.ModuleList(init_conv(k * lateral_channels, smooth_channels, 3) for _ in in_channels)
        self.merge_conv = init_conv(k * merged, merged, 3) if shared_inputs else None
        #: ps3's channels (4 * smooth_channels)
        self.merged_channels = merged
        self.classifier = init_conv(merged, num_classes, 3) if num_classes is not None else None

    # ---- stages (lists are ordered fine to coarse: level 2, 3, 4, 5)

    def laterals(self, c: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The 1x1 lateral convs.

        Args:
            c: the four encoder maps c2..c5 (with shared maps concatenated when ``shared_inputs``).

        Returns:
            Four maps of ``lateral_channels``.
        """
        return [conv(x) for conv, x in zip(self.lateral_convs, c, strict=True)]

    def top_down(self, laterals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The top-down sums: p5 = lateral5; p_i = up(p_{i+1} to lateral_i's size) + lateral_i.

        Args:
            laterals: the four lateral maps, fine to coarse.

        Returns:
            p2..p5, each at its lateral's size.
        """
        p = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            p.append(resize(p[-1], lateral.shape[-2:]) + lateral)
        return p[::-1]

    def smooth1(self, p: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The first 3x3 smoothing, "ps1".

        Args:
            p: the four top-down sums (with shared maps concatenated when ``shared_inputs``).

        Returns:
            Four maps of ``lateral_channels``.
        """
        return [conv(x) for conv, x in zip(self.smooth1_convs, p, strict=True)]

    def smooth2(self, ps1: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The second 3x3 smoothing, "ps2".

        Args:
            ps1: the four ps1 maps (with shared maps concatenated when ``shared_inputs``).

        Returns:
            Four maps of ``smooth_channels``.
        """
        return [conv(x) for conv, x in zip(self.smooth2_convs, ps1, strict=True)]

    def merge(self, ps2: Sequence[torch.Tensor]) -> torch.Tensor:
        """ps3: the maps upsampled to the finest level's size and concatenated (+ merge conv when shared).

        Args:
            ps2: the ps2 maps, fine to coarse (with shared maps when ``shared_inputs``).

        Returns:
            ps3 at the first map's size.
        """
        size = ps2[0].shape[-2:]
        ps3 = torch.cat([resize(x, size) for x in ps2], dim=1)
        return self.merge_conv(ps3) if self.merge_conv is not None else ps3

    def classify(self, ps3: torch.Tensor) -> torch.Tensor:
        """The final 3x3 conv.

        Args:
            ps3: the merged map.

        Returns:
            Logits ``(B, num_classes, h, w)`` at ps3's size.

        Raises:
            ValueError: the FPN was built without a classifier (``num_classes=None``).
        """
        if self.classifier is None:
            raise ValueError("this FPN was built without a classifier (num_classes=None)")
        return self.classifier(ps3)

    # ---- the whole pass

    def forward(
        self, c: Sequence[torch.Tensor], share: Share | None = None, return_features: bool = False
    ) -> torch.Tensor | FPNFeatures:
        """One FPN pass.

        Args:
            c: the four encoder maps c2..c5.
            share: ``share(point, own_maps)``, needed exactly when the FPN has ``shared_inputs``.
            return_features: return every intermediate instead of the logits.

        Returns:
            Logits ``(B, num_classes, h, w)`` at c2's size, or :class:`FPNFeatures`.

        Raises:
            ValueError: not four maps, ``share`` given or missing against ``shared_inputs``, or
                logits asked of an FPN without a classifier (``num_classes=None``: use
                ``return_features=True`` and its ps3).
        """
        c = list(c)
        if len(c) != 4:
            raise ValueError(f"the FPN takes four feature maps (c2..c5), got {len(c)}")
        if self.shared_inputs and share is None:
            raise ValueError("this FPN was built with shared_inputs=True: pass share=")
        if share is not None and not self.shared_inputs:
            raise ValueError("share= needs an FPN built with shared_inputs=True")
        if self.classifier is None and not return_features:
            raise ValueError("this FPN has no classifier (num_classes=None): pass return_features=True and use its ps3")

        features = fpn_pass(self, c, share)
        return features if return_features else features.logits


class FPNBranch(nn.Module):
    """Encoder + FPN: one GLNet branch (ResNet-50 + FPN by default), logits at 1/4, 1/2 or 1.

    ``forward(x, share=None, return_features=False)`` passes ``share`` and
    ``return_features`` on to the FPN pass. With ``output_stride`` 4 the FPN's own classifier
    makes the logits (GLNet's head, at c2's resolution: 1/4 for a ResNet, 1/16 for a plain
    ViT); with 2 or 1 the FPN has no classifier and ``head``, a
    :class:`~gigaseg.nn.decoders.FullResolutionHead`, turns ps3, the encoder's stride-2 map
    (or its own stride-2 stem when the encoder has none) and the pixels into logits at 1/2 or
    full resolution.

    Args:
        encoder: a timm model name.
        num_classes: output logits.
        in_channels: input bands.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        shared_inputs: every FPN stage takes ``concat(own, shared)`` (GLNet feature sharing).
        lateral_channels: width of the laterals and ps1.
        smooth_channels: width of ps2.
        output_stride: 4 (GLNet's head), 2 or 1 (the full-resolution head).
        coarse_logits: with output stride 1 or 2, the head also keeps GLNet's classifier (a 3x3
            conv on ps3 at 1/4) and adds its upsampled logits to its own
            (:class:`~gigaseg.nn.decoders.FullResolutionHead`'s ``coarse_kernel=3``). No effect
            at output stride 4, whose logits are that classifier's.

    Raises:
        ConfigError: an output stride other than 1, 2 or 4, or a bad encoder.
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        shared_inputs: bool = False,
        lateral_channels: int = 256,
        smooth_channels: int = 128,
        output_stride: int = 4,
        coarse_logits: bool = False,
    ):
        super().__init__()
        if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}"
            )
        fine = output_stride < 4
        self.encoder = Encoder(encoder, in_channels=in_channels, pretrained=pretrained, stride2=fine)
        self.fpn = FPN(
            self.encoder.out_channels,
            None if fine else num_classes,
            lateral_channels=lateral_channels,
            smooth_channels=smooth_channels,
            shared_inputs=shared_inputs,
        )
        #: the full-resolution head (output_stride 1 or 2), else None (the FPN's classifier)
        self.head: FullResolutionHead | None = None
        if fine:
            self.head = FullResolutionHead(
                self.fpn.merged_channels,
                num_classes,
                image_channels=in_channels,
                skip_channels=self.encoder.stride2_channels,
                output_stride=output_stride,
                coarse_kernel=3 if coarse_logits else 0,
            )

    @property
    def output_stride(self) -> int:
        """Input pixels per logit pixel: the head's (1 or 2), else the finest encoder level's (4 for a ResNet)."""
        return self.head.output_stride if self.head is not None else self.encoder.reductions[0]

    def forward(
        self, x: torch.Tensor, share: Share | None = None, return_features: bool = False
    ) -> torch.Tensor | FPNFeatures:
        """Encoder, then one FPN pass (and the full-resolution head, when built).

        Args:
            x: images ``(B, in_channels, H, W)``.
            share: passed on to the FPN pass (:meth:`FPN.forward`).
            return_features: return every intermediate instead of the logits.

        Returns:
            Logits at ``output_stride`` (1/4 for a ResNet with GLNet's head; the input's size
            for output stride 1; ``ceil(H / 2)`` x ``ceil(W / 2)`` for 2 with a ResNet), or
            :class:`FPNFeatures` (whose ``logits`` are those logits).

        Raises:
            ValueError: ``share`` given or missing against ``shared_inputs``.
        """
        if self.head is None:
            return self.fpn(self.encoder(x), share=share, return_features=return_features)
        skip, c = self.encoder.forward_with_stride2(x)
        features = fpn_pass(self.fpn, c, share, keep=ALL_MAPS if return_features else frozenset({"ps3"}))
        del c
        logits = self.head(features.ps3, x, skip if self.head.uses_encoder_skip else None)
        if not return_features:
            return logits
        features.logits = logits
        return features
