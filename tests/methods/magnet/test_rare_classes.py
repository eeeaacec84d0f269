"""MagNet's rare-class options: the backbone stage's loss chosen per run, class-balanced backbone crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gigaseg
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window
from gigaseg.io.normalize import Normalization
from gigaseg.methods.magnet.recipe import (
    OHEM_MIN_KEPT,
    OHEM_THRESH,
    BackboneCrops,
    _flip,
    backbone_step,
    magnet_stages,
    refinement_step,
)
from gigaseg.methods.registry import create_model
from gigaseg.nn.losses import LOSSES, FocalLoss, ohem_cross_entropy, segmentation_loss
from gigaseg.training.recipe import StepContext, TrainSettings
from gigaseg.training.views import rng_for

from ..rare import write_rare_dataset

NORM = Normalization.for_image(3, np.uint8)
#: the rare dataset's 96 x 128 images are one frame: crops of 96 x 128, 48 x 64 or 24 x 32 pixels
TINY = {"scales": [[24, 32], [48, 64], [96, 128]], "input_size": [32, 32], "median_kernel": 3}


def tiny_model(**options):
    torch.manual_seed(0)
    return create_model("magnet", encoder="test_resnet", num_classes=3, **{**TINY, **options})


@pytest.fixture
def rare_dataset(tmp_path):
    return write_rare_dataset(tmp_path / "rare")


class Fabric:
    def backward(self, loss):
        loss.backward()


def fixed_batch():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 32, 32), generator=generator)
    labels[0, :8] = 255
    logits = torch.randn(4, 3, 32, 32, generator=generator, requires_grad=True)
    return {"image": torch.zeros(4, 3, 32, 32), "label": labels}, logits


def backbone_loss_of(model, stage, logits, batch) -> float:
    """The backbone step's loss with the backbone replaced by fixed logits (one sub-batch: weight 1)."""
    ctx = StepContext(Fabric(), model, lambda images: logits, 4, stage, TrainSettings())
    return float(backbone_step(ctx, batch)["loss"])


def test_the_default_loss_is_the_old_cross_entropy_bit_identical():
    model = tiny_model()
    assert model.options["loss"] == "ce" and model.options["crop_sampling"] == "uniform"
    batch, logits = fixed_batch()
    got = backbone_loss_of(model, magnet_stages(model)[0], logits, batch)
    old = FocalLoss(gamma=0, ignore_index=255)(logits.detach(), batch["label"])  # the stage's loss until now
    assert got == float(old)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "ce"])
def test_every_other_loss_is_the_one_named(rare_dataset, name):
    model = tiny_model(loss=name)
    stage = magnet_stages(model)[0]
    stage.make_data(rare_dataset, NORM, TrainSettings())
    weights = stage.options.get("class_weights")
    assert (weights is not None) == (name == "weighted_ce")
    batch, logits = fixed_batch()
    got = backbone_loss_of(model, stage, logits, batch)
    want = segmentation_loss(name, 3, weights, 255)(logits.detach(), batch["label"])
    assert got == pytest.approx(float(want), rel=1e-6)
    assert got != pytest.approx(float(FocalLoss(gamma=0)(logits.detach(), batch["label"])), rel=1e-3)


def test_the_refinement_stage_keeps_ohem_whatever_the_loss():
    model = tiny_model(loss="lovasz")
    stage = magnet_stages(model)[1]
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 32, 32), generator=generator)
    logits = torch.randn(2, 3, 32, 32, generator=generator, requires_grad=True)
    batch = {
        "coarse": torch.randn(2, 3, 32, 32, generator=generator),
        "image": torch.randn(2, 3, 32, 32, generator=generator),
        "label": labels,
        "box": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], dtype=torch.float64),
    }
    model.eval()
    ctx = StepContext(Fabric(), model, lambda images, coarse: logits, 2, stage, TrainSettings())
    got = float(refinement_step(ctx, batch)["loss"])
    want = ohem_cross_entropy(logits.detach(), labels, thresh=OHEM_THRESH, min_kept=OHEM_MIN_KEPT)
    assert got == pytest.approx(float(want), rel=1e-6)


def share_with_rare_class(views) -> float:
    return float(np.mean([(views[i]["label"] == 2).any().item() for i in range(len(views))]))


def test_balanced_crops_hold_the_rare_class_far_more_often(rare_dataset):
    model = tiny_model(crop_sampling="balanced")
    stage = magnet_stages(model)[0]
    views = stage.make_data(rare_dataset, NORM, TrainSettings(seed=1))
    assert views.sampling == "balanced" and "class_weights" not in stage.options
    balanced = BackboneCrops(rare_dataset, NORM, model, crops_per_image=50, seed=1, sampling="balanced")
    uniform = BackboneCrops(rare_dataset, NORM, model, crops_per_image=50, seed=1)
    # uniform: one image of four has the line, and the crops of the whole frame shrink it away
    share_balanced, share_uniform = share_with_rare_class(balanced), share_with_rare_class(uniform)
    assert share_uniform < 0.1  # 0.03
    assert share_balanced > 0.2 and share_balanced > 4 * share_uniform  # 0.285: a third of the draws, less the shrunk
    scales = {balanced[i]["scale"] for i in range(20)}
    assert scales == {0, 1, 2}  # the scale is still drawn per crop
    again = BackboneCrops(rare_dataset, NORM, model, crops_per_image=50, seed=1, sampling="balanced")
    assert torch.equal(again[7]["image"], balanced[7]["image"])  # deterministic per (seed, epoch, index)


def old_backbone_crop(views: BackboneCrops, index: int) -> dict:
    """BackboneCrops.__getitem__ as it was before balanced sampling existed."""
    rng = rng_for(views.seed, views.epoch, index)
    sample = views.dataset[index // views.crops_per_image]
    height, width = sample.image.height, sample.image.width
    geometry = views.model.frame_geometry(views.model.frame_size(height, width))
    scale = int(rng.integers(geometry.num_scales))
    ch, cw = geometry.windows(scale)[0].shape
    window = Window(int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1)), ch, cw)
    image, label = views._read(sample, window)
    if rng.random() < 0.5:
        image, label = _flip(image, 1), _flip(label, 1)
    k = int(rng.integers(4))
    if k:
        image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    return {
        "image": NORM.apply(np.ascontiguousarray(image)),
        "label": label,
        "window": [window.top, window.left, ch, cw],
    }


def test_uniform_crops_are_bit_identical_to_before(rare_dataset):
    views = BackboneCrops(rare_dataset, NORM, tiny_model(), crops_per_image=3, seed=5)
    views.set_epoch(2)
    for index in range(len(views)):
        item, old = views[index], old_backbone_crop(views, index)
        np.testing.assert_array_equal(item["image"].numpy(), old["image"])
        np.testing.assert_array_equal(item["label"].numpy(), old["label"])
        assert item["window"].tolist() == old["window"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "dice"}, "loss='dice' is not one of"),
        ({"crop_sampling": "rare"}, "crop_sampling='rare' is not one of 'uniform', 'balanced'"),
        ({"sampling_temperature": 2.0}, "sampling_temperature must be in \\[0, 1\\]"),
    ],
)
def test_bad_rare_class_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model(**options)


def test_backbone_trains_with_weighted_ce_on_balanced_crops(rare_dataset, tmp_path):
    options = {**TINY, "loss": "weighted_ce", "crop_sampling": "balanced", "sampling_temperature": 0.5}
    settings = gigaseg.TrainSettings(epochs=1, batch_size=4, lr=1e-3, progress=False)
    result = gigaseg.train(
        "magnet",
        rare_dataset.root,
        tmp_path / "run",
        encoder="test_resnet",
        options=options,
        settings=settings,
        stage="backbone",
    )
    assert np.isfinite(float(result["history"][0]["train_loss"]))
