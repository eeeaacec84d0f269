"""PatchGD's training step, memory planning, training/evaluation end to end, and the binary metrics."""

from __future__ import annotations

import contextlib
import copy
import csv
import json

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
import yaml

from gigaseg.api import evaluate, train
from gigaseg.cli import main
from gigaseg.data.synth.ultramnist import write_ultramnist_dataset
from gigaseg.errors import BudgetError, ConfigError
from gigaseg.inference.contract import SegmentationPredictor
from gigaseg.methods import registry
from gigaseg.methods.patchgd import recipe as patchgd
from gigaseg.methods.patchgd.model import global_view_of
from gigaseg.methods.registry import create_model, training_stages
from gigaseg.nn.base import SegmentationModel
from gigaseg.training.recipe import StepContext, TrainSettings


class StubFabric:
    """What a step uses of Fabric on one device."""

    def backward(self, loss):
        loss.backward()

    def no_backward_sync(self, module, enabled=True):
        return contextlib.nullcontext()


def context(model, **settings):
    stage = training_stages(model)[0]
    return StepContext(
        fabric=StubFabric(),
        model=model,
        wrapped=model,
        sub_batch=stage.sub_batch,
        stage=stage,
        settings=TrainSettings(**settings),
    )


def record_theta1(model):
    """Patches per theta1 call, split by whether gradients were recorded."""
    calls = {"grad": [], "no_grad": []}

    def hook(_module, inputs, _output):
        calls["grad" if torch.is_grad_enabled() else "no_grad"].append(inputs[0].shape[0])

    model.theta1.register_forward_hook(hook)
    return calls


def make_batch(model, batch=2, size=128, segmentation=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 3, size, size), generator=generator)
    if segmentation:
        label = torch.randint(0, model.num_classes, (batch, size, size), generator=generator)
    else:
        label = torch.randint(0, model.num_classes, (batch,), generator=generator)
    return {"image": x, "label": label, "global": global_view_of(x, model.patch_size)}


def classifier(**options):
    torch.manual_seed(0)
    base = {"patch_size": 32, "latent_dim": 16, "sampling_fraction": 0.25, "inner_iterations": 3}
    return create_model("patchgd_classifier", encoder="test_resnet", num_classes=4, **{**base, **options}).train()


def segmenter(**options):
    torch.manual_seed(0)
    base = {"patch_size": 32, "sampling_fraction": 0.5, "inner_iterations": 2}
    return create_model("patchgd_segmenter", encoder="test_resnet", num_classes=3, **{**base, **options}).train()


# ----------------------------------------------------------------------------- the training step


def assert_theta1_learns(model):
    """Every theta1 parameter has a gradient; the stem, the head and the residual gates' are non-zero.

    (timm zero-initialises each residual block's last BatchNorm scale, so at initialisation
    the convolutions inside a residual branch get exactly zero gradient; the zeroed scale
    itself does get one, which is what lets the branch learn.)
    """
    grads = {name: p.grad for name, p in model.theta1.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    nonzero = {name for name, g in grads.items() if g.abs().sum() > 0}
    blocks = {n.rsplit(".", 2)[0] for n in grads if "layer" in n and ".bn" in n}
    gates = {max(n for n in grads if n.startswith(block + ".bn") and n.endswith(".weight")) for block in blocks}
    expected = {n for n in grads if ".conv1." in n and "layer" not in n or n.startswith(("fc.", "segmentation_head."))}
    expected |= gates
    assert expected and expected <= nonzero, sorted(expected - nonzero)
    assert len(nonzero) > len(grads) / 2


@pytest.mark.parametrize("global_patch", [True, False])
def test_classifier_step_recomputes_exactly_k_patches_with_gradients(global_patch):
    model = classifier(global_patch=global_patch)
    calls = record_theta1(model)
    batch = make_batch(model)  # 2 images of 128x128: 16 patches each, k = 0.25 * 16 = 4
    logged = training_stages(model)[0].step(context(model), batch)
    assert logged["k"] == 4
    assert sum(calls["no_grad"]) == 2 * 16  # the fill: every patch once, without gradients
    # per inner iteration: k patches per image, then the global patches in their own pass
    assert calls["grad"] == ([2 * 4, 2] if global_patch else [2 * 4]) * 3
    assert_theta1_learns(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.theta2.parameters())
    assert np.isfinite(float(logged["loss"]))


def test_classifier_step_loss_is_divided_by_the_accumulation(monkeypatch):
    model = classifier(inner_iterations=2, dropout=0.0)
    reference = copy.deepcopy(model)
    fixed = [torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]]), torch.tensor([[6, 7, 8, 9], [0, 11, 12, 13]])]
    draws = iter(fixed)
    monkeypatch.setattr(patchgd, "_sample_indices", lambda *args: next(draws))
    batch = make_batch(model)
    training_stages(model)[0].step(context(model, accumulate=3), batch)

    # by hand: fill, then per iteration refresh the drawn patches in the running Z, CE / (2 x 3)
    z = reference.fill(batch["image"], 16)
    for indices in fixed:
        logits, z_new = reference(batch["image"], batch["global"], latents=z, indices=indices)
        (F.cross_entropy(logits, batch["label"]) / 6).backward()
        z = z_new.detach()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_segmenter_step_recomputes_exactly_k_patches_with_gradients():
    model = segmenter()
    calls = record_theta1(model)
    batch = make_batch(model, batch=1, size=64, segmentation=True)  # 4 patches, k = 2
    logged = training_stages(model)[0].step(context(model), batch)
    assert logged["k"] == 2
    assert sum(calls["no_grad"]) == 4
    assert calls["grad"] == [2, 1, 2, 1]  # per inner iteration: 2 sampled patches, then the global patch
    assert_theta1_learns(model)
    assert model.theta2.weight.grad.abs().sum() > 0


def test_segmentation_losses():
    binary = create_model("patchgd_segmenter", encoder="test_resnet", num_classes=2, patch_size=32)
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1] = torch.tensor([[5.0, -5.0, 0.0, 0.0]] * 4)
    label = torch.tensor([[1, 0, 1, 255]] * 4)[None]
    loss = patchgd.segmentation_loss(binary, logits, label)
    single = logits[:, 1:]
    valid = label != 255
    bce = F.binary_cross_entropy_with_logits(single[:, 0][valid], (label[valid] == 1).float())
    p = torch.sigmoid(single[:, 0]) * valid
    t = (label == 1).float() * valid
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(loss, bce + dice)
    multi = segmenter()
    logits3 = torch.randn(1, 3, 4, 4)
    label3 = torch.randint(0, 3, (1, 4, 4))
    assert patchgd.segmentation_loss(multi, logits3, label3) > F.cross_entropy(logits3, label3)  # CE + Dice


# ----------------------------------------------------------------------------- memory planning


def test_max_memory_chooses_k_and_the_fill_sub_batch():
    model = classifier(patch_size=64)
    shape = (3, 512, 512)  # 64 patches of 64 px; k wanted = 16
    free = patchgd.plan_patches(model, shape, 2, None)
    assert (free.k, free.fill_batch) == (16, patchgd.DEFAULT_FILL_BATCH)
    roomy = patchgd.plan_patches(model, shape, 2, 10**12, device="cuda")
    assert roomy.k == 16 and roomy.fill_batch == patchgd.MAX_FILL_BATCH
    per_patch, base = roomy.per_patch, roomy.fixed + roomy.data

    def budget(needed):  # 10% of a budget is left to the allocator
        return int(needed / (1 - patchgd.ALLOCATOR_MARGIN)) + 1

    # room for 2 images x (5 patches + the global patch): k = 5
    tight = patchgd.plan_patches(model, shape, 2, budget(base + 2 * 6 * per_patch + per_patch // 2), device="cuda")
    assert tight.k == 5
    assert patchgd.plan_patches(model, shape, 2, budget(base + 2 * 2 * per_patch), device="cuda").k == 1
    with pytest.raises(BudgetError, match="too small to train patchgd_classifier on 2 image"):
        patchgd.plan_patches(model, shape, 2, budget(base + 2 * 2 * per_patch) - 2, device="cuda")
    with pytest.raises(BudgetError, match="the smallest that works is about"):
        patchgd.plan_patches(model, shape, 2, base + 2 * 2 * per_patch, device="cuda")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ultramnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("um") / "data"
    write_ultramnist_dataset(root, count=6, size=64, seed=1, val_fraction=0.34)
    return root


def settings(**kw):
    return TrainSettings(**{"epochs": 1, "batch_size": 2, "progress": False, "seed": 1, **kw})


def test_train_and_evaluate_the_classifier(ultramnist, tmp_path):
    run = tmp_path / "run"
    result = train(
        "patchgd_classifier",
        ultramnist,
        run,
        encoder="test_resnet",
        options={"patch_size": 32, "latent_dim": 16},
        settings=settings(epochs=2),
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 2 and {"train_loss", "train_k", "val_accuracy", "val_balanced_accuracy"} <= set(rows[0])
    assert float(rows[0]["train_k"]) == 1.0  # 4 patches x 0.25
    assert 0.0 <= float(rows[-1]["val_accuracy"]) <= 1.0
    assert (run / "best.ckpt").exists() and len(result["history"]) == 2
    summary = evaluate(run, ultramnist, progress=False)
    assert summary["task"] == "classification" and set(summary["predictions"]) == {"img_0004", "img_0005"}
    labels = yaml.safe_load((ultramnist / "dataset.yaml").read_text())["labels"]
    correct = sum(summary["predictions"][n] == labels[n] for n in ("img_0004", "img_0005"))
    assert summary["accuracy"] == correct / 2 and summary["counted"] == 2
    # evaluation loads best.ckpt, chosen by validation accuracy: the two agree
    assert summary["accuracy"] == max(float(r["val_accuracy"]) for r in rows)


def test_train_with_max_memory_through_the_cli(ultramnist, tmp_path, capsys):
    run = tmp_path / "cli"
    code = main(
        [
            "train",
            "--method",
            "patchgd_classifier",
            "--data",
            str(ultramnist),
            "--out",
            str(run),
            "--encoder",
            "test_resnet",
            "--set",
            "patch_size=32",
            "--set",
            "latent_dim=16",
            "--set",
            "sampling_fraction=0.5",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--max-memory",
            "64GB",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[0]["train_k"]) == 2.0  # the budget is ample: k = 0.5 x 4
    code = main(
        [
            "train",
            "--method",
            "patchgd_classifier",
            "--data",
            str(ultramnist),
            "--out",
            str(tmp_path / "x"),
            "--encoder",
            "test_resnet",
            "--set",
            "patch_size=32",
            "--epochs",
            "1",
            "--max-memory",
            "10MB",
        ]
    )
    assert code == 2 and "too small to train patchgd_classifier" in capsys.readouterr().err


def test_train_the_downsampled_baseline_and_mismatched_tasks(ultramnist, tiny_dataset, tmp_path):
    train(
        "downsampled_classifier",
        ultramnist,
        tmp_path / "down",
        encoder="test_resnet",
        options={"input_size": 32, "latent_dim": 16},
        settings=settings(),
    )
    summary = evaluate(tmp_path / "down", ultramnist, progress=False)
    assert summary["counted"] == 2 and 0 <= summary["accuracy"] <= 1
    with pytest.raises(ConfigError, match="is a segmentation dataset but patchgd_classifier is a classification"):
        train(
            "patchgd_classifier",
            tiny_dataset,
            tmp_path / "bad",
            encoder="test_resnet",
            options={"patch_size": 32},
            settings=settings(),
        )
    with pytest.raises(ConfigError, match="is a classification dataset but patchgd_segmenter"):
        train(
            "patchgd_segmenter",
            ultramnist,
            tmp_path / "bad2",
            encoder="test_resnet",
            options={"patch_size": 32},
            settings=settings(),
        )


def test_train_and_evaluate_the_segmenter(tiny_dataset, tmp_path):
    run = tmp_path / "seg"
    train(
        "patchgd_segmenter",
        tiny_dataset,
        run,
        encoder="test_resnet",
        options={"patch_size": 32},
        settings=settings(lr=1e-3),
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[0]["train_k"]) == 2.0 and 0 <= float(rows[0]["val_miou"]) <= 1  # 9 patches x 0.25
    summary = evaluate(run, tiny_dataset, progress=False, max_memory="8GB")
    assert summary["counted"] == 96 * 96 and "binary" not in summary  # three classes


# ----------------------------------------------------------------------------- binary metrics


class ThresholdModel(SegmentationModel):
    """A stand-in segmenter whose prediction is known: class 1 where channel 0 is above 127."""

    def __init__(self, encoder="none", *, num_classes=2, in_channels=1, pretrained=False):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels)
        self.dummy = torch.nn.Parameter(torch.zeros(1))


class Threshold(SegmentationPredictor):
    def predict_block(self, source, context, window):
        positive = (source.read(window)[..., 0] > 127).astype(np.float32)
        return np.stack([1 - positive, positive])


@pytest.fixture
def threshold_method(monkeypatch):
    """ThresholdModel registered as method "threshold" for this test only."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    registry.register(
        "threshold",
        model=ThresholdModel,
        recipe=lambda model: [],
        predictor=lambda model, normalization, **settings: Threshold(model, normalization),
    )


def binary_dataset(root):
    """One 8x8 image: 10 target pixels, 12 predicted, 8 of them right: tp 8, fp 4, fn 2, tn 50."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    target = np.zeros((8, 8), np.uint8)
    target.flat[:10] = 1
    predicted = np.zeros((8, 8), np.uint8)
    predicted.flat[2:14] = 1
    tifffile.imwrite(root / "images" / "a.tif", predicted * 200)
    tifffile.imwrite(root / "masks" / "a.tif", target)
    (root / "dataset.yaml").write_text(
        yaml.safe_dump({"task": "segmentation", "classes": ["background", "vessel"], "splits": {"val": ["a"]}})
    )
    return root


def test_binary_metrics_through_evaluation(tmp_path, threshold_method):
    summary = evaluate(ThresholdModel(), binary_dataset(tmp_path / "d"), progress=False)
    binary = summary["binary"]
    tp, fp, fn, tn = 8, 4, 2, 50
    assert (binary["tp"], binary["fp"], binary["fn"], binary["tn"]) == (tp, fp, fn, tn)
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    expected = {
        "f1": 2 * tp / (2 * tp + fp + fn),  # 16 / 22
        "iou": tp / (tp + fp + fn),  # 8 / 14
        "sensitivity": sensitivity,  # 0.8
        "specificity": specificity,  # 50 / 54
        "precision": tp / (tp + fp),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "lr_positive": sensitivity / (1 - specificity),  # 0.8 / (4 / 54) = 10.8
        "lr_negative": (1 - sensitivity) / specificity,  # 0.2 / (50 / 54) = 0.216
    }
    for key, value in expected.items():
        assert binary[key] == pytest.approx(value, rel=1e-12), key
    assert binary["lr_positive"] == pytest.approx(10.8) and binary["lr_negative"] == pytest.approx(0.216)
    assert summary["per_class"]["vessel"]["f1"] == pytest.approx(expected["f1"])
    json.dumps(summary, allow_nan=False)  # strict JSON


def test_binary_likelihood_ratio_without_false_positives_is_inf(tmp_path, threshold_method):
    root = binary_dataset(tmp_path / "d")
    perfect = np.zeros((8, 8), np.uint8)
    perfect.flat[:10] = 200
    tifffile.imwrite(root / "images" / "a.tif", perfect)
    binary = evaluate(ThresholdModel(), root, progress=False)["binary"]
    assert binary["lr_positive"] == "inf" and binary["lr_negative"] == 0.0 and binary["f1"] == 1.0
