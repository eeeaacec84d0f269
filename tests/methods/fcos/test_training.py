"""Training a tiny fcos with the shared Trainer: it learns to find bright squares, checkpoints and resumes."""

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from gigaseg.io.normalize import Normalization
from gigaseg.methods.fcos.model import FCOSDetector
from gigaseg.methods.fcos.recipe import detection_step, fcos_stages
from gigaseg.training.checkpoint import load_checkpoint
from gigaseg.training.loop import Trainer
from gigaseg.training.recipe import StepContext, TrainSettings

from .squares import Squares

NORM = Normalization.for_image(3, np.uint8)
TINY = {"fpn_channels": 32, "head_convs": 1, "input_size": 96, "crop_size": 64, "max_level": 5}


def found_share(model, data, score_threshold=0.3):
    """(recall, false positives): ground-truth squares matched at IoU > 0.5 by a detection of their class."""
    hits = total = false = 0
    for sample in data.samples:
        image = torch.from_numpy(NORM.apply(sample.pixels))[None]
        (found,) = model.detect(image, score_threshold=score_threshold)
        gt = torch.from_numpy(sample.boxes)
        total += len(gt)
        if len(found):
            iou = box_iou(torch.from_numpy(found.boxes), gt)
            iou[torch.from_numpy(found.labels)[:, None] != torch.from_numpy(sample.labels)[None]] = 0
            hits += int((iou.max(0).values > 0.5).sum())
            false += int((iou.max(1).values <= 0.5).sum())
    return hits / total, false


def settings(**kw):
    return TrainSettings(
        **{"epochs": 15, "batch_size": 8, "lr": 3e-3, "progress": False, "accelerator": "cpu", "seed": 0, **kw}
    )


@pytest.mark.slow  # about 5 s: 60 optimiser steps are what it takes to learn the squares
def test_trainer_teaches_a_tiny_fcos_to_find_squares_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = FCOSDetector(encoder="test_resnet", num_classes=2, **TINY)
    train, held_out = Squares(count=32, seed=0), Squares(count=8, seed=1)
    before = found_share(model, held_out)
    result = Trainer(model, fcos_stages(model), train, None, tmp_path, settings(), NORM, lambda *a, **k: None).fit()
    rows = result["history"]
    assert len(rows) == 15 and {"train_loss", "train_loss_classification", "train_loss_bbox_regression"} <= set(rows[0])
    assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"]
    recall, false = found_share(model, held_out)
    assert before[0] < 0.2
    assert recall >= 0.8 and false <= 4, (recall, false)  # measured: 0.95 and 2
    payload = load_checkpoint(tmp_path / "last.ckpt")
    assert payload["data"]["classes"] == ["red", "green"] and payload["data"]["category_ids"] == [1, 2]
    # resume: one more epoch from last.ckpt
    again = FCOSDetector(encoder="test_resnet", num_classes=2, **TINY)
    result = Trainer(again, fcos_stages(again), train, None, tmp_path, settings(epochs=16), NORM, None).fit(resume=True)
    assert [int(r["epoch"]) for r in result["history"]][-2:] == [14, 15]


@pytest.mark.parametrize("sub_batch", [1, 2, 3])
def test_sub_batches_weight_each_part_by_its_share(sub_batch):
    """A batch split by a memory budget: each part's losses (normalised by its own positives) weighted by its size."""
    torch.manual_seed(0)
    model = FCOSDetector(encoder="test_resnet", num_classes=2, **TINY).eval()  # BatchNorm frozen: parts agree
    data = Squares(count=3, seed=2)
    images = torch.stack([torch.from_numpy(NORM.apply(s.pixels)) for s in data.samples])
    targets = [{"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels)} for s in data.samples]

    class Fabric:
        def backward(self, loss):
            loss.backward()

    ctx = StepContext(Fabric(), model, model, sub_batch, fcos_stages(model)[0], settings())
    logged = detection_step(ctx, {"image": images, "targets": targets})
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = [slice(start, start + sub_batch) for start in range(0, 3, sub_batch)]
    expected = sum(sum(model(images[p], targets[p]).values()) * (len(targets[p]) / 3) for p in parts)
    expected.backward()
    assert logged["loss"] == pytest.approx(float(expected.detach()), rel=1e-4)
    assert logged["loss"] == pytest.approx(
        logged["loss_classification"] + logged["loss_bbox_regression"] + logged["loss_bbox_ctrness"], rel=1e-5
    )
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
