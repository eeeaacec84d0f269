"""timm encoders: levels, shapes, and pretrained weights from the hub or a local file (offline)."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

from gigaseg.errors import ConfigError
from gigaseg.nn.encoders import Encoder, default_out_indices


def test_resnet_levels_are_c2_to_c5():
    encoder = Encoder("test_resnet")
    assert encoder.out_indices == (1, 2, 3, 4)
    assert encoder.reductions == [4, 8, 16, 32]
    assert encoder.out_channels == [32, 48, 192, 96]
    assert encoder.output_stride == 32
    features = encoder(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 32, 16, 16), (2, 48, 8, 8), (2, 192, 4, 4), (2, 96, 2, 2)]


def test_resnet50_channels_match_glnet():
    with torch.device("meta"):  # shapes only: no memory, no init time
        encoder = Encoder("resnet50")
    assert encoder.out_channels == [256, 512, 1024, 2048]
    assert encoder.reductions == [4, 8, 16, 32]


@pytest.mark.parametrize(
    "reductions, expected",
    [
        ([2, 4, 8, 16, 32], (1, 2, 3, 4)),  # ResNet, EfficientNet: skip the stride-2 stem
        ([4, 8, 16, 32], (0, 1, 2, 3)),  # ConvNeXt, Swin
        ([16] * 12, (8, 9, 10, 11)),  # plain ViT: the last four blocks
        ([2, 4, 8], (1, 2)),  # shallow: fewer than four
    ],
)
def test_default_out_indices(reductions, expected):
    assert default_out_indices([{"reduction": r} for r in reductions]) == expected


@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "test_mambaout"])
def test_other_families_give_nchw_maps_at_4_to_32(name):
    encoder = Encoder(name)
    assert encoder.reductions == [4, 8, 16, 32]
    features = encoder(torch.randn(1, 3, 64, 64))
    # test_mambaout's timm features are NHWC; the encoder hands out NCHW
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // r, 64 // r) for c, r in zip(encoder.out_channels, encoder.reductions)
    ]


def test_explicit_out_indices_and_in_channels():
    encoder = Encoder("test_resnet", in_channels=5, out_indices=(2, 3))
    assert encoder.out_channels == [48, 192]
    assert [tuple(f.shape) for f in encoder(torch.randn(1, 5, 64, 64))] == [(1, 48, 8, 8), (1, 192, 4, 4)]


def test_unknown_encoder_suggests_names():
    with pytest.raises(ConfigError, match="unknown encoder 'resnet5O'.*'resnet50'"):
        Encoder("resnet5O")


# ------------------------------------------------------------------ pretrained weights


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(3)
    model = timm.create_model("resnet18")  # a full classification model, fc included
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_local_classification_state_dict(resnet18_file):
    path, state = resnet18_file
    encoder = Encoder("resnet18", pretrained=path)
    loaded = encoder.model.state_dict()
    assert torch.equal(loaded["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert not any(k.startswith("fc.") for k in loaded)


def test_in_channels_adapt_the_first_conv_like_timm(resnet18_file):
    path, state = resnet18_file
    grey = Encoder("resnet18", in_channels=1, pretrained=path).model.conv1.weight
    assert torch.allclose(grey, state["conv1.weight"].sum(dim=1, keepdim=True))
    four = Encoder("resnet18", in_channels=4, pretrained=path).model.conv1.weight
    assert torch.allclose(four, timm.models.adapt_input_conv(4, state["conv1.weight"]))
    assert torch.allclose(four[:, 3], state["conv1.weight"][:, 0] * 3 / 4)


@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "test_vit"])
def test_local_weights_for_flattened_and_wrapped_extractors(tmp_path, name):
    # ConvNeXt's stem and EfficientNet's blocks are renamed by timm's feature wrappers
    # (stem.0 -> stem_0), the ViT getter prefixes "model."; head layers are dropped
    torch.manual_seed(4)
    reference = timm.create_model(name)
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(path))
    encoder = Encoder(name, pretrained=path)
    source = {k.replace(".", "_"): v for k, v in reference.state_dict().items()}
    for key, value in encoder.model.state_dict().items():
        plain = key.removeprefix("model.").replace(".", "_")
        assert torch.equal(value, source[plain]), key


def test_features_only_state_dict_round_trips(tmp_path):
    torch.manual_seed(5)
    original = Encoder("test_resnet")
    path = tmp_path / "features.bin"
    torch.save(original.model.state_dict(), path)
    copy = Encoder("test_resnet", pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), copy.state_dict().values()))
    grey = Encoder("test_resnet", pretrained=path, in_channels=1)  # adapted here too
    stem = original.model.state_dict()["conv1.0.weight"]
    assert torch.allclose(grey.model.state_dict()["conv1.0.weight"], stem.sum(dim=1, keepdim=True))


def test_checkpoint_wrappers_and_ddp_prefixes_are_undone(tmp_path):
    reference = timm.create_model("test_resnet")
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3}, path)
    encoder = Encoder("test_resnet", pretrained=path)
    assert torch.equal(encoder.model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_classifier_of_another_size_is_ignored(tmp_path):
    reference = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "finetuned.pth"
    torch.save(reference.state_dict(), path)
    Encoder("test_resnet", pretrained=path)


def test_wrong_architecture_names_the_keys(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(ConfigError, match=r"resnet18\.pth: not a state dict of timm 'test_resnet'.*missing keys"):
        Encoder("test_resnet", pretrained=path)


def test_extra_and_missing_keys_are_errors(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.0.conv2.weight"]
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(
        ConfigError, match=r"1 missing keys \(layer2.0.conv2.weight\); 1 unexpected keys \(extra.weight\)"
    ):
        Encoder("test_resnet", pretrained=path)


def test_wrong_shapes_are_errors(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"shapes do not match.*layer1.0.conv1.weight \(1, 1, 1, 1\)"):
        Encoder("test_resnet", pretrained=path)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ConfigError, match=r"nowhere\.pth: pretrained weights file not found"):
        Encoder("test_resnet", pretrained=missing)
    for name in ("corrupt.pth", "corrupt.safetensors"):
        corrupt = tmp_path / name
        corrupt.write_bytes(b"this is not a weights file")
        with pytest.raises(ConfigError, match=rf"{name.replace('.', r'[.]')}: not a readable weights file"):
            Encoder("test_resnet", pretrained=corrupt)


def test_hub_failure_asks_for_a_local_file(monkeypatch):
    real = timm.create_model

    def offline(name, *args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, *args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        ConfigError, match=r"couldn't connect.*pass the local file: pretrained='/path/to/test_resnet\.pth'"
    ):
        Encoder("test_resnet", pretrained=True)


def test_model_without_timm_weights():
    # timm has no pretrained tag for test_mambaout: it says so before any download
    with pytest.raises(ConfigError, match="no pretrained weights for encoder 'test_mambaout'"):
        Encoder("test_mambaout", pretrained=True)


def test_pretrained_must_be_bool_or_path():
    with pytest.raises(ConfigError, match="pretrained must be True, False or a weights file path"):
        Encoder("test_resnet", pretrained=3)
