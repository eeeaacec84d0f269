"""The framework for object detection (``patchgd_detector``): FCOS on patch-global feature pyramids.

"Resource Efficient Perception for Vision Systems" (arXiv 2405.07166) extends PatchGD with a
global patch to detection: theta1 (a backbone + feature pyramid) encodes each of the ``m x n``
patches of a canvas and the canvas downsampled to one patch (the global patch); per pyramid
level the ``mn + 1`` maps are fused by theta2 and FCOS's heads predict the boxes. Training is
the framework's: the maps of every patch are filled without gradients, then per inner
iteration ``k`` sampled patches are re-encoded *with* gradients, written into (a copy of) the
filled maps, and the FCOS losses are back-propagated (``gigaseg.methods.patchgd.recipe``).

theta1 (:class:`PyramidEncoder`): a timm encoder (``gigaseg.nn.encoders.Encoder``) and
torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` as FCOS builds it (P3..P5 from
c3..c5, P6 and P7 from P5 by stride-2 convolutions, ``latent_dim`` channels; ``min_level`` 2
adds P2, ``max_level`` 5 or 6 stops earlier). A patch of side ``p`` gives per level ``l`` a map
``(latent_dim, p / 2**l, p / 2**l)``. FCOS's towers and final layers
(:class:`gigaseg.nn.fcos.FCOSHeads`, torchvision's ``FCOSHead``) run once on the fused maps:
the paper's public code (``classification_detection_patchgd/detection.py``) runs torchvision's
whole FCOS head (towers included) on the fused maps, and so does this module.

``fusion`` (theta2, per level):

``"paper"``
    As the paper and its public code: the ``mn + 1`` maps of a level are stacked in
    channels, ``(d (mn + 1), h, w)``, and reduced to ``d`` channels. ``paper_reduce="conv"``
    (the paper's text): one 1x1 convolution from ``d (mn + 1)`` to ``d`` channels;
    ``"max"`` (the public code): a 1x1 convolution ``d -> d`` on each map, then the maximum
    over the ``mn + 1`` maps. The fused map has the size of one patch's map, so it stands for
    the whole canvas: the point at ``(h, w)`` of level ``l`` is the canvas point
    ``(h, w) * 2**l * m`` (the heads' strides are ``2**l * m``; ``m = canvas_size /
    patch_size``), and the feature of every local region at its own ``(h, w)`` lands at the same
    ``(h, w)`` of the global frame: a region's position in the canvas is lost, only which
    position inside its patch survives (the 1x1 convolution can weigh regions by their grid
    index, but nothing maps a patch's content to where it lies). Points ``2**l * m`` pixels
    apart also mean an object must contain such a point to be learnt (FCOS assigns points
    inside boxes): objects much smaller than ``2**min_level * m`` pixels are mostly missed.
    The public code also detaches the fused maps (the backbone and the fusion convolutions
    then get no gradient from the losses); here the framework's inner iterations recompute
    ``k`` patches with gradients, so theta1 and theta2 learn.
    It needs square canvases of ``canvas_size`` (the grid's ``mn`` is part of the weights).

``"grid"``
    Spatially consistent: a level's patch maps are stitched into the grid ``Z_l`` in canvas
    coordinates (``(d, m h, n w)``, as ``Z`` is for classification and segmentation), the
    global patch's map resized bilinearly to that grid and added (``global_merge="add"``) or
    concatenated and reduced by a 1x1 convolution (``"concat"``); the heads run on the fused
    ``Z_l`` with strides ``2**l``: boxes in canvas pixel coordinates at the resolution of a
    detector run on the whole canvas. Any canvas whose sides are covered by patches works.

Options (defaults in brackets): ``patch_size`` (512; a multiple of ``2**max_level``),
``canvas_size`` (4096; the side training views and whole-canvas prediction resize/pad
images to; a multiple of ``patch_size``), ``fusion`` (``"grid"``), ``paper_reduce``
(``"conv"``), ``global_merge`` (``"add"``), ``global_patch`` (True), ``sampling_fraction``
(0.25), ``inner_iterations`` (4), ``latent_dim`` (256: the pyramid's channels, theta2's and
the heads' width), ``min_level`` (3), ``max_level`` (7), ``head_convs`` (4),
``center_sampling_radius`` (1.5), ``global_norm`` (``"batch"``), ``global_gradient``
(``"balanced"``), ``global_dropout`` (0) as in ``gigaseg.methods.patchgd.model``; inference:
``mode`` (``"auto"``: an image with a side longer than ``canvas_size`` is cut into
canvas-sized tiles sharing ``overlap_ratio`` whose detections are merged by ``merge``,
``merge_metric``, ``merge_threshold`` and ``class_agnostic``; other images are resized to the
canvas; ``"whole"``, ``"sliced"`` force one), ``score_threshold``, ``nms_threshold``,
``max_detections`` (per canvas) and ``image_max_detections`` (per merged image; 0, the default:
no cap).

Forward modes (normalised images ``x`` ``(B, C, H, W)``):

- ``model(x, targets)``: every patch encoded with gradients in one pass (the memory-hungry
  reference); FCOS's losses. Without targets, the heads' raw outputs.
- ``model(x, targets, global_view=g, latents=Z, indices=idx)``: the inner iteration: the
  patches ``idx`` (``(B, k)`` row-major grid indices) re-encoded with gradients into a copy of
  the detached ``Z`` (from :meth:`PatchGDDetector.fill`, one ``(B, mn, d, h_l, w_l)`` tensor
  per level).
- ``model.detect(x)``: ``Z`` filled without gradients (``fill_batch`` patches per pass), fused,
  and FCOS's post-processing: boxes in ``x``'s pixel coordinates.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ...errors import ConfigError
from ...nn.base import DetectionModel
from ...nn.encoders import Encoder, PretrainedSpec
from ...nn.fcos import FCOSHeads
from .model import (
    DEFAULT_FILL_BATCH,
    GLOBAL_GRADIENTS,
    GLOBAL_NORMS,
    _FrameworkMixin,
    even_chunks,
    gather_patches,
    global_normalisation,
    global_view_of,
    patch_at,
    scale_gradient,
)

__all__ = ["DETECTOR_FUSIONS", "PatchGDDetector", "PyramidEncoder"]

DETECTOR_FUSIONS = ("paper", "grid")
PAPER_REDUCTIONS = ("conv", "max")
GLOBAL_MERGES = ("add", "concat")
PREDICTION_MODES = ("auto", "whole", "sliced")


class PyramidEncoder(nn.Module):
    """theta1 for detection: a timm encoder and FCOS's feature pyramid, one map per level.

    Args:
        encoder: a timm model name (its maps must include strides ``2**min_level`` .. 32).
        in_channels: input bands.
        channels: the pyramid's channels.
        min_level: the finest level (2 or 3).
        max_level: the coarsest level (5, 6: P5 max-pooled, 7: FCOS's P6/P7 convolutions).
        pretrained: False, True (timm's weights) or a local weights file for the encoder.

    Raises:
        ConfigError: an encoder without the maps the levels need.
    """

    def __init__(
        self,
        encoder: str,
        in_channels: int,
        channels: int,
        min_level: int,
        max_level: int,
        pretrained: PretrainedSpec = False,
    ):
        super().__init__()
        self.encoder = Encoder(encoder, in_channels=in_channels, pretrained=pretrained)
        wanted = [2**level for level in range(min_level, 6)]
        missing = [s for s in wanted if s not in self.encoder.reductions]
        if missing:
            raise ConfigError(
                f"patchgd_detector: encoder {encoder!r} has maps at strides {self.encoder.reductions}, "
                f"not at {', '.join(map(str, missing))} (min_level={min_level} needs {wanted})"
            )
        self.levels = [self.encoder.reductions.index(s) for s in wanted]
        extra = {7: LastLevelP6P7(channels, channels), 6: LastLevelMaxPool()}.get(max_level)
        self.fpn = FeaturePyramidNetwork(
            [self.encoder.out_channels[i] for i in self.levels], channels, extra_blocks=extra
        )

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid of each patch.

        Args:
            patches: ``(N, C, p, p)``.

        Returns:
            One ``(N, channels, p / 2**l, p / 2**l)`` map per level, finest first.
        """
        maps = self.encoder(patches)
        return list(self.fpn(OrderedDict((str(i), maps[j]) for i, j in enumerate(self.levels))).values())


class PatchGDDetector(_FrameworkMixin, DetectionModel):
    """The framework for detection: FCOS on the fused patch and global pyramids (see the module docstring).

    Args:
        encoder: theta1's timm encoder.
        num_classes: object classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        **options: see the module docstring.

    Raises:
        ConfigError: an unknown option, a value out of range, a ``patch_size`` that is not a
            multiple of ``2**max_level`` or a ``canvas_size`` that is not one of ``patch_size``.
    """

    default_options = {
        "patch_size": 512,
        "canvas_size": 4096,
        "fusion": "grid",
        "paper_reduce": "conv",
        "global_merge": "add",
        "global_patch": True,
        "sampling_fraction": 0.25,
        "inner_iterations": 4,
        "latent_dim": 256,
        "min_level": 3,
        "max_level": 7,
        "head_convs": 4,
        "center_sampling_radius": 1.5,
        "global_norm": "batch",
        "global_gradient": "balanced",
        "global_dropout": 0.0,
        "mode": "auto",
        "overlap_ratio": 0.2,
        "merge": "nms",
        "merge_metric": "iou",
        "merge_threshold": 0.5,
        "class_agnostic": False,
        "score_threshold": 0.05,
        "nms_threshold": 0.6,
        "max_detections": 100,
        "image_max_detections": 0,
    }
    option_choices = {
        "fusion": DETECTOR_FUSIONS,
        "paper_reduce": PAPER_REDUCTIONS,
        "global_merge": GLOBAL_MERGES,
        "global_norm": GLOBAL_NORMS,
        "global_gradient": GLOBAL_GRADIENTS,
        "min_level": (2, 3),
        "max_level": (5, 6, 7),
        "mode": PREDICTION_MODES,
        "merge": ("nms", "nmm"),
        "merge_metric": ("iou", "ios"),
    }
    inference_options = (
        "mode",
        "overlap_ratio",
        "merge",
        "merge_metric",
        "merge_threshold",
        "class_agnostic",
        "score_threshold",
        "nms_threshold",
        "max_detections",
        "image_max_detections",
    )

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
        o = self.options
        d = o["latent_dim"]
        self.theta1 = PyramidEncoder(encoder, in_channels, d, o["min_level"], o["max_level"], pretrained)
        self._add_global_statistics()
        #: no-grad patches per theta1 pass when detecting (the predictor sets it from its budget)
        self.fill_batch = DEFAULT_FILL_BATCH
        maps = self.grid_side**2 + (1 if o["global_patch"] else 0)
        if o["fusion"] == "paper":
            if o["paper_reduce"] == "conv":
                self.theta2 = nn.ModuleList(nn.Conv2d(d * maps, d, 1) for _ in self.level_numbers)
            else:
                self.theta2 = nn.ModuleList(nn.Conv2d(d, d, 1) for _ in self.level_numbers)
        elif o["global_patch"] and o["global_merge"] == "concat":
            self.theta2 = nn.ModuleList(nn.Conv2d(2 * d, d, 1) for _ in self.level_numbers)
        else:
            self.theta2 = nn.ModuleList()  # grid + add: no weights between the pyramids and the heads
        self.heads = FCOSHeads(
            d,
            num_classes,
            num_convs=o["head_convs"],
            strides=self.strides,
            center_sampling_radius=o["center_sampling_radius"],
        )

    def check_options(self) -> None:
        """The framework's options, positive sizes, divisible patch and canvas sizes, thresholds in range."""
        self._check_framework_options()
        o = self.options
        self._require_positive("canvas_size", "latent_dim", "max_detections")
        for name in ("head_convs", "image_max_detections"):
            if o[name] < 0:
                raise ConfigError(f"patchgd_detector: option {name} must be >= 0, got {o[name]}")
        step = 2 ** o["max_level"]
        if o["patch_size"] % step:
            raise ConfigError(
                f"patchgd_detector: patch_size must be a multiple of {step} (2 ** max_level), got {o['patch_size']}"
            )
        if o["canvas_size"] % o["patch_size"]:
            raise ConfigError(
                f"patchgd_detector: canvas_size must be a multiple of patch_size {o['patch_size']}, "
                f"got {o['canvas_size']}"
            )
        for name in ("score_threshold", "nms_threshold"):
            if not 0.0 <= o[name] <= 1.0:
                raise ConfigError(f"patchgd_detector: option {name} must be in [0, 1], got {o[name]}")
        for name in ("merge_threshold", "overlap_ratio"):
            if not 0.0 <= o[name] < 1.0:
                raise ConfigError(f"patchgd_detector: option {name} must be in [0, 1), got {o[name]}")
        if o["center_sampling_radius"] <= 0:
            raise ConfigError(
                f"patchgd_detector: option center_sampling_radius must be > 0, got {o['center_sampling_radius']}"
            )

    # ---- geometry
    @property
    def level_numbers(self) -> list[int]:
        """The pyramid levels ``min_level`` .. ``max_level``."""
        return list(range(self.options["min_level"], self.options["max_level"] + 1))

    @property
    def grid_side(self) -> int:
        """``m``: patches along a side of the canvas (``canvas_size / patch_size``)."""
        return self.options["canvas_size"] // self.patch_size

    @property
    def strides(self) -> tuple[int, ...]:
        """Canvas pixels per point of each fused level: ``2**l`` (grid), ``2**l * m`` (paper)."""
        scale = self.grid_side if self.options["fusion"] == "paper" else 1
        return tuple(2**level * scale for level in self.level_numbers)

    @property
    def map_sides(self) -> list[int]:
        """The side of one patch's map at each level: ``patch_size / 2**l``."""
        return [self.patch_size // 2**level for level in self.level_numbers]

    def map_bytes(self, batch: int, height: int, width: int) -> int:
        """Estimated training bytes of ``Z``, theta2 and the heads for ``batch`` images (theta1's patches aside).

        ``Z`` three times per level (the filled maps, the copy the patches are written into and its
        gradient) and, per fused point, the heads' towers (conv, GroupNorm and ReLU outputs of
        both towers, kept for the backward), their outputs and the fused map, float32, plus 20%
        for autograd's bookkeeping.

        Args:
            batch: images per mini-batch.
            height: the images' height in pixels.
            width: the images' width in pixels.

        Returns:
            Bytes.
        """
        rows, cols = self.grid((height, width))
        d = self.options["latent_dim"]
        patch_points = sum(s * s for s in self.map_sides) * rows * cols
        if self.options["fusion"] == "paper":
            fused_points = sum(s * s for s in self.map_sides)
        else:
            fused_points = patch_points
        per_point = d * (6 * self.options["head_convs"] + 4) + 2 * (self.num_classes + 5)
        return int(1.2 * 4 * batch * (3 * d * patch_points + per_point * fused_points))

    # ---- pieces
    def encode(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """theta1 on patches.

        Args:
            patches: ``(N, C, p, p)``.

        Returns:
            One ``(N, latent_dim, p / 2**l, p / 2**l)`` map per level.
        """
        return self.theta1(patches)

    def fill(self, x: torch.Tensor, sub_batch: int = DEFAULT_FILL_BATCH) -> list[torch.Tensor]:
        """``Z``: every patch's pyramid, without gradients.

        Args:
            x: normalised images ``(B, C, H, W)``.
            sub_batch: patches per theta1 pass (at least 2 in training, for BatchNorm).

        Returns:
            Per level, ``(B, m n, latent_dim, h_l, w_l)`` (grid index row-major).
        """
        rows, cols = self.grid(x)
        batch, p, d = x.shape[0], self.patch_size, self.options["latent_dim"]
        z = [x.new_empty((batch, rows * cols, d, s, s)) for s in self.map_sides]
        jobs = [(b, i) for b in range(batch) for i in range(rows * cols)]
        with torch.no_grad():
            for chunk in even_chunks(jobs, max(sub_batch, 2 if self.training else 1)):
                patches = torch.stack([patch_at(x[b], i // cols * p, i % cols * p, p) for b, i in chunk])
                for level, maps in enumerate(self.encode(patches)):
                    for (b, i), out in zip(chunk, maps.to(z[level].dtype)):
                        z[level][b, i] = out
        return z

    def global_maps(self, global_view: torch.Tensor) -> list[torch.Tensor]:
        """theta1's pyramid of the global patches, BatchNorm per ``global_norm``.

        Args:
            global_view: ``(B, C, p, p)``.

        Returns:
            One ``(B, latent_dim, h_l, w_l)`` map per level.
        """
        with global_normalisation(self, global_view.shape[0]):
            return self.encode(global_view)

    def fuse(self, z: list[torch.Tensor], g: list[torch.Tensor] | None, rows: int, cols: int) -> list[torch.Tensor]:
        """theta2: each level's patch maps fused with the global map, as ``fusion`` says.

        Args:
            z: per level ``(B, rows * cols, d, h, w)``.
            g: per level the global map ``(B, d, h, w)``, or None (no global patch).
            rows: the grid's rows.
            cols: the grid's columns.

        Returns:
            Per level the map the heads run on: ``(B, d, h, w)`` (paper) or
            ``(B, d, rows h, cols w)`` (grid).
        """
        fused = []
        for level, maps in enumerate(z):
            batch, count, d, h, w = maps.shape
            if self.options["fusion"] == "paper":
                if g is not None:
                    maps = torch.cat([maps, g[level][:, None].to(maps.dtype)], dim=1)
                conv = self.theta2[level]
                if self.options["paper_reduce"] == "conv":
                    fused.append(conv(maps.reshape(batch, -1, h, w)))
                else:
                    reduced = conv(maps.reshape(-1, d, h, w)).view(batch, -1, d, h, w)
                    fused.append(reduced.amax(dim=1))
                continue
            grid = maps.view(batch, rows, cols, d, h, w).permute(0, 3, 1, 4, 2, 5).reshape(batch, d, rows * h, cols * w)
            if g is not None:
                up = F.interpolate(g[level].float(), size=grid.shape[-2:], mode="bilinear", align_corners=False)
                up = up.to(grid.dtype)
                if self.options["global_merge"] == "add":
                    grid = grid + up
                else:
                    grid = self.theta2[level](torch.cat([grid, up], dim=1))
            fused.append(grid)
        return fused

    def fused_features(
        self,
        x: torch.Tensor,
        global_view: torch.Tensor | None = None,
        *,
        latents: list[torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The maps the heads run on (see "Forward modes" in the module docstring).

        Args:
            x: normalised images ``(B, C, H, W)``.
            global_view: the global patches ``(B, C, p, p)``; None: ``x`` area-averaged.
            latents: ``Z`` from :meth:`fill`; None encodes every patch here (with gradients
                when they are enabled).
            indices: with ``latents``, the ``(B, k)`` grid indices re-encoded into a copy of
                the detached ``latents``; None uses ``latents`` as they are.

        Returns:
            One map per level (:meth:`fuse`).

        Raises:
            ValueError: ``fusion="paper"`` on a grid other than the canvas's, or latents of
                another grid.
        """
        use_global = self.options["global_patch"]
        rows, cols = self.grid(x)
        batch, p = x.shape[0], self.patch_size
        if self.options["fusion"] == "paper" and (rows, cols) != (self.grid_side, self.grid_side):
            raise ValueError(
                f"fusion 'paper' needs {self.options['canvas_size']}-px canvases ({self.grid_side}x{self.grid_side} "
                f"patches), got {tuple(x.shape[-2:])}"
            )
        if use_global and global_view is None:
            global_view = global_view_of(x, p)
        if latents is None:
            indices = torch.arange(rows * cols, device=x.device).expand(batch, -1)
            d = self.options["latent_dim"]
            base = [x.new_zeros((batch, rows * cols, d, s, s)) for s in self.map_sides]
        else:
            if latents[0].shape[:2] != (batch, rows * cols):
                raise ValueError(f"latents hold {tuple(latents[0].shape[:2])} patches, the images {batch, rows * cols}")
            base = [z.detach() for z in latents]
        z = base
        if indices is not None:
            k = indices.shape[1]
            fresh = self.encode(gather_patches(x, indices, cols, p))
            owner = torch.arange(batch, device=x.device).repeat_interleave(k)
            where = indices.to(x.device).reshape(-1)
            z = []
            for level, maps in enumerate(fresh):
                copy = base[level].clone()
                # the k patches written into a copy: the loss reaches theta1 through exactly these
                copy[owner, where] = maps.to(copy.dtype)
                z.append(copy)
        g = None
        if use_global:
            g = self.global_maps(global_view)
            if latents is not None and indices is not None:
                factor = self.global_gradient_factor(indices.shape[1], rows * cols)
                g = [scale_gradient(level, factor) for level in g]
            g = [self.drop_global(level) for level in g]
        return self.fuse(z, g, rows, cols)

    # ---- forward
    def forward(
        self,
        images: torch.Tensor,
        targets=None,
        *,
        global_view: torch.Tensor | None = None,
        latents: list[torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
    ):
        """FCOS's losses with targets, else the heads' raw outputs (see "Forward modes").

        Args:
            images: normalised images ``(B, C, H, W)``.
            targets: B dicts ``{"boxes": float (N, 4), "labels": int64 (N,)}`` in the images'
                pixel coordinates, or None.
            global_view: the global patches ``(B, C, p, p)``; None: computed from ``images``.
            latents: ``Z`` from :meth:`fill`, or None (every patch encoded here; without
                gradients enabled, ``fill_batch`` patches per pass).
            indices: with ``latents``, the ``(B, k)`` grid indices to re-encode with gradients.

        Returns:
            ``classification``, ``bbox_regression`` and ``bbox_ctrness`` losses, or the heads'
            ``cls_logits``, ``bbox_regression`` and ``bbox_ctrness``.
        """
        if latents is None and not torch.is_grad_enabled():
            latents = self.fill(images, self.fill_batch)
        features = self.fused_features(images, global_view, latents=latents, indices=indices)
        if targets is None:
            return self.heads(features)
        return self.heads.losses(features, targets)

    def detect_tensors(
        self,
        images: torch.Tensor,
        *,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """The objects of each image: ``Z`` filled (``fill_batch`` patches per pass), fused, post-processed.

        Args:
            images: normalised images ``(B, C, H, W)``.
            score_threshold: candidates scoring at most this are dropped (None: the option).
            nms_threshold: the IoU above which class-wise NMS drops the lower-scoring box.
            max_detections: the most objects kept per image.

        Returns:
            B dicts with ``boxes`` (in the images' pixels, clipped to them), ``scores``,
            ``labels``, best first.
        """
        with torch.no_grad():
            latents = self.fill(images, self.fill_batch)
        features = self.fused_features(images, latents=latents)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self.heads.detections(
            features,
            [size] * images.shape[0],
            **self.detection_settings(score_threshold, nms_threshold, max_detections),
        )
