"""The full-resolution head: shapes on odd sizes, the encoder's stride-2 level, the parameter formula, gradients."""

from __future__ import annotations

import pytest
import torch

from gigaseg.errors import ConfigError
from gigaseg.nn.decoders import FullResolutionHead
from gigaseg.nn.encoders import Encoder
from gigaseg.nn.fpn import FPNBranch
from methods.base import count_parameters

#: odd sides, neither a multiple of 4 nor of 2
SIZE = (61, 67)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def head_parameters(C, K, k, k2=None, output_stride=1, w=32, f=16, s=16, q=0):
    """The module docstring's formula (k2=None: the stride-2 stem stands in for the encoder's level)."""
    total = C * w + 2 * w  # reduce: 1x1 conv without bias + BN
    if q:
        total += q * q * C * K + K  # the coarse classifier
    if k2 is None:
        total += 9 * k * s + 2 * s  # stem2
        k2 = s
    total += 9 * (w + k2) * w + 2 * w  # fuse2
    if output_stride == 2:
        return total + w * K + K
    total += 9 * k * s + 2 * s  # stem1
    total += 9 * (w + s) * f + 2 * f  # fuse1
    return total + f * K + K


def inputs(C=20, k=3, k2=8, batch=2, size=SIZE):
    generator = torch.Generator().manual_seed(0)
    h, w = size
    features = torch.randn(batch, C, ceil_div(h, 4), ceil_div(w, 4), generator=generator)
    image = torch.randn(batch, k, h, w, generator=generator)
    skip = torch.randn(batch, k2, ceil_div(h, 2), ceil_div(w, 2), generator=generator) if k2 else None
    return features, image, skip


# ---- the head alone


@pytest.mark.parametrize("output_stride", [1, 2])
@pytest.mark.parametrize("k2", [8, None], ids=["encoder-skip", "own-stem"])
def test_head_shapes_on_odd_sizes(output_stride, k2):
    head = FullResolutionHead(20, 5, image_channels=3, skip_channels=k2, output_stride=output_stride)
    features, image, skip = inputs(k2=k2)
    out = head(features, image, skip)
    h, w = SIZE
    expected = (h, w) if output_stride == 1 else (ceil_div(h, 2), ceil_div(w, 2))
    assert tuple(out.shape) == (2, 5, *expected)
    assert head.output_stride == output_stride
    assert head.uses_encoder_skip == (k2 is not None)


def test_head_follows_the_skip_and_image_sizes_it_is_given():
    """Every upsampling goes to the next map's exact size, whatever the rounding of the encoder."""
    head = FullResolutionHead(20, 2, image_channels=3, skip_channels=8, output_stride=2)
    features, image, _ = inputs()
    skip = torch.randn(2, 8, 30, 33)  # floor instead of ceil
    assert tuple(head(features, image, skip).shape) == (2, 2, 30, 33)
    head1 = FullResolutionHead(20, 2, image_channels=3, skip_channels=8, output_stride=1)
    assert tuple(head1(features, image, skip).shape) == (2, 2, *SIZE)


@pytest.mark.parametrize("output_stride", [1, 2])
@pytest.mark.parametrize("k2", [8, None], ids=["encoder-skip", "own-stem"])
def test_head_parameter_count_follows_the_formula(output_stride, k2):
    head = FullResolutionHead(20, 5, image_channels=4, skip_channels=k2, output_stride=output_stride)
    assert count_parameters(head) == head_parameters(20, 5, 4, k2, output_stride)
    wide = FullResolutionHead(
        20,
        5,
        image_channels=4,
        skip_channels=k2,
        output_stride=output_stride,
        channels=24,
        fine_channels=12,
        stem_channels=8,
    )
    assert count_parameters(wide) == head_parameters(20, 5, 4, k2, output_stride, w=24, f=12, s=8)


@pytest.mark.parametrize("output_stride", [1, 2])
def test_coarse_logits_are_added_upsampled_to_the_heads(output_stride):
    """coarse_kernel=q: a q x q classifier on the 1/4 features, its logits upsampled and added."""
    head = FullResolutionHead(20, 5, image_channels=3, skip_channels=8, output_stride=output_stride, coarse_kernel=3)
    assert count_parameters(head) == head_parameters(20, 5, 3, 8, output_stride, q=3)
    assert tuple(head.coarse.weight.shape) == (5, 20, 3, 3)
    head.eval()
    features, image, skip = inputs()
    with torch.no_grad():
        out = head(features, image, skip)
        coarse = head.coarse(features)
        head.coarse = None  # the same head without its coarse classifier
        alone = head(features, image, skip)
    upsampled = torch.nn.functional.interpolate(coarse, size=out.shape[-2:], mode="bilinear", align_corners=False)
    expected = alone + upsampled
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, alone, atol=1e-3)


def test_coarse_classifier_gets_gradients_and_checks_its_kernel():
    head = FullResolutionHead(20, 3, image_channels=3, skip_channels=8, coarse_kernel=1).train()
    features, image, skip = inputs()
    head(features, image, skip).square().mean().backward()
    assert head.coarse.weight.grad.abs().sum() > 0 and head.coarse.bias.grad.abs().sum() > 0
    assert FullResolutionHead(20, 3, image_channels=3, skip_channels=8).coarse is None
    for bad in (2, -1, True, 1.0):
        with pytest.raises(ConfigError, match="coarse_kernel must be 0 or a positive odd integer"):
            FullResolutionHead(20, 3, image_channels=3, skip_channels=8, coarse_kernel=bad)


def test_head_on_a_resnet50_fpn_is_light():
    """The docstring's example: ps3 of GLNet's FPN (512 channels), ResNet-50's 64-channel stem, 7 classes."""
    assert head_parameters(512, 7, 3, 64) == 51_687
    with torch.device("meta"):
        branch = FPNBranch("resnet50", num_classes=7, output_stride=1)
    assert branch.encoder.stride2_channels == 64
    assert count_parameters(branch.head) == 51_687
    assert count_parameters(branch.head) < count_parameters(branch.fpn) / 80


@pytest.mark.parametrize("output_stride", [1, 2])
@pytest.mark.parametrize("k2", [8, None], ids=["encoder-skip", "own-stem"])
def test_gradients_reach_every_head_parameter_and_its_inputs(output_stride, k2):
    head = FullResolutionHead(20, 3, image_channels=3, skip_channels=k2, output_stride=output_stride).train()
    features, image, skip = inputs(k2=k2)
    features.requires_grad_(True)
    if skip is not None:
        skip.requires_grad_(True)
    head(features, image, skip).square().mean().backward()
    missing = [name for name, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert features.grad.abs().sum() > 0
    assert skip is None or skip.grad.abs().sum() > 0


def test_head_checks_its_arguments():
    with pytest.raises(ConfigError, match="output_stride 1 or 2, got 4"):
        FullResolutionHead(20, 3, image_channels=3, skip_channels=8, output_stride=4)
    with pytest.raises(ConfigError, match="channels must be a positive integer"):
        FullResolutionHead(20, 3, image_channels=3, skip_channels=8, channels=0)
    features, image, skip = inputs()
    with pytest.raises(ValueError, match="pass the encoder's stride-2 map"):
        FullResolutionHead(20, 3, image_channels=3, skip_channels=8)(features, image)
    with pytest.raises(ValueError, match="built without skip_channels"):
        FullResolutionHead(20, 3, image_channels=3, skip_channels=None)(features, image, skip)


# ---- the encoder's stride-2 level


@pytest.mark.parametrize("name, channels", [("test_resnet", 32), ("test_efficientnet", 16), ("test_convnext", None)])
def test_encoder_stride2_level_leaves_the_usual_levels_alone(name, channels):
    torch.manual_seed(0)
    plain = Encoder(name)
    torch.manual_seed(0)
    fine = Encoder(name, stride2=True)
    assert fine.stride2_channels == channels and plain.stride2_channels is None
    assert (fine.out_indices, fine.out_channels, fine.reductions) == (
        plain.out_indices,
        plain.out_channels,
        plain.reductions,
    )
    state = plain.state_dict()
    assert list(fine.state_dict()) == list(state)  # the same modules: weights load either way
    fine.load_state_dict(state)
    x = torch.randn(1, 3, *SIZE)
    skip, maps = fine.forward_with_stride2(x)
    for a, b in zip(maps, plain(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(fine(x), maps, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if channels is None:
        assert skip is None
    else:
        assert tuple(skip.shape) == (1, channels, ceil_div(SIZE[0], 2), ceil_div(SIZE[1], 2))
    assert plain.forward_with_stride2(x)[0] is None


# ---- on the FPN


@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext"])
@pytest.mark.parametrize("output_stride", [1, 2])
def test_fpn_branch_with_the_head(encoder, output_stride):
    torch.manual_seed(0)
    branch = FPNBranch(encoder, num_classes=4, lateral_channels=16, smooth_channels=8, output_stride=output_stride)
    assert branch.output_stride == output_stride
    assert branch.fpn.classifier is None  # the FPN's own classifier is not built
    assert not any(key.startswith("fpn.classifier") for key in branch.state_dict())
    skip = branch.encoder.stride2_channels
    assert count_parameters(branch.head) == head_parameters(32, 4, 3, skip, output_stride)
    x = torch.randn(2, 3, *SIZE)
    out = branch(x)
    h, w = SIZE
    expected = (h, w) if output_stride == 1 else (ceil_div(h, 2), ceil_div(w, 2))
    assert tuple(out.shape) == (2, 4, *expected)
    features = branch(x, return_features=True)
    torch.testing.assert_close(features.logits, out)
    assert features.ps3.shape[1] == 32
    out.square().mean().backward()
    assert [name for name, p in branch.named_parameters() if p.grad is None] == []


def test_fpn_branch_default_is_glnets_head():
    torch.manual_seed(0)
    branch = FPNBranch("test_resnet", num_classes=4, lateral_channels=16, smooth_channels=8)
    assert branch.head is None and branch.fpn.classifier is not None and branch.output_stride == 4
    assert branch.encoder.stride2_channels is None
    assert not any(key.startswith("head.") for key in branch.state_dict())


def test_fpn_branch_refuses_other_output_strides():
    for bad in (3, 8, 0, True):
        with pytest.raises(ConfigError, match="output_stride must be one of 1, 2, 4"):
            FPNBranch("test_resnet", num_classes=2, output_stride=bad)
