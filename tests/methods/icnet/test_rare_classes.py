"""ICNet's rare-class options: the cascade label guidance's loss chosen per run, class-balanced scaled crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gigaseg
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window
from gigaseg.io.normalize import Normalization
from gigaseg.methods.icnet.model import CascadeOutputs, HeadCascadeOutputs
from gigaseg.methods.icnet.recipe import ScaledCrops, downsample_labels, icnet_stages, icnet_step
from gigaseg.methods.registry import create_model
from gigaseg.nn.losses import LOSSES, segmentation_loss
from gigaseg.training.recipe import StepContext, TrainSettings
from gigaseg.training.views import rng_for

from ..rare import write_rare_dataset

NORM = Normalization.for_image(3, np.uint8)
TINY = {"width": 0.25, "crop_size": 32, "tile_size": [64, 128], "tile_overlap": 16}


def tiny_model(**options):
    torch.manual_seed(0)
    return create_model("icnet", encoder="icnet_resnet50_half", num_classes=3, **{**TINY, **options})


@pytest.fixture
def rare_dataset(tmp_path):
    return write_rare_dataset(tmp_path / "rare")


class Fabric:
    def backward(self, loss):
        loss.backward()


def fixed_outputs(head: bool):
    """Labels of 64 x 64 crops (some ignored) and fixed logits at 1/16, 1/8, 1/4 (and full size with the head)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 64, 64), generator=generator)
    labels[0, :12] = 255
    sizes = (4, 8, 16, 64) if head else (4, 8, 16)
    logits = [torch.randn(2, 3, s, s, generator=generator, requires_grad=True) for s in sizes]
    outputs = HeadCascadeOutputs(*logits) if head else CascadeOutputs(*logits)
    return {"image": torch.zeros(2, 3, 64, 64), "label": labels}, outputs


def step_with(model, stage, outputs, batch) -> dict[str, torch.Tensor]:
    """ICNet's step with the network replaced by fixed outputs (one sub-batch: the chunk's share is 1)."""
    ctx = StepContext(Fabric(), model, lambda images: outputs, 2, stage, TrainSettings())
    return icnet_step(ctx, batch)


def old_cascade_loss(outputs, labels, weights, ignore_index=255):
    """The cascade label guidance loss as it was before the option ``loss``: cross-entropy per term."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    parts = []
    for logits, weight in zip(outputs, weights):
        target = downsample_labels(labels, logits.shape[-2:])
        if not bool((target != ignore_index).any()):
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index)
        parts.append(loss.detach())
        total = total + float(weight) * loss
    return total.detach(), parts


@pytest.mark.parametrize("output_stride", [4, 1])
def test_the_default_loss_is_the_old_cross_entropy_bit_identical(output_stride):
    model = tiny_model(output_stride=output_stride)
    assert model.options["loss"] == "ce" and model.options["crop_sampling"] == "uniform"
    batch, outputs = fixed_outputs(head=output_stride == 1)
    logged = step_with(model, icnet_stages(model)[0], outputs, batch)
    total, parts = old_cascade_loss(outputs, batch["label"], model.cascade_loss_weights)
    assert torch.equal(logged["loss"], total)
    for name, old in zip(model.loss_names, parts):
        assert torch.equal(logged[name], old), name


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "ce"])
def test_every_term_uses_the_loss_named_with_the_paper_weights(rare_dataset, name):
    model = tiny_model(output_stride=1, loss=name)  # the three cascade terms and the head's
    (stage,) = icnet_stages(model)
    stage.make_data(rare_dataset, NORM, TrainSettings())
    weights = stage.options.get("class_weights")
    assert (weights is not None) == (name == "weighted_ce")
    batch, outputs = fixed_outputs(head=True)
    logged = step_with(model, stage, outputs, batch)
    loss_fn = segmentation_loss(name, 3, weights, 255)
    want = []
    for key, logits in zip(model.loss_names, outputs):
        term = loss_fn(logits.detach(), downsample_labels(batch["label"], logits.shape[-2:]))
        assert float(logged[key]) == pytest.approx(float(term), rel=1e-6), key
        want.append(float(term))
    assert float(logged["loss"]) == pytest.approx(float(np.dot(model.cascade_loss_weights, want)), rel=1e-6)
    _, ce = old_cascade_loss(outputs, batch["label"], model.cascade_loss_weights)
    assert float(logged["loss_4"]) != pytest.approx(float(ce[2]), rel=1e-3)


def share_with_rare_class(views) -> float:
    return float(np.mean([(views[i]["label"] == 2).any().item() for i in range(len(views))]))


def test_balanced_crops_hold_the_rare_class_far_more_often(rare_dataset):
    model = tiny_model(crop_size=24, crop_sampling="balanced", crops_per_image=50)
    (stage,) = icnet_stages(model)
    balanced = stage.make_data(rare_dataset, NORM, TrainSettings(seed=1))
    assert balanced.sampling == "balanced" and stage.options["ignore_index"] == 255
    uniform = ScaledCrops(rare_dataset, NORM, 24, crops_per_image=50, seed=1)
    share_balanced, share_uniform = share_with_rare_class(balanced), share_with_rare_class(uniform)
    assert share_uniform < 0.1  # 0.035: one image of four has the line, and crops of 12 to 48 px rarely reach it
    assert share_balanced > 0.25 and share_balanced > 4 * share_uniform  # 0.37: a third of the draws and more
    scales = [balanced[i]["scale"] for i in range(40)]
    assert min(scales) < 0.8 and max(scales) > 1.5  # the scale is still drawn per crop
    again = ScaledCrops(rare_dataset, NORM, 24, crops_per_image=50, seed=1, sampling="balanced")
    assert torch.equal(again[7]["image"], balanced[7]["image"])  # deterministic per (seed, epoch, index)


def old_scaled_crop(views: ScaledCrops, index: int) -> tuple[np.ndarray, np.ndarray]:
    """ScaledCrops.__getitem__'s crop as it was before balanced sampling existed (image and label, unpadded)."""
    rng = rng_for(views.seed, views.epoch, index)
    sample = views.dataset[index // views.crops_per_image]
    height, width = sample.image.height, sample.image.width
    scale = float(rng.uniform(*views.scale_range))
    src_h = min(height, max(1, round(views.crop / scale)))
    src_w = min(width, max(1, round(views.crop / scale)))
    top = int(rng.integers(height - src_h + 1))
    left = int(rng.integers(width - src_w + 1))
    window = Window(top, left, src_h, src_w)
    out = (min(views.crop, max(1, round(src_h * scale))), min(views.crop, max(1, round(src_w * scale))))
    resize = None if out == (src_h, src_w) else out
    image = sample.image.read(window, out_size=resize, resample="area" if scale <= 1 else "bilinear")
    label = sample.mask.read(window, out_size=resize, resample="nearest")[..., 0]
    if views.mirror and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return NORM.apply(np.ascontiguousarray(image)), label


def test_uniform_crops_are_bit_identical_to_before(rare_dataset):
    views = ScaledCrops(rare_dataset, NORM, 40, crops_per_image=3, seed=5)
    views.set_epoch(2)
    for index in range(len(views)):
        item = views[index]
        image, label = old_scaled_crop(views, index)
        h, w = label.shape
        np.testing.assert_array_equal(item["image"][:, :h, :w].numpy(), image)
        np.testing.assert_array_equal(item["label"][:h, :w].numpy(), label)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "dice"}, "loss='dice' is not one of"),
        ({"crop_sampling": "rare"}, "crop_sampling='rare' is not one of 'uniform', 'balanced'"),
        ({"sampling_temperature": -0.5}, "sampling_temperature must be in \\[0, 1\\]"),
    ],
)
def test_bad_rare_class_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model(**options)


def test_pspnet_keeps_its_cross_entropy_and_uniform_crops():
    with pytest.raises(ConfigError, match="unknown option 'loss'"):
        create_model("pspnet", encoder="pspnet_resnet50", num_classes=3, width=0.125, loss="weighted_ce")


def test_icnet_trains_with_weighted_ce_on_balanced_crops(rare_dataset, tmp_path):
    options = {**TINY, "loss": "weighted_ce", "crop_sampling": "balanced"}
    settings = gigaseg.TrainSettings(epochs=1, batch_size=4, lr=1e-3, progress=False)
    result = gigaseg.train(
        "icnet", rare_dataset.root, tmp_path / "run", encoder="icnet_resnet50_half", options=options, settings=settings
    )
    assert np.isfinite(float(result["history"][0]["train_loss"]))
