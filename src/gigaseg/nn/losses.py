"""The methods' segmentation losses: GLNet's focal loss, MagNet's OHEM cross-entropy, Dice,
and the losses that keep rare classes alive (:func:`segmentation_loss`).

All take logits ``(B, C, H, W)`` and integer targets ``(B, H, W)`` of the same spatial size
(resize the labels with nearest neighbour first; the losses never resample). Pixels equal
to ``ignore_index`` count nowhere. When no pixel is left the loss is 0 (connected to the
graph), not NaN, so a fully ignored crop does not poison a run.

A class that covers 0.1% of the pixels contributes 0.1% of a plain cross-entropy's gradient,
so a short training from random weights never predicts it. :func:`segmentation_loss` builds
the losses that counter this, by name (``LOSSES``): cross-entropy with per-class weights from
the training set's class frequencies (:func:`class_weights`), and cross-entropy plus a
region loss that scores every class present in the batch equally (soft Dice, Lovasz-softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import IGNORE_INDEX
from ..errors import ConfigError

__all__ = [
    "LOSSES",
    "CrossEntropy",
    "DiceOverPresentClasses",
    "FocalLoss",
    "LovaszSoftmax",
    "SumOfLosses",
    "class_weights",
    "dice_loss",
    "ohem_cross_entropy",
    "segmentation_loss",
]

#: the names :func:`segmentation_loss` builds
LOSSES = ("ce", "focal", "weighted_ce", "ce_dice", "lovasz", "ce_lovasz")

#: the losses that use class weights (the others accept and ignore them)
WEIGHTED_LOSSES = ("weighted_ce",)

#: the exponent of :func:`class_weights`: weight ~ frequency ** -0.5
WEIGHT_POWER = 0.5

#: the largest weight :func:`class_weights` gives, as a multiple of the smallest
WEIGHT_MAX_RATIO = 50.0


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != target.dim() + 1 or logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match: "
            f"expected (B, C, *S) and (B, *S)"
        )


def _zero(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum() * 0.0


class FocalLoss(nn.Module):
    """Softmax focal loss ``-(1 - p_t)^gamma * log(p_t)``, averaged over the non-ignored pixels.

    GLNet uses gamma = 3. With gamma = 0 it is exactly ``F.cross_entropy(logits, target,
    ignore_index=ignore_index)``. (smp's FocalLoss is a per-class sigmoid loss, a different thing.)

    Args:
        gamma: the focusing exponent.
        ignore_index: the target value of pixels to ignore.
    """

    def __init__(self, gamma: float = 3.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.gamma = float(gamma)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The focal loss.

        Args:
            logits: ``(B, C, H, W)``.
            target: integer class ids ``(B, H, W)``.

        Returns:
            The scalar loss (float32); 0 when every pixel is ignored.

        Raises:
            ValueError: ``logits`` and ``target`` shapes do not match.
        """
        _check(logits, target)
        valid = target != self.ignore_index
        if not valid.any():
            return _zero(logits)
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, torch.where(valid, target, 0).long().unsqueeze(1)).squeeze(1)[valid]
        loss = -log_pt if self.gamma == 0 else -((1 - log_pt.exp()) ** self.gamma) * log_pt
        return loss.mean()

    def extra_repr(self) -> str:
        """``gamma`` and ``ignore_index``, for ``repr``."""
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}"


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Online hard example mining cross-entropy (MagNet, after HRNet-OCR).

    Keeps the pixels whose predicted probability of the true class is below ``thresh`` —
    but at least the ``min_kept`` hardest ones (lowest probability) when fewer are below —
    and averages their cross-entropy (``min_kept`` is at least 1, as in HRNet's loss). The
    selection itself carries no gradient.

    Args:
        logits: ``(B, C, H, W)``.
        target: integer class ids ``(B, H, W)``.
        thresh: the probability of the true class below which a pixel is hard.
        min_kept: the fewest pixels kept (capped by the non-ignored pixels).
        ignore_index: the target value of pixels to ignore.

    Returns:
        The scalar loss (float32); 0 when every pixel is ignored.

    Raises:
        ValueError: ``logits`` and ``target`` shapes do not match.
    """
    _check(logits, target)
    valid = (target != ignore_index).reshape(-1)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return _zero(logits)
    safe_target = torch.where(target != ignore_index, target, 0).long()
    losses = F.cross_entropy(logits.float(), safe_target, reduction="none").reshape(-1)[valid]
    with torch.no_grad():
        p_true = (-losses).exp()  # softmax probability of the true class
        keep = max(int((p_true < thresh).sum()), min(max(1, int(min_kept)), num_valid))
        hardest = torch.topk(losses.detach(), keep, sorted=False).indices
    return losses[hardest].mean()


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int | None = None,
    *,
    smooth: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 |P.T| + smooth) / (|P| + |T| + smooth)`` over the whole batch.

    Binary (``num_classes=None``): logits ``(B, 1, H, W)``, sigmoid probabilities of the
    foreground, target 0/1 (PatchGD's segmentation loss is BCE + this). Multi-class
    (``num_classes=C``): softmax probabilities against one-hot targets, Dice per class,
    averaged over the classes. A class absent from both prediction and target scores 0 loss
    through ``smooth``, unlike smp's DiceLoss, which drops classes absent from the target.

    Args:
        logits: ``(B, 1, H, W)`` (binary) or ``(B, num_classes, H, W)``.
        target: integer class ids ``(B, H, W)`` (0/1 when binary).
        num_classes: None for the binary loss, else the class count.
        smooth: the additive smoothing of numerator and denominator.
        ignore_index: the target value of pixels to ignore.

    Returns:
        The scalar loss (float32).

    Raises:
        ValueError: shapes that do not match, or logits with the wrong channel count.
    """
    _check(logits, target)
    valid = (target != ignore_index).unsqueeze(1)
    safe_target = torch.where(target != ignore_index, target, 0).long()
    logits = logits.float()
    if num_classes is None:
        if logits.shape[1] != 1:
            raise ValueError(f"binary dice_loss takes one logit channel, got {logits.shape[1]}; pass num_classes")
        probs = torch.sigmoid(logits)
        truth = safe_target.unsqueeze(1).float()
    else:
        if logits.shape[1] != num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels for num_classes={num_classes}")
        probs = torch.softmax(logits, dim=1)
        truth = F.one_hot(safe_target, num_classes).movedim(-1, 1).float()
    probs, truth = probs * valid, truth * valid
    dims = [0] + list(range(2, logits.dim()))
    intersection = (probs * truth).sum(dims)
    total = probs.sum(dims) + truth.sum(dims)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


# --------------------------------------------------------------------------- rare classes


def class_weights(
    frequencies: Sequence[float] | np.ndarray,
    *,
    power: float = WEIGHT_POWER,
    max_ratio: float = WEIGHT_MAX_RATIO,
) -> np.ndarray:
    """Per-class loss weights from the training set's class frequencies.

    The rule: ``w_c = f_c ** -power`` (inverse square root by default) for every class with
    ``f_c > 0``, capped at ``max_ratio`` times the commonest class's weight, then divided by the
    mean over those classes (so the weights average 1). A class absent from the training set
    (``f_c == 0``) gets 1: it is never a target, so its weight changes nothing.

    The square root sits between no weighting and inverse frequency: with seven classes from
    40% down to 0.1% the rarest class weighs 20 times the commonest, where inverse frequency
    would give 400 and turn the common classes' gradients into noise. The cap (50 by default:
    reached by a class 2500 times rarer than the commonest) bounds what a class of a few
    pixels can do.

    Args:
        frequencies: pixel share per class (any non-negative numbers: they are normalised),
            e.g. ``gigaseg.data.statistics.class_frequencies(dataset)``.
        power: the exponent (0: every weight 1; 1: inverse frequency).
        max_ratio: the largest weight as a multiple of the smallest (>= 1).

    Returns:
        float64 ``(C,)`` weights.

    Raises:
        ConfigError: a frequency is negative or not finite, every frequency is 0, or ``max_ratio`` is below 1.
    """
    f = np.asarray(frequencies, dtype=np.float64).reshape(-1)
    if not np.isfinite(f).all() or (f < 0).any():
        raise ConfigError(f"class frequencies must be finite and non-negative, got {f.tolist()}")
    if not max_ratio >= 1:
        raise ConfigError(f"max_ratio must be at least 1, got {max_ratio}")
    present = f > 0
    if not present.any():
        raise ConfigError("class frequencies are all 0: no class to weigh")
    raw = (f[present] / f.sum()) ** -float(power)
    raw = np.minimum(raw, raw.min() * max_ratio)
    weights = np.ones_like(f)
    weights[present] = raw / raw.mean()
    return weights


class CrossEntropy(nn.Module):
    """Cross-entropy over the non-ignored pixels, optionally with class weights; 0 when all are ignored.

    With weights it is PyTorch's weighted mean ``sum_i w[y_i] * ce_i / sum_i w[y_i]``: a crop of
    one class scores what the unweighted loss scores, and the weights set how much a pixel of
    each class pulls relative to the others.

    Args:
        weight: ``(C,)`` class weights, or None for the plain mean.
        ignore_index: the target value of pixels to ignore.
    """

    def __init__(self, weight: Sequence[float] | np.ndarray | torch.Tensor | None = None, ignore_index=IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer(
            "weight",
            None if weight is None else torch.as_tensor(np.asarray(weight, dtype=np.float32)),
            persistent=False,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss.

        Args:
            logits: ``(B, C, H, W)``.
            target: integer class ids ``(B, H, W)``.

        Returns:
            The scalar loss; 0 when every pixel is ignored.

        Raises:
            ValueError: shapes that do not match, or weights of another class count.
        """
        _check(logits, target)
        if not (target != self.ignore_index).any():
            return _zero(logits)
        weight = self.weight
        if weight is not None:
            if weight.numel() != logits.shape[1]:
                raise ValueError(f"{weight.numel()} class weights for {logits.shape[1]} classes")
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        """Whether weighted, and ``ignore_index``, for ``repr``."""
        return f"weighted={self.weight is not None}, ignore_index={self.ignore_index}"


class DiceOverPresentClasses(nn.Module):
    """Soft multi-class Dice loss ``1 - 2|P.T| / (|P| + |T|)`` averaged over the classes present in the target.

    Probabilities are the softmax of the logits; each class's Dice is taken over the whole
    batch (smp's ``DiceLoss``, multiclass mode, no smoothing, ignored pixels dropped). smp's
    mean runs over all classes with the absent ones counted as 0; this loss averages over the
    classes present instead, so a batch's rare class weighs exactly as much as its commonest,
    whatever the class count. (:func:`dice_loss` is the other variant: every class, smoothed.)

    Args:
        num_classes: the class count.
        ignore_index: the target value of pixels to ignore.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.dice = smp.losses.DiceLoss("multiclass", from_logits=True, smooth=0.0, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss.

        Args:
            logits: ``(B, C, H, W)``.
            target: integer class ids ``(B, H, W)``.

        Returns:
            The scalar loss; 0 when every pixel is ignored.

        Raises:
            ValueError: shapes that do not match, or logits with another class count.
        """
        _check(logits, target)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels for num_classes={self.num_classes}")
        valid = target != self.ignore_index
        present = int(torch.unique(target[valid]).numel())
        if present == 0:
            return _zero(logits)
        # smp's mean divides by every class; the absent ones contribute 0
        return self.dice(logits.float(), target.long()) * (self.num_classes / present)


class LovaszSoftmax(nn.Module):
    """The Lovasz-softmax loss of Berman et al. (CVPR 2018): a convex surrogate of 1 - IoU per class.

    smp's ``LovaszLoss`` (multiclass mode, over the whole batch, the classes present in the
    target): it drops the ignored pixels before sorting the errors, which is what the paper's
    reference code does. On one-hot probabilities it equals the mean over the present classes
    of ``1 - IoU``. smp returns an empty tensor when every pixel is ignored; this returns 0.

    Args:
        ignore_index: the target value of pixels to ignore.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index
        self.lovasz = smp.losses.LovaszLoss("multiclass", per_image=False, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss.

        Args:
            logits: ``(B, C, H, W)``.
            target: integer class ids ``(B, H, W)``.

        Returns:
            The scalar loss; 0 when every pixel is ignored.

        Raises:
            ValueError: shapes that do not match.
        """
        _check(logits, target)
        if not (target != self.ignore_index).any():
            return _zero(logits)
        return self.lovasz(logits.float(), target.long())


class SumOfLosses(nn.Module):
    """The sum of several losses of the same logits and target.

    Args:
        terms: the losses, each called as ``loss(logits, target)``.
    """

    def __init__(self, *terms: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The sum.

        Args:
            logits: ``(B, C, H, W)``.
            target: integer class ids ``(B, H, W)``.

        Returns:
            The scalar sum of the terms.
        """
        return sum(term(logits, target) for term in self.terms)


def segmentation_loss(
    name: str,
    num_classes: int,
    class_weights: Sequence[float] | np.ndarray | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> nn.Module:
    """A training loss by name, called as ``loss(logits, labels)``.

    - ``"ce"``: cross-entropy (the mean over non-ignored pixels);
    - ``"focal"``: GLNet's focal loss, gamma 3 (:class:`FocalLoss`);
    - ``"weighted_ce"``: cross-entropy weighted by ``class_weights`` (:class:`CrossEntropy`);
    - ``"ce_dice"``: cross-entropy + soft Dice over the classes present (:class:`DiceOverPresentClasses`);
    - ``"lovasz"``: Lovasz-softmax (:class:`LovaszSoftmax`);
    - ``"ce_lovasz"``: cross-entropy + Lovasz-softmax.

    Only ``"weighted_ce"`` uses ``class_weights``; the other names accept and ignore them, so
    a trainer can always pass the weights of its training set.

    Args:
        name: one of ``LOSSES``.
        num_classes: the class count (checks the weights; sizes Dice).
        class_weights: ``(num_classes,)`` weights, e.g. :func:`class_weights` of the training
            set's class frequencies; needed by ``"weighted_ce"``.
        ignore_index: the label value the loss ignores.

    Returns:
        The loss module; every one is 0 (not NaN) on a batch whose pixels are all ignored.

    Raises:
        ConfigError: an unknown ``name``, ``"weighted_ce"`` without weights, or weights of
            another length than ``num_classes``.
    """
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
    if class_weights is not None and len(class_weights) != num_classes:
        raise ConfigError(f"{len(class_weights)} class weights for {num_classes} classes")
    if name == "weighted_ce" and class_weights is None:
        raise ConfigError("loss 'weighted_ce' needs class weights (class_weights of the training class frequencies)")
    if name == "focal":
        return FocalLoss(gamma=3, ignore_index=ignore_index)
    if name == "weighted_ce":
        return CrossEntropy(class_weights, ignore_index=ignore_index)
    if name == "lovasz":
        return LovaszSoftmax(ignore_index)
    ce = CrossEntropy(ignore_index=ignore_index)
    if name == "ce_dice":
        return SumOfLosses(ce, DiceOverPresentClasses(num_classes, ignore_index))
    if name == "ce_lovasz":
        return SumOfLosses(ce, LovaszSoftmax(ignore_index))
    return ce
