"""The baselines' rare-class options: losses chosen per run, balanced crops, frequencies stored with the run."""

from __future__ import annotations

import numpy as np
import pytest

import gigaseg
from gigaseg.data.statistics import class_frequencies
from gigaseg.errors import ConfigError
from gigaseg.methods.registry import create_model, training_stages
from gigaseg.training.checkpoint import load_checkpoint

PATCH = {"patch_size": 32, "overlap": 8, "fpn_channels": 16, "crops_per_image": 4}


@pytest.mark.parametrize("loss", ["weighted_ce", "ce_lovasz", "ce_dice"])
def test_patch_trains_with_a_rare_class_loss_and_balanced_crops_and_stores_the_frequencies(
    tiny_dataset, tmp_path, loss
):
    options = {**PATCH, "loss": loss, "crop_sampling": "balanced", "output_stride": 1}
    settings = gigaseg.TrainSettings(epochs=1, batch_size=4, lr=1e-3, progress=False)
    result = gigaseg.train(
        "patch", tiny_dataset, tmp_path / "run", encoder="test_resnet", options=options, settings=settings
    )
    assert np.isfinite(float(result["history"][0]["train_loss"]))
    stored = load_checkpoint(tmp_path / "run" / "last.ckpt")["data"]["class_frequencies"]
    train = gigaseg.load_dataset(tiny_dataset, split="train")
    np.testing.assert_allclose(stored, class_frequencies(train))
    assert sum(stored) == pytest.approx(1.0)


def test_weighted_ce_prepares_class_weights_from_the_training_masks(tiny_dataset):
    model = create_model("patch", encoder="test_resnet", num_classes=3, **PATCH, loss="weighted_ce")
    stage = training_stages(model)[0]
    train = gigaseg.load_dataset(tiny_dataset, split="train")
    views = stage.make_data(train, gigaseg.Normalization.for_image(3, np.uint8), gigaseg.TrainSettings())
    weights = np.asarray(stage.options["class_weights"])
    frequencies = class_frequencies(train)
    assert weights.shape == (3,) and weights.mean() == pytest.approx(1.0)
    assert np.argmax(weights) == np.argmin(frequencies)  # the rarest class weighs most
    assert views.sampling == "uniform"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"crop_sampling": "rare"}, "crop_sampling='rare' is not one of 'uniform', 'balanced'"),
        ({"sampling_temperature": 2.0}, "sampling_temperature must be in \\[0, 1\\]"),
        ({"loss": "dice"}, "loss='dice' is not one of"),
    ],
)
def test_bad_rare_class_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("patch", encoder="test_resnet", num_classes=3, **{**PATCH, **options})
