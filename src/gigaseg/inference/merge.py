"""Merging the detections of overlapping tiles: non-maximum suppression or greedy non-maximum merging.

A sliced detector sees an object crossing a tile border twice or more: whole in one tile, cut
in its neighbour. :func:`merge_detections` reduces such groups to one box:

- ``method="nms"``: the best-scoring box of a group is kept, the others dropped;
- ``method="nmm"``: greedy non-maximum merging as SAHI's ``GREEDYNMM``: the best-scoring box
  absorbs every remaining box that matches it, and the kept box becomes their union (so a
  box cut by a border and its whole twin become the whole box), scored by the best score.

Two boxes match when their overlap exceeds ``threshold`` by ``metric``: ``"iou"``
(intersection over union) or ``"ios"`` (intersection over the smaller box's area, which is 1
for a cut box inside its whole twin: the match a tile border calls for). ``class_agnostic``
merges boxes of different classes too (the kept box's class wins).

NMS by IoU runs torchvision's ``batched_nms``; the other combinations walk the boxes in score
order, comparing each kept box with the boxes left that can overlap it (those whose left edge is
within the widest box's width of it, found by bisection), so a large image's many boxes cost
time in proportion to their number and their neighbours, in linear memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms, nms

from ..errors import ConfigError
from ..geometry import Detections

__all__ = ["MERGE_METHODS", "MERGE_METRICS", "MergeSettings", "match_scores", "merge_detections"]

#: how a group of matching boxes becomes one
MERGE_METHODS = ("nms", "nmm")
#: how two boxes' overlap is measured
MERGE_METRICS = ("iou", "ios")


@dataclass(frozen=True)
class MergeSettings:
    """How the detections of overlapping tiles are merged.

    Attributes:
        method: ``"nms"`` (keep the best box of a group) or ``"nmm"`` (greedy non-maximum
            merging: the best box grows to the union of its group).
        metric: ``"iou"`` (intersection over union) or ``"ios"`` (intersection over the
            smaller box).
        threshold: boxes whose overlap is above this match, in ``[0, 1)``.
        class_agnostic: merge boxes of different classes too.

    Raises:
        ConfigError: an unknown method or metric, or a threshold outside ``[0, 1)``.
    """

    method: str = "nms"
    metric: str = "iou"
    threshold: float = 0.5
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"merge method must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}")
        if self.metric not in MERGE_METRICS:
            raise ConfigError(f"merge metric must be one of {', '.join(MERGE_METRICS)}, got {self.metric!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ConfigError(f"merge threshold must be a number in [0, 1), got {self.threshold!r}")
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ConfigError(f"merge threshold must be in [0, 1), got {self.threshold}")


def match_scores(box: np.ndarray, others: np.ndarray, metric: str) -> np.ndarray:
    """The overlap of one box with each of ``others``.

    Args:
        box: ``(4,)`` as ``(x0, y0, x1, y1)``.
        others: ``(N, 4)``.
        metric: ``"iou"`` or ``"ios"`` (intersection over the smaller of the two areas).

    Returns:
        float64 ``(N,)`` in ``[0, 1]``; 0 where both boxes have no area.
    """
    box = np.asarray(box, dtype=np.float64)
    others = np.asarray(others, dtype=np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    denominator = area + areas - inter if metric == "iou" else np.minimum(area, areas)
    out = np.zeros(len(others))
    np.divide(inter, denominator, out=out, where=denominator > 0)
    return out


def merge_detections(detections: Detections, settings: MergeSettings | None = None) -> Detections:
    """Reduce every group of matching boxes to one (see the module docstring).

    Args:
        detections: boxes of one image, from any number of tiles, in image coordinates.
        settings: the method, metric, threshold and class handling (default: ``MergeSettings()``).

    Returns:
        The merged detections, best score first.
    """
    settings = settings or MergeSettings()
    if len(detections) == 0:
        return detections
    if settings.method == "nms" and settings.metric == "iou":
        boxes = torch.from_numpy(detections.boxes).double()
        scores = torch.from_numpy(detections.scores).double()
        if settings.class_agnostic:
            keep = nms(boxes, scores, float(settings.threshold))
        else:
            keep = batched_nms(boxes, scores, torch.from_numpy(detections.labels), float(settings.threshold))
        keep = keep.numpy()
        return Detections(detections.boxes[keep], detections.scores[keep], detections.labels[keep])
    groups = (
        [np.arange(len(detections))]
        if settings.class_agnostic
        else [np.flatnonzero(detections.labels == label) for label in np.unique(detections.labels)]
    )
    boxes, scores, labels = [], [], []
    for members in groups:
        kept_boxes, kept_scores, kept_labels = _greedy(detections, members, settings)
        boxes.append(kept_boxes)
        scores.append(kept_scores)
        labels.append(kept_labels)
    boxes, scores, labels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    order = np.argsort(-scores, kind="stable")
    return Detections(boxes[order], scores[order], labels[order])


def _greedy(detections: Detections, members: np.ndarray, settings: MergeSettings):
    """Suppress (nms) or absorb (nmm) the boxes matching each best remaining box, within ``members``.

    Only boxes that can overlap the current one are compared: those whose left edge lies between
    its left edge less the widest box's width and its right edge (found by bisection in the boxes
    sorted by left edge), so the cost follows the boxes near each box, not all of the image's.
    """
    order = members[np.argsort(-detections.scores[members], kind="stable")]
    boxes = detections.boxes[order].astype(np.float64)
    by_left = np.argsort(boxes[:, 0], kind="stable")
    lefts = boxes[by_left, 0]
    widest = float((boxes[:, 2] - boxes[:, 0]).max()) if len(boxes) else 0.0
    left = np.ones(len(order), dtype=bool)
    kept_boxes, kept_scores, kept_labels = [], [], []
    for i in range(len(order)):
        if not left[i]:
            continue
        left[i] = False
        near = by_left[
            np.searchsorted(lefts, boxes[i, 0] - widest, side="left") : np.searchsorted(lefts, boxes[i, 2], side="left")
        ]
        near = near[left[near]]
        matched = near[match_scores(boxes[i], boxes[near], settings.metric) > settings.threshold]
        left[matched] = False
        box = boxes[i]
        if settings.method == "nmm" and len(matched):
            group = boxes[np.concatenate([[i], matched])]
            box = np.array([group[:, 0].min(), group[:, 1].min(), group[:, 2].max(), group[:, 3].max()])
        kept_boxes.append(box)
        kept_scores.append(detections.scores[order[i]])
        kept_labels.append(detections.labels[order[i]])
    return (
        np.asarray(kept_boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(kept_scores, dtype=np.float32),
        np.asarray(kept_labels, dtype=np.int64),
    )
