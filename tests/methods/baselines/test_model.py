"""The global-only and patch-only baselines' network (FPNSegmenter) on every decoder."""

from __future__ import annotations

import pytest
import timm
import torch

from gigaseg.errors import ConfigError
from gigaseg.methods.baselines.model import GlobalSegmenter, PatchSegmenter
from gigaseg.methods.registry import create_model

from ..base import ModelTester


class TestGlobal(ModelTester):
    method = "global"
    options = {"input_size": 64}


class TestPatch(ModelTester):
    method = "patch"
    options = {"patch_size": 64, "overlap": 16, "blend": "uniform"}


class TestGlobalSmpUnet(ModelTester):
    method = "global"
    options = {"input_size": 64, "decoder": "smp_unet"}


class TestPatchSmpFpn(ModelTester):
    method = "patch"
    options = {"patch_size": 64, "overlap": 0, "decoder": "smp_fpn"}


class TestGlobalFullResolution(ModelTester):
    """The full-resolution head on the FPN's ps3 with the ResNet's stride-2 stem map."""

    method = "global"
    options = {"input_size": 64, "output_stride": 1}


class TestPatchFullResolution(ModelTester):
    method = "patch"
    options = {"patch_size": 64, "overlap": 16, "output_stride": 1}
    input_size = (61, 67)  # sides that are not multiples of 4


class TestPatchFullResolutionConvNeXt(ModelTester):
    """An encoder without a stride-2 level: the head's own stride-2 stem stands in."""

    method = "patch"
    encoder = "test_convnext"
    options = {"patch_size": 64, "overlap": 16, "output_stride": 1}


class TestPatchFullResolutionCoarseLogits(ModelTester):
    """The full-resolution head plus the FPN's 3x3 classifier on ps3, upsampled."""

    method = "patch"
    options = {"patch_size": 64, "overlap": 16, "output_stride": 1, "coarse_logits": True}


class TestPatchHalfResolution(ModelTester):
    method = "patch"
    options = {"patch_size": 64, "overlap": 16, "output_stride": 2}


def test_defaults_follow_glnet():
    assert GlobalSegmenter.default_options["input_size"] == 508
    assert PatchSegmenter.default_options["patch_size"] == 508
    model = create_model("patch", encoder="test_resnet", num_classes=2)
    assert model.options["blend"] == "gaussian" and model.options["decoder"] == "fpn"
    assert model.options["loss"] == "focal"


def test_fpn_decoder_logits_at_quarter_resolution_and_forward_at_input():
    model = create_model("global", encoder="test_resnet", num_classes=4, input_size=100)
    x = torch.randn(1, 3, 100, 100)
    assert model.output_stride == 4
    assert tuple(model.decode(x).shape) == (1, 4, 25, 25)
    assert tuple(model(x).shape) == (1, 4, 100, 100)


@pytest.mark.parametrize("method", ["global", "patch"])
@pytest.mark.parametrize("output_stride, side", [(1, 101), (2, 51)])
def test_fpn_decoder_with_the_full_resolution_head(method, output_stride, side):
    size = {"input_size": 101} if method == "global" else {"patch_size": 101, "overlap": 0}
    model = create_model(method, encoder="test_resnet", num_classes=4, output_stride=output_stride, **size)
    x = torch.randn(1, 3, 101, 101)
    assert model.output_stride == output_stride
    assert tuple(model.decode(x).shape) == (1, 4, side, side)  # 1/2: ceil(101 / 2), the stem's size
    assert tuple(model(x).shape) == (1, 4, 101, 101)
    assert model.net.fpn.classifier is None  # no parameters left without gradient
    assert any(key.startswith("net.head.") for key in model.state_dict())


def test_output_stride_4_is_the_papers_head_unchanged():
    torch.manual_seed(0)
    default = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=0)
    torch.manual_seed(0)
    explicit = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=0, output_stride=4)
    assert default.options["output_stride"] == 4 and default.output_stride == 4
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert not any(".head." in key for key in default.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(default.predict(x), explicit.predict(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["global", "patch"])
def test_a_config_without_output_stride_is_completed_by_the_default(method):
    """A checkpoint written before the option existed: 4 for "fpn", 1 for the smp decoders."""
    model = create_model(method, encoder="test_resnet", num_classes=2)
    old = model.config
    del old["options"]["output_stride"]
    assert model.canonical_config(old) == model.config
    assert create_model(**old).options["output_stride"] == 4
    smp_old = {**old, "options": {**old["options"], "decoder": "smp_unet"}}
    assert create_model(**smp_old).options["output_stride"] == 1


@pytest.mark.parametrize("method", ["global", "patch"])
def test_coarse_logits_option_builds_the_heads_coarse_classifier(method):
    size = {"input_size": 64} if method == "global" else {"patch_size": 64, "overlap": 0}
    model = create_model(method, encoder="test_resnet", num_classes=3, output_stride=1, coarse_logits=True, **size)
    merged = model.net.fpn.merged_channels
    assert tuple(model.net.head.coarse.weight.shape) == (3, merged, 3, 3)
    assert {"net.head.coarse.weight", "net.head.coarse.bias"} <= set(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert tuple(model.decode(x).shape) == (1, 3, 64, 64)
    default = create_model(method, encoder="test_resnet", num_classes=3, output_stride=1, **size)
    assert default.options["coarse_logits"] is False and default.net.head.coarse is None
    # a checkpoint written before the option: completed as false
    old = default.config
    del old["options"]["coarse_logits"]
    assert default.canonical_config(old) == default.config
    assert create_model(**old).net.head.coarse is None
    with pytest.raises(ConfigError, match="coarse_logits must be true or false"):
        create_model(method, encoder="test_resnet", num_classes=3, output_stride=1, coarse_logits="yes", **size)
    with pytest.raises(
        ConfigError,
        match=f"^{method}: coarse_logits adds the FPN's classifier to its full-resolution head, so it "
        "needs decoder 'fpn', got 'smp_unet'$",
    ):
        create_model(method, encoder="test_resnet", num_classes=3, decoder="smp_unet", coarse_logits=True, **size)


@pytest.mark.parametrize("decoder", ["smp_unet", "smp_fpn"])
def test_smp_decoders_take_only_output_stride_1(decoder):
    model = create_model("global", encoder="test_resnet", num_classes=2, input_size=64, decoder=decoder)
    assert model.options["output_stride"] == 1 == model.output_stride
    create_model("global", encoder="test_resnet", num_classes=2, input_size=64, decoder=decoder, output_stride=1)
    for stride in (2, 4):
        with pytest.raises(ConfigError, match=f"predicts at full resolution, so output_stride must be 1, got {stride}"):
            create_model(
                "patch",
                encoder="test_resnet",
                num_classes=2,
                patch_size=64,
                overlap=0,
                decoder=decoder,
                output_stride=stride,
            )


@pytest.mark.parametrize("decoder", ["smp_unet", "smp_fpn"])
def test_smp_decoders_are_full_resolution(decoder):
    model = create_model("global", encoder="test_resnet", num_classes=2, input_size=64, decoder=decoder)
    x = torch.randn(1, 3, 64, 64)
    assert model.output_stride == 1
    assert tuple(model.decode(x).shape) == (1, 2, 64, 64)
    # the encoder inside is a timm features_only model ("tu-" encoder): no download was needed
    assert type(model.net.encoder).__name__ == "TimmUniversalEncoder"


def test_smp_fpn_needs_sizes_divisible_by_its_stride():
    with pytest.raises(ConfigError, match="multiple of 32"):
        create_model("global", encoder="test_resnet", num_classes=2, decoder="smp_fpn")  # input_size 508
    create_model("global", encoder="test_resnet", num_classes=2, decoder="smp_unet")  # smp's U-Net resizes itself


def test_smp_decoder_loads_local_encoder_weights(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("test_resnet")
    path = tmp_path / "test_resnet.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(
        "global", encoder="test_resnet", num_classes=2, input_size=64, decoder="smp_unet", pretrained=path
    )
    assert torch.equal(model.net.encoder.model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    fpn_model = create_model("global", encoder="test_resnet", num_classes=2, input_size=64, pretrained=path)
    assert torch.equal(fpn_model.net.encoder.model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert "pretrained" not in fpn_model.config


@pytest.mark.parametrize(
    "options, message",
    [
        ({"decoder": "deeplab"}, "decoder='deeplab' is not one of"),
        ({"loss": "dice"}, "loss='dice'"),
        ({"blend": "cosine"}, "blend='cosine'"),
        ({"patch_size": 0}, "patch_size must be > 0"),
        ({"patch_size": "508"}, "patch_size must be an integer"),
        ({"overlap": 508}, r"overlap must be in \[0, patch_size=508\)"),
        ({"patch_size": -4}, "patch_size must be > 0"),
        ({"crops_per_image": 1.5}, "crops_per_image must be an integer"),
        ({"output_stride": 3}, "output_stride=3 is not one of 1, 2, 4"),
        ({"output_stride": 8}, "output_stride=8 is not one of 1, 2, 4"),
        ({"output_stride": "1"}, "output_stride must be an integer"),
        ({"output_stride": True}, "output_stride must be an integer"),
    ],
)
def test_patch_option_values_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("patch", encoder="test_resnet", num_classes=2, **options)


def test_global_checks_output_stride():
    with pytest.raises(ConfigError, match="^global: option output_stride=0 is not one of 1, 2, 4$"):
        create_model("global", encoder="test_resnet", num_classes=2, output_stride=0)


def test_global_options_are_its_own():
    with pytest.raises(ConfigError, match="'patch_size'.*input_size"):
        create_model("global", encoder="test_resnet", num_classes=2, patch_size=64)
    with pytest.raises(ConfigError, match="'lr'"):  # training hyperparameters belong to the recipe, not the model
        create_model("global", encoder="test_resnet", num_classes=2, lr=1e-4)


def test_fpn_channels_sets_the_decoder_width():
    paper = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=16)
    light = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=16, fpn_channels=64)

    def fpn_params(model):
        return sum(p.numel() for p in model.net.fpn.parameters())

    def encoder_params(model):
        return sum(p.numel() for p in model.net.encoder.parameters())

    assert encoder_params(paper) == encoder_params(light)
    # every FPN conv scales with the width squared (laterals and the classifier linearly)
    assert fpn_params(light) < fpn_params(paper) / 8
    x = torch.rand(1, 3, 64, 64)
    assert light(x).shape == (1, 3, 64, 64)
