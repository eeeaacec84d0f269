"""Focal, OHEM cross-entropy and Dice losses on tensors small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gigaseg.nn.losses import FocalLoss, dice_loss, ohem_cross_entropy


def logits_for(probabilities):
    """(1, C, 1, N) logits whose softmax over C is ``probabilities`` (a list of N columns)."""
    p = torch.tensor(probabilities, dtype=torch.float64).T  # (C, N)
    return p.log().unsqueeze(0).unsqueeze(2)


# ---------------------------------------------------------------- focal


def test_focal_by_hand():
    # two pixels, true-class probabilities 0.75 and 0.5
    logits = logits_for([[0.25, 0.75], [0.5, 0.5]])
    target = torch.tensor([[[1, 0]]])
    expected = (-(0.25**3) * math.log(0.75) - (0.5**3) * math.log(0.5)) / 2
    assert FocalLoss(gamma=3)(logits, target).item() == pytest.approx(expected)


def test_focal_with_gamma_0_is_cross_entropy_and_ignores_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=generator, requires_grad=True)
    target = torch.randint(0, 5, (2, 6, 7), generator=generator)
    target[0, :3] = 255
    focal = FocalLoss(gamma=0)(logits, target)
    torch.testing.assert_close(focal, F.cross_entropy(logits, target, ignore_index=255))
    # ignored pixels get no gradient; the mean runs over valid pixels only
    focal.backward()
    assert torch.count_nonzero(logits.grad[0, :, :3]) == 0
    assert FocalLoss(gamma=3)(logits, target) < focal  # down-weighting easy pixels only lowers it


def test_focal_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = FocalLoss()(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()


def test_shapes_must_match():
    with pytest.raises(ValueError, match="do not match"):
        FocalLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------- OHEM


def test_ohem_keeps_pixels_below_threshold():
    # true-class probabilities 0.9, 0.6, 0.3, 0.8
    logits = logits_for([[0.1, 0.9], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    target = torch.tensor([[[1, 0, 1, 1]]])
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1)
    assert loss.item() == pytest.approx((-math.log(0.6) - math.log(0.3)) / 2)


def test_ohem_keeps_at_least_min_kept_hardest():
    logits = logits_for([[0.1, 0.9], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    target = torch.tensor([[[1, 0, 1, 1]]])
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=3)
    assert loss.item() == pytest.approx((-math.log(0.6) - math.log(0.3) - math.log(0.8)) / 3)
    everything = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100)
    assert everything.item() == pytest.approx(F.cross_entropy(logits, target).item())


def test_ohem_ignores_pixels():
    logits = logits_for([[0.1, 0.9], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    target = torch.tensor([[[1, 0, 255, 1]]])
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1)
    assert loss.item() == pytest.approx(-math.log(0.6))
    assert ohem_cross_entropy(logits, torch.full_like(target, 255)).item() == 0.0


# ---------------------------------------------------------------- Dice


def test_binary_dice_by_hand():
    logits = torch.zeros(1, 1, 1, 2)  # sigmoid 0.5 everywhere
    target = torch.tensor([[[1, 0]]])
    # intersection 0.5, |P| = 1, |T| = 1: 1 - (2 * 0.5 + 1) / (2 + 1) = 1/3
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(1 / 3)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.5)
    perfect = torch.tensor([[[[30.0, -30.0]]]])
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_multiclass_dice_by_hand():
    logits = logits_for([[0.5, 0.5], [0.5, 0.5]]).float()
    target = torch.tensor([[[0, 1]]])
    # each class: intersection 0.5, |P| = 1, |T| = 1 -> 1 - 2/3 with smooth 1
    assert dice_loss(logits, target, num_classes=2).item() == pytest.approx(1 / 3)
    three = torch.cat([logits, torch.full_like(logits[:, :1], -1e4)], dim=1)
    # class 2 is absent from prediction and target: loss 0 for it, through smooth
    assert dice_loss(three, target, num_classes=3).item() == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)


def test_dice_ignores_pixels_and_checks_channels():
    logits = torch.zeros(1, 1, 1, 3)
    target = torch.tensor([[[1, 0, 255]]])
    assert dice_loss(logits, target).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="pass num_classes"):
        dice_loss(torch.zeros(1, 2, 1, 3), target)
