"""Streaming confusion matrix and the segmentation / classification scores derived from it.

Feed predictions tile by tile with :meth:`ConfusionMatrix.update`; the matrix (rows =
target class, columns = predicted class) is all that is kept, so an image of any size is
scored in constant memory. Conventions for undefined values:

- per-class IoU / F1 / precision / recall are NaN when their denominator is 0 (e.g. IoU of
  a class absent from both target and prediction);
- means (mIoU, mean F1, balanced accuracy) average over the classes whose value is defined
  and that are not excluded, and are NaN when none is;
- :meth:`ConfusionMatrix.summary` writes NaN as ``None`` so the dict is strict JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["ConfusionMatrix"]


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
