"""GLNet's FPN: structure, shapes, init, the sharing points and the ResNet-50 parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gigaseg.errors import ConfigError
from gigaseg.methods.registry import create_model
from gigaseg.nn.fpn import FPN, SHARING_POINTS, FPNBranch, FPNFeatures
from methods.base import conv_parameters, count_parameters

CHANNELS = [8, 12, 16, 20]


def pyramid(sizes=((25, 25), (13, 13), (7, 7), (4, 4)), batch=2, channels=CHANNELS):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, *s, generator=generator) for c, s in zip(channels, sizes)]


def up(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def test_only_plain_convs_no_norm_no_activation():
    fpn = FPN(CHANNELS, num_classes=5)
    leaves = [m for m in fpn.modules() if not list(m.children())]
    assert leaves and all(isinstance(m, nn.Conv2d) for m in leaves)


def test_layer_shapes_follow_glnet():
    fpn = FPN([256, 512, 1024, 2048], num_classes=7)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in fpn.lateral_convs] == [
        (256, 256, (1, 1)),
        (512, 256, (1, 1)),
        (1024, 256, (1, 1)),
        (2048, 256, (1, 1)),
    ]
    assert all((c.in_channels, c.out_channels, c.kernel_size) == (256, 256, (3, 3)) for c in fpn.smooth1_convs)
    assert all((c.in_channels, c.out_channels, c.kernel_size) == (256, 128, (3, 3)) for c in fpn.smooth2_convs)
    assert (fpn.classifier.in_channels, fpn.classifier.out_channels, fpn.classifier.kernel_size) == (512, 7, (3, 3))
    assert fpn.merge_conv is None


def test_init_is_normal_0_01_with_zero_bias():
    torch.manual_seed(0)
    fpn = FPN([256, 512, 1024, 2048], num_classes=7)
    for conv in fpn.modules():
        if isinstance(conv, nn.Conv2d):
            assert torch.count_nonzero(conv.bias) == 0
    weights = torch.cat([m.weight.flatten() for m in fpn.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.mean().item()) < 1e-4
    assert weights.std().item() == pytest.approx(0.01, rel=0.01)


def test_logits_at_the_finest_level_size_for_odd_sizes():
    fpn = FPN(CHANNELS, num_classes=5)
    assert tuple(fpn(pyramid()).shape) == (2, 5, 25, 25)


def test_stages_compute_what_glnet_describes():
    torch.manual_seed(0)
    fpn = FPN(CHANNELS, num_classes=5, lateral_channels=6, smooth_channels=4)
    c = pyramid()
    out = fpn(c, return_features=True)
    assert isinstance(out, FPNFeatures)
    lat = [conv(x) for conv, x in zip(fpn.lateral_convs, c)]
    p5 = lat[3]
    p4 = up(p5, lat[2]) + lat[2]
    p3 = up(p4, lat[1]) + lat[1]
    p2 = up(p3, lat[0]) + lat[0]
    for got, want in zip(out.p, [p2, p3, p4, p5]):
        torch.testing.assert_close(got, want)
    ps1 = [conv(x) for conv, x in zip(fpn.smooth1_convs, out.p)]
    ps2 = [conv(x) for conv, x in zip(fpn.smooth2_convs, ps1)]
    ps3 = torch.cat([ps2[0]] + [up(x, ps2[0]) for x in ps2[1:]], dim=1)
    torch.testing.assert_close(out.ps3, ps3)
    torch.testing.assert_close(out.logits, fpn.classifier(ps3))
    assert [x.shape[1] for x in out.ps1] == [6] * 4 and [x.shape[1] for x in out.ps2] == [4] * 4
    assert out.ps3.shape[1] == 16
    assert all(a is b for a, b in zip(out.c, c))
    torch.testing.assert_close(fpn(c), out.logits)


def test_shared_inputs_double_every_stage_and_call_share_at_the_four_points():
    fpn = FPN(CHANNELS, num_classes=3, shared_inputs=True)
    assert [conv.in_channels for conv in fpn.lateral_convs] == [2 * c for c in CHANNELS]
    assert all(conv.in_channels == 512 for conv in fpn.smooth1_convs)
    assert all(conv.in_channels == 512 for conv in fpn.smooth2_convs)
    assert (fpn.merge_conv.in_channels, fpn.merge_conv.out_channels) == (1024, 512)
    assert fpn.classifier.in_channels == 512

    other = FPN(CHANNELS, num_classes=3)(pyramid(), return_features=True)  # e.g. the global branch
    calls = []

    def share(point, own):
        calls.append((point, [tuple(x.shape) for x in own]))
        return [torch.zeros_like(x) for x in getattr(other, point)]

    out = fpn(pyramid(), share=share, return_features=True)
    assert [point for point, _ in calls] == list(SHARING_POINTS) == ["c", "p", "ps1", "ps2"]
    assert calls[0][1] == [tuple(x.shape) for x in pyramid()]
    assert tuple(out.logits.shape) == (2, 3, 25, 25) and out.ps3.shape[1] == 512
    assert out.c[0].shape[1] == CHANNELS[0]  # own maps, before concatenation


def test_share_argument_must_match_the_build():
    with pytest.raises(ValueError, match="shared_inputs=True: pass share="):
        FPN(CHANNELS, 3, shared_inputs=True)(pyramid())
    with pytest.raises(ValueError, match="needs an FPN built with shared_inputs=True"):
        FPN(CHANNELS, 3)(pyramid(), share=lambda point, own: own)
    with pytest.raises(ConfigError, match="four encoder levels"):
        FPN(CHANNELS[:3], 3)


def test_branch_gives_quarter_resolution_logits():
    branch = FPNBranch("test_resnet", num_classes=4)
    assert branch.output_stride == 4
    assert tuple(branch(torch.randn(1, 3, 100, 100)).shape) == (1, 4, 25, 25)


def test_resnet50_fpn_parameter_count():
    """One GLNet branch (ResNet-50 + FPN, 7 classes), counted by hand from the layer shapes."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = create_model("global", encoder="resnet50", num_classes=7)
    encoder = count_parameters(model.net.encoder)
    assert encoder == 23_508_032  # torchvision/timm ResNet-50 (25,557,032) without its fc (2048*1000 + 1000)
    laterals = sum(conv_parameters(c, 256, 1) for c in (256, 512, 1024, 2048))
    smooth1 = 4 * conv_parameters(256, 256, 3)
    smooth2 = 4 * conv_parameters(256, 128, 3)
    classifier = conv_parameters(512, 7, 3)
    fpn = laterals + smooth1 + smooth2 + classifier
    assert fpn == 4_556_807
    assert count_parameters(model.net.fpn) == fpn
    assert model.num_parameters() == encoder + fpn == 28_064_839


def test_fpn_without_classifier_ends_at_ps3():
    """num_classes=None: no classifier (a head on ps3 makes the logits), the other layers as GLNet's."""
    torch.manual_seed(0)
    with_classifier = FPN(CHANNELS, num_classes=5)
    torch.manual_seed(0)
    fpn = FPN(CHANNELS, num_classes=None)
    assert fpn.classifier is None and fpn.merged_channels == 512
    assert set(with_classifier.state_dict()) - set(fpn.state_dict()) == {"classifier.weight", "classifier.bias"}
    fpn.load_state_dict({k: v for k, v in with_classifier.state_dict().items() if not k.startswith("classifier.")})
    c = pyramid()
    out = fpn(c, return_features=True)
    assert out.logits is None
    torch.testing.assert_close(out.ps3, with_classifier(c, return_features=True).ps3)
    with pytest.raises(ValueError, match="no classifier"):
        fpn(c)
    with pytest.raises(ValueError, match="without a classifier"):
        fpn.classify(out.ps3)


def test_branch_output_stride_1_gives_input_size_logits_for_odd_sizes():
    branch = FPNBranch("test_resnet", num_classes=4, output_stride=1)
    assert branch.output_stride == 1
    assert tuple(branch(torch.randn(1, 3, 101, 99)).shape) == (1, 4, 101, 99)


def test_branch_coarse_logits_add_the_fpn_classifier_upsampled():
    """coarse_logits=True: the head's logits plus a 3x3 classifier on ps3 (GLNet's), upsampled."""
    torch.manual_seed(0)
    plain = FPNBranch("test_resnet", num_classes=4, output_stride=1).eval()
    torch.manual_seed(0)
    branch = FPNBranch("test_resnet", num_classes=4, output_stride=1, coarse_logits=True).eval()
    merged = branch.fpn.merged_channels
    assert set(branch.state_dict()) - set(plain.state_dict()) == {"head.coarse.weight", "head.coarse.bias"}
    assert tuple(branch.head.coarse.weight.shape) == (4, merged, 3, 3)
    assert count_parameters(branch) - count_parameters(plain) == 9 * merged * 4 + 4
    assert branch.fpn.classifier is None  # the coarse classifier lives in the head
    branch.load_state_dict({**plain.state_dict(), **branch.head.coarse.state_dict(prefix="head.coarse.")})
    x = torch.randn(2, 3, 61, 67)
    with torch.no_grad():
        features = plain(x, return_features=True)
        coarse = branch.head.coarse(features.ps3)
        assert tuple(coarse.shape[-2:]) == tuple(features.ps3.shape[-2:])  # at 1/4
        torch.testing.assert_close(branch(x), features.logits + up(coarse, features.logits))


def test_branch_coarse_logits_have_no_effect_at_output_stride_4():
    torch.manual_seed(0)
    paper = FPNBranch("test_resnet", num_classes=4)
    torch.manual_seed(0)
    branch = FPNBranch("test_resnet", num_classes=4, coarse_logits=True)
    assert branch.head is None and list(branch.state_dict()) == list(paper.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(branch(x), paper(x), rtol=0, atol=0)
