"""Deployment helpers: BN folding (which pairs, and only those), channels_last, ONNX equal to PyTorch."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from gigaseg.errors import ConfigError
from gigaseg.export import (
    export_onnx,
    find_conv_bn_pairs,
    fold_batchnorm,
    onnx_max_difference,
    optimize_for_inference,
    run_onnx,
    to_channels_last,
)
from gigaseg.methods.registry import create_model


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


class Shared(nn.Module):
    """conv1 -> bn1 (foldable); conv2's output feeds bn2 AND a residual (not foldable); conv3 runs twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        z = self.bn2(z) + z
        return self.bn3(self.conv3(self.conv3(z)))


def test_only_safe_pairs_are_folded():
    model = randomise_bn(Shared())
    x = torch.randn(2, 3, 16, 16)
    assert find_conv_bn_pairs(model, x) == [("conv1", "bn1")]
    folded = fold_batchnorm(model, x)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.BatchNorm2d)
    assert folded.folded_batchnorms == 1 and model.training  # the original is untouched
    assert isinstance(model.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # a predictor may be built under inference_mode
        assert fold_batchnorm(model, x).folded_batchnorms == 1


@pytest.mark.parametrize(
    "method, encoder, options, bns",
    [
        ("icnet", "icnet_resnet50_half", {"width": 0.25}, 63),
        ("icnet", "test_resnet", {"width": 0.25}, None),
        ("pspnet", "pspnet_resnet50", {"width": 0.125}, None),
    ],
)
def test_every_inference_bn_of_the_networks_folds(method, encoder, options, bns):
    torch.manual_seed(0)
    model = randomise_bn(create_model(method, encoder=encoder, num_classes=4, **options))
    x = torch.randn(1, 3, 64, 128)
    folded = fold_batchnorm(model, x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    used = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: used.add(m)) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert folded.folded_batchnorms == len(used) == (bns if bns is not None else len(used)) > 0
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(n.startswith("aux.") for n in left)  # only PSPNet's training-only auxiliary head keeps its BN


def test_channels_last_and_optimized_copy_give_the_same_logits():
    torch.manual_seed(0)
    model = randomise_bn(create_model("icnet", encoder="icnet_resnet50_half", num_classes=3, width=0.25)).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        want = model(x)
        fast = optimize_for_inference(model, x, channels_last=True)
        got = fast(x.contiguous(memory_format=torch.channels_last))
        plain = to_channels_last(create_model("icnet", encoder="icnet_resnet50_half", num_classes=3, width=0.25))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert plain.classifier.weight.is_contiguous(memory_format=torch.channels_last)


onnx_deps = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="needs onnx and onnxruntime (dev extra)",
)


@onnx_deps
def test_icnet_onnx_matches_pytorch(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = randomise_bn(create_model("icnet", encoder="icnet_resnet50_half", num_classes=5, width=0.25)).train()
    x = torch.randn(1, 3, 128, 256)
    path = export_onnx(model, tmp_path / "icnet.onnx", x)
    assert model.training  # exporting does not change the model's mode
    assert onnx_max_difference(path, model, x) < 1e-4
    graph = onnx.load(str(path)).graph
    assert not [i.name for i in graph.initializer if "aux" in i.name]  # auxiliary heads are not exported
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]  # folded
    (logits,) = run_onnx(path, torch.randn(2, 3, 128, 256))  # dynamic batch
    assert logits.shape == (2, 5, 128, 256)


@onnx_deps
def test_pspnet_and_timm_icnet_onnx_match_pytorch(tmp_path):
    x = torch.randn(1, 3, 64, 128)
    for name, model in {
        "pspnet": create_model("pspnet", encoder="pspnet_resnet50", num_classes=3, width=0.125),
        "timm": create_model("icnet", encoder="test_resnet", num_classes=3, width=0.25),
    }.items():
        path = export_onnx(randomise_bn(model), tmp_path / f"{name}.onnx", x, fold_bn=(name == "timm"))
        assert onnx_max_difference(path, model, x) < 1e-4, name


def test_missing_onnx_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ConfigError, match="pip install onnx"):
        export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "x.onnx", torch.randn(1, 3, 8, 8))
