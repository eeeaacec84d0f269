"""FCOS's detection heads on any feature pyramid: point anchors, losses and post-processing.

FCOS ("FCOS: Fully Convolutional One-Stage Object Detection", Tian et al., ICCV 2019) predicts,
at every position of every pyramid level, one score per class, a centerness logit and the
distances from the position to the box's four sides. :class:`FCOSHeads` puts these heads on
any list of per-level feature maps ``(B, d, H_l, W_l)`` whose strides (input pixels per map
pixel) it is given, so a plain encoder + FPN and the patch-global detector's fused maps use the
same heads. Everything that defines FCOS is torchvision's, reused rather than copied:

- the heads: :class:`torchvision.models.detection.fcos.FCOSHead` (four 3x3 conv + GroupNorm +
  ReLU towers, shared across levels; classification with the focal-loss prior bias;
  ReLU-ed distances normalised by the level's anchor size; centerness on the regression tower);
- the points: :class:`torchvision.models.detection.anchor_utils.AnchorGenerator` with one
  square anchor per position whose side is the level's stride (its centre is the point
  ``(x * stride, y * stride)``, torchvision's convention);
- the target assignment (centre sampling within ``center_sampling_radius`` strides, the point
  inside the box, each level responsible for the largest side distance in
  ``(4 * stride, 8 * stride)``, the first level from 0 and the last without upper bound, the
  smallest box winning ties) and the losses (sigmoid focal loss, GIoU loss and centerness
  BCE, each summed and divided by the number of positive points):
  :meth:`torchvision.models.detection.fcos.FCOS.compute_loss` (its assignment re-done by chunks of
  points in :func:`match_points`, the same matches in bounded memory) and ``FCOSHead.compute_loss``;
- the post-processing (score ``sqrt(sigmoid(class) * sigmoid(centerness))``, a threshold, the
  ``topk_candidates`` best per level, boxes clipped to the image, class-wise NMS by
  :func:`torchvision.ops.batched_nms`, the best ``max_detections`` kept):
  :meth:`torchvision.models.detection.fcos.FCOS.postprocess_detections`.

Boxes are ``(x0, y0, x1, y1)`` in the input's pixel coordinates, labels 0-based class indices
(no background class: a point matching no box is background).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead

__all__ = ["FCOS_STRIDES", "FCOSHeads", "GroupNormFCOSHead", "check_targets", "match_points"]

#: points assigned per step by :func:`match_points` (its pairwise tensors hold points x boxes values)
MATCH_CHUNK_VALUES = 1 << 22

#: FCOS's pyramid P3-P7: input pixels per map pixel
FCOS_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)


class GroupNormFCOSHead(FCOSHead):
    """torchvision's ``FCOSHead`` (one anchor per point) with ``norm_groups`` GroupNorm groups in its towers.

    torchvision builds its towers with 32 groups, which needs a multiple of 32 channels; the
    towers, forward and ``compute_loss`` are torchvision's, so the state dict is that of
    ``FCOS.head``.

    Args:
        in_channels: channels of every level's map.
        num_classes: object classes.
        num_convs: conv layers in each tower.
        norm_groups: GroupNorm groups (must divide ``in_channels``).
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int, norm_groups: int):
        nn.Module.__init__(self)  # FCOSHead.__init__ fixes 32 groups; the same parts with ours
        norm = partial(nn.GroupNorm, norm_groups)
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(in_channels, 1, num_convs, norm_layer=norm)


class FCOSHeads(nn.Module):
    """FCOS's classification, centerness and box-regression heads on a feature pyramid.

    The same heads (weights shared across levels, as in FCOS) run on every level. A
    torchvision ``FCOSHead`` (:class:`GroupNormFCOSHead`) is ``self.head``, so its state dict loads into (and from)
    torchvision's ``FCOS.head``.

    Args:
        in_channels: channels ``d`` of every level's map.
        num_classes: object classes (no background class).
        num_convs: conv layers in each of the two towers.
        strides: the input pixels per map pixel of each level, finest first; also each level's
            anchor size, which sets the level's object-size range ``(4 * s, 8 * s)``.
        center_sampling_radius: a point is positive only within this many strides of a box's
            centre (FCOS's centre sampling).
        topk_candidates: the best scoring candidates kept per level before NMS.
        norm_groups: GroupNorm groups in the towers; None: the most groups up to 32 that divide
            ``in_channels`` into groups of at least 8 channels (32 for 256 channels, torchvision's
            choice; 4 for 32), else 1 (a group of a few channels normalises a 1x1 map too).

    Raises:
        ValueError: no strides, strides not increasing, or channels GroupNorm cannot split.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_convs: int = 4,
        strides: Sequence[int] = FCOS_STRIDES,
        center_sampling_radius: float = 1.5,
        topk_candidates: int = 1000,
        norm_groups: int | None = None,
    ):
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if not strides or any(s < 1 for s in strides) or any(b <= a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"strides must be positive and increasing, finest first, got {strides}")
        if norm_groups is None:
            norm_groups = max(g for g in range(1, 33) if in_channels % g == 0 and (in_channels // g >= 8 or g == 1))
        if in_channels % norm_groups:
            raise ValueError(f"GroupNorm cannot split {in_channels} channels into {norm_groups} groups")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.strides = strides
        self.center_sampling_radius = float(center_sampling_radius)
        self.topk_candidates = int(topk_candidates)
        self.head = GroupNormFCOSHead(in_channels, num_classes, num_convs, norm_groups)
        self.anchor_generator = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)

    def _check(self, features: Sequence[Tensor]) -> None:
        if len(features) != len(self.strides):
            raise ValueError(f"{len(features)} feature maps for {len(self.strides)} strides {self.strides}")
        for level, f in enumerate(features):
            if f.dim() != 4 or f.shape[1] != self.in_channels:
                raise ValueError(f"level {level}: expected a map (B, {self.in_channels}, H, W), got {tuple(f.shape)}")

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """The heads' raw outputs, all levels concatenated (finest first, row-major in each).

        Args:
            features: one map ``(B, in_channels, H_l, W_l)`` per stride.

        Returns:
            ``cls_logits`` ``(B, P, num_classes)``, ``bbox_regression`` ``(B, P, 4)`` (distances
            to the left, top, right and bottom sides in anchor sizes) and ``bbox_ctrness``
            ``(B, P, 1)``, where ``P = sum(H_l * W_l)``.
        """
        self._check(features)
        return self.head(list(features))

    def anchors(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The point anchors of each level.

        Args:
            features: one map per stride (only their sizes, dtype and device are used).

        Returns:
            Per level, float ``(H_l * W_l, 4)`` square boxes of side ``stride`` centred on the
            points ``(x * stride, y * stride)``, row-major.
        """
        self._check(features)
        f0 = features[0]
        self.anchor_generator.set_cell_anchors(f0.dtype, f0.device)
        grid_sizes = [list(f.shape[-2:]) for f in features]
        strides = [[torch.tensor(s, dtype=torch.int64, device=f0.device)] * 2 for s in self.strides]
        return self.anchor_generator.grid_anchors(grid_sizes, strides)

    def losses(self, features: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """FCOS's three losses for a batch.

        Args:
            features: one map ``(B, in_channels, H_l, W_l)`` per stride.
            targets: B dicts with ``boxes`` float ``(N, 4)`` (input pixel coordinates, positive
                width and height) and ``labels`` int64 ``(N,)`` (0-based classes); N may be 0.

        Returns:
            ``classification`` (sigmoid focal), ``bbox_regression`` (GIoU) and ``bbox_ctrness``
            (BCE): scalars, each a sum over points divided by the number of positive points
            (at least 1); the training loss is their sum.

        Raises:
            ValueError: a target count other than the batch size, or malformed boxes or labels.
        """
        self._check(features)
        batch = features[0].shape[0]
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch} images")
        check_targets(targets, self.num_classes)
        outputs = self.head(list(features))
        levels = self.anchors(features)
        per_level = [len(a) for a in levels]
        anchors = torch.cat(levels)
        targets = [
            {"boxes": t["boxes"].to(anchors), "labels": t["labels"].to(anchors.device, torch.int64)} for t in targets
        ]
        # FCOS's target assignment (torchvision's FCOS.compute_loss, by chunks of points) and
        # torchvision's losses (FCOSHead.compute_loss)
        with torch.autocast(anchors.device.type, enabled=False):
            outputs = {k: v.float() for k, v in outputs.items()}
            anchors = anchors.float()
            matched = [match_points(anchors, t["boxes"], per_level, self.center_sampling_radius) for t in targets]
            return self.head.compute_loss(targets, outputs, [anchors] * batch, matched)

    def detections(
        self,
        features: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        *,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.6,
        max_detections: int = 100,
    ) -> list[dict[str, Tensor]]:
        """The detected objects of each image.

        Args:
            features: one map ``(B, in_channels, H_l, W_l)`` per stride.
            image_sizes: B ``(height, width)``: each image's size in input pixels (boxes are
                clipped to it).
            score_threshold: candidates scoring at most this are dropped.
            nms_threshold: the IoU above which NMS drops the lower-scoring box of a class.
            max_detections: the most objects kept per image (the best scoring).

        Returns:
            B dicts: ``boxes`` float ``(N, 4)`` ``(x0, y0, x1, y1)``, ``scores`` ``(N,)`` and
            ``labels`` int64 ``(N,)``, best first.
        """
        self._check(features)
        if len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {features[0].shape[0]} images")
        outputs = self.head(list(features))
        levels = self.anchors(features)
        per_level = [len(a) for a in levels]
        split = {k: list(v.float().split(per_level, dim=1)) for k, v in outputs.items()}
        levels = [a.float() for a in levels]
        owner = SimpleNamespace(
            score_thresh=float(score_threshold),
            nms_thresh=float(nms_threshold),
            detections_per_img=int(max_detections),
            topk_candidates=self.topk_candidates,
            box_coder=self.box_coder,
        )
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        with torch.autocast(levels[0].device.type, enabled=False):
            return FCOS.postprocess_detections(owner, split, [levels] * len(sizes), sizes)


def check_targets(targets: Sequence[dict[str, Tensor]], num_classes: int) -> None:
    """Check detection targets: boxes ``(N, 4)`` with positive sides, labels ``(N,)`` in range.

    Args:
        targets: dicts with ``boxes`` and ``labels`` tensors.
        num_classes: the class count the labels index.

    Raises:
        ValueError: the first malformed target, by its index.
    """
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or not isinstance(labels, Tensor):
            raise ValueError(f"target {i}: needs 'boxes' and 'labels' tensors")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
            raise ValueError(
                f"target {i}: boxes must be (N, 4) and labels (N,), got {tuple(boxes.shape)}, {tuple(labels.shape)}"
            )
        if len(boxes) and ((boxes[:, 2:] <= boxes[:, :2]).any() or not torch.isfinite(boxes).all()):
            raise ValueError(f"target {i}: every box needs x1 > x0 and y1 > y0 (finite)")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"target {i}: labels must lie in [0, {num_classes}), got {labels.tolist()[:8]}")


def match_points(anchors: Tensor, boxes: Tensor, per_level: Sequence[int], center_sampling_radius: float) -> Tensor:
    """FCOS's target assignment, exactly as torchvision's ``FCOS.compute_loss``, by chunks of points.

    A point is positive for a box when it lies inside the box, within ``center_sampling_radius``
    anchor sizes of its centre, and the box's largest side distance from it lies in its level's
    range ``(4 * size, 8 * size)`` (the first level from 0, the last without upper bound); the
    smallest such box wins. torchvision builds ``points x boxes x 4`` tensors at once (gigabytes
    for a 4096-px canvas's 350k points and hundreds of objects); each point's match depends only
    on itself, so chunks of about ``MATCH_CHUNK_VALUES / boxes`` points give the same answer in
    bounded memory.

    Args:
        anchors: float ``(P, 4)`` square anchors of all levels, finest first.
        boxes: float ``(N, 4)`` ``(x0, y0, x1, y1)``.
        per_level: points per level.
        center_sampling_radius: FCOS's centre-sampling radius in anchor sizes.

    Returns:
        int64 ``(P,)``: the matched box's index, or -1.
    """
    count = anchors.shape[0]
    matched = torch.full((count,), -1, dtype=torch.int64, device=anchors.device)
    if boxes.numel() == 0:
        return matched
    boxes = boxes.to(anchors)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    sizes = anchors[:, 2] - anchors[:, 0]
    lower, upper = sizes * 4, sizes * 8
    lower[: per_level[0]] = 0
    upper[count - per_level[-1] :] = float("inf")
    x0, y0, x1, y1 = boxes.unsqueeze(0).unbind(dim=2)  # (1, N)
    step = max(1, MATCH_CHUNK_VALUES // len(boxes))
    for start in range(0, count, step):
        part = slice(start, start + step)
        points = (anchors[part, :2] + anchors[part, 2:]) / 2
        match = (points[:, None, :] - centers[None]).abs_().max(dim=2).values < (
            center_sampling_radius * sizes[part, None]
        )
        x, y = points.unsqueeze(dim=2).unbind(dim=1)  # (n, 1)
        distances = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
        match &= distances.min(dim=2).values > 0
        farthest = distances.max(dim=2).values
        match &= (farthest > lower[part, None]) & (farthest < upper[part, None])
        best, index = (match.to(torch.float32) * (1e8 - areas[None, :])).max(dim=1)
        index[best < 1e-5] = -1
        matched[part] = index
    return matched
