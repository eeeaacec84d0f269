"""COCO detection metrics from the field's evaluator (pycocotools' ``COCOeval``), in memory.

:class:`DetectionEvaluator` collects each image's ground truth and detections and scores them
as the COCO benchmark does: AP averaged over the ten overlap thresholds .50, .55, ... .95 ("AP"), at
an overlap of .50 ("AP50") and .75 ("AP75", the one number the Resource Efficient Perception paper's code
reports), per object size (COCO's areas: small < 32², medium < 96², large), and the average
recall with up to ``max_detections`` boxes per image. A value pycocotools reports as -1 (no
ground truth of that size range, say) is NaN here.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np

from .geometry import Detections

__all__ = ["COCO_KEYS", "DetectionEvaluator", "coco_boxes"]

#: the summary values of ``COCOeval.stats`` in order, by the names ``compute`` gives them
COCO_KEYS = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def coco_boxes(boxes: np.ndarray) -> np.ndarray:
    """``(x0, y0, x1, y1)`` boxes as COCO's ``(x, y, width, height)``.

    Args:
        boxes: ``(N, 4)`` corner boxes.

    Returns:
        float64 ``(N, 4)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def max_detections_for(object_counts: Sequence[int]) -> int:
    """The detections per image to score: COCO's 100, or the most objects one image holds when that is more.

    COCO's images hold a few objects; a mosaic or an aerial scene holds hundreds, and a cap of
    100 would cap recall (and AP) far below what the detector found.

    Args:
        object_counts: the objects of each image scored.

    Returns:
        The cap, at least 100.
    """
    return max([100, *(int(count) for count in object_counts)])


class DetectionEvaluator:
    """Collects ground truth and detections image by image; ``compute`` runs COCOeval on them.

    Args:
        classes: the class names; a label ``i`` is ``classes[i]``.
        max_detections: the most detections per image COCOeval scores (its ``maxDets``' last
            value; COCO's own is 100 — images with more objects need more).

    Raises:
        ValueError: no classes, or ``max_detections`` below 1.
    """

    def __init__(self, classes: Sequence[str], max_detections: int = 100):
        if not classes:
            raise ValueError("DetectionEvaluator needs at least one class")
        if int(max_detections) < 1:
            raise ValueError(f"max_detections must be at least 1, got {max_detections}")
        self.classes = [str(name) for name in classes]
        self.max_detections = int(max_detections)
        self._images: list[dict] = []
        self._truth: list[dict] = []
        self._found: list[dict] = []
        self._names: set[str] = set()

    def __len__(self) -> int:
        """The images added so far."""
        return len(self._images)

    def add(
        self,
        name: str,
        width: int,
        height: int,
        gt_boxes,
        gt_labels,
        detections: Detections,
        gt_iscrowd=None,
    ) -> None:
        """One image's ground truth and detections.

        Args:
            name: the image's name (unique among the images added).
            width: the image's width in pixels.
            height: the image's height in pixels.
            gt_boxes: ``(N, 4)`` ground-truth boxes ``(x0, y0, x1, y1)``.
            gt_labels: ``(N,)`` their class indices.
            detections: what the detector found in the image.
            gt_iscrowd: ``(N,)`` flags of crowd regions (matched but neither counted nor
                penalised, as in COCO), or None for none.

        Raises:
            ValueError: a repeated name, a label outside the classes, mismatched lengths.
        """
        if name in self._names:
            raise ValueError(f"image {name!r} was added twice")
        boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
        crowd = np.zeros(len(labels), dtype=bool) if gt_iscrowd is None else np.asarray(gt_iscrowd, bool).reshape(-1)
        if not len(boxes) == len(labels) == len(crowd):
            raise ValueError(f"{name}: {len(boxes)} boxes, {len(labels)} labels and {len(crowd)} crowd flags")
        for what, values in (("ground-truth", labels), ("detection", detections.labels)):
            if len(values) and (values.min() < 0 or values.max() >= len(self.classes)):
                raise ValueError(f"{name}: a {what} label is outside 0..{len(self.classes) - 1}")
        self._names.add(name)
        image_id = len(self._images) + 1
        self._images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height)})
        for box, label, is_crowd in zip(coco_boxes(boxes), labels, crowd):
            self._truth.append(
                {
                    "id": len(self._truth) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(is_crowd),
                }
            )
        for box, score, label in zip(coco_boxes(detections.boxes), detections.scores, detections.labels):
            self._found.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
            )

    def compute(self) -> dict:
        """Score every image added, as COCOeval does.

        Returns:
            ``{"AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10",
            "AR100", "AR_small", "AR_medium", "AR_large"}`` as floats in ``[0, 1]`` (NaN where
            COCOeval has nothing to score: no ground truth at all, or none of a size range),
            ``"AP_per_class"`` ``{class name: AP}`` (NaN for a class without ground truth),
            ``"images"``, ``"objects"``, ``"detections"`` (counts) and ``"max_detections"``.
            "AR100" is the recall at ``max_detections`` boxes per image.
        """
        counts = {
            "images": len(self._images),
            "objects": len(self._truth),
            "detections": len(self._found),
            "max_detections": self.max_detections,
        }
        nan = {key: math.nan for key in COCO_KEYS}
        per_class = {name: math.nan for name in self.classes}
        if not self._truth:
            return {**nan, "AP_per_class": per_class, **counts}
        if not self._found:  # COCO.loadRes refuses an empty list; nothing found scores 0
            present = {self.classes[a["category_id"] - 1] for a in self._truth}
            zero = dict.fromkeys(COCO_KEYS, 0.0)
            for key, (lo, hi) in (("small", (0, 32**2)), ("medium", (32**2, 96**2)), ("large", (96**2, math.inf))):
                if not any(lo <= a["area"] < hi for a in self._truth if not a["iscrowd"]):
                    zero[f"AP_{key}"] = zero[f"AR_{key}"] = math.nan
            return {**zero, "AP_per_class": {n: 0.0 if n in present else math.nan for n in self.classes}, **counts}

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            truth = COCO()
            truth.dataset = {
                "images": self._images,
                "annotations": self._truth,
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(self.classes)],
            }
            truth.createIndex()
            found = truth.loadRes(self._found)
            evaluation = COCOeval(truth, found, iouType="bbox")
            evaluation.params.maxDets = [cap for cap in (1, 10) if cap < self.max_detections] + [self.max_detections]
            evaluation.evaluate()
            evaluation.accumulate()
        values = _summary(evaluation, self.max_detections)
        # precision: [IoU thresholds, recall points, classes, area ranges, max detections]
        precision = evaluation.eval["precision"][:, :, :, 0, -1]
        for index, name in enumerate(self.classes):
            points = precision[:, :, index]
            points = points[points > -1]
            per_class[name] = float(points.mean()) if points.size else math.nan
        return {**values, "AP_per_class": per_class, **counts}


def _summary(evaluation, max_detections: int) -> dict[str, float]:
    """The values of :data:`COCO_KEYS` from an accumulated COCOeval, as its ``summarize`` computes them.

    ``COCOeval.summarize`` scores AP at 100 detections per image whatever ``maxDets`` says, so
    the averages are taken here from ``evaluation.eval`` at the ``maxDets`` entry each key means
    ("AR100": at ``max_detections``; "AR1" / "AR10" NaN when ``max_detections`` is not above them).
    """
    params = evaluation.params
    areas = {"all": 0, "small": 1, "medium": 2, "large": 3}

    def mean(kind: str, area: str, cap: int, iou: float | None = None) -> float:
        if cap not in params.maxDets:
            return math.nan
        values = evaluation.eval[kind]
        if iou is not None:
            values = values[np.flatnonzero(np.isclose(params.iouThrs, iou))]
        values = values[..., areas[area], params.maxDets.index(cap)]
        values = values[values > -1]
        return float(values.mean()) if values.size else math.nan

    top = max_detections
    return {
        "AP": mean("precision", "all", top),
        "AP50": mean("precision", "all", top, 0.5),
        "AP75": mean("precision", "all", top, 0.75),
        "AP_small": mean("precision", "small", top),
        "AP_medium": mean("precision", "medium", top),
        "AP_large": mean("precision", "large", top),
        "AR1": mean("recall", "all", 1),
        "AR10": mean("recall", "all", 10),
        "AR100": mean("recall", "all", top),
        "AR_small": mean("recall", "small", top),
        "AR_medium": mean("recall", "medium", top),
        "AR_large": mean("recall", "large", top),
    }
