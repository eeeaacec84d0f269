"""Training a tiny fcos: gigaseg train learns to find bright squares (validated by COCO AP), checkpoints, resumes."""

import csv

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from gigaseg.cli import main
from gigaseg.io.normalize import Normalization
from gigaseg.methods.fcos.model import FCOSDetector
from gigaseg.methods.fcos.recipe import detection_step, fcos_stages
from gigaseg.methods.registry import create_model
from gigaseg.training.checkpoint import load_checkpoint
from gigaseg.training.recipe import StepContext, TrainSettings

from .squares import Squares, write_coco

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


@pytest.mark.slow  # about 9 s: 60 optimiser steps learn the squares; 16 validations; the resumed epoch
def test_gigaseg_train_teaches_a_tiny_fcos_to_find_squares_validates_ap_and_resumes(tmp_path, capsys):
    data = write_coco(tmp_path / "data", {"train": Squares(count=32, seed=0), "val": Squares(count=8, seed=1)})
    out = tmp_path / "run"
    argv = ["train", "--method", "fcos", "--data", str(data), "--out", str(out), "--encoder", "test_resnet"]
    argv += ["--batch-size", "8", "--lr", "3e-3", "--accelerator", "cpu"]
    for key, value in {**TINY, "mode": "whole"}.items():
        argv += ["--set", f"{key}={value}"]
    assert main([*argv, "--epochs", "15"]) == 0
    assert "last val AP" in capsys.readouterr().out
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15
    assert {"val_AP", "val_AP50", "val_AP75", "val_AP_small", "train_loss_bbox_ctrness"} <= set(rows[0])
    assert float(rows[0]["val_max_detections"]) == 100  # COCO's cap: no val image holds more objects
    first, last = rows[0], rows[-1]
    assert float(last["train_loss"]) < 0.6 * float(first["train_loss"])
    assert float(first["val_AP50"]) < 0.3  # measured: 0.12 after 4 steps
    assert float(last["val_AP50"]) > 0.8 and float(last["val_AP"]) > 0.35, last  # measured: 0.997 and 0.49
    best = load_checkpoint(out / "best.ckpt")
    assert best["data"]["classes"] == ["red", "green"] and best["data"]["category_ids"] == [1, 2]
    assert float(best["metrics"]["val_AP"]) == max(float(r["val_AP"]) for r in rows)
    # the trained detector finds the held-out squares through the model too
    model = create_model(**best["model"]["config"])
    model.load_state_dict(best["model"]["state_dict"])
    recall, false = found_share(model, Squares(count=8, seed=1))
    assert recall >= 0.8 and false <= 4, (recall, false)
    # resume: one more epoch from last.ckpt
    assert main([*argv, "--epochs", "16", "--resume"]) == 0
    with open(out / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == list(range(16))


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


def test_sliced_mode_trains_on_crops_and_validates_on_merged_tiles(tmp_path):
    from gigaseg.data.loader import load_dataset
    from gigaseg.inference.sliced import SlicedDetectionPredictor
    from gigaseg.methods.registry import build_predictor, training_stages
    from gigaseg.training.detection_views import RandomDetectionCrops
    from gigaseg.training.loop import Trainer

    data = write_coco(tmp_path / "data", {"train": Squares(count=4, seed=0), "val": Squares(count=2, seed=1)})
    train, val = load_dataset(data, split="train"), load_dataset(data, split="val")
    torch.manual_seed(0)
    model = create_model(
        "fcos",
        encoder="test_resnet",
        num_classes=2,
        **{**TINY, "mode": "sliced", "crop_size": 48, "crops_per_image": 3},
    )
    stages = training_stages(model)
    views = stages[0].make_data(train, NORM, settings())
    assert isinstance(views, RandomDetectionCrops) and len(views) == 12 and views[0]["image"].shape == (3, 48, 48)
    made = []

    def make_predictor(normalization, **kw):
        made.append(build_predictor(model, normalization, **kw))
        return made[-1]

    trainer = Trainer(
        model, stages, train, val, tmp_path / "run", settings(epochs=1, batch_size=4), NORM, make_predictor
    )
    (row,) = trainer.fit()["history"]
    assert isinstance(made[0], SlicedDetectionPredictor) and made[0].tile_size == 48
    assert 0.0 <= row["val_AP"] <= 1.0 and row["train_loss"] > 0
    assert (tmp_path / "run" / "best.ckpt").exists()


def test_max_memory_splits_a_training_batch_into_sub_batches(tmp_path):
    from gigaseg.budget import runtime_bytes, training_estimate
    from gigaseg.errors import BudgetError
    from gigaseg.training.loop import Trainer

    model = create_model("fcos", encoder="test_resnet", num_classes=2, **{**TINY, "input_size": 512})
    (stage,) = fcos_stages(model)
    estimate = training_estimate(model, stage.sample_inputs(model), "adamw", runtime=runtime_bytes("cpu"))
    assert estimate.per_sample > 40 * 2**20  # a 512-px view's activations, measured on the meta device

    def sub_batch(budget):
        trainer = Trainer(model, [stage], Squares(2), None, tmp_path, settings(max_memory=budget), NORM, None)
        return trainer._sub_batch(stage, 8)

    assert sub_batch(None) == 8
    assert sub_batch(estimate.total(3) + estimate.per_sample // 2) == 3  # half a sample of room for RSS drift
    with pytest.raises(BudgetError, match="too small for training stage 'fcos'"):
        sub_batch(estimate.fixed)


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_dataset, capsys):
    squares = write_coco(tmp_path / "squares", {"train": Squares(count=2)})
    base = ["train", "--method", "fcos", "--encoder", "test_resnet", "--out", str(tmp_path / "run")]
    for argv, message in (
        ([*base, "--data", str(tiny_dataset)], "is a segmentation dataset but fcos is a detection method"),
        ([*base, "--data", str(squares), "--set", "mode=tiles"], "fcos: option mode='tiles' is not one of"),
        ([*base, "--data", str(squares), "--set", "min_level=1"], "min_level=1 is not one of"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
