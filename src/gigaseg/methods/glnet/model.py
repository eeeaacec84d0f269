"""GLNet: collaborative global-local networks (Chen et al., CVPR 2019), on any timm encoder.

The network, as in the paper and the authors' code:

- **global branch** (``global_branch``): encoder + GLNet's FPN (``gigaseg.nn.fpn``) on the
  whole image resized to ``size_g`` x ``size_g``; logits at 1/4 of ``size_g``.
- **local branch** (``local_branch``): encoder + an FPN whose every stage takes
  ``concat(local, global crop)`` at the four sharing points (c2..c5, the top-down sums, ps1,
  ps2; ``FPN(shared_inputs=True)``). The global crop of a patch is the rectangle it covers
  on the global map (:func:`crop_global`, ``gigaseg.geometry.crop_resize`` with the cells
  kept inside the map), resized to the local map's size.
- **local -> global** (stage 3): ``global_ext`` holds the duplicate "_ext" layers with doubled
  inputs. The frozen local branch runs over every patch; at each sharing point its maps are
  pasted onto the global grid and averaged over overlaps (``LocalToGlobal``, built on
  ``gigaseg.geometry.PasteAverager``); the global branch then runs its encoder and the ``_ext`` FPN
  layers on ``concat(global, merged local)``, with the stage-1 classifier (as in the
  authors' code, the classifier is shared by both global paths).
- **ensemble**: a 3x3 conv over ``concat(ps3_local, crop of ps3_global)`` (1024 -> classes at the paper's FPN widths).
- **feature-map regulariser** (stage 2): ``fmreg * MSE(ps3_local, crop of ps3_global)``,
  ``fmreg = 0.15``. Losses are focal with ``focal_gamma = 3`` (the option ``loss`` picks another
  of ``gigaseg.nn.losses.LOSSES`` for every stage, e.g. ``weighted_ce`` for rare classes).
- **global_fixed**: stage 3 retrains the global branch, while the local branch keeps being fed
  by the stage-1 global branch it was trained with. That frozen copy is part of the model
  (so one checkpoint predicts on its own): encoder + plain FPN, 28.06 M parameters with
  ResNet-50 branches and 7 classes. Until stage 3 starts it shares the global branch's
  tensors (no memory, stored once in checkpoints); from stage 3 on it is a separate copy.
  The paper's count (both branches, both FPNs with their sharing layers, ensemble head:
  79.2 M) does not include it; :meth:`GLNet.parameter_breakdown` lists both.

Full-resolution logits (option ``output_stride``): every head of the paper predicts at 1/4 of
its input (c2's resolution), which cannot draw a structure narrower than a few 1/4 cells (a
2-px road). ``output_stride=4`` (the default) is the paper's network, unchanged (the same
modules, state dict and outputs: checkpoints written before the option load as 4). With 1 (or
2) each head is a :class:`~gigaseg.nn.decoders.FullResolutionHead` instead, fed with the
encoder's stride-2 map and the pixels of the view it predicts, and the losses compare logits at
that resolution with labels at that resolution (at 1: the labels themselves):

- the global branch (``FPNBranch(output_stride=...)``): ``global_branch.head`` on the global
  ps3, the global encoder's stride-2 map and the global view: logits at ``size_g`` (stage 1);
  the ``_ext`` pass of stage 3 shares that head as it shares the stage-1 classifier at 4;
- the local branch: ``local_branch.head`` on the local ps3, the patch's stride-2 map and the
  patch pixels: local logits at ``size_p`` (its stage-2 loss);
- the ensemble: a head whose input is the ensemble's, ``concat(ps3_local, crop of ps3_global)``
  (twice ps3's channels), with the patch's stride-2 map and pixels: ensemble logits at ``size_p``.

``coarse_logits`` (the ensemble) and ``branch_coarse_logits`` (both branches' heads) keep the
paper's 3x3 classifier of that head beside it and add its upsampled 1/4 logits to the head's.

The feature sharing, the local -> global merge and the feature-map regulariser stay at the FPN's
1/4 resolution, as in the paper. Without autograd the heads' concatenations are never built
(:func:`head_logits`: sums of convolutions over the weight's channel slices, as
``gigaseg.nn.fpn.conv_cat`` does for the FPN).

Stages (``STAGES``): 1 ``global``, 2 ``global2local``, 3 ``local2global``. The stage a model
was trained in lives in the buffer ``trained_stage`` (saved in checkpoints; 0 = untrained,
which predicts like stage 1), so a checkpoint predicts the way its stage defines: stage 1 the
global branch alone; stages 2 and 3 the ensemble over GLNet's patch grid.

Nothing here keeps per-image state: every call takes what it needs (the global features,
the merged local maps) as arguments and returns what it computed. ``forward`` dispatches on
``task`` so training steps go through the (Fabric/DDP-)wrapped module:

- ``forward(x)``: whole images ``(B, C, H, W)`` (normalised) -> logits at ``(H, W)``, computed
  in memory the way the streaming predictor (``gigaseg.methods.glnet.predictor``) computes them;
- ``forward(x, "global", merged=None, fixed=False)`` -> :class:`FPNFeatures` of the global
  branch (``merged``: the stage-3 local->global maps; ``fixed``: the frozen stage-1 copy);
- ``forward(patches, "local", boxes=..., context=..., ensemble=True)`` -> :class:`PatchOutput`;
- ``forward(local_ps3, "ensemble", global_ps3=..., boxes=..., image=..., skip=...)`` -> ensemble
  logits (``image``, the patches, and ``skip``, their stride-2 map, for full-resolution heads).

Huge images: with ``global_context="image"`` (the default, as the paper) the global view is
the whole image resized to ``size_g``. GLNet was trained with 2448 px scenes (a 4.8x
downsample to 508 px); for a 20000 x 20000 image a 508 px global view is a 40x downsample, so
the global branch sees a scale it never saw in training and every 508 px patch covers only
about 3 x 3 cells of the global c2 map. The memory stays bounded either way (the global
features are of fixed size). ``global_context="tile"`` gives each block the global view of the
``context_tile``-px tile around it instead (``gigaseg.methods.glnet.predictor.GLNetTilePredictor``),
so the global branch sees images at the scale it trained at; by default the tile is the side
of the scenes the model was trained on, which training records in the buffer ``scene_side``
(saved in checkpoints; 0 in older ones, which fall back to the paper's 2448 px). The tiles
cost compute, not memory: each tile predicts only its core, the part of the image no other
tile predicts, but tiles overlap, so the pixels near core borders go through the local
branch of two to four tiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...geometry import PasteAverager, PatchGrid, Window, box_on_grid, crop_resize, resize
from ...nn.base import SegmentationModel
from ...nn.decoders import FullResolutionHead, add_coarse_logits
from ...nn.encoders import Encoder, PretrainedSpec
from ...nn.fpn import (
    ALL_MAPS,
    FPN,
    OUTPUT_STRIDES,
    SHARING_POINTS,
    FPNBranch,
    FPNFeatures,
    conv_cat,
    fpn_pass,
    init_conv,
)
from ...nn.losses import LOSSES

__all__ = ["GLNet", "STAGES", "PatchOutput", "LocalToGlobal", "crop_global", "head_logits", "stage_number"]

#: the tile side of the "tile" policy when neither the option nor the weights give one: the paper's scenes
PAPER_SCENE_SIDE = 2448

#: the three training stages, in order (stage numbers 1, 2, 3)
STAGES = ("global", "global2local", "local2global")

#: the maps of one FPN pass that other branches share
_SHARED = SHARING_POINTS  # ("c", "p", "ps1", "ps2")


def stage_number(stage: int | str) -> int:
    """The number of a training stage given by number or name.

    Args:
        stage: 0 (untrained), 1, 2 or 3, or a stage name (``"global"``, ``"global2local"``,
            ``"local2global"``).

    Returns:
        1, 2 or 3 for a name; the number itself (0 to 3) for a number.

    Raises:
        ConfigError: an unknown name, or anything else than an int from 0 to 3 (bools included).
    """
    if isinstance(stage, str):
        if stage not in STAGES:
            raise ConfigError(f"glnet has no stage {stage!r}; its stages are {', '.join(STAGES)}")
        return STAGES.index(stage) + 1
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError(f"a GLNet stage is 0 (untrained), 1, 2, 3 or a stage name, got {stage!r}")
    return stage


def _cells_inside(box, height: int, width: int) -> Window:
    """``gigaseg.geometry.box_on_grid`` of ``box``, shifted back inside the map where rounding pushed it out.

    Patches near the far border of a large image can round to cells starting at the map's
    edge on coarse maps (a 508 px patch of a 20000 px image is 0.4 cells of the 16-cell c5
    map); GLNet's slicing would then crop nothing. Shifting keeps the cell count and the
    patch's side of the map.
    """
    cells = box_on_grid(box, height, width)
    top = max(0, min(cells.top, height - cells.height))
    left = max(0, min(cells.left, width - cells.width))
    return Window(top, left, cells.height, cells.width).clip(height, width)


def crop_global(features: torch.Tensor, boxes, out_size: Sequence[int], batch_index=None) -> torch.Tensor:
    """GLNet's global -> local crop: ``gigaseg.geometry.crop_resize`` with cells kept inside the map.

    Each box's cells on the ``(H, W)`` map (``gigaseg.geometry.box_on_grid``, shifted inside
    when rounding pushed them past the border) are resized bilinearly to ``out_size``; crops
    of equal size are resized in one call. Differentiable.

    Args:
        features: the global maps ``(B, C, H, W)``.
        boxes: the ``N`` patches' normalised boxes ``(y0, x0, y1, x1)``
            (``gigaseg.geometry.normalized_box``): a sequence, an array or a tensor ``(N, 4)``.
        out_size: the crops' ``(height, width)``.
        batch_index: ``batch_index[i]`` is the map box ``i`` is cut from; None: map 0 for a
            single map (``B == 1``), map ``i`` when ``B == N``.

    Returns:
        The crops ``(N, C, *out_size)``, in ``features``' dtype.
    """
    return crop_resize(features, boxes, tuple(out_size), batch_index, to_cells=_cells_inside)


def _crop_like(features, boxes, size, dtype, batch_index) -> torch.Tensor:
    return crop_global(features, boxes, size, batch_index).to(dtype)


def head_logits(
    head: FullResolutionHead, features: list, image: torch.Tensor, skip: torch.Tensor | None
) -> torch.Tensor:
    """``head(torch.cat(features, 1), image, skip)``, without building concatenations when autograd is off.

    With autograd it is the head's own forward on the concatenated features. Without it, each
    convolution that takes a concatenation (``reduce`` over the features, ``fuse2`` over the
    upsampled features and the stride-2 map, ``fuse1`` over the upsampled features and the
    full-resolution pixel stem) is computed as a sum of convolutions over its weight's
    input-channel slices (``gigaseg.nn.fpn.conv_cat``), one part resized or made at a time, so
    the full-resolution concatenation never exists: the same numbers (up to float summation
    order) at a lower peak.

    Args:
        head: the head (in eval mode when autograd is off: its BatchNorms then use their running
            statistics, as the head's forward would).
        features: the 1/4-resolution maps to concatenate, all of one size (items may be
            zero-argument callables that make them; without autograd the list's items are set
            to None as they are used).
        image: the pixels the head predicts ``(N, image_channels, H, W)``.
        skip: the encoder's stride-2 map; ignored (may be None) when the head makes its own.

    Returns:
        Logits ``(N, num_classes, H, W)`` (output stride 1) or at the stride-2 map's size (2).

    Raises:
        ValueError: ``skip`` missing for a head built to use the encoder's stride-2 map.
    """
    skip = skip if head.uses_encoder_skip else None
    if torch.is_grad_enabled():
        parts = [x() if callable(x) else x for x in features]
        return head(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), image, skip)
    if skip is None:
        if head.uses_encoder_skip:
            raise ValueError("this head was built with skip_channels: pass the encoder's stride-2 map as skip")
        skip = head.stem2(image)
    coarse = None if head.coarse is None else conv_cat(head.coarse, list(features))
    x = _conv_bn_relu(head.reduce, features)
    x = _conv_bn_relu(head.fuse2, [x, skip], skip.shape[-2:])
    del skip
    if head.fuse1 is not None:
        x = _conv_bn_relu(head.fuse1, [x, functools.partial(head.stem1, image)], image.shape[-2:])
    logits = head.classifier(x)
    return logits if coarse is None else add_coarse_logits(logits, coarse)


def _conv_bn_relu(block: nn.Sequential, parts: list, size=None) -> torch.Tensor:
    """A conv-BN-ReLU block on the concatenation of ``parts``, its conv as :func:`conv_cat`'s sum."""
    conv, norm, act = block
    return act(norm(conv_cat(conv, parts, size)))


@dataclass
class PatchOutput:
    """What the local branch returns for a sub-batch of patches.

    Attributes:
        local: the local branch's maps (``logits``: the local logits at 1/``output_stride`` of
            the patch: 1/4 with the paper's heads, the patch's size at output stride 1).
        ensemble: the ensemble logits (the local logits' size); None without the ensemble.
        global_ps3: the crop of the global ps3 each patch was ensembled with (at ps3's 1/4
            resolution, whatever the output stride); None without the ensemble.
        skip: the local encoder's stride-2 map of the patches, when ``"skip"`` was in ``keep``
            and the heads use it (output stride 1 or 2); else None.
    """

    local: FPNFeatures
    ensemble: torch.Tensor | None
    global_ps3: torch.Tensor | None
    skip: torch.Tensor | None = None


class LocalToGlobal:
    """GLNet's local -> global merge for one image: paste-averages of the local maps.

    Every local map is resized to its patch's footprint on the global grid of its sharing
    point and level, summed there and divided by the overlap count
    (``gigaseg.geometry.PasteAverager``). Call :meth:`add` for each sub-batch (or
    :meth:`add_point` from the ``visit`` of a local pass) and :meth:`result` for the
    ``merged`` argument of :meth:`GLNet.global_features`. Holds one global-resolution map per
    point and level: bounded memory whatever the image size.

    Args:
        sizes: for each sharing point (``"c"``, ``"p"``, ``"ps1"``, ``"ps2"``), the global
            branch's map sizes ``(h, w)`` at levels 2..5.
    """

    def __init__(self, sizes: dict[str, list[tuple[int, int]]]):
        self.averagers = {point: [PasteAverager(size) for size in sizes[point]] for point in _SHARED}

    @classmethod
    def like(cls, features: FPNFeatures) -> LocalToGlobal:
        """A merger onto the grids of ``features``.

        Args:
            features: the global branch's maps of this image (only their sizes are used).

        Returns:
            An empty ``LocalToGlobal``.
        """
        return cls({point: [tuple(m.shape[-2:]) for m in getattr(features, point)] for point in _SHARED})

    def add_point(self, point: str, maps: Sequence[torch.Tensor], boxes) -> None:
        """Paste a sub-batch's local maps at one sharing point (detached: no gradient flows back).

        Args:
            point: the sharing point, ``"c"``, ``"p"``, ``"ps1"`` or ``"ps2"``.
            maps: the local maps at levels 2..5, each ``(N, C, h, w)`` for ``N`` patches.
            boxes: the ``N`` patches' normalised boxes on the image.
        """
        for averager, patch_maps in zip(self.averagers[point], maps, strict=True):
            averager.add(patch_maps.detach(), boxes)

    def add(self, local: FPNFeatures, boxes) -> None:
        """Paste a sub-batch's local maps at every sharing point.

        Args:
            local: the local branch's maps of ``N`` patches (``c``, ``p``, ``ps1``, ``ps2`` kept).
            boxes: the ``N`` patches' normalised boxes on the image.
        """
        for point in _SHARED:
            self.add_point(point, getattr(local, point), boxes)

    def result(self) -> dict[str, list[torch.Tensor]]:
        """The merged maps: what was pasted, averaged over overlaps (0 where no patch landed).

        Returns:
            ``{point: [map (1, C, h, w) per level 2..5]}`` on the global branch's grids.

        Raises:
            ValueError: nothing was pasted.
        """
        return {point: [a.result() for a in averagers] for point, averagers in self.averagers.items()}


class GLNet(SegmentationModel):
    """GLNet's two branches, the ``_ext`` layers, the ensemble head and the frozen stage-1 copy.

    Args:
        encoder: the timm name of the branches' encoder (ResNet-50 in the paper).
        num_classes: output classes.
        in_channels: input bands.
        pretrained: the global and local encoders' initial weights: False or None (random),
            True (timm's) or a local weights file. The frozen copy starts as the global branch.
        **options: the options below; those not given take ``default_options``.

    Options:
        size_g: side of the global view (the whole image resized), 508 in the paper.
        size_p: side of the full-resolution local patches, 508 in the paper.
        min_overlap: GLNet's patch grid overlaps neighbouring patches by at least this (50 px).
        fmreg: weight of the stage-2 feature-map regulariser (0.15).
        focal_gamma: gamma of the focal loss (3), used when ``loss`` is ``"focal"``.
        loss: the loss of every stage's segmentation terms (``gigaseg.nn.losses.LOSSES``):
            ``"focal"`` (the paper's, with ``focal_gamma``; the default), ``"ce"``,
            ``"weighted_ce"`` (class weights from the training masks), ``"ce_dice"``,
            ``"lovasz"`` or ``"ce_lovasz"``. A checkpoint written before the option loads as
            ``"focal"``.
        global_context: how prediction gives patches their global view. ``"image"``: the whole
            image at ``size_g``, whatever the image size (see the module docstring). ``"tile"``:
            the thumbnail of a ``context_tile``-px tile around each block, so images far larger
            than the training scenes are seen at the training scale
            (``gigaseg.methods.glnet.predictor.GLNetTilePredictor``). An inference option:
            ``--set global_context=tile``.
        context_tile: side of the tiles of the ``"tile"`` policy; 0 (the default): the side of
            the scenes this model was trained on (:attr:`context_side`).
        fpn_channels: lateral width of every FPN (256 in the paper; the smoothing width is half).
            Narrower FPNs are for CPU-scale comparisons with the baselines' ``fpn_channels``:
            at 64 the FPN convolutions, which dominate GLNet's cost per patch, are ~16x cheaper.
        output_stride: input pixels per logit pixel of every head: 4 (the paper's heads, the
            default), 2 or 1 (full-resolution heads, see the module docstring). It shapes the
            network, so it cannot change after training.
        coarse_logits: with output stride 1 or 2, the full-resolution ensemble head also keeps
            the paper's ensemble classifier (3x3 conv on ``concat(ps3_local, crop of
            ps3_global)`` at 1/4) and adds its upsampled logits to its own
            (:class:`~gigaseg.nn.decoders.FullResolutionHead`'s ``coarse_kernel``), so the
            global context reaches the logits as directly as with the paper's head. False (the
            default, and what checkpoints written before the option load as): the head alone.
            No effect at output stride 4, whose ensemble is that classifier.
        branch_coarse_logits: with output stride 1 or 2, the global and local branches'
            full-resolution heads also keep the paper's branch classifier (3x3 conv on the
            branch's ps3 at 1/4) and add its upsampled logits to their own
            (``FPNBranch(coarse_logits=True)``); stage 1 and stage 3 classify the global view
            with that head, so the global FPN's ps3 reaches the logits without the head's fine
            stages. False (the default, and what checkpoints written before the option load
            as): the heads alone. No effect at output stride 4.

    Raises:
        ConfigError: an unknown option, or an option of the wrong type or out of range.
    """

    default_options: dict[str, Any] = {
        "size_g": 508,
        "size_p": 508,
        "min_overlap": 50,
        "fmreg": 0.15,
        "focal_gamma": 3.0,
        "loss": "focal",
        "global_context": "image",
        "fpn_channels": 256,
        "context_tile": 0,
        "output_stride": 4,
        "coarse_logits": False,
        "branch_coarse_logits": False,
    }
    option_choices = {
        "global_context": ("image", "tile"),
        "output_stride": OUTPUT_STRIDES,
        "loss": LOSSES,
    }
    inference_options = ("min_overlap", "global_context", "context_tile")

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
        width = self.options["fpn_channels"]
        stride = self.options["output_stride"]
        widths = {"lateral_channels": width, "smooth_channels": max(1, width // 2)}
        kw = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "output_stride": stride,
            "coarse_logits": self.options["branch_coarse_logits"],
            **widths,
        }
        self.global_branch = FPNBranch(encoder, pretrained=pretrained, **kw)
        self.local_branch = FPNBranch(encoder, pretrained=pretrained, shared_inputs=True, **kw)
        channels = self.global_branch.encoder.out_channels
        merged = self.global_branch.fpn.merged_channels  # ps3 channels (512 at the paper's widths)
        #: the ensemble head: the paper's 3x3 conv (output stride 4) or a full-resolution head
        self.ensemble: nn.Module
        if stride == 4:
            self.global_ext = FPN(channels, num_classes, shared_inputs=True, **widths)
            self.global_ext.classifier = None  # stage 3 classifies with the stage-1 classifier
            self.ensemble = init_conv(2 * merged, num_classes, 3)
        else:  # stage 3 classifies with the global branch's head
            self.global_ext = FPN(channels, None, shared_inputs=True, **widths)
            self.ensemble = FullResolutionHead(
                2 * merged,
                num_classes,
                image_channels=in_channels,
                skip_channels=self.local_branch.encoder.stride2_channels,
                output_stride=stride,
                coarse_kernel=3 if self.options["coarse_logits"] else 0,
            )
        with torch.device("meta"):  # its tensors are the global branch's until stage 3 starts
            self.global_fixed = FPNBranch(encoder, pretrained=False, **kw)
        self._tie_fixed()
        self.register_buffer("trained_stage", torch.tensor(0, dtype=torch.long))
        # the median longer side of the training images (0: unknown), for the "tile" policy
        self.register_buffer("scene_side", torch.tensor(0, dtype=torch.long))
        self._register_load_state_dict_pre_hook(_tie_or_untie_on_load, with_module=True)

    def check_options(self) -> None:
        """Positive sides and width, ``0 <= min_overlap < size_p``, ``context_tile`` 0 or > ``size_p``."""
        self._require_positive("size_g", "size_p", "fpn_channels")
        if not 0 <= self.options["min_overlap"] < self.options["size_p"]:
            raise ConfigError(
                f"glnet: option min_overlap must be in [0, size_p={self.options['size_p']}), "
                f"got {self.options['min_overlap']}"
            )
        tile = self.options["context_tile"]
        if tile != 0 and tile <= self.options["size_p"]:
            raise ConfigError(
                f"glnet: option context_tile must be larger than size_p={self.options['size_p']} "
                f"(a tile holds whole patches), or 0 for the training scenes' side; got {tile}"
            )
        if self.options["fmreg"] < 0 or self.options["focal_gamma"] < 0:
            raise ConfigError("glnet: options fmreg and focal_gamma must be >= 0")

    # ------------------------------------------------------------------ stages

    @property
    def stage(self) -> int:
        """The stage this model predicts as: 1, 2 or 3 (an untrained model predicts as stage 1)."""
        return max(1, int(self.trained_stage))

    def set_stage(self, stage: int | str) -> None:
        """Record the stage the weights belong to (``before_stage`` does it when a stage starts).

        Args:
            stage: a stage number (0 to 3) or name.

        Raises:
            ConfigError: ``stage`` is no stage (see :func:`stage_number`).
        """
        self.trained_stage.fill_(stage_number(stage))

    @property
    def context_side(self) -> int:
        """The tile side of the ``"tile"`` policy, in pixels.

        The ``context_tile`` option, else the recorded training scenes' side (``scene_side``),
        else the paper's 2448 px; never smaller than ``size_p + 1``.
        """
        side = int(self.options["context_tile"]) or int(self.scene_side) or PAPER_SCENE_SIDE
        return max(side, int(self.options["size_p"]) + 1)

    # The frozen stage-1 copy. Until stage 3 starts it equals the global branch, so its
    # parameters and buffers ARE the global branch's (tied: no memory, checkpoints store them
    # once, and it follows the global branch through stages 1 and 2). Stage 3's before_stage
    # snapshots it (:meth:`copy_global_to_fixed`); loading a state dict ties or unties it by
    # whether the dict's two copies are equal.

    @property
    def fixed_is_tied(self) -> bool:
        """True while ``global_fixed`` shares the global branch's tensors."""
        mine = dict(self.global_branch.named_parameters())
        return all(p is mine[name] for name, p in self.global_fixed.named_parameters())

    def _tie_fixed(self) -> None:
        for module, source in zip(self.global_fixed.modules(), self.global_branch.modules()):
            for key in list(module._parameters):
                module._parameters[key] = source._parameters[key]
            for key in list(module._buffers):
                module._buffers[key] = source._buffers[key]

    def _untie_fixed(self) -> None:
        for module in self.global_fixed.modules():
            for key, value in list(module._parameters.items()):
                if value is not None:
                    module._parameters[key] = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
            for key, value in list(module._buffers.items()):
                if value is not None:
                    module._buffers[key] = value.detach().clone()

    def copy_global_to_fixed(self) -> None:
        """``global_fixed`` := a separate copy of the global branch now (the weights stage 3 keeps frozen)."""
        self._tie_fixed()
        self._untie_fixed()

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per part, and what the paper counts.

        The ``global_branch`` figure includes its plain FPN's classifier (output stride 4) or
        its full-resolution head (1 or 2), which the ``_ext`` layers share; ``ensemble`` is
        the paper's 3x3 conv or the ensemble's full-resolution head.

        Returns:
            Parameter counts keyed ``global_branch``, ``global_ext``, ``local_branch``,
            ``ensemble``, ``global_fixed`` (counted even while it shares the global branch's
            tensors), ``paper`` (what the paper counts: all but ``global_fixed``) and ``total``
            (``paper + global_fixed``).
        """
        parts = {
            name: sum(p.numel() for p in getattr(self, name).parameters())
            for name in ("global_branch", "global_ext", "local_branch", "ensemble", "global_fixed")
        }
        parts["paper"] = sum(v for k, v in parts.items() if k != "global_fixed")
        parts["total"] = parts["paper"] + parts["global_fixed"]
        return parts

    def grid(self, height: int, width: int) -> PatchGrid:
        """GLNet's patch grid over an image: ``size_p`` patches overlapping by at least ``min_overlap``.

        Args:
            height: the image height in pixels.
            width: the image width in pixels.

        Returns:
            The grid (``PatchGrid.glnet``).
        """
        return PatchGrid.glnet(height, width, self.options["size_p"], self.options["min_overlap"])

    # ------------------------------------------------------------------ the parts

    def global_features(
        self, x: torch.Tensor, merged: dict[str, list[torch.Tensor]] | None = None, fixed: bool = False, keep=ALL_MAPS
    ) -> FPNFeatures:
        """The global branch on global views ``x``; with ``merged``, through the ``_ext`` layers.

        Args:
            x: normalised global views ``(B, C, size_g, size_g)``.
            merged: stage 3's merged local maps (:meth:`LocalToGlobal.result`), resized to the
                global maps and concatenated with them at every sharing point; None: the plain FPN.
            fixed: run the frozen stage-1 copy instead (always under no_grad, plain FPN).
            keep: the maps to keep (``gigaseg.nn.fpn.fpn_pass``); the others are released early.

        Returns:
            The branch's maps. The logits are the stage-1 classifier's at 1/4 of the view (a
            ResNet encoder, output stride 4), or the global branch's full-resolution head's at
            1/``output_stride`` of the view; the ``_ext`` pass shares that classifier or head.

        Raises:
            ValueError: ``fixed`` with ``merged`` (the frozen copy has no ``_ext`` layers).
        """
        if fixed:
            if merged is not None:
                raise ValueError("the frozen stage-1 global copy has no _ext layers")
            with torch.no_grad():
                return self._branch_pass(self.global_fixed, self.global_fixed.fpn, x, None, None, keep)
        if merged is None:
            return self._branch_pass(self.global_branch, self.global_branch.fpn, x, None, None, keep)

        def share(point: str, own: list[torch.Tensor]) -> list[torch.Tensor]:
            return [resize(m.to(o.dtype), o.shape[-2:]) for m, o in zip(merged[point], own, strict=True)]

        return self._branch_pass(self.global_branch, self.global_ext, x, share, self.global_branch.fpn.classifier, keep)

    def _branch_pass(self, branch: FPNBranch, fpn: FPN, x, share, classifier, keep) -> FPNFeatures:
        """``branch``'s encoder, then ``fpn``'s pass; with a full-resolution head, its logits when kept."""
        head = branch.head
        if head is None or "logits" not in keep:
            return fpn_pass(fpn, branch.encoder(x), share, classifier=classifier, keep=keep)
        skip, c = branch.encoder.forward_with_stride2(x)
        features = fpn_pass(fpn, c, share, keep=set(keep) | {"ps3"})
        del c
        features.logits = head_logits(head, [features.ps3], x, skip)
        if "ps3" not in keep:
            features.ps3 = None
        return features

    def local_features(
        self,
        patches: torch.Tensor,
        boxes,
        context: FPNFeatures,
        batch_index=None,
        keep=ALL_MAPS,
        visit: Callable[[str, list[torch.Tensor]], None] | None = None,
    ) -> FPNFeatures:
        """The local branch on ``patches`` fed with crops of the global ``context`` at every sharing point.

        Each crop (:func:`crop_global`) is made when its level is computed, so without
        autograd one crop is alive at a time.

        Args:
            patches: normalised full-resolution patches ``(N, C, size_p, size_p)``.
            boxes: the patches' ``N`` normalised boxes on the image (``gigaseg.geometry.normalized_box``).
            context: the global branch's maps (``c``, ``p``, ``ps1`` and ``ps2`` are used).
            batch_index: crop ``i`` is cut from context map ``batch_index[i]`` (see
                :func:`crop_global`); None: map 0 of a one-image context.
            keep: the maps to keep (``gigaseg.nn.fpn.fpn_pass``).
            visit: ``visit(point, own_maps)`` sees the local maps at each sharing point (the
                local -> global merge); None: nothing does.

        Returns:
            The local branch's maps (logits at 1/4 of the patch for a ResNet encoder with the
            paper's head, at 1/``output_stride`` with a full-resolution head).

        Raises:
            ValueError: the context and the local branch have different numbers of levels.
        """
        return self._local_pass(patches, boxes, context, batch_index, keep, visit, need_skip=False)[0]

    def _local_pass(
        self, patches, boxes, context: FPNFeatures, batch_index, keep, visit, need_skip: bool
    ) -> tuple[FPNFeatures, torch.Tensor | None]:
        """:meth:`local_features`, and the local encoder's stride-2 map when ``need_skip`` (None without one)."""
        head = self.local_branch.head
        logits = head is not None and "logits" in keep
        if head is None:
            skip, c = None, self.local_branch.encoder(patches)
        else:
            skip, c = self.local_branch.encoder.forward_with_stride2(patches)
            if not (logits or need_skip):
                skip = None  # released before the FPN pass

        def share(point: str, own: list[torch.Tensor]) -> list:
            if visit is not None:
                visit(point, own)
            maps = getattr(context, point)
            if len(maps) != len(own):
                raise ValueError(f"the context has {len(maps)} maps at {point!r}, the local branch {len(own)}")
            # each crop is made when its level is computed (one crop alive at a time without autograd)
            return [
                functools.partial(_crop_like, g, boxes, o.shape[-2:], o.dtype, batch_index) for g, o in zip(maps, own)
            ]

        features = fpn_pass(self.local_branch.fpn, c, share, keep=set(keep) | ({"ps3"} if logits else set()))
        del c
        if logits:
            features.logits = head_logits(head, [features.ps3], patches, skip)
            if "ps3" not in keep:
                features.ps3 = None
        return features, skip if need_skip else None

    def ensemble_logits(
        self,
        local_ps3: torch.Tensor,
        global_ps3: torch.Tensor,
        boxes,
        batch_index=None,
        image: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLNet's ensemble head on patches' local ps3 and the matching crops of the global ps3.

        Args:
            local_ps3: the local branch's ps3 ``(N, C, h, w)``.
            global_ps3: the global ps3 ``(B, C, H, W)`` to crop (gradients reach it).
            boxes: the ``N`` patches' normalised boxes.
            batch_index: the global map each crop comes from (see :func:`crop_global`).
            image: the normalised patches ``(N, in_channels, size_p, size_p)``; needed by a
                full-resolution ensemble head (output stride 1 or 2), unused at 4.
            skip: the local encoder's stride-2 map of the patches (:class:`PatchOutput`'s
                ``skip``); needed by a full-resolution head whose encoder has that level.

        Returns:
            ``(logits, crop)``: the ensemble logits ``(N, num_classes, h, w)`` at ps3's size
            (output stride 4) or at 1/``output_stride`` of ``image``, and the crop of the global
            ps3 ``(N, C, h, w)`` (in ``local_ps3``'s dtype) they were computed from.

        Raises:
            ValueError: a full-resolution ensemble head without ``image`` (or without ``skip``
                when it uses the encoder's stride-2 map).
        """
        crop = crop_global(global_ps3, boxes, local_ps3.shape[-2:], batch_index).to(local_ps3.dtype)
        if not isinstance(self.ensemble, FullResolutionHead):
            return conv_cat(self.ensemble, [local_ps3, crop]), crop
        if image is None:
            raise ValueError(
                f"glnet's ensemble at output_stride {self.options['output_stride']} needs the patches' pixels (image=)"
            )
        return head_logits(self.ensemble, [local_ps3, crop], image, skip), crop

    def patch_forward(
        self,
        patches: torch.Tensor,
        boxes,
        context: FPNFeatures,
        ensemble_from: torch.Tensor | None = None,
        batch_index=None,
        ensemble: bool = True,
        keep=ALL_MAPS,
    ) -> PatchOutput:
        """Local branch + ensemble for a sub-batch of patches.

        Args:
            patches: normalised full-resolution patches ``(N, C, size_p, size_p)``.
            boxes: the ``N`` patches' normalised boxes.
            context: the global maps the local branch crops (:meth:`global_features`).
            ensemble_from: the global ps3 the ensemble crops (stage 3: that of the ``_ext``
                pass); None: ``context.ps3``.
            batch_index: the context map each patch crops (see :func:`crop_global`).
            ensemble: run the ensemble head (the local ``ps3`` is then kept whatever ``keep`` says).
            keep: the local maps to keep (``gigaseg.nn.fpn.fpn_pass``), and ``"skip"``: return
                the local encoder's stride-2 map (for a later :meth:`ensemble_logits` call at
                output stride 1 or 2).

        Returns:
            The local maps, and the ensemble logits with their global ps3 crops (both None
            when ``ensemble`` is False).
        """
        keep = set(keep) | ({"ps3"} if ensemble else set())
        want_skip = "skip" in keep
        keep.discard("skip")
        need_skip = want_skip or (ensemble and isinstance(self.ensemble, FullResolutionHead))
        local, skip = self._local_pass(patches, boxes, context, batch_index, keep, None, need_skip=need_skip)
        if not ensemble:
            return PatchOutput(local, None, None, skip if want_skip else None)
        source = ensemble_from if ensemble_from is not None else context.ps3
        logits, crop = self.ensemble_logits(local.ps3, source, boxes, batch_index, image=patches, skip=skip)
        return PatchOutput(local, logits, crop, skip if want_skip else None)

    def forward(self, x: torch.Tensor, task: str = "image", **kwargs: Any):
        """Run one of GLNet's computations (see the module docstring).

        Training steps call the (Fabric/DDP-)wrapped module, so every part goes through here.

        Args:
            x: images for ``"image"``, global views for ``"global"``, patches for ``"local"``,
                local ps3 maps for ``"ensemble"``.
            task: ``"image"`` (:meth:`segment`), ``"global"`` (:meth:`global_features`),
                ``"local"`` (:meth:`patch_forward`) or ``"ensemble"`` (:meth:`ensemble_logits`).
            **kwargs: that method's other arguments.

        Returns:
            Logits ``(B, num_classes, H, W)`` for ``"image"``, ``FPNFeatures`` for ``"global"``,
            a :class:`PatchOutput` for ``"local"``, the ensemble logits for ``"ensemble"``.

        Raises:
            ValueError: an unknown ``task``.
        """
        if task == "image":
            return self.segment(x, **kwargs)
        if task == "global":
            return self.global_features(x, **kwargs)
        if task == "local":
            return self.patch_forward(x, **kwargs)
        if task == "ensemble":
            return self.ensemble_logits(x, **kwargs)[0]
        raise ValueError(f"unknown GLNet task {task!r}")

    # ------------------------------------------------------------------ whole images in memory

    def global_view(self, x: torch.Tensor) -> torch.Tensor:
        """Whole images resized to ``size_g`` x ``size_g`` (area when shrinking, bilinear otherwise).

        Args:
            x: normalised images ``(B, C, H, W)``.

        Returns:
            The global views ``(B, C, size_g, size_g)``.
        """
        return resize(x, (self.options["size_g"],) * 2, area_when_shrinking=True)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of whole (normalised) images, computed the way the streaming predictor computes them.

        Stage 1: the global logits upsampled. Stages 2 and 3: the ensemble logits of every
        patch of GLNet's grid, upsampled to the patch size (already there at output stride 1)
        and averaged where patches overlap.
        Everything is held in memory: for small images, tests and reference; whole-image
        prediction of large images goes through its predictor (``gigaseg.methods.glnet.predictor``).

        Args:
            x: normalised images ``(B, C, H, W)``.

        Returns:
            Logits ``(B, num_classes, H, W)``.
        """
        stage = self.stage
        height, width = x.shape[-2:]
        out = []
        for b in range(x.shape[0]):
            image = x[b : b + 1]
            view = self.global_view(image)
            if stage == 1:
                out.append(resize(self.global_features(view).logits, (height, width)))
                continue
            grid = self.grid(height, width)
            boxes = grid.normalized_boxes()
            pad_h, pad_w = grid.padded_shape[0] - height, grid.padded_shape[1] - width
            padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
            patches = torch.cat([padded[:, :, w.top : w.bottom, w.left : w.right] for w in grid.windows])
            if stage == 2:
                context = self.global_features(view)
                result = self.patch_forward(patches, boxes, context)
            else:
                context = self.global_features(view, fixed=True)
                merger = LocalToGlobal.like(context)
                local = self.local_features(patches, boxes, context)
                merger.add(local, boxes)
                glob = self.global_features(view, merger.result())
                result = self.patch_forward(patches, boxes, context, ensemble_from=glob.ps3)
            logits = resize(result.ensemble, grid.patch)
            total = logits.new_zeros((1, self.num_classes, *grid.padded_shape))
            count = logits.new_zeros((1, 1, *grid.padded_shape))
            for window, patch_logits in zip(grid.windows, logits):
                total[(0, slice(None), *window.slices)] += patch_logits
                count[(0, slice(None), *window.slices)] += 1
            out.append((total / count.clamp(min=1))[:, :, :height, :width])
        return torch.cat(out)

    # ------------------------------------------------------------------ shapes

    def context_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """Shapes of one global view's maps at each sharing point and ps3, from a meta-device pass.

        Returns:
            ``{point: [(C, h, w) per level]}`` for ``"c"``, ``"p"``, ``"ps1"`` and ``"ps2"``
            (levels 2..5), and ``"ps3"``: one shape at level 2's size.
        """
        size = self.options["size_g"]
        meta = torch.empty((1, self.in_channels, size, size), device="meta")
        encoder = self.global_branch.encoder
        shapes: dict[str, list[tuple[int, ...]]] = {}
        with torch.no_grad():
            c = _meta_call(encoder, meta)
        shapes["c"] = [tuple(m.shape[1:]) for m in c]
        lateral = self.global_branch.fpn.lateral_convs[0].out_channels
        smooth = self.global_branch.fpn.smooth2_convs[0].out_channels
        sizes = [s[1:] for s in shapes["c"]]
        shapes["p"] = [(lateral, *s) for s in sizes]
        shapes["ps1"] = [(lateral, *s) for s in sizes]
        shapes["ps2"] = [(smooth, *s) for s in sizes]
        shapes["ps3"] = [(4 * smooth, *sizes[0])]
        return shapes


def _tie_or_untie_on_load(module: GLNet, state_dict, prefix, *_args) -> None:
    """Load pre-hook: tie ``global_fixed`` to the global branch when the incoming copies are equal;
    checkpoints from before ``scene_side`` was recorded load with it unknown (0)."""
    state_dict.setdefault(f"{prefix}scene_side", torch.tensor(0, dtype=torch.long))
    pairs = []
    for key in module.global_branch.state_dict():
        a, b = state_dict.get(f"{prefix}global_branch.{key}"), state_dict.get(f"{prefix}global_fixed.{key}")
        if a is None or b is None:
            return  # an incomplete dict: leave the tie as it is, load_state_dict reports the keys
        pairs.append((a, b))
    equal = all(a is b or (a.shape == b.shape and torch.equal(a, b)) for a, b in pairs)
    if equal and not module.fixed_is_tied:
        module._tie_fixed()
    elif not equal and module.fixed_is_tied:
        module._untie_fixed()


def _meta_call(module: nn.Module, x: torch.Tensor):
    """``module(x)`` for a meta-device ``x`` (a meta copy of ``module`` when it holds real weights)."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "meta":
        with torch.device("meta"):
            module = Encoder(module.name, in_channels=module.in_channels, out_indices=module.out_indices)
    return module(x)
