"""MagNet: multi-scale progressive refinement (Huynh et al., CVPR 2021) on gigaseg's engine.

The network is a backbone segmenter and a small refinement module:

- ``backbone``: :class:`gigaseg.nn.segmenters.FPNSegmenter` (an encoder with GLNet's FPN,
  i.e. GLNet's global branch; ResNet-50 + FPN is MagNet's DeepGlobe backbone). ``decoder``
  may also pick smp's U-Net / FPN on the same encoder.
- ``output_stride``: where the backbone's logits are made (FPNSegmenter's option). 4 (the
  default, the paper's backbone: the FPN's classifier at 1/4 of the input patch, upsampled
  bilinearly to it), 2 or 1 (:class:`gigaseg.nn.decoders.FullResolutionHead` on the FPN's
  ps3, the encoder's stride-2 map and the pixels: logits at 1/2 or at the patch's own
  resolution). The smp decoders are at full resolution (1, their only value, the default
  with them). Everything downstream already works at the input size: the backbone's
  probabilities of a patch are at ``input_size`` whatever the stride, and so are the coarse
  crops, the refinement module and its labels. So with output stride 1 the refinement that
  reaches the finest scale (where a patch is read at or near native resolution) refines
  full-resolution backbone predictions instead of 1/4 ones upsampled, and a 2-px road can be
  drawn. The backbone stage's loss is at the patch's resolution against its labels read at
  that size (nearest), at every stride; at 4 the logits are upsampled to it first.
- ``coarse_logits``: with output stride 1 or 2, the backbone's full-resolution head also
  keeps the FPN's 3x3 classifier on ps3 and adds its upsampled logits to its own
  (FPNSegmenter's option; false by default, and for checkpoints written before it; no
  effect at 4; the smp decoders refuse it).
- ``refinement``: :class:`RefinementModule`, which refines the fine (patch) prediction with
  the coarse prediction cropped to the patch.

Configuration (options; ``preset`` fills every option not given explicitly):

- ``scales``: ``[[h, w], ...]`` of the whole frame at each scale, coarse to fine.
- ``input_size``: ``[h, w]`` of the network input. At scale ``i`` the frame is cut into
  patches of the coarsest scale's size (``ceil(S_i / S_0)`` per axis, spread evenly with the
  last one flush, MagNet's grid), and every patch is resized to ``input_size``.
- ``points``: pixels replaced per scale: ``> 1`` a count, ``<= 1`` a fraction of the area
  refined at that scale (the whole canvas, or the kept patches for MagNet-Fast).
- ``median_kernel``: odd side of the median blur applied to the error score, after
  resizing the score of the whole canvas to ``input_size`` (then bilinear back).
- ``fast_patches``: ``None`` for MagNet; ``n`` for MagNet-Fast, which ranks a scale's
  patches by the mean uncertainty of the current prediction inside them and refines only
  the ``n`` MOST uncertain ones (the authors' code keeps the least uncertain).
- ``crops_per_image``: training views per image and epoch.
- ``loss``: the backbone stage's loss (``gigaseg.nn.losses.LOSSES``; ``"ce"``, cross-entropy,
  the default and MagNet's). The refinement stage keeps the paper's OHEM cross-entropy.
- ``crop_sampling``: how the backbone stage places its crops: ``"uniform"`` (the default, the
  paper's) or ``"balanced"`` (each crop holds a pixel of a class drawn uniformly over the
  classes, so rare thin classes are in a fixed share of the crops), with
  ``sampling_temperature`` between uniform over classes (0) and by frequency (1). See
  ``gigaseg.methods.magnet.recipe.BackboneCrops``. Checkpoints written before these options
  load with their defaults.

Presets (:data:`PRESETS`): ``"deepglobe"`` (the default: 612/1224/2448 on 508 inputs,
0.75 of the area, kernel 11), ``"deepglobe_fast"`` (0.9, top 3 patches), ``"cityscapes"``
(256x128 .. 2048x1024 on 256x128 inputs, 32768 points, kernel 5) and ``"cityscapes_fast"``
(0.9, top 4 patches).

Inference on one *frame* (:meth:`MagNet.infer_frame`): the backbone on the whole frame at
input size gives the current prediction at the coarsest scale; at every finer scale the
patches (all, or the most uncertain ``fast_patches``) go through the backbone, the current
prediction is cropped to each patch box, ``refinement(coarse, fine)`` refines it, refined
patches are pasted onto the scale's canvas, and the top ``points`` pixels of the error
score ``certainty(refined) * uncertainty(current)`` (median-smoothed) replace the upsampled
current prediction. Certainty is ``top1 - top2`` probability, uncertainty ``1 - certainty``.

Frames and image sizes (:meth:`MagNet.frame_size`):

- The configured scales are relative: scale ``i`` of a frame of ``H x W`` pixels has a
  canvas of ``round(H * S_i.h / S_K.h) x round(W * S_i.w / S_K.w)`` (``S_K`` the finest
  scale), so the finest canvas is always the frame's own size, and a frame of exactly
  ``S_K`` pixels gets exactly the configured scales.
- An image at most :data:`WHOLE_IMAGE_SLACK` (1.25) times the finest scale per side is one
  frame: the whole image, with its scales relative to its own size (a 2000 px image under
  the DeepGlobe preset: 500 / 1000 / 2000).
- A larger image is processed block-wise: every part of it is predicted from a frame of
  the finest scale's size at native resolution (the scales of training) that contains it,
  so memory does not depend on the image's size (see ``gigaseg.methods.magnet.predictor``).

Until the refinement module has been trained (the buffer ``refinement_trained``, set when
the refinement stage starts and saved in checkpoints), predictions are the backbone's at
the coarsest scale alone (MagNet's stage 0), e.g. during validation of the backbone stage.
The inference option ``refine`` overrides this: ``"never"`` gives the backbone at the
coarsest scale from any checkpoint (``gigaseg evaluate --set refine=never``: the baseline
MagNet must beat), ``"always"`` the full method.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from ...data.statistics import CROP_SAMPLINGS
from ...errors import ConfigError
from ...geometry import Box, Window, box_on_grid, crop_resize, resize, upsample_window
from ...nn.base import SegmentationModel
from ...nn.encoders import PretrainedSpec
from ...nn.losses import LOSSES
from ...nn.segmenters import DECODERS, OUTPUT_STRIDES, FPNSegmenter, check_decoder_options

__all__ = [
    "MagNet",
    "RefinementModule",
    "FrameGeometry",
    "PRESETS",
    "WHOLE_IMAGE_SLACK",
    "certainty",
    "uncertainty",
    "error_score",
    "median_blur",
    "smooth_error",
    "num_points",
    "select_points",
    "select_patches",
    "magnet_starts",
    "patch_boxes",
]

#: BatchNorm momentum of the refinement module (MagNet's BN_MOMENTUM)
BN_MOMENTUM = 0.01

#: an image up to this many times the finest scale (per side) is processed as one frame
WHOLE_IMAGE_SLACK = 1.25

#: rows per pass (at input resolution) and halo rows of the refinement module at inference
REFINE_BAND = 128
REFINE_HALO = 4
#: pixels per band when merging the refined canvas with the upsampled current prediction
BAND_PIXELS = 512 * 1024

_DEEPGLOBE = {
    "scales": [[612, 612], [1224, 1224], [2448, 2448]],
    "input_size": [508, 508],
    "points": 0.75,
    "median_kernel": 11,
    "fast_patches": None,
}
_CITYSCAPES = {
    "scales": [[128, 256], [256, 512], [512, 1024], [1024, 2048]],
    "input_size": [128, 256],
    "points": 32768.0,
    "median_kernel": 5,
    "fast_patches": None,
}

#: the paper's published configurations (DeepGlobe and Cityscapes; MagNet and MagNet-Fast); scales and input
#: sizes are (h, w)
PRESETS: dict[str, dict[str, Any]] = {
    "deepglobe": _DEEPGLOBE,
    "deepglobe_fast": {**_DEEPGLOBE, "points": 0.9, "fast_patches": 3},
    "cityscapes": _CITYSCAPES,
    "cityscapes_fast": {**_CITYSCAPES, "points": 0.9, "fast_patches": 4},
}


# --------------------------------------------------------------------------- refinement module


class RefinementModule(nn.Module):
    """MagNet's refinement module: ``refine(coarse, fine) -> logits`` of the same size.

    Input ``concat([coarse, fine])`` (2C channels; this one order in training and
    inference) -> BN -> 3x3 conv 2C->64, BN, ReLU -> 3x3 conv 64->64, BN, ReLU -> two
    bottleneck blocks (planes 32, out 128, the first with a 1x1 projection) -> 1x1 conv
    128->C. No conv has a bias; every BN has momentum 0.01. ``1284 C + 79104`` parameters
    with the default widths.

    Args:
        num_classes: C, the class count of both inputs and of the output.
        width: channels of the two 3x3 convolutions (64).
        planes: bottleneck planes (32); the blocks output ``4 * planes`` channels.
        blocks: bottleneck blocks (2).
    """

    def __init__(self, num_classes: int, width: int = 64, planes: int = 32, blocks: int = 2):
        super().__init__()
        norm = partial(nn.BatchNorm2d, momentum=BN_MOMENTUM)
        channels = 2 * num_classes
        out = planes * Bottleneck.expansion
        self.num_classes = num_classes
        self.bn0 = norm(channels)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = norm(width)
        projection = nn.Sequential(nn.Conv2d(width, out, 1, bias=False), norm(out))
        self.blocks = nn.Sequential(
            Bottleneck(width, planes, downsample=projection, norm_layer=norm),
            *[Bottleneck(out, planes, norm_layer=norm) for _ in range(blocks - 1)],
        )
        self.classifier = nn.Conv2d(out, num_classes, 1, bias=False)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """Refined logits from the coarse and fine predictions of the same patches.

        Args:
            coarse: the coarse probabilities cropped to the patches, ``(N, C, h, w)``.
            fine: the backbone's probabilities of the patches, ``(N, C, h, w)``.

        Returns:
            Logits ``(N, C, h, w)``.

        Raises:
            ValueError: ``coarse`` and ``fine`` differ in shape.
        """
        if coarse.shape != fine.shape:
            raise ValueError(f"coarse {tuple(coarse.shape)} and fine {tuple(fine.shape)} predictions differ in shape")
        x = self.bn0(torch.cat([coarse, fine], dim=1))
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return self.classifier(self.blocks(x))


# --------------------------------------------------------------------------- scores and selection


def certainty(probs: torch.Tensor) -> torch.Tensor:
    """``top1 - top2`` class probability per pixel.

    Computed in bands of rows, so large canvases need no full-size top-2 temporaries.

    Args:
        probs: class probabilities ``(N, C, h, w)``, ``C >= 2``.

    Returns:
        float32 ``(N, 1, h, w)`` in ``[0, 1]``.
    """
    n, _, h, w = probs.shape
    out = torch.empty((n, 1, h, w), dtype=torch.float32, device=probs.device)
    rows = max(1, BAND_PIXELS // max(1, w))
    for top in range(0, h, rows):
        top2 = torch.topk(probs[:, :, top : top + rows], k=2, dim=1).values.float()
        torch.sub(top2[:, :1], top2[:, 1:2], out=out[:, :, top : top + rows])
    return out


def uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """``1 - certainty``: 1 where the two best classes tie, 0 where one class has it all.

    Args:
        probs: class probabilities ``(N, C, h, w)``, ``C >= 2``.

    Returns:
        float32 ``(N, 1, h, w)`` in ``[0, 1]``.
    """
    return 1.0 - certainty(probs)


def error_score(refined: torch.Tensor, current_uncertainty: torch.Tensor) -> torch.Tensor:
    """``certainty(refined) * uncertainty(current)``: high where refining is confident and needed.

    Args:
        refined: the refined probabilities ``(N, C, h, w)``.
        current_uncertainty: :func:`uncertainty` of the current prediction at the same size, ``(N, 1, h, w)``.

    Returns:
        float32 ``(N, 1, h, w)``.
    """
    return certainty(refined) * current_uncertainty


def median_blur(x: torch.Tensor, kernel: int, band_bytes: int = 32 * 2**20) -> torch.Tensor:
    """``kernel x kernel`` median filter with reflected borders.

    The same values as ``kornia.filters.median_blur(x, (kernel, kernel))`` (its default
    reflect border; a test checks equality), computed in bands of rows so that the
    ``kernel**2`` neighbourhoods held at once stay near ``band_bytes`` (kornia unfolds the
    whole map at once, ``kernel**2`` values per pixel). Maps with a side of at most
    ``kernel // 2`` pixels, too small to reflect, are padded by replicating their edges.

    Args:
        x: the maps ``(N, C, h, w)``.
        kernel: odd side of the window; 1 or less returns ``x`` itself.
        band_bytes: target bytes of the neighbourhoods unfolded at once (32 MiB).

    Returns:
        A new tensor like ``x`` (or ``x`` itself when ``kernel <= 1``).

    Raises:
        ValueError: ``kernel`` is even (and greater than 1).
    """
    if kernel <= 1:
        return x
    if kernel % 2 == 0:
        raise ValueError(f"the median kernel must be odd, got {kernel}")
    pad = kernel // 2
    n, c, h, w = x.shape
    padded = (
        F.pad(x, (pad, pad, pad, pad), mode="reflect")
        if min(h, w) > pad
        else F.pad(x, (pad, pad, pad, pad), mode="replicate")
    )
    out = torch.empty_like(x)
    rows = max(1, band_bytes // max(1, n * c * w * kernel * kernel * x.element_size()))
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        windows = padded[:, :, top : bottom + 2 * pad].unfold(2, kernel, 1).unfold(3, kernel, 1)
        out[:, :, top:bottom] = windows.reshape(n, c, bottom - top, w, kernel * kernel).median(dim=-1).values
    return out


def smooth_error(error: torch.Tensor, size: Sequence[int], kernel: int) -> torch.Tensor:
    """Median blur of an error map with a ``kernel`` square at resolution ``size``.

    The map is resized to ``size``, median blurred (:func:`median_blur`, reflected borders)
    and resized back to its own size; each resize is area when it shrinks both sides and
    bilinear otherwise (so a canvas larger than ``size`` comes back bilinearly).

    Args:
        error: the error map ``(N, 1, h, w)``.
        size: ``(h, w)`` at which the blur runs (MagNet: the network's input size).
        kernel: odd side of the median window; 1 returns ``error`` unchanged.

    Returns:
        The smoothed map at ``error``'s size.
    """
    if kernel <= 1:
        return error
    original = tuple(error.shape[-2:])
    small = median_blur(resize(error, size, area_when_shrinking=True), kernel)
    return resize(small, original, area_when_shrinking=True)


def num_points(points: float, refined_area: int) -> int:
    """Pixels to replace at a scale.

    Args:
        points: ``> 1`` a count (capped at the refined area), ``<= 1`` a fraction of the
            refined area (rounded down).
        refined_area: pixels refined at this scale (covered by the refined patches).

    Returns:
        The number of pixels, between 0 and ``refined_area``.
    """
    refined_area = int(refined_area)
    if points > 1:
        return min(int(points), refined_area)
    return int(math.floor(points * refined_area))


def select_points(error: torch.Tensor, n: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n`` pixels of highest ``error`` among ``candidates``.

    Ties are broken by ``torch.topk``.

    Args:
        error: the error score, ``(h, w)`` or ``(1, 1, h, w)``.
        n: how many pixels to select, at most the number of candidates.
        candidates: optional bool ``(h, w)`` mask of the pixels that may be chosen (those
            refined at this scale); None: every pixel.

    Returns:
        Boolean ``(h, w)`` mask with exactly ``n`` True pixels.

    Raises:
        ValueError: ``n`` is negative or larger than the number of candidates.
    """
    flat = error.reshape(-1).float()
    total = flat.numel()
    if candidates is not None:
        allowed = candidates.reshape(-1)
        available = int(allowed.sum())
        flat = flat.masked_fill(~allowed, float("-inf"))
    else:
        available = total
    if not 0 <= n <= available:
        raise ValueError(f"cannot select {n} points among {available}")
    h, w = error.shape[-2:]
    if n == 0:
        return torch.zeros((h, w), dtype=torch.bool, device=error.device)
    if n <= total // 2:
        mask = torch.zeros(total, dtype=torch.bool, device=error.device)
        mask[torch.topk(flat, n, sorted=False).indices] = True
    else:  # cheaper to find the pixels left out (every non-candidate is among them: they are -inf)
        mask = torch.ones(total, dtype=torch.bool, device=error.device)
        if total - n:
            mask[torch.topk(flat, total - n, largest=False, sorted=False).indices] = False
    return mask.view(h, w)


def select_patches(current_uncertainty: torch.Tensor, boxes: Sequence[Box], n: int) -> list[int]:
    """MagNet-Fast: the ``n`` boxes with the highest MEAN uncertainty.

    Each normalised box is averaged over its cells on the uncertainty map
    (:func:`gigaseg.geometry.box_on_grid`, clipped; a box with no cell counts as 0). Ties
    keep the earlier box.

    Args:
        current_uncertainty: the current prediction's uncertainty, ``(1, 1, h, w)`` or ``(h, w)``.
        boxes: normalised boxes ``(y0, x0, y1, x1)``.
        n: how many boxes to keep.

    Returns:
        The kept boxes' indices, ascending (all of them when ``n >= len(boxes)``).
    """
    grid = current_uncertainty.reshape(current_uncertainty.shape[-2:])
    h, w = grid.shape
    means = []
    for box in boxes:
        cells = box_on_grid(box, h, w).clip(h, w)
        means.append(float(grid[cells.slices].float().mean()) if cells.area else 0.0)
    order = sorted(range(len(boxes)), key=lambda j: (-means[j], j))
    return sorted(order[:n])


# --------------------------------------------------------------------------- geometry


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def magnet_starts(length: int, patch: int) -> list[int]:
    """MagNet's patch starts on one side: ``ceil(L / p)`` patches, evenly spread, last one flush.

    Non-overlapping when ``p`` divides ``L`` (every published configuration).

    Args:
        length: L, the side in pixels.
        patch: p, the patch side in pixels.

    Returns:
        The starts, ascending; ``[0]`` when ``patch >= length``.
    """
    if patch >= length:
        return [0]
    n = -(-length // patch)
    span = length - patch
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def patch_boxes(scales: Sequence[Sequence[int]]) -> list[list[Box]]:
    """Normalised patch boxes ``(y0, x0, y1, x1)`` of every scale (row-major).

    The patch at scale ``i`` has the coarsest scale's size in that scale's pixels, so scale 0
    is one box covering the frame.

    Args:
        scales: ``(h, w)`` of the frame at each scale, coarse to fine.

    Returns:
        One list of boxes per scale, with coordinates in ``[0, 1]``.
    """
    ph, pw = scales[0]
    out = []
    for sh, sw in scales:
        boxes = []
        for top in magnet_starts(sh, ph):
            for left in magnet_starts(sw, pw):
                boxes.append((top / sh, left / sw, min(1.0, (top + ph) / sh), min(1.0, (left + pw) / sw)))
        out.append(boxes)
    return out


@dataclass(frozen=True)
class FrameGeometry:
    """Where MagNet looks in one frame.

    Args:
        frame: ``(h, w)`` of the frame in pixels.
        canvases: ``(h, w)`` of the prediction canvas at each scale (the last one is the
            frame itself).
        boxes: the normalised patch boxes ``(y0, x0, y1, x1)`` of each scale.
    """

    frame: tuple[int, int]
    canvases: tuple[tuple[int, int], ...]
    boxes: tuple[tuple[Box, ...], ...]

    @property
    def num_scales(self) -> int:
        """The number of scales."""
        return len(self.canvases)

    def windows(self, scale: int) -> list[Window]:
        """Scale ``scale``'s patches as windows of frame pixels (what the backbone reads).

        Both edges of a box are rounded (half up), so neighbouring patches tile the frame
        without gaps whatever its size.

        Args:
            scale: index of the scale, 0 the coarsest.

        Returns:
            One window (at least 1x1, inside the frame) per box of that scale, row-major.
        """
        h, w = self.frame
        out = []
        for y0, x0, y1, x1 in self.boxes[scale]:
            top, left = min(_round_half_up(y0 * h), h - 1), min(_round_half_up(x0 * w), w - 1)
            bottom = max(top + 1, min(h, _round_half_up(y1 * h)))
            right = max(left + 1, min(w, _round_half_up(x1 * w)))
            out.append(Window.from_bounds(top, left, bottom, right))
        return out


def _pair(value: Any, name: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ConfigError(f"magnet: {name} must be a positive integer or an [h, w] pair of them, got {value!r}")
    return [int(value[0]), int(value[1])]


# --------------------------------------------------------------------------- the network

#: reads the patches at frame windows, resized to the input size: ``(N, C_in, ih, iw)`` normalised
PatchReader = Callable[[list[Window]], torch.Tensor]

#: values of the ``refine`` option (see the module docstring)
REFINE_MODES = ("auto", "never", "always")


class MagNet(SegmentationModel):
    """MagNet / MagNet-Fast; see the module docstring.

    ``forward(x)`` in training mode: the backbone's logits at ``x``'s size (the backbone
    stage trains these). ``forward(x, coarse)``: the refinement module's logits for fine
    images ``x`` (their backbone probabilities are computed without gradient) and coarse
    probabilities ``coarse`` cropped to them (the refinement stage). ``forward(x)`` in eval
    mode: the whole method on each image of ``x`` as one frame, returned as log-probabilities
    at ``x``'s size (so ``predict`` gives MagNet's prediction).

    Args:
        encoder: the backbone's encoder name (ResNet-50 by default, MagNet's DeepGlobe backbone).
        num_classes: class count, at least 2 (certainty is ``top1 - top2``).
        in_channels: input channels.
        pretrained: the encoder's weights: False/None random, True timm's, or a local weights file.
        **options: the options of the module docstring (``preset``, ``scales``,
            ``input_size``, ``points``, ``median_kernel``, ``fast_patches``, ``decoder``,
            ``output_stride``, ``coarse_logits``, ``crops_per_image``, ``loss``, ``crop_sampling``,
            ``sampling_temperature``, ``refine``); ``preset`` fills those not given.

    Raises:
        ConfigError: an unknown preset or option, an option out of range, fewer than 2 classes, an
            output stride other than 1 or ``coarse_logits`` with an smp decoder, or an
            ``input_size`` that is not a multiple of the decoder's size multiple.
    """

    default_options: dict[str, Any] = {
        "preset": "deepglobe",
        **copy.deepcopy(_DEEPGLOBE),
        "decoder": "fpn",
        "output_stride": 4,
        "coarse_logits": False,
        "crops_per_image": 1,
        "loss": "ce",
        "crop_sampling": "uniform",
        "sampling_temperature": 0.0,
        "refine": "auto",
    }
    option_choices = {
        "preset": tuple(PRESETS),
        "decoder": DECODERS,
        "output_stride": OUTPUT_STRIDES,
        "refine": REFINE_MODES,
        "loss": LOSSES,
        "crop_sampling": CROP_SAMPLINGS,
    }
    inference_options = ("points", "fast_patches", "median_kernel", "refine")

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
        if num_classes < 2:
            raise ConfigError(f"magnet needs at least 2 classes (its certainty is top1 - top2), got {num_classes}")
        self.backbone = FPNSegmenter(
            encoder,
            num_classes=num_classes,
            in_channels=in_channels,
            pretrained=pretrained,
            decoder=self.options["decoder"],
            output_stride=self.options["output_stride"],
            coarse_logits=self.options["coarse_logits"],
        )
        multiple = self.backbone.size_multiple
        if any(side % multiple for side in self.input_size):
            raise ConfigError(
                f"magnet: decoder {self.options['decoder']!r} needs input_size to be a multiple of "
                f"{multiple}, got {self.input_size}"
            )
        self.refinement = RefinementModule(num_classes)
        self.register_buffer("refinement_trained", torch.zeros((), dtype=torch.uint8))

    # ---- configuration

    @classmethod
    def _resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        preset = options.get("preset", cls.default_options["preset"])
        if preset not in PRESETS:
            raise ConfigError(f"magnet: option preset={preset!r} is not one of {', '.join(repr(p) for p in PRESETS)}")
        decoder = options.get("decoder", cls.default_options["decoder"])
        if "output_stride" not in options and isinstance(decoder, str) and decoder.startswith("smp_"):
            options = {**options, "output_stride": 1}  # the smp decoders' only stride (and an old config's)
        return super()._resolve_options({**copy.deepcopy(PRESETS[preset]), **options})

    def check_options(self) -> None:
        """Check scales, input size, points, kernel, fast patches, crops, sampling temperature and output stride.

        Scales and input size become [h, w].
        """
        opts = self.options
        check_decoder_options("magnet", opts["decoder"], opts["output_stride"], opts["coarse_logits"])
        scales = opts["scales"]
        if not isinstance(scales, (list, tuple)) or not scales:
            raise ConfigError(f"magnet: scales must be a non-empty list of [h, w] sizes, got {scales!r}")
        scales = [_pair(s, "each scale") for s in scales]
        for a, b in zip(scales, scales[1:]):
            if b[0] < a[0] or b[1] < a[1] or b == a:
                raise ConfigError(
                    f"magnet: scales must grow from coarse to fine (each side non-decreasing), got {a} before {b}"
                )
        opts["scales"] = scales
        opts["input_size"] = _pair(opts["input_size"], "input_size")
        if not opts["points"] > 0:
            raise ConfigError(
                f"magnet: option points must be > 0 (a count > 1 or a fraction <= 1), got {opts['points']}"
            )
        kernel = opts["median_kernel"]
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"magnet: option median_kernel must be a positive odd integer, got {kernel}")
        fast = opts["fast_patches"]
        if fast is not None and (isinstance(fast, bool) or not isinstance(fast, int) or fast < 1):
            raise ConfigError(
                f"magnet: option fast_patches must be null (MagNet) or a positive integer (MagNet-Fast), got {fast!r}"
            )
        self._require_positive("crops_per_image")
        self._require_sampling_temperature()

    @property
    def scales(self) -> list[tuple[int, int]]:
        """``(h, w)`` of the whole frame at each configured scale, coarse to fine."""
        return [tuple(s) for s in self.options["scales"]]

    @property
    def input_size(self) -> tuple[int, int]:
        """``(h, w)`` of the network input (every patch is resized to it)."""
        return tuple(self.options["input_size"])

    @property
    def num_scales(self) -> int:
        """The number of configured scales."""
        return len(self.options["scales"])

    def variant(self, **options: Any) -> MagNet:
        """A copy with other options and the same weights.

        Args:
            **options: the options to change, e.g. ``fast_patches=3, points=0.9`` for MagNet-Fast.

        Returns:
            The new MagNet.
        """
        return self.with_options(**options)

    @property
    def refines(self) -> bool:
        """Whether predictions refine past the coarsest scale: option ``refine`` ("never": the
        backbone alone at the coarsest scale, MagNet's own baseline; "always"; "auto": once the
        refinement stage has run)."""
        mode = self.options["refine"]
        return mode == "always" or (mode == "auto" and bool(self.refinement_trained))

    def mark_refinement_trained(self, trained: bool = True) -> None:
        """Set the flag that switches whole-image predictions from the backbone alone to MagNet.

        Args:
            trained: the flag's new value (saved in checkpoints as the ``refinement_trained`` buffer).
        """
        self.refinement_trained.fill_(int(trained))

    # ---- geometry

    def whole_image(self, height: int, width: int) -> bool:
        """Whether an image of this size is processed as one frame (see the module docstring).

        Args:
            height: the image's height in pixels.
            width: the image's width in pixels.

        Returns:
            True when neither side exceeds :data:`WHOLE_IMAGE_SLACK` times the finest scale's.
        """
        fh, fw = self.scales[-1]
        return height <= WHOLE_IMAGE_SLACK * fh and width <= WHOLE_IMAGE_SLACK * fw

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The frame an image is processed in: itself, or the finest scale's size.

        Args:
            height: the image's height in pixels.
            width: the image's width in pixels.

        Returns:
            ``(h, w)`` of the frame: the image's own size for a whole image, else the finest
            scale's size (capped by the image's side).
        """
        if self.whole_image(height, width):
            return height, width
        fh, fw = self.scales[-1]
        return min(height, fh), min(width, fw)

    def frame_geometry(self, frame: Sequence[int]) -> FrameGeometry:
        """Canvases and patch boxes of every scale for one frame.

        Args:
            frame: ``(h, w)`` of the frame in pixels.

        Returns:
            Its :class:`FrameGeometry`: canvases relative to the frame's size (the finest one
            the frame itself), boxes those of the configured scales.
        """
        h, w = int(frame[0]), int(frame[1])
        fh, fw = self.scales[-1]
        if (h, w) == (fh, fw):
            canvases = tuple(self.scales)
        else:
            canvases = tuple(
                (max(1, _round_half_up(h * sh / fh)), max(1, _round_half_up(w * sw / fw))) for sh, sw in self.scales
            )
            canvases = canvases[:-1] + ((h, w),)
        boxes = tuple(tuple(b) for b in patch_boxes(self.scales))
        return FrameGeometry((h, w), canvases, boxes)

    # ---- forward

    def backbone_probs(self, x: torch.Tensor, autocast=None) -> torch.Tensor:
        """Softmax of the backbone's logits at ``x``'s size.

        Args:
            x: normalised images ``(N, C_in, h, w)``.
            autocast: a callable returning the mixed-precision context, or None for none.

        Returns:
            float32 probabilities ``(N, C, h, w)``.
        """
        with autocast() if autocast is not None else nullcontext():
            logits = self.backbone(x.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits.float(), dim=1)

    def refine_probs(self, coarse: torch.Tensor, fine: torch.Tensor, autocast=None) -> torch.Tensor:
        """Softmax of ``refinement(coarse, fine)`` (float32).

        In eval mode the module runs in bands of :data:`REFINE_BAND` rows with a halo of
        :data:`REFINE_HALO` rows (its receptive field), which gives the same values as one
        pass while holding a fraction of its 128-channel activations.

        Args:
            coarse: the coarse probabilities cropped to the patches, ``(N, C, h, w)``.
            fine: the backbone's probabilities of the patches, ``(N, C, h, w)``.
            autocast: a callable returning the mixed-precision context, or None for none.

        Returns:
            float32 probabilities ``(N, C, h, w)``.
        """
        h = coarse.shape[-2]
        context = autocast() if autocast is not None else nullcontext()
        if self.refinement.training or h <= REFINE_BAND + 2 * REFINE_HALO:
            with context:
                logits = self.refinement(
                    coarse.contiguous(memory_format=torch.channels_last),
                    fine.contiguous(memory_format=torch.channels_last),
                )
            return torch.softmax(logits.float(), dim=1)
        out = torch.empty_like(coarse, dtype=torch.float32)
        for top in range(0, h, REFINE_BAND):
            bottom = min(h, top + REFINE_BAND)
            lo, hi = max(0, top - REFINE_HALO), min(h, bottom + REFINE_HALO)
            with context:
                logits = self.refinement(
                    coarse[:, :, lo:hi].contiguous(memory_format=torch.channels_last),
                    fine[:, :, lo:hi].contiguous(memory_format=torch.channels_last),
                )
            out[:, :, top:bottom] = torch.softmax(logits[:, :, top - lo : bottom - lo].float(), dim=1)
        return out

    def forward(self, x: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's logits, the refinement module's, or MagNet's log-probabilities (see the class).

        Args:
            x: normalised images ``(N, C_in, h, w)``: input-size patches in training, whole
                frames in eval mode.
            coarse: coarse probabilities ``(N, C, h, w)`` cropped to the patches ``x``
                (the refinement stage), or None.

        Returns:
            ``(N, C, h, w)``: the refinement module's logits when ``coarse`` is given, else
            the backbone's logits in training mode, MagNet's log-probabilities in eval mode.
        """
        if coarse is not None:
            with torch.no_grad():
                fine = torch.softmax(self.backbone(x).float(), dim=1)
            return self.refinement(coarse.to(fine.dtype), fine)
        if self.training:
            return self.backbone(x)
        return torch.log(self.infer(x).clamp_min(1e-8))

    def infer(self, x: torch.Tensor, refine: bool | None = None, sub_batch: int = 4) -> torch.Tensor:
        """MagNet on each image of a normalised batch, each image one frame.

        Args:
            x: normalised images ``(N, C_in, H, W)``.
            refine: None follows :attr:`refines`; False stops after the coarsest scale.
            sub_batch: patches per backbone / refinement pass.

        Returns:
            float32 probabilities ``(N, C, H, W)``.
        """
        outputs = []
        for image in x.split(1):

            def read(windows: list[Window], image=image) -> torch.Tensor:
                return torch.cat(
                    [
                        resize(
                            image[:, :, win.top : win.bottom, win.left : win.right],
                            self.input_size,
                            area_when_shrinking=True,
                        )
                        for win in windows
                    ]
                )

            outputs.append(self.infer_frame(read, x.shape[-2:], sub_batch=sub_batch, refine=refine))
        return torch.cat(outputs)

    # ---- the method on one frame

    def infer_frame(
        self,
        read_patches: PatchReader,
        frame: Sequence[int],
        *,
        sub_batch: int = 4,
        autocast=None,
        refine: bool | None = None,
        trace: list | None = None,
    ) -> torch.Tensor:
        """MagNet's prediction of one frame, at the frame's size.

        Args:
            read_patches: ``read_patches(windows)`` returns the normalised pixels of frame
                windows resized to ``input_size`` (:data:`PatchReader`).
            frame: ``(h, w)`` of the frame in pixels.
            sub_batch: patches per backbone / refinement pass (at least 1).
            autocast: a callable returning the mixed-precision context, or None for none.
            refine: None follows :attr:`refines`; False stops after the coarsest scale.
            trace: if a list, receives one dict per scale (patches refined, points
                replaced) for tests and benchmarks.

        Returns:
            float32 probabilities ``(1, C, h, w)``.
        """
        if refine is None:
            refine = self.refines
        geometry = self.frame_geometry(frame)
        sub_batch = max(1, int(sub_batch))
        current = self.backbone_probs(read_patches(geometry.windows(0)), autocast)
        current = resize(current, geometry.canvases[0], area_when_shrinking=True)
        if trace is not None:
            trace.append({"scale": 0, "patches": [0], "points": 0})
        if not refine or geometry.num_scales == 1:
            return (
                F.interpolate(current, size=geometry.frame, mode="bilinear", align_corners=False)
                if tuple(current.shape[-2:]) != geometry.frame
                else current
            )
        for scale in range(1, geometry.num_scales):
            current = self._refine_scale(current, scale, geometry, read_patches, sub_batch, autocast, trace)
        return current

    def _refine_scale(
        self,
        current: torch.Tensor,
        scale: int,
        geometry: FrameGeometry,
        read_patches: PatchReader,
        sub_batch: int,
        autocast,
        trace: list | None,
    ) -> torch.Tensor:
        canvas = geometry.canvases[scale]
        boxes = geometry.boxes[scale]
        windows = geometry.windows(scale)
        current_uncertainty = uncertainty(current)
        selected = list(range(len(boxes)))
        fast = self.options["fast_patches"]
        if fast is not None and fast < len(boxes):
            selected = select_patches(current_uncertainty, boxes, fast)

        # refined patches pasted onto the scale's canvas (averaged where they overlap)
        refined = current.new_zeros((1, self.num_classes, *canvas), dtype=torch.float32)
        count = current.new_zeros((1, 1, *canvas), dtype=torch.float32)
        for start in range(0, len(selected), sub_batch):
            chunk = selected[start : start + sub_batch]
            chunk_boxes = [boxes[j] for j in chunk]
            fine = self.backbone_probs(read_patches([windows[j] for j in chunk]), autocast)
            coarse = crop_resize(current, chunk_boxes, self.input_size)
            patches = self.refine_probs(coarse, fine, autocast)
            del fine, coarse
            for k, box in enumerate(chunk_boxes):
                cells = box_on_grid(box, *canvas)
                inside = cells.clip(*canvas)
                if inside.area == 0:
                    continue
                rel = inside.relative_to(cells)
                patch = (
                    F.interpolate(patches[k : k + 1], size=cells.shape, mode="bilinear", align_corners=False)
                    if tuple(patches.shape[-2:]) != cells.shape
                    else patches[k : k + 1]
                )
                refined[(slice(None), slice(None), *inside.slices)] += patch[(slice(None), slice(None), *rel.slices)]
                count[(slice(None), slice(None), *inside.slices)] += 1
            del patches
        covered = count[0, 0] > 0
        refined.div_(count.clamp_(min=1))
        del count

        error = error_score(refined, resize(current_uncertainty, canvas, area_when_shrinking=True))
        error = smooth_error(error, self.input_size, self.options["median_kernel"])
        n = num_points(self.options["points"], int(covered.sum()))
        chosen = select_points(error, n, covered)
        del error, covered
        # the upsampled current prediction where not chosen, in bands of rows (exact crops
        # of the bilinear upsampling), so no second full-size canvas is ever allocated
        rows = max(1, BAND_PIXELS // max(1, canvas[1]))
        for top in range(0, canvas[0], rows):
            band = Window(top, 0, min(rows, canvas[0] - top), canvas[1])
            keep = ~chosen[band.slices]
            if not keep.any():
                continue
            upsampled = upsample_window(current, canvas, band)
            target = refined[:, :, band.top : band.bottom]
            target.copy_(torch.where(keep, upsampled, target))
        if trace is not None:
            trace.append({"scale": scale, "patches": selected, "points": n, "chosen": int(chosen.sum())})
        return refined
