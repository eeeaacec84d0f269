"""FCOS heads on any feature pyramid: shapes, points, torchvision's FCOS as reference, decoding, over-fitting."""

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS
from torchvision.ops import box_iou

from gigaseg.geometry import Detections
from gigaseg.nn import fcos as fcos_module
from gigaseg.nn.base import DetectionModel
from gigaseg.nn.fcos import FCOSHeads, match_points

STRIDES = (8, 16, 32)


class Pooled(nn.Module):
    """A conv then average pooling to each stride: a stand-in pyramid (torchvision's backbone protocol too)."""

    out_channels = 32

    def __init__(self, channels=32, strides=STRIDES):
        super().__init__()
        self.strides = strides
        self.conv = nn.Conv2d(3, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return OrderedDict((str(i), F.avg_pool2d(y, s, ceil_mode=True)) for i, s in enumerate(self.strides))


class TinyDetector(DetectionModel):
    default_options = {}

    def __init__(self, num_classes=2, channels=16, strides=STRIDES):
        super().__init__(encoder="none", num_classes=num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.strides = strides
        self.heads = FCOSHeads(channels, num_classes, num_convs=1, strides=strides)

    def features(self, images):
        y = self.body(images)
        return [F.avg_pool2d(y, s, ceil_mode=True) for s in self.strides]


def test_shapes_and_points():
    heads = FCOSHeads(16, 3, num_convs=2, strides=(4, 8))
    assert heads.head.classification_head.conv[1].num_groups == 2  # groups of 8 channels, as 256 / 32
    assert FCOSHeads(256, 3).head.regression_head.conv[1].num_groups == 32
    features = [torch.randn(2, 16, 10, 12), torch.randn(2, 16, 5, 6)]
    out = heads(features)
    points = 10 * 12 + 5 * 6
    assert out["cls_logits"].shape == (2, points, 3)
    assert out["bbox_regression"].shape == (2, points, 4)
    assert out["bbox_ctrness"].shape == (2, points, 1)
    assert (out["bbox_regression"] >= 0).all()
    anchors = heads.anchors(features)
    assert [a.shape for a in anchors] == [(120, 4), (30, 4)]
    # level 0, row 1, column 2: a 4-pixel square centred on (x, y) = (2 * 4, 1 * 4)
    assert anchors[0][1 * 12 + 2].tolist() == [6, 2, 10, 6]
    assert anchors[1][-1].tolist() == [5 * 8 - 4, 4 * 8 - 4, 5 * 8 + 4, 4 * 8 + 4]
    # the initial foreground probability is FCOS's prior 0.01
    assert torch.sigmoid(out["cls_logits"]).mean().item() == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="2 feature maps for 3 strides"):
        FCOSHeads(16, 3, strides=(4, 8, 16))(features)
    with pytest.raises(ValueError, match="increasing"):
        FCOSHeads(16, 3, strides=(8, 4))
    with pytest.raises(ValueError, match="labels must lie in"):
        heads.losses(features, [{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([3])}] * 2)
    with pytest.raises(ValueError, match="x1 > x0"):
        heads.losses(features, [{"boxes": torch.tensor([[5.0, 0, 4, 4]]), "labels": torch.tensor([0])}] * 2)


def reference_pair():
    """torchvision's FCOS and FCOSHeads with the same (randomised) head weights on the same pyramid."""
    torch.manual_seed(0)
    backbone = Pooled()
    reference = FCOS(
        backbone,
        num_classes=3,
        min_size=64,
        max_size=64,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * 3),
        score_thresh=0.05,
        nms_thresh=0.6,
        detections_per_img=50,
    )
    with torch.no_grad():
        for p in reference.head.parameters():  # away from the init, so scores and boxes vary
            p.add_(torch.randn_like(p) * 0.2)
    heads = FCOSHeads(32, 3, strides=STRIDES, norm_groups=32)  # torchvision always uses 32 groups
    heads.head.load_state_dict(reference.head.state_dict())
    return backbone, reference, heads


def test_losses_and_detections_equal_torchvision_fcos():
    backbone, reference, heads = reference_pair()
    images = torch.rand(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 20.0], [30.0, 30.0, 62.0, 63.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 18.0, 17.0]]), "labels": torch.tensor([1])},
    ]
    reference.train()
    expected = reference(list(images), targets)
    features = list(backbone(images).values())
    got = heads.losses(features, targets)
    assert set(got) == {"classification", "bbox_regression", "bbox_ctrness"}
    for name in expected:
        assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-5), name
        assert got[name].item() > 0

    reference.eval()
    with torch.no_grad():
        expected = reference(list(images))
        got = heads.detections(features, [(64, 64)] * 2, score_threshold=0.05, nms_threshold=0.6, max_detections=50)
    for e, g in zip(expected, got):
        assert len(g["boxes"]) == len(e["boxes"]) > 3
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-5, atol=1e-6)
        assert g["labels"].tolist() == e["labels"].tolist()


def test_empty_targets_train_only_the_background():
    heads = FCOSHeads(16, 2, num_convs=1, strides=(8,))
    features = [torch.randn(1, 16, 4, 4, requires_grad=True)]
    losses = heads.losses(features, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert losses["bbox_regression"].item() == 0 and losses["bbox_ctrness"].item() == 0
    assert losses["classification"].item() > 0
    sum(losses.values()).backward()
    assert features[0].grad.abs().sum() > 0


def test_decoder_reproduces_a_box_target():
    """Head outputs that encode a box at one point decode to exactly that box, with its class and score."""
    heads = FCOSHeads(16, 3, num_convs=1, strides=(8, 16))
    features = [torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 4, 4)]
    anchors = torch.cat(heads.anchors(features))
    box = torch.tensor([[13.0, 18.0, 37.0, 29.5]])
    point = 3 * 8 + 3  # level 0, row 3, column 3: the point (24, 24), inside the box
    outputs = {
        "cls_logits": torch.full((1, len(anchors), 3), -20.0),
        "bbox_regression": torch.zeros(1, len(anchors), 4),
        "bbox_ctrness": torch.zeros(1, len(anchors), 1),
    }
    outputs["cls_logits"][0, point, 2] = 3.0
    outputs["bbox_regression"][0, point] = heads.box_coder.encode(anchors[point : point + 1], box)[0]
    assert outputs["bbox_regression"][0, point].tolist() == pytest.approx([11 / 8, 6 / 8, 13 / 8, 5.5 / 8])
    heads.head.forward = lambda x: outputs
    (found,) = heads.detections(features, [(60, 60)], score_threshold=0.2)
    assert found["boxes"][0].tolist() == pytest.approx(box[0].tolist())
    assert found["labels"].tolist() == [2]
    assert found["scores"].item() == pytest.approx((torch.sigmoid(torch.tensor(3.0)) * 0.5).sqrt().item())
    (clipped,) = heads.detections(features, [(25, 30)], score_threshold=0.2)  # a smaller image clips the box
    assert clipped["boxes"][0].tolist() == pytest.approx([13.0, 18.0, 30.0, 25.0])


def test_overfitting_one_box_lowers_the_loss_and_finds_the_box():
    torch.manual_seed(0)
    model = TinyDetector(num_classes=2)
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 20:44, 12:40] = 1.0
    target = [{"boxes": torch.tensor([[12.0, 20.0, 40.0, 44.0]]), "labels": torch.tensor([1])}]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(60):
        losses = model(image, target)
        total = sum(losses.values())
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        totals.append(total.item())
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5])
    (found,) = model.detect(image, score_threshold=0.3, max_detections=5)
    assert isinstance(found, Detections) and model.training  # the mode is restored
    assert found.labels[0] == 1
    assert box_iou(torch.from_numpy(found.boxes[:1]), target[0]["boxes"]).item() > 0.7
    assert model.task == "detection"


def test_forward_without_targets_gives_the_raw_outputs():
    model = TinyDetector(num_classes=2)
    out = model(torch.zeros(2, 3, 64, 48))
    points = 8 * 6 + 4 * 3 + 2 * 2
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "cls_logits": (2, points, 2),
        "bbox_regression": (2, points, 4),
        "bbox_ctrness": (2, points, 1),
    }


@pytest.mark.parametrize("chunk_values", [1 << 22, 100])
def test_chunked_assignment_equals_torchvision(monkeypatch, chunk_values):
    """match_points gives torchvision's matches, in one piece or in chunks of a few points."""
    monkeypatch.setattr(fcos_module, "MATCH_CHUNK_VALUES", chunk_values)
    torch.manual_seed(0)
    heads = FCOSHeads(16, 3, num_convs=1, strides=(8, 16, 32))
    features = [torch.zeros(1, 16, s, s) for s in (32, 16, 8)]
    anchors = torch.cat(heads.anchors(features))
    per_level = [32 * 32, 16 * 16, 8 * 8]
    xy = torch.rand(40, 2) * 220
    boxes = torch.cat([xy, xy + 4 + torch.rand(40, 2) * 120], 1)
    boxes[5] = boxes[6]  # a tie: the smaller (here the same) box, torchvision's order
    expected = []
    owner = SimpleNamespace(
        center_sampling_radius=1.5, head=SimpleNamespace(compute_loss=lambda t, o, a, matched: expected.extend(matched))
    )
    FCOS.compute_loss(owner, [{"boxes": boxes}], None, [anchors], per_level)
    got = match_points(anchors, boxes, per_level, 1.5)
    assert (got >= 0).sum() > 50  # the case matches many points
    assert torch.equal(got, expected[0])
    assert torch.equal(match_points(anchors, boxes[:0], per_level, 1.5), torch.full((len(anchors),), -1))
