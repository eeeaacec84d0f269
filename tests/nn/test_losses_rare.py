"""The rare-class losses of ``segmentation_loss`` on tensors small enough to check by hand, and their gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gigaseg.errors import ConfigError
from gigaseg.nn.losses import (
    LOSSES,
    CrossEntropy,
    DiceOverPresentClasses,
    FocalLoss,
    LovaszSoftmax,
    class_weights,
    segmentation_loss,
)


def logits_for(probabilities):
    """(1, C, 1, N) logits whose softmax over C is ``probabilities`` (a list of N columns)."""
    p = torch.tensor(probabilities, dtype=torch.float64).T  # (C, N)
    return p.log().unsqueeze(0).unsqueeze(2)


# ---------------------------------------------------------------- class weights


def test_class_weights_are_inverse_square_root_frequencies_normalised_to_mean_1():
    weights = class_weights([0.5, 0.3, 0.2, 0.0])
    raw = np.array([0.5, 0.3, 0.2]) ** -0.5  # 1.4142, 1.8257, 2.2361; mean 1.8253
    np.testing.assert_allclose(weights[:3], raw / raw.mean())
    np.testing.assert_allclose(weights, [0.774767, 1.000220, 1.225014, 1.0], atol=1e-6)
    assert weights[3] == 1.0  # a class absent from the training set is never a target


def test_class_weights_clip_and_accept_counts():
    # seven classes from 40% to 0.1%: the rarest weighs 20x the commonest (sqrt(400))
    frequencies = [0.4, 0.3, 0.15, 0.1, 0.037, 0.012, 0.001]
    weights = class_weights(frequencies)
    assert weights[6] / weights[0] == pytest.approx(20.0)
    np.testing.assert_allclose(class_weights(np.array(frequencies) * 1e6), weights)  # counts work too
    # a class at 1e-8 of the pixels would weigh 7071 times the others: capped at 50 times
    tiny = class_weights([0.5, 0.5 - 1e-8, 1e-8])
    assert tiny[2] / tiny[0] == pytest.approx(50.0) and tiny.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(tiny, [3 / 52, 3 / 52, 150 / 52], rtol=1e-6)
    with pytest.raises(ConfigError, match="all 0"):
        class_weights([0, 0])
    with pytest.raises(ConfigError, match="non-negative"):
        class_weights([0.5, -0.1])


# ---------------------------------------------------------------- the factory


def test_factory_builds_every_name_and_refuses_the_wrong_ones():
    for name in LOSSES:
        loss = segmentation_loss(name, 3, class_weights=[1.0, 2.0, 3.0])
        assert callable(loss)
    assert isinstance(segmentation_loss("focal", 3), FocalLoss) and segmentation_loss("focal", 3).gamma == 3
    with pytest.raises(ConfigError, match="unknown loss 'dice'"):
        segmentation_loss("dice", 3)
    with pytest.raises(ConfigError, match="needs class weights"):
        segmentation_loss("weighted_ce", 3)
    with pytest.raises(ConfigError, match="2 class weights for 3 classes"):
        segmentation_loss("ce", 3, class_weights=[1.0, 2.0])


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_ignores_ignored_pixels_and_is_0_when_all_are(name):
    loss = segmentation_loss(name, 3, class_weights=[0.5, 1.0, 2.0])
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=generator, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6), generator=generator)
    target[0, :2] = 255
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.count_nonzero(logits.grad[0, :, :2]) == 0
    # whatever the logits of the ignored pixels, the loss is the same
    other = logits.detach().clone()
    other[0, :, :2] = 100 * torch.randn(3, 2, 6, generator=generator)
    assert loss(other, target).item() == pytest.approx(value.item(), rel=1e-6)
    empty = loss(logits, torch.full_like(target, 255))
    assert empty.item() == 0.0 and empty.dim() == 0
    empty.backward()


def test_plain_ce_is_torch_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 3, generator=generator)
    target = torch.randint(0, 4, (2, 3, 3), generator=generator)
    target[1, 0, 0] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.equal(segmentation_loss("ce", 4)(logits, target), expected)


# ---------------------------------------------------------------- hand-computed values


def test_weighted_ce_by_hand():
    # true-class probabilities 0.75 (class 1) and 0.5 (class 0); weights 1 and 3
    logits = logits_for([[0.25, 0.75], [0.5, 0.5]])
    target = torch.tensor([[[1, 0]]])
    expected = (3 * -math.log(0.75) + 1 * -math.log(0.5)) / (3 + 1)
    assert CrossEntropy([1.0, 3.0])(logits, target).item() == pytest.approx(expected)
    assert segmentation_loss("weighted_ce", 2, class_weights=[1.0, 3.0])(logits, target).item() == pytest.approx(
        expected
    )


def test_dice_over_present_classes_on_2x2_by_hand():
    # uniform probabilities 1/3 over 3 classes; target [[0, 0], [1, 1]]: class 2 is absent
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.tensor([[[0, 0], [1, 1]]])
    # class 0: |P.T| = 2/3, |P| = 4/3, |T| = 2 -> Dice 0.4; class 1 the same; mean over 2 classes
    assert DiceOverPresentClasses(3)(logits, target).item() == pytest.approx(0.6)
    # with one pixel ignored: class 0: |P.T| = 1/3, |P| = 1, |T| = 1 -> 1/3; class 1: 2/3, 1, 2 -> 4/9
    target[0, 0, 1] = 255
    expected = 1 - (1 / 3 + 4 / 9) / 2
    assert DiceOverPresentClasses(3)(logits, target).item() == pytest.approx(expected)
    # ce_dice is their sum
    ce = F.cross_entropy(logits, target, ignore_index=255).item()
    assert segmentation_loss("ce_dice", 3)(logits, target).item() == pytest.approx(ce + expected)


def test_lovasz_softmax_by_hand():
    # two pixels, labels 0 and 1, softmax [0.8, 0.2] and [0.3, 0.7]
    logits = logits_for([[0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([[[0, 1]]])
    # class 0: errors |fg - p| = (0.2, 0.3); sorted (0.3 on pixel 1, not class 0; 0.2 on pixel 0);
    #   Jaccard loss of the growing error sets: {1} -> 1 - 1/2, {1, 0} -> 1 - 0/2: increments 0.5, 0.5
    #   -> 0.3 * 0.5 + 0.2 * 0.5 = 0.25
    # class 1: errors (0.2, 0.3); sorted (0.3 on pixel 1, class 1; 0.2 on pixel 0);
    #   {1} -> 1 - 0/1, {1, 0} -> 1 - 0/2: increments 1, 0 -> 0.3
    assert LovaszSoftmax()(logits, target).item() == pytest.approx((0.25 + 0.3) / 2)
    # a third pixel, ignored, changes nothing whatever its scores
    logits3 = logits_for([[0.8, 0.2], [0.3, 0.7], [0.01, 0.99]])
    assert LovaszSoftmax()(logits3, torch.tensor([[[0, 1, 255]]])).item() == pytest.approx(0.275)
    assert segmentation_loss("ce_lovasz", 2)(logits, target).item() == pytest.approx(
        0.275 + (-math.log(0.8) - math.log(0.7)) / 2
    )


def test_lovasz_on_one_hot_predictions_is_1_minus_iou_over_present_classes():
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (1, 6, 6), generator=generator)
    target[0, 0] = 255
    predicted = torch.randint(0, 3, (1, 6, 6), generator=generator)
    logits = 60.0 * F.one_hot(predicted, 4).movedim(-1, 1).double()  # class 3 never predicted nor present
    valid = target != 255
    ious = []
    for c in range(4):
        t, p = (target == c) & valid, (predicted == c) & valid
        if t.any():
            ious.append((t & p).sum().item() / (t | p).sum().item())
    assert LovaszSoftmax()(logits, target).item() == pytest.approx(1 - np.mean(ious), abs=1e-6)


# ---------------------------------------------------------------- the rare class's gradient

#: seven classes from 40% to 0.1% of a 100 x 100 crop: 10 pixels of the rarest
COUNTS = [4000, 3000, 1500, 1000, 370, 120, 10]


def _crop():
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    return labels.reshape(1, 100, 100)


def _gradients(name: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The mean norm (over classes) of d loss / d logits at the rarest class's pixels and at the commonest's."""
    logits = logits.clone().requires_grad_()
    loss = segmentation_loss(name, 7, class_weights=class_weights(np.array(COUNTS) / sum(COUNTS)))
    loss(logits, labels).backward()
    norm = logits.grad.norm(dim=1)[0]
    return norm[labels[0] == 6].mean().item(), norm[labels[0] == 0].mean().item()


def test_a_rare_pixel_pulls_much_harder_with_weighted_ce_or_lovasz_than_with_ce():
    labels = _crop()
    # a network at random initialisation: nearly uniform probabilities
    logits = 0.1 * torch.randn(1, 7, 100, 100, generator=torch.Generator().manual_seed(1))
    rare = {name: _gradients(name, logits, labels)[0] for name in LOSSES}
    # plain CE: about (1 - 1/7) / 10000 per rare pixel, like every other pixel
    assert rare["ce"] == pytest.approx(9.2e-5, rel=0.02)
    assert rare["weighted_ce"] / rare["ce"] > 12  # 14.3: weight 4.02 over a crop-mean weight of 0.28
    assert rare["ce_lovasz"] / rare["ce"] > 15  # 22.0
    # Dice's softmax gradient scales with p (1 - p) and its denominator is the false-positive
    # mass of a uniform prediction: at initialisation it adds little
    assert 1.0 < rare["ce_dice"] / rare["ce"] < 1.5  # 1.30


def test_a_rare_pixel_pulls_much_harder_with_ce_dice_once_the_common_classes_are_learned():
    labels = _crop()
    # the common classes predicted at 0.9; the rare class at 0.3 on its pixels and 0.01 elsewhere
    probabilities = torch.full((7, 100, 100), 0.0)
    one_hot = F.one_hot(labels[0], 7).movedim(-1, 0).bool()
    probabilities[one_hot] = 0.9
    probabilities[6] = 0.01
    rare_pixels = labels[0] == 6
    probabilities[:, rare_pixels] = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.05, 0.05, 0.3]).unsqueeze(1)
    rest = ~one_hot & (torch.arange(7) != 6).view(7, 1, 1) & ~rare_pixels
    probabilities[rest] = (1 - 0.9 - 0.01) / 5
    logits = probabilities.log().unsqueeze(0)
    ce_rare, ce_common = _gradients("ce", logits, labels)
    dice_rare, _ = _gradients("ce_dice", logits, labels)
    weighted_rare, _ = _gradients("weighted_ce", logits, labels)
    assert dice_rare / ce_rare > 5  # 8.5
    assert weighted_rare / ce_rare > 10  # 14.3 (ce_lovasz: 44.0)
