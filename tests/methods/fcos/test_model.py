"""The fcos network: torchvision's fcos_resnet50_fpn's parameters, pyramid levels, options, losses and detect."""

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn

from gigaseg.errors import ConfigError
from gigaseg.geometry import Detections
from gigaseg.methods.fcos.model import FCOSDetector

TINY = {"fpn_channels": 32, "head_convs": 1, "input_size": 64, "crop_size": 64}


def tiny(**options):
    torch.manual_seed(0)
    return FCOSDetector(encoder="test_resnet", num_classes=3, **{**TINY, **options})


def test_parameters_equal_torchvision_fcos_resnet50_fpn():
    ours = FCOSDetector(encoder="resnet50", num_classes=91)
    reference = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    count = sum(p.numel() for p in reference.parameters())
    assert ours.num_parameters() == count == 32_322_720  # 32,269,600 + ResNet-50's 53,120 BatchNorm weights
    # the FPN and heads are torchvision's modules: their state dicts load into each other
    ours.heads.head.load_state_dict(reference.head.state_dict())
    ours.fpn.load_state_dict(reference.backbone.fpn.state_dict())


@pytest.mark.parametrize(
    ("min_level", "max_level", "strides"),
    [(3, 7, (8, 16, 32, 64, 128)), (2, 5, (4, 8, 16, 32)), (2, 6, (4, 8, 16, 32, 64)), (3, 5, (8, 16, 32))],
)
def test_pyramid_levels(min_level, max_level, strides):
    model = tiny(min_level=min_level, max_level=max_level)
    assert model.strides == strides == model.heads.strides
    features = model.features(torch.zeros(1, 3, 128, 96))
    assert [tuple(f.shape[-2:]) for f in features] == [(-(-128 // s), -(-96 // s)) for s in strides]
    assert all(f.shape[1] == 32 for f in features)
    if max_level == 6:  # P6 max-pooled from P5: no weights of its own
        assert not any("extra" in name for name, _ in model.fpn.named_parameters())


def test_losses_and_detect():
    model = tiny()
    images = torch.randn(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    assert next(model.encoder.parameters()).grad.abs().sum() > 0
    found = model.detect(images, score_threshold=0.0, max_detections=7)
    assert [type(d) for d in found] == [Detections, Detections] and [len(d) for d in found] == [7, 7]
    assert all((d.boxes >= 0).all() and (d.boxes <= 64).all() for d in found)
    # None takes the model's options
    assert len(model.with_inference_options(max_detections=3, score_threshold=0.0).detect(images)[0]) == 3


def test_options():
    model = tiny()
    assert model.tile_size == 64 and tiny(tile_size=48).tile_size == 48
    assert model.overlap == 13 and tiny(tile_size=100, overlap_ratio=0.25).overlap == 25
    with pytest.raises(ConfigError, match=r"overlap_ratio must be in \[0, 1\)"):
        tiny(overlap_ratio=1.0)
    with pytest.raises(ConfigError, match="mode=.*is not one of"):
        tiny(mode="tiles")
    with pytest.raises(ConfigError, match="min_level=4"):
        tiny(min_level=4)
    with pytest.raises(ConfigError, match="score_threshold must be in"):
        tiny(score_threshold=1.5)
    other = model.with_inference_options(mode="sliced", overlap_ratio=0.5, merge="nmm", full_image_size=64)
    assert other.options["mode"] == "sliced" and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
    )
    with pytest.raises(ConfigError, match="cannot change after training"):
        model.with_inference_options(min_level=2)
