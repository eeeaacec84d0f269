"""Streaming confusion matrix and the segmentation / classification scores derived from it,
and the scores that see detail: boundary F1 and thin-structure recall (:class:`DetailMetrics`).

Feed predictions tile by tile with :meth:`ConfusionMatrix.update`; the matrix (rows =
target class, columns = predicted class) is all that is kept, so an image of any size is
scored in constant memory. :class:`DetailMetrics` is fed full-width row bands, top to
bottom, and keeps only counts plus a halo of rows. Conventions for undefined values:

- per-class IoU / F1 / precision / recall are NaN when their denominator is 0 (e.g. IoU of
  a class absent from both target and prediction);
- means (mIoU, mean F1, balanced accuracy) average over the classes whose value is defined
  and that are not excluded, and are NaN when none is;
- :meth:`ConfusionMatrix.summary` writes NaN as ``None`` so the dict is strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from .geometry import Window

__all__ = ["ConfusionMatrix", "DetailMetrics"]


def _to_numpy(array: Any, name: str) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    return array


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64, NaN where den == 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _ratio(num: float, den: float) -> float:
    """num / den with den == 0 giving inf (num > 0) or NaN (num == 0); NaN propagates."""
    if np.isnan(num) or np.isnan(den):
        return float("nan")
    if den == 0:
        return float("inf") if num > 0 else float("nan")
    return float(num / den)


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (int64).

    ``matrix[t, p]`` counts pixels (or samples) of target class ``t`` predicted as ``p``.

    Args:
        num_classes: number of classes (>= 1); class ids are ``0..num_classes-1``.
        ignore_index: target id whose pixels are skipped; None ignores nothing.

    Raises:
        ValueError: ``num_classes`` is below 1.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"counted={int(self._matrix.sum())})"
        )

    # ---- accumulation
    def update(self, pred: Any, target: Any) -> ConfusionMatrix:
        """Count one tile.

        Args:
            pred: predicted class ids, a numpy or torch integer (or bool) array of any number of dims.
            target: target class ids, the same size as ``pred``.

        Returns:
            This matrix, for chaining.

        Raises:
            ValueError: the arrays are not integer, differ in size, a prediction is outside
                ``0..num_classes-1``, or a target id is neither a class nor ``ignore_index``;
                the message names the bad ids.
        """
        p = _to_numpy(pred, "pred").ravel()
        t = _to_numpy(target, "target").ravel()
        if p.shape != t.shape:
            raise ValueError(f"pred and target differ in size: {np.shape(pred)} vs {np.shape(target)}")
        if p.size == 0:
            return self
        c = self.num_classes
        if p.min() < 0 or p.max() >= c:
            bad = np.unique(p[(p < 0) | (p >= c)])
            raise ValueError(f"predicted class ids {bad[:10].tolist()} are outside 0..{c - 1}")
        if self.ignore_index is not None:
            keep = t != self.ignore_index
            if not keep.all():
                p, t = p[keep], t[keep]
                if t.size == 0:
                    return self
        if t.min() < 0 or t.max() >= c:
            bad = np.unique(t[(t < 0) | (t >= c)])
            raise ValueError(
                f"target class ids {bad[:10].tolist()} are outside 0..{c - 1} "
                f"and not the ignore index ({self.ignore_index})"
            )
        index = t.astype(np.int64) * c + p
        self._matrix += np.bincount(index, minlength=c * c).reshape(c, c)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another worker) into this one.

        Args:
            other: a matrix with the same number of classes.

        Returns:
            This matrix, for chaining.

        Raises:
            ValueError: the class counts differ.
        """
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._matrix += other._matrix
        return self

    def reset(self) -> None:
        """Set every count to 0."""
        self._matrix[:] = 0

    def all_reduce(self, fabric: Any = None) -> ConfusionMatrix:
        """Sum the counts over all processes of a distributed run, in place.

        Args:
            fabric: a Lightning Fabric (anything with ``world_size``, ``device`` and
                ``all_reduce(tensor, reduce_op="sum")``); None or a single process: no-op.

        Returns:
            This matrix, for chaining.
        """
        if fabric is None or fabric.world_size <= 1:
            return self
        import torch

        total = fabric.all_reduce(torch.from_numpy(self._matrix).to(fabric.device), reduce_op="sum")
        self._matrix[...] = total.cpu().numpy()
        return self

    @property
    def matrix(self) -> np.ndarray:
        """The live counts: int64, rows = target class, columns = predicted class.

        Not a copy: writing into it replaces counts (e.g. with a sum over processes, though
        :meth:`all_reduce` does that); copy it to keep a snapshot.
        """
        return self._matrix

    # ---- per-class counts
    @property
    def true_positives(self) -> np.ndarray:
        """Correct count per class (the diagonal, a copy)."""
        return np.diag(self._matrix).copy()

    @property
    def support(self) -> np.ndarray:
        """Target count per class (row sums)."""
        return self._matrix.sum(axis=1)

    @property
    def predicted(self) -> np.ndarray:
        """Prediction count per class (column sums)."""
        return self._matrix.sum(axis=0)

    # ---- per-class scores
    def iou(self) -> np.ndarray:
        """IoU per class.

        Returns:
            float64 ``tp / (tp + fp + fn)`` per class; NaN for classes absent from target and prediction.
        """
        tp = self.true_positives
        return _divide(tp, self.support + self.predicted - tp)

    def f1(self) -> np.ndarray:
        """F1 (= Dice) per class; also available as ``dice``.

        Returns:
            float64 ``2 tp / (2 tp + fp + fn)`` per class; NaN where undefined.
        """
        return _divide(2 * self.true_positives, self.support + self.predicted)

    dice = f1

    def precision(self) -> np.ndarray:
        """Precision per class.

        Returns:
            float64 ``tp / predicted`` per class; NaN for classes never predicted.
        """
        return _divide(self.true_positives, self.predicted)

    def recall(self) -> np.ndarray:
        """Recall per class.

        Returns:
            float64 ``tp / support`` per class; NaN for classes absent from the target.
        """
        return _divide(self.true_positives, self.support)

    # ---- aggregates
    def _excluded_mask(self, exclude: Iterable[int]) -> np.ndarray:
        mask = np.zeros(self.num_classes, dtype=bool)
        for k in exclude:
            if not 0 <= k < self.num_classes:
                raise ValueError(f"cannot exclude class {k}: classes are 0..{self.num_classes - 1}")
            mask[k] = True
        return mask

    def miou(self, exclude: Iterable[int] = ()) -> float:
        """Mean IoU over classes present (in target or prediction) and not excluded.

        Args:
            exclude: class indices left out of the mean.

        Returns:
            The mean, NaN when no class is left.

        Raises:
            ValueError: an excluded index is not a class.
        """
        return _mean(self.iou()[~self._excluded_mask(exclude)])

    def mean_f1(self, exclude: Iterable[int] = ()) -> float:
        """Mean F1 over classes present and not excluded.

        Args:
            exclude: class indices left out of the mean.

        Returns:
            The mean, NaN when no class is left.

        Raises:
            ValueError: an excluded index is not a class.
        """
        return _mean(self.f1()[~self._excluded_mask(exclude)])

    def pixel_accuracy(self) -> float:
        """Overall accuracy.

        Returns:
            Correct / counted; NaN before anything was counted.
        """
        return float(_divide(np.trace(self._matrix), self._matrix.sum()))

    def balanced_accuracy(self, exclude: Iterable[int] = ()) -> float:
        """Mean recall over classes present in the target (and not excluded).

        Args:
            exclude: class indices left out of the mean.

        Returns:
            The mean, NaN when no class is left.

        Raises:
            ValueError: an excluded index is not a class.
        """
        return _mean(self.recall()[~self._excluded_mask(exclude)])

    def binary_metrics(self, positive: int = 1) -> dict[str, float]:
        """Scores of class ``positive`` against all others (the plain binary case for 2 classes).

        Computed from counts, so ``1 - spec`` is exactly fp / (fp + tn).

        Args:
            positive: the class counted as positive.

        Returns:
            Keys: tp, fp, fn, tn (int counts); sensitivity (recall), specificity, precision,
            f1, iou, balanced_accuracy ((sens + spec) / 2); lr_positive = sens / (1 - spec)
            and lr_negative = (1 - sens) / spec. A ratio with denominator 0 is NaN, except a
            likelihood ratio with a positive numerator over 0, which is inf (e.g. LR+ with
            no false positives).

        Raises:
            ValueError: ``positive`` is not a class.
        """
        if not 0 <= positive < self.num_classes:
            raise ValueError(f"positive class {positive} is outside 0..{self.num_classes - 1}")
        m = self._matrix
        tp = int(m[positive, positive])
        fn = int(m[positive].sum()) - tp
        fp = int(m[:, positive].sum()) - tp
        tn = int(m.sum()) - tp - fn - fp

        def frac(num: int, den: int) -> float:
            return num / den if den else float("nan")

        sens, spec = frac(tp, tp + fn), frac(tn, tn + fp)
        return {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "sensitivity": sens,
            "specificity": spec,
            "precision": frac(tp, tp + fp),
            "f1": frac(2 * tp, 2 * tp + fp + fn),
            "iou": frac(tp, tp + fp + fn),
            "balanced_accuracy": (sens + spec) / 2,
            "lr_positive": _ratio(sens, frac(fp, fp + tn)),
            "lr_negative": _ratio(frac(fn, tp + fn), spec),
        }

    def summary(self, class_names: Sequence[str] | None = None, exclude: Iterable[int | str] = ()) -> dict[str, Any]:
        """Everything as a strict-JSON dict (NaN -> None).

        Args:
            class_names: one name per class; None names them ``"0"``, ``"1"``, ...
            exclude: class indices or names (names need ``class_names``) left out of the means
                (miou, mean_f1, balanced_accuracy), not of the per-class entries.

        Returns:
            num_classes, class_names, excluded (names), ignore_index, counted,
            pixel_accuracy, miou, mean_f1, balanced_accuracy, per_class (name -> iou, f1,
            precision, recall, support, predicted) and matrix (nested lists).

        Raises:
            ValueError: the number of names differs from the classes, or an excluded class is unknown.
        """
        names = list(class_names) if class_names is not None else [str(k) for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        excluded = []
        for k in exclude:
            if isinstance(k, str):
                if k not in names:
                    raise ValueError(f"cannot exclude unknown class {k!r}; classes are {names}")
                k = names.index(k)
            excluded.append(int(k))
        iou, f1, precision, recall = self.iou(), self.f1(), self.precision(), self.recall()
        support, predicted = self.support, self.predicted
        return {
            "num_classes": self.num_classes,
            "class_names": names,
            "excluded": [names[k] for k in excluded],
            "ignore_index": self.ignore_index,
            "counted": int(self._matrix.sum()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "miou": _json_float(self.miou(excluded)),
            "mean_f1": _json_float(self.mean_f1(excluded)),
            "balanced_accuracy": _json_float(self.balanced_accuracy(excluded)),
            "per_class": {
                name: {
                    "iou": _json_float(iou[k]),
                    "f1": _json_float(f1[k]),
                    "precision": _json_float(precision[k]),
                    "recall": _json_float(recall[k]),
                    "support": int(support[k]),
                    "predicted": int(predicted[k]),
                }
                for k, name in enumerate(names)
            },
            "matrix": self._matrix.tolist(),
        }


# --------------------------------------------------------------------------- detail


def _boundary_codes(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``class + 1`` at the boundary pixels of ``labels``, 0 elsewhere (uint16).

    A boundary pixel is a valid pixel with a valid 4-neighbour of another class; the image's
    edge is no boundary, and neither is the edge of an ignored region.
    """
    edge = np.zeros(labels.shape, dtype=bool)
    step = (labels[1:] != labels[:-1]) & valid[1:] & valid[:-1]
    edge[1:] |= step
    edge[:-1] |= step
    step = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    edge[:, 1:] |= step
    edge[:, :-1] |= step
    return np.where(edge, labels.astype(np.uint16) + 1, 0).astype(np.uint16)


def _disk_offsets(radius: int) -> list[tuple[int, int]]:
    """The offsets ``(dy, dx)`` with ``dy**2 + dx**2 <= radius**2``."""
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if dy * dy + dx * dx <= radius * radius
    ]


def _matched(codes: np.ndarray, other: np.ndarray, offsets: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Where a boundary pixel of ``codes`` has one of its class in ``other`` at one of ``offsets``."""
    height, width = codes.shape
    padded = np.pad(other, radius)
    hit = np.zeros(codes.shape, dtype=bool)
    for dy, dx in offsets:
        hit |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width] == codes
    return hit & (codes > 0)


def _erode(mask: np.ndarray, metric: str, radius: int) -> np.ndarray:
    """Erosion by a square (``chessboard``) or diamond (``taxicab``) of ``radius``; outside the array is background."""
    padded = np.pad(mask, 1)
    return (ndimage.distance_transform_cdt(padded, metric=metric) > radius)[1:-1, 1:-1]


def _dilate(mask: np.ndarray, metric: str, radius: int) -> np.ndarray:
    """Dilation by a square (``chessboard``) or diamond (``taxicab``) of ``radius``."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_cdt(~mask, metric=metric) <= radius


def _octagon(radius: int) -> tuple[int, int]:
    """``(square, diamond)`` radii whose sum ``radius`` makes a near-regular octagon (diamond = sqrt(2) square)."""
    square = round(radius / (1 + math.sqrt(2)))
    return square, radius - square


def _thin_parts(mask: np.ndarray, radius: int) -> np.ndarray:
    """The pixels of ``mask`` that no octagon of ``radius`` (``2 radius + 1`` across) inside ``mask`` covers."""
    square, diamond = _octagon(radius)
    opened = _erode(_erode(mask, "chessboard", square), "taxicab", diamond)
    opened = _dilate(_dilate(opened, "chessboard", square), "taxicab", diamond)
    return mask & ~opened


#: rows of DetailMetrics' counts
_PRED_EDGE, _PRED_MATCHED, _TRUE_EDGE, _TRUE_MATCHED, _SKELETON, _COVERED = range(6)


class DetailMetrics:
    """Boundary F1 and thin-structure recall per class, fed full-width row bands of an image in order.

    **Boundary F1** (the BF score of Csurka et al., BMVC 2013): a pixel of class ``c`` is on
    its boundary when a 4-neighbour has another class (the image's edge is no boundary). Per
    class, precision is the share of predicted boundary pixels within ``tolerance`` pixels
    (Euclidean) of a ground-truth boundary pixel of that class, recall the share of
    ground-truth boundary pixels within ``tolerance`` of a predicted one, and F1 their
    harmonic mean. The tolerance is in pixels, 2 by default, not the paper's 0.75% of the
    image diagonal: on a 20000-px scene that would forgive 200 px, hiding exactly the detail
    this score is for, and a fixed tolerance makes the score independent of how the scene is
    cut. Counts are pooled over all images (like the confusion matrix), not averaged per
    image as in the paper, so a small image does not weigh as much as a gigapixel one.

    **Thin-structure recall** (the topology sensitivity of clDice, Shit et al., CVPR 2021):
    per class, the share of the ground truth's skeleton pixels (``skimage.morphology.skeletonize``)
    that the prediction labels with that class. The skeleton is taken of the class's thin
    parts: the pixels that no octagon ``2 r + 1`` pixels across (r = ceil(max_width / 2),
    close to a disk) inside the class covers, i.e. structures at most ``max_width`` px wide.
    A road or stream narrower than that is skeletonised whole; a field contributes only its
    thin spurs. This bounds how far the skeleton depends on the mask (the skeleton of a
    large blob depends on pixels arbitrarily far away), which is what lets it stream.

    Pixels whose target is ``ignore_index`` are neither boundary nor skeleton, and a
    neighbour that is ignored makes no boundary; their predictions count nowhere.

    **Streaming**: :meth:`update` takes each full-width row band of an image, top to bottom;
    the results equal those of the whole image at once (:meth:`update_image`). Rows are scored
    once the ``halo`` rows below them have arrived, and ``halo`` rows above them are kept as
    context: ``tolerance + 1`` rows for the boundary score, ``5 r + 8`` for the skeleton
    (``r`` for the octagon's erosion, ``r`` for its dilation, at most about ``3 r`` for the
    thinning of a structure that an octagon does not fit).

    Means (:meth:`mean_boundary_f1`, :meth:`mean_thin_recall`) average over the classes whose
    value is defined (boundary F1: the class has boundary pixels in the target or the
    prediction; thin recall: it has skeleton pixels) and that are not excluded; NaN when none.

    Args:
        num_classes: number of classes (>= 1).
        ignore_index: target id whose pixels are not scored; None ignores nothing.
        tolerance: the boundary distance tolerance in pixels (>= 0).
        max_width: the widest structure, in pixels, the thin-structure recall skeletonises (>= 1).
        thin_classes: the classes whose thin-structure recall is computed (None: all; ``()``:
            none, which also shrinks the halo to the boundary score's).

    Raises:
        ValueError: a bad class count, tolerance, width or class id.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        tolerance: int = 2,
        max_width: int = 32,
        thin_classes: Iterable[int] | None = None,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(tolerance) != tolerance or tolerance < 0:
            raise ValueError(f"tolerance must be a whole number of pixels >= 0, got {tolerance}")
        if int(max_width) != max_width or max_width < 1:
            raise ValueError(f"max_width must be a whole number of pixels >= 1, got {max_width}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.tolerance = int(tolerance)
        self.max_width = int(max_width)
        thin = range(self.num_classes) if thin_classes is None else sorted({int(c) for c in thin_classes})
        for c in thin:
            if not 0 <= c < self.num_classes:
                raise ValueError(f"thin class {c} is outside 0..{self.num_classes - 1}")
        self.thin_classes = tuple(thin)
        self._radius = (self.max_width + 1) // 2
        self._offsets = _disk_offsets(self.tolerance)
        self._counts = np.zeros((6, self.num_classes), dtype=np.int64)
        self._image: dict | None = None

    def __repr__(self) -> str:
        return (
            f"DetailMetrics(num_classes={self.num_classes}, tolerance={self.tolerance}, "
            f"max_width={self.max_width}, boundary_pixels={int(self._counts[_TRUE_EDGE].sum())})"
        )

    @property
    def halo(self) -> int:
        """Rows above and below a row that its scores depend on."""
        boundary = self.tolerance + 1
        return max(boundary, 5 * self._radius + 8) if self.thin_classes else boundary

    @property
    def in_progress(self) -> bool:
        """Whether an image's bands are being fed (its last band has not arrived)."""
        return self._image is not None

    # ---- accumulation
    def update(self, window: Window, pred: Any, target: Any, *, image_height: int) -> DetailMetrics:
        """Add one full-width row band of an image; bands come top to bottom, one image after another.

        Args:
            window: the band's rows (``left`` 0, ``width`` the image's).
            pred: ``(window.height, window.width)`` predicted class ids (numpy or torch integers).
            target: the same size of target class ids (or ``ignore_index``).
            image_height: the image's height (the band ending there finishes the image).

        Returns:
            These metrics, for chaining.

        Raises:
            ValueError: arrays of the wrong size or with ids out of range, a band that does not
                start where the previous one ended (or at row 0 for a new image), or one past the image.
        """
        p, t = _to_numpy(pred, "pred"), _to_numpy(target, "target")
        if p.shape != (window.height, window.width) or t.shape != p.shape:
            raise ValueError(
                f"pred {p.shape} and target {t.shape} must both be the band's {window.height}x{window.width}"
            )
        if window.left != 0:
            raise ValueError(f"bands must be full-width (left 0), got {window}")
        self._check_ids(p, t)
        state = self._image
        if state is None:
            if window.top != 0:
                raise ValueError(f"an image's first band must start at row 0, got {window}")
            state = self._image = {
                "height": int(image_height),
                "width": window.width,
                "top": 0,
                "done": 0,
                "pred": p[:0].astype(np.uint8),
                "target": t[:0].astype(np.uint16),
            }
        elif (
            window.top != state["top"] + len(state["pred"])
            or window.width != state["width"]
            or image_height != state["height"]
        ):
            raise ValueError(
                f"{window} does not continue the image being fed ({state['height']}x{state['width']}, "
                f"next row {state['top'] + len(state['pred'])})"
            )
        bottom = window.bottom
        if bottom > state["height"]:
            raise ValueError(f"{window} ends past the image's {state['height']} rows")
        state["pred"] = np.concatenate([state["pred"], p.astype(np.uint8)])
        state["target"] = np.concatenate([state["target"], t.astype(np.uint16)])
        finished = bottom == state["height"]
        halo = self.halo
        limit = bottom if finished else bottom - halo
        if limit > state["done"] and (finished or limit - state["done"] >= halo):
            self._score(state, limit, finished)
            keep = max(state["top"], limit - halo)
            state["pred"] = state["pred"][keep - state["top"] :]
            state["target"] = state["target"][keep - state["top"] :]
            state["top"], state["done"] = keep, limit
        if finished:
            self._image = None
        return self

    def update_image(self, pred: Any, target: Any) -> DetailMetrics:
        """Add a whole image at once.

        Args:
            pred: ``(H, W)`` predicted class ids.
            target: ``(H, W)`` target class ids (or ``ignore_index``).

        Returns:
            These metrics, for chaining.

        Raises:
            ValueError: arrays that are not 2-D or differ in size, ids out of range, or an image
                whose bands are being fed.
        """
        p = _to_numpy(pred, "pred")
        if p.ndim != 2:
            raise ValueError(f"pred must be (H, W), got {p.shape}")
        if self._image is not None:
            raise ValueError("an image is being fed band by band; finish it first")
        return self.update(Window(0, 0, *p.shape), p, target, image_height=p.shape[0])

    def _check_ids(self, p: np.ndarray, t: np.ndarray) -> None:
        c = self.num_classes
        if p.size and (p.min() < 0 or p.max() >= c):
            bad = np.unique(p[(p < 0) | (p >= c)])
            raise ValueError(f"predicted class ids {bad[:10].tolist()} are outside 0..{c - 1}")
        bad_target = (t < 0) | (t >= c)
        if self.ignore_index is not None:
            bad_target &= t != self.ignore_index
        if bad_target.any():
            raise ValueError(
                f"target class ids {np.unique(t[bad_target])[:10].tolist()} are outside 0..{c - 1} "
                f"and not the ignore index ({self.ignore_index})"
            )

    def _score(self, state: dict, limit: int, finished: bool) -> None:
        """Count rows ``state['done'] .. limit`` from the rows kept (context above, halo below)."""
        pred, target = state["pred"], state["target"]
        rows = slice(state["done"] - state["top"], limit - state["top"])
        valid = np.ones(target.shape, dtype=bool) if self.ignore_index is None else target != self.ignore_index
        c = self.num_classes
        true_codes = _boundary_codes(target, valid)
        pred_codes = _boundary_codes(pred, valid)
        counts = self._counts
        for codes, other, total_row, matched_row in (
            (pred_codes, true_codes, _PRED_EDGE, _PRED_MATCHED),
            (true_codes, pred_codes, _TRUE_EDGE, _TRUE_MATCHED),
        ):
            own = codes[rows]
            counts[total_row] += np.bincount(own[own > 0].astype(np.int64) - 1, minlength=c)
            hit = _matched(codes, other, self._offsets, self.tolerance)[rows]
            counts[matched_row] += np.bincount(own[hit].astype(np.int64) - 1, minlength=c)
        present = np.bincount(target[valid].astype(np.int64), minlength=c)
        for k in self.thin_classes:
            if not present[k]:
                continue
            skeleton = skeletonize(_thin_parts(target == k, self._radius))[rows]
            counts[_SKELETON, k] += int(skeleton.sum())
            counts[_COVERED, k] += int((skeleton & (pred[rows] == k)).sum())

    def merge(self, other: DetailMetrics) -> DetailMetrics:
        """Add another accumulator's counts (e.g. from another worker) into this one.

        Args:
            other: metrics with the same classes, tolerance and width, and no image in progress.

        Returns:
            These metrics, for chaining.

        Raises:
            ValueError: the settings differ, or either has an image in progress.
        """
        mine = (self.num_classes, self.tolerance, self.max_width, self.thin_classes)
        theirs = (other.num_classes, other.tolerance, other.max_width, other.thin_classes)
        if mine != theirs:
            raise ValueError(f"cannot merge metrics with settings {theirs} into {mine}")
        if self.in_progress or other.in_progress:
            raise ValueError("cannot merge while an image is being fed")
        self._counts += other._counts
        return self

    def reset(self) -> None:
        """Forget every count and any image in progress."""
        self._counts[:] = 0
        self._image = None

    # ---- scores
    @property
    def counts(self) -> dict[str, np.ndarray]:
        """Per-class int64 counts (copies): ``predicted_boundary``, ``predicted_boundary_matched``,
        ``boundary``, ``boundary_matched``, ``skeleton`` and ``skeleton_covered``."""
        names = (
            "predicted_boundary",
            "predicted_boundary_matched",
            "boundary",
            "boundary_matched",
            "skeleton",
            "skeleton_covered",
        )
        return {name: self._counts[k].copy() for k, name in enumerate(names)}

    def boundary_precision(self) -> np.ndarray:
        """Boundary precision per class.

        Returns:
            float64: the share of predicted boundary pixels near a target boundary of their
            class; NaN for classes with no predicted boundary.
        """
        return _divide(self._counts[_PRED_MATCHED], self._counts[_PRED_EDGE])

    def boundary_recall(self) -> np.ndarray:
        """Boundary recall per class.

        Returns:
            float64: the share of target boundary pixels near a predicted boundary of their
            class; NaN for classes with no target boundary.
        """
        return _divide(self._counts[_TRUE_MATCHED], self._counts[_TRUE_EDGE])

    def boundary_f1(self) -> np.ndarray:
        """Boundary F1 (BF score) per class.

        Returns:
            float64 ``2 P R / (P + R)``: 0 when the class has a boundary on one side only (or
            none matched), NaN when it has none in target and prediction.
        """
        precision, recall = self.boundary_precision(), self.boundary_recall()
        f1 = _divide(2 * np.nan_to_num(precision) * np.nan_to_num(recall), np.nan_to_num(precision + recall))
        some = (self._counts[_PRED_EDGE] + self._counts[_TRUE_EDGE]) > 0
        return np.where(some, np.nan_to_num(f1), np.nan)

    def thin_recall(self) -> np.ndarray:
        """Thin-structure recall per class.

        Returns:
            float64: the share of the target's thin-part skeleton labelled with the class; NaN
            for classes without skeleton pixels (or not in ``thin_classes``).
        """
        return _divide(self._counts[_COVERED], self._counts[_SKELETON])

    def _excluded_mask(self, exclude: Iterable[int]) -> np.ndarray:
        mask = np.zeros(self.num_classes, dtype=bool)
        for k in exclude:
            if not 0 <= k < self.num_classes:
                raise ValueError(f"cannot exclude class {k}: classes are 0..{self.num_classes - 1}")
            mask[k] = True
        return mask

    def mean_boundary_f1(self, exclude: Iterable[int] = ()) -> float:
        """Mean boundary F1 over the classes with a boundary (in target or prediction) and not excluded.

        Args:
            exclude: class indices left out of the mean.

        Returns:
            The mean, NaN when no class is left.

        Raises:
            ValueError: an excluded index is not a class.
        """
        return _mean(self.boundary_f1()[~self._excluded_mask(exclude)])

    def mean_thin_recall(self, exclude: Iterable[int] = ()) -> float:
        """Mean thin-structure recall over the classes with skeleton pixels and not excluded.

        Args:
            exclude: class indices left out of the mean.

        Returns:
            The mean, NaN when no class is left.

        Raises:
            ValueError: an excluded index is not a class.
        """
        return _mean(self.thin_recall()[~self._excluded_mask(exclude)])

    def summary(self, class_names: Sequence[str] | None = None, exclude: Iterable[int | str] = ()) -> dict[str, Any]:
        """Everything as a strict-JSON dict (NaN -> None), like ``ConfusionMatrix.summary``.

        Args:
            class_names: one name per class; None names them ``"0"``, ``"1"``, ...
            exclude: class indices or names (names need ``class_names``) left out of the means,
                not of the per-class entries.

        Returns:
            num_classes, class_names, excluded (names), ignore_index, tolerance, max_width,
            thin_classes (names), mean_boundary_f1, mean_thin_recall, and per_class (name ->
            boundary_f1, boundary_precision, boundary_recall, boundary_pixels (target),
            predicted_boundary_pixels, thin_recall, skeleton_pixels).

        Raises:
            ValueError: an image is still being fed, the number of names differs from the
                classes, or an excluded class is unknown.
        """
        if self.in_progress:
            raise ValueError("an image is still being fed: its last band has not arrived")
        names = list(class_names) if class_names is not None else [str(k) for k in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        excluded = []
        for k in exclude:
            if isinstance(k, str):
                if k not in names:
                    raise ValueError(f"cannot exclude unknown class {k!r}; classes are {names}")
                k = names.index(k)
            excluded.append(int(k))
        f1, precision, recall, thin = (
            self.boundary_f1(),
            self.boundary_precision(),
            self.boundary_recall(),
            self.thin_recall(),
        )
        return {
            "num_classes": self.num_classes,
            "class_names": names,
            "excluded": [names[k] for k in excluded],
            "ignore_index": self.ignore_index,
            "tolerance": self.tolerance,
            "max_width": self.max_width,
            "thin_classes": [names[k] for k in self.thin_classes],
            "mean_boundary_f1": _json_float(self.mean_boundary_f1(excluded)),
            "mean_thin_recall": _json_float(self.mean_thin_recall(excluded)),
            "per_class": {
                name: {
                    "boundary_f1": _json_float(f1[k]),
                    "boundary_precision": _json_float(precision[k]),
                    "boundary_recall": _json_float(recall[k]),
                    "boundary_pixels": int(self._counts[_TRUE_EDGE, k]),
                    "predicted_boundary_pixels": int(self._counts[_PRED_EDGE, k]),
                    "thin_recall": _json_float(thin[k]),
                    "skeleton_pixels": int(self._counts[_SKELETON, k]),
                }
                for k, name in enumerate(names)
            },
        }
