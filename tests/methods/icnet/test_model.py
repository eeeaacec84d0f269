"""ICNet's network (faithful half-width PSPNet-50 cascade, CFF, auxiliary heads) and the PSPNet-50 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gigaseg.errors import ConfigError
from gigaseg.methods.icnet.model import CascadeFeatureFusion, CascadeOutputs, ICNet, PyramidPoolingSum
from gigaseg.methods.icnet.pspnet import PSPNet, adaptive_avg_pool
from gigaseg.methods.registry import create_model

from ..base import ModelTester, conv_parameters


class _CascadeTester(ModelTester):
    """ICNet's training forward gives three outputs: the generic checks look at the 1/4 logits."""

    method = "icnet"
    input_size = (64, 128)
    # the auxiliary heads only get gradients from the cascade loss (tested below)
    unused_parameters = ("cff_sub24.aux", "cff_sub12.aux")

    def run_forward(self, model, x):
        out = model(x)
        return out.x4 if isinstance(out, CascadeOutputs) else out

    def expected_shape(self, x):
        return (x.shape[0], self.num_classes, x.shape[-2] // 4, x.shape[-1] // 4)


class TestICNet(_CascadeTester):
    encoder = "icnet_resnet50_half"
    options = {"width": 0.25}


class TestICNetTimmEncoder(_CascadeTester):
    encoder = "test_resnet"
    options = {"width": 0.25}


class TestPSPNet(ModelTester):
    method = "pspnet"
    encoder = "pspnet_resnet50"
    options = {"width": 0.125}
    unused_parameters = ("aux.",)

    def run_forward(self, model, x):
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    def test_other_in_channels(self):
        # batch 2: the bin-1 pyramid branch's BN cannot train on a single 1x1 value (as in PSPNet)
        model = self.build(in_channels=1)
        x = self.make_input(batch_size=2, in_channels=1)
        assert tuple(self.run_forward(model, x).shape) == self.expected_shape(x)

    def expected_shape(self, x):
        return (x.shape[0], self.num_classes, x.shape[-2] // 8, x.shape[-1] // 8)


def tiny_icnet(**options) -> ICNet:
    torch.manual_seed(0)
    return create_model("icnet", encoder="icnet_resnet50_half", num_classes=5, **{"width": 0.25, **options})


# ----------------------------------------------------------------------------- faithful structure


def bn_parameters(c: int) -> int:
    return 2 * c


def convbn(cin: int, cout: int, k: int) -> int:
    return conv_parameters(cin, cout, k, bias=False) + bn_parameters(cout)


def bottleneck(cin: int, cout: int, stride: int = 1) -> int:
    mid = cout // 4
    n = convbn(cin, mid, 1) + convbn(mid, mid, 3) + convbn(mid, cout, 1)
    return n + (convbn(cin, cout, 1) if (cin != cout or stride != 1) else 0)


def resnet50_parameters(base: int, cin: int = 3) -> int:
    n = convbn(cin, base, 3) + convbn(base, base, 3) + convbn(base, 2 * base, 3)
    c = 2 * base
    for i, (blocks, stride) in enumerate(((3, 1), (4, 2), (6, 1), (3, 1))):
        out = 4 * base * 2**i
        n += bottleneck(c, out, stride) + (blocks - 1) * bottleneck(out, out)
        c = out
    return n


def test_faithful_icnet_parameter_count_by_hand():
    model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=19)
    backbone = resnet50_parameters(32)
    assert sum(p.numel() for p in model.backbone.parameters()) == backbone
    head = (
        convbn(1024, 256, 1)  # pyramid reduction 1024 -> 256
        + convbn(3, 32, 3)
        + convbn(32, 32, 3)
        + convbn(32, 64, 3)  # sub1: three 3x3 s2 convs
        + convbn(256, 128, 3)
        + convbn(256, 128, 1)
        + conv_parameters(256, 19, 1)  # CFF(sub4, sub2) + aux
        + convbn(128, 128, 3)
        + convbn(64, 128, 1)
        + conv_parameters(128, 19, 1)  # CFF(., sub1) + aux
        + conv_parameters(128, 19, 1)
    )  # classifier at 1/4
    assert model.num_parameters() == backbone + head == 6_707_321
    pspnet = create_model("pspnet", encoder="pspnet_resnet50", num_classes=19)
    assert sum(p.numel() for p in pspnet.backbone.parameters()) == resnet50_parameters(64)
    assert pspnet.num_parameters() == 49_080_038  # 7.3x ICNet's


def test_half_width_channels_and_dilations():
    model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=19)
    b = model.backbone
    assert [b.stem[i][0].out_channels for i in range(3)] == [32, 32, 64]
    assert [b.stem[i][0].stride for i in range(3)] == [(2, 2), (1, 1), (1, 1)]
    assert isinstance(b.stem[3], nn.MaxPool2d) and b.stem[3].stride == 2 and b.stem[3].kernel_size == 3
    assert [len(layer) for layer in (b.layer1, b.layer2, b.layer3, b.layer4)] == [3, 4, 6, 3]
    assert [layer[-1].expand[0].out_channels for layer in (b.layer1, b.layer2, b.layer3, b.layer4)] == [
        128,
        256,
        512,
        1024,
    ]
    assert b.layer2[0].conv[0].stride == (2, 2)
    assert {blk.conv[0].dilation for blk in b.layer3} == {(2, 2)} and {blk.conv[0].stride for blk in b.layer3} == {
        (1, 1)
    }
    assert {blk.conv[0].dilation for blk in b.layer4} == {(4, 4)} and {blk.conv[0].stride for blk in b.layer4} == {
        (1, 1)
    }
    assert [m[0].out_channels for m in model.sub1] == [32, 32, 64] and {m[0].stride for m in model.sub1} == {(2, 2)}
    assert model.reduce[0].in_channels == 1024 and model.reduce[0].out_channels == 256
    assert model.reduce[0].kernel_size == (1, 1) and isinstance(model.reduce[2], nn.ReLU)
    psp = create_model("pspnet", encoder="pspnet_resnet50", num_classes=19).backbone
    assert [psp.stem[i][0].out_channels for i in range(3)] == [64, 64, 128]
    assert [layer[-1].expand[0].out_channels for layer in (psp.layer1, psp.layer2, psp.layer3, psp.layer4)] == [
        256,
        512,
        1024,
        2048,
    ]
    assert psp.layer3[0].conv[0].dilation == (2, 2) and psp.layer4[0].conv[0].dilation == (4, 4)


def test_cascade_resolutions_and_shared_computation():
    model = tiny_icnet().train()
    seen = {}

    def record(name):
        def hook(_m, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            seen.setdefault(name, []).append((tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])))

        return hook

    b = model.backbone
    for name, module in {
        "conv3_1": b.layer2[0],
        "conv3_2": b.layer2[1],
        "conv5": b.layer4,
        "sub1": model.sub1,
        "cff24": model.cff_sub24,
        "cff12": model.cff_sub12,
        "stem": b.stem,
    }.items():
        module.register_forward_hook(record(name))
    out = model(torch.randn(2, 3, 128, 256))
    assert seen["stem"] == [((64, 128), (16, 32))]  # the 1/2 image, max-pooled to 1/8 of the input
    assert seen["conv3_1"] == [((16, 32), (8, 16))]  # run once: sub2 at 1/16
    assert seen["conv3_2"] == [((4, 8), (4, 8))]  # sub4 continues from conv3_1 downsampled to 1/32
    assert seen["conv5"] == [((4, 8), (4, 8))]  # dilated: stays at 1/32
    assert seen["sub1"] == [((128, 256), (16, 32))]  # light branch: 1/8
    assert seen["cff24"] == [((4, 8), (8, 16))] and seen["cff12"] == [((8, 16), (16, 32))]
    assert [tuple(o.shape) for o in out] == [(2, 5, 8, 16), (2, 5, 16, 32), (2, 5, 32, 64)]


def test_cascade_shapes_at_cityscapes_frame_size_on_meta():
    with torch.device("meta"):
        model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=19).train()
        out = model(torch.empty(1, 3, 1024, 2048))
        assert [tuple(o.shape) for o in out] == [(1, 19, 64, 128), (1, 19, 128, 256), (1, 19, 256, 512)]
        model.eval()
        assert tuple(model(torch.empty(1, 3, 1024, 2048)).shape) == (1, 19, 1024, 2048)


def test_cff_shapes_and_no_relu_before_the_sum():
    torch.manual_seed(0)
    cff = CascadeFeatureFusion(low_channels=16, high_channels=8, out_channels=12, num_classes=3).train()
    # every conv/BN has non-trivial statistics so the branches have both signs
    f1, f2 = torch.randn(2, 16, 5, 7), torch.randn(2, 8, 10, 14)
    fused, aux = cff(f1, f2)
    assert tuple(fused.shape) == (2, 12, 10, 14) and tuple(aux.shape) == (2, 3, 10, 14)
    assert cff.low[0].kernel_size == (3, 3) and cff.low[0].dilation == (2, 2) and cff.low[0].padding == (2, 2)
    assert cff.high[0].kernel_size == (1, 1)
    assert len(cff.low) == 2 and len(cff.high) == 2  # conv + BN, no ReLU
    assert not any(isinstance(m, nn.ReLU) for m in (*cff.low.modules(), *cff.high.modules()))
    branch = {}
    cff.low.register_forward_hook(lambda m, i, o: branch.__setitem__("low", o))
    cff.high.register_forward_hook(lambda m, i, o: branch.__setitem__("high", o))
    cff.eval()
    fused, aux = cff(f1, f2)
    assert aux is None  # the auxiliary classifier is training-only
    low, high = branch["low"], branch["high"]
    assert (low < 0).any() and (high < 0).any()  # neither branch was rectified
    torch.testing.assert_close(fused, torch.relu(low + high), rtol=0, atol=0)
    # rectifying before the sum would give a different result
    assert not torch.allclose(fused, torch.relu(low) + torch.relu(high))
    up = F.interpolate(f1, size=(10, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(low, cff.low(up))


def test_pyramid_pooling_sums_without_parameters():
    pool = PyramidPoolingSum()
    assert sum(p.numel() for p in pool.parameters()) == 0 and pool.bins == (1, 2, 3, 6)
    x = torch.randn(2, 4, 12, 18)
    want = x.clone()
    for b in (1, 2, 3, 6):
        want += F.interpolate(F.adaptive_avg_pool2d(x, b), size=(12, 18), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pool(x), want)
    assert pool(x).shape == x.shape  # summed, not concatenated


def test_pspnet_pyramid_concatenates():
    model = create_model("pspnet", encoder="pspnet_resnet50", num_classes=19)
    assert model.ppm.bins == (1, 2, 3, 6)
    assert [b[0].out_channels for b in model.ppm.branches] == [512] * 4
    assert model.ppm.bottleneck[0].in_channels == 2048 + 4 * 512 and model.ppm.bottleneck[0].kernel_size == (3, 3)


@pytest.mark.parametrize("size", [(32, 64), (7, 13), (6, 6)])
def test_export_pooling_matches_adaptive_pooling(size, monkeypatch):
    x = torch.randn(1, 3, *size)
    want = [F.adaptive_avg_pool2d(x, b) for b in (1, 2, 3, 6)]
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    for b, expected in zip((1, 2, 3, 6), want):
        torch.testing.assert_close(adaptive_avg_pool(x, b), expected)


def test_auxiliary_heads_run_only_in_training():
    model = tiny_icnet()
    calls = []
    for name in ("cff_sub24", "cff_sub12"):
        getattr(model, name).aux.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x = torch.randn(1, 3, 64, 128)
    model.train()
    assert isinstance(model(x), CascadeOutputs) and calls == ["cff_sub24", "cff_sub12"]
    calls.clear()
    model.eval()
    out = model(x)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 5, 64, 128)  # 1/4 upsampled to the input
    assert calls == []
    logits4 = model.decode(x)
    torch.testing.assert_close(out, F.interpolate(logits4, size=(64, 128), mode="bilinear", align_corners=False))
    model.predict(x)
    assert calls == []


def test_auxiliary_heads_learn_from_the_cascade_loss():
    from gigaseg.methods.icnet.recipe import cascade_label_guidance_loss

    model = tiny_icnet().train()
    out = model(torch.randn(2, 3, 64, 128))
    loss, _ = cascade_label_guidance_loss(out, torch.randint(0, 5, (2, 64, 128)))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad


def test_timm_encoder_stages_feeding_sub2_and_sub4():
    model = create_model("icnet", encoder="resnet18", num_classes=3, width=0.25)
    cascade = model.backbone
    assert cascade.shared and cascade._head[-1] == "layer2" and cascade._tail == ["layer3", "layer4"]
    assert (cascade.sub2_channels, cascade.sub4_channels) == (128, 512)
    assert cascade.encoder.reductions == [4, 8, 8, 8]  # dilated to output stride 8
    sub2, sub4 = cascade(torch.randn(1, 3, 64, 128))  # the 1/2 image of a 128x256 input
    assert tuple(sub2.shape[-2:]) == (8, 16) and tuple(sub4.shape[-2:]) == (4, 8)  # 1/16 and 1/32 of the input


def test_options_are_checked():
    for options, message in [
        ({"width": 0.0}, "width must be > 0"),
        ({"loss_weights": [1.0, 1.0]}, "loss_weights must be three"),
        ({"tile_size": [0, 10]}, "tile_size must be"),
        ({"tile_size": 256, "tile_overlap": 256}, r"tile_overlap must be an integer in \[0, 256\)"),
        ({"scale_min": 2.0, "scale_max": 1.0}, "scale_min <= scale_max"),
        ({"blend": "cosine"}, "blend='cosine'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            create_model("icnet", encoder="icnet_resnet50_half", num_classes=2, **options)
    assert (
        create_model("icnet", encoder="icnet_resnet50_half", num_classes=2, width=0.25, tile_size=512).options[
            "tile_size"
        ]
        == 512
    )


def test_own_backbone_weights_from_a_local_file(tmp_path):
    source = tiny_icnet()
    path = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), path)
    model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=2, width=0.25, pretrained=str(path))
    torch.testing.assert_close(model.backbone.layer3[0].conv[0].weight, source.backbone.layer3[0].conv[0].weight)
    with pytest.raises(ConfigError, match="no downloadable pretrained weights"):
        create_model("icnet", encoder="icnet_resnet50_half", num_classes=2, width=0.25, pretrained=True)
    with pytest.raises(ConfigError, match="not a state dict of 'icnet_resnet50_half'"):
        create_model("icnet", encoder="icnet_resnet50_half", num_classes=2, width=0.5, pretrained=str(path))


def test_pspnet_auxiliary_head_only_in_training():
    model = create_model("pspnet", encoder="pspnet_resnet50", num_classes=3, width=0.125)
    x = torch.randn(2, 3, 64, 64)
    main, aux = model.train()(x)
    assert tuple(main.shape) == tuple(aux.shape) == (2, 3, 8, 8)
    calls = []
    model.aux.register_forward_hook(lambda *a: calls.append(1))
    assert tuple(model.eval()(x).shape) == (2, 3, 64, 64) and calls == []
    assert isinstance(model, PSPNet)
