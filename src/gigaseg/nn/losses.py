"""The methods' segmentation losses: GLNet's focal loss, MagNet's OHEM cross-entropy, Dice.

All take logits ``(B, C, H, W)`` and integer targets ``(B, H, W)`` of the same spatial size
(resize the labels with nearest neighbour first; the losses never resample). Pixels equal
to ``ignore_index`` count nowhere. When no pixel is left the loss is 0 (connected to the
graph), not NaN, so a fully ignored crop does not poison a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import IGNORE_INDEX

__all__ = ["FocalLoss", "dice_loss", "ohem_cross_entropy"]


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
