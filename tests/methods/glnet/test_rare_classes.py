"""GLNet's loss chosen per run: the paper's focal loss by default (bit-identical), any of nn.losses otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gigaseg.data.statistics import class_frequencies
from gigaseg.errors import ConfigError
from gigaseg.io.normalize import Normalization
from gigaseg.methods.glnet import recipe as method
from gigaseg.methods.registry import create_model, training_stages
from gigaseg.nn.losses import LOSSES, FocalLoss, class_weights
from gigaseg.training.recipe import StepContext, TrainSettings

from ..rare import write_rare_dataset
from .test_method import batch_of, prepared, tiny

UINT8 = Normalization.for_image(3, np.uint8)
TINY = {"size_g": 64, "size_p": 32, "min_overlap": 8}


class Fabric:
    def backward(self, loss):
        loss.backward()


def fixed_batch(num_classes=3):
    """Global views' labels (64 px, some ignored) and logits at 1/4, as the global branch would return."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (2, 64, 64), generator=generator)
    labels[0, :10] = 255
    labels[1, 30:34] = 2
    logits = torch.randn(2, num_classes, 16, 16, generator=generator, requires_grad=True)
    return {"image": torch.zeros(2, 3, 64, 64), "label": labels}, logits


def global_step_loss(model, stage, logits, batch) -> float:
    """Stage 1's step with the global branch replaced by fixed logits."""

    def wrapped(images, task, **kwargs):
        assert task == "global"
        return SimpleNamespace(logits=logits[: images.shape[0]])

    ctx = StepContext(Fabric(), model, wrapped, 8, stage, TrainSettings())
    return float(method.global_step(ctx, batch)["loss"])


@pytest.mark.parametrize("gamma", [3.0, 1.5])
def test_the_default_is_the_papers_focal_loss_with_focal_gamma_bit_identical(gamma):
    model = create_model("glnet", encoder="test_resnet", num_classes=3, **TINY, focal_gamma=gamma)
    assert model.options["loss"] == "focal"
    stage = training_stages(model)[0]
    batch, logits = fixed_batch()
    got = global_step_loss(model, stage, logits, batch)
    labels = F.interpolate(batch["label"][:, None].float(), size=(16, 16), mode="nearest-exact")[:, 0].long()
    old = FocalLoss(gamma=gamma, ignore_index=255)(logits.detach(), labels)  # the loss before the option existed
    assert got == float(old)
    if gamma != 3.0:  # focal_gamma is GLNet's, not segmentation_loss's gamma 3
        assert got != float(FocalLoss(gamma=3.0)(logits.detach(), labels))


def test_weighted_ce_uses_the_class_weights_of_the_training_masks(tmp_path):
    dataset = write_rare_dataset(tmp_path / "rare")
    model = create_model("glnet", encoder="test_resnet", num_classes=3, **TINY, loss="weighted_ce")
    stage = training_stages(model)[0]
    stage.make_data(dataset, UINT8, TrainSettings())
    weights = np.asarray(stage.options["class_weights"])
    np.testing.assert_allclose(weights, class_weights(class_frequencies(dataset)))
    assert np.argmax(weights) == 2  # the thin line weighs most
    batch, logits = fixed_batch()
    got = global_step_loss(model, stage, logits, batch)
    # by hand: sum_i w[y_i] ce_i / sum_i w[y_i] over the non-ignored pixels
    labels = F.interpolate(batch["label"][:, None].float(), size=(16, 16), mode="nearest-exact")[:, 0].long()
    valid = labels != 255
    ce = -F.log_softmax(logits.detach().double(), dim=1).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0][valid]
    w = torch.as_tensor(weights)[labels[valid]]
    assert got == pytest.approx(float((w * ce).sum() / w.sum()), rel=1e-6)
    assert got != pytest.approx(float(ce.mean()), rel=1e-3)  # not the unweighted mean


@pytest.fixture
def small_dataset(tmp_path, make_tiny_dataset):
    return make_tiny_dataset(tmp_path / "small", count=3, size=64)


@pytest.mark.parametrize("stage_name, calls", [("global", 1), ("global2local", 4), ("local2global", 3)])
def test_every_stage_uses_the_chosen_loss_for_every_term(small_dataset, monkeypatch, stage_name, calls):
    used = []
    real = method.stage_loss

    def spy(ctx, name):
        loss = real(ctx, name)

        def counted(logits, labels):
            used.append((name, type(loss).__name__, tuple(ctx.stage.options["class_weights"])))
            return loss(logits, labels)

        return counted

    monkeypatch.setattr(method, "stage_loss", spy)
    number = method.STAGES.index(stage_name) + 1
    model = tiny(stage=number - 1, loss="weighted_ce")
    ctx, stage = prepared(model, stage_name, sub_batch=6)  # 9 patches per image: sub-batches of 6 and 3
    losses = stage.step(ctx, batch_of(small_dataset, stage, model))
    assert all(np.isfinite(float(v)) for v in losses.values())
    # stage 1: one term; stage 2: local + ensemble per sub-batch; stage 3: global + ensemble per sub-batch
    assert len(used) == calls
    assert {(name, kind) for name, kind, _ in used} == {("weighted_ce", "CrossEntropy")}
    assert len(used[0][2]) == 3


def test_the_default_never_goes_through_stage_loss(small_dataset, monkeypatch):
    monkeypatch.setattr(method, "stage_loss", lambda ctx, name: pytest.fail(f"stage_loss({name!r}) called"))
    model = tiny(stage=1)
    ctx, stage = prepared(model, "global2local")
    stage.step(ctx, batch_of(small_dataset, stage, model))
    assert "class_weights" not in stage.options and stage.options["ignore_index"] == 255


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "dice"}, "loss='dice' is not one of"),
        ({"crop_sampling": "balanced"}, "unknown option 'crop_sampling'"),  # every patch trains: nothing to balance
    ],
)
def test_bad_loss_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("glnet", encoder="test_resnet", num_classes=3, **TINY, **options)


def test_every_loss_is_accepted():
    for name in LOSSES:
        assert create_model("glnet", encoder="test_resnet", num_classes=3, **TINY, loss=name).options["loss"] == name
