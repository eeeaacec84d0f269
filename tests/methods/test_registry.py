"""create_model, the METHODS mapping and method registration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gigaseg.errors import ConfigError
from gigaseg.methods import registry
from gigaseg.methods.registry import (
    METHODS,
    available_methods,
    build_predictor,
    create_model,
    method_spec,
    register,
    training_stages,
)
from gigaseg.nn.base import GigasegModel, SegmentationModel


def test_baselines_are_available():
    names = available_methods()
    assert {"global", "patch"} <= set(names)
    assert names == sorted(names)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'glnett'; available methods: .*global.*patch"):
        create_model("glnett", num_classes=2)


def test_options_as_dict_or_keywords_and_config_round_trip():
    a = create_model("patch", encoder="test_resnet", num_classes=3, options={"patch_size": 64}, overlap=8)
    b = create_model(**json.loads(json.dumps(a.config)))
    assert (
        a.config
        == b.config
        == {
            "method": "patch",
            "encoder": "test_resnet",
            "num_classes": 3,
            "in_channels": 3,
            "options": {**METHODS["patch"].model.default_options, "patch_size": 64, "overlap": 8},
        }
    )
    with pytest.raises(ConfigError, match="overlap given both"):
        create_model("patch", encoder="test_resnet", num_classes=3, options={"overlap": 8}, overlap=8)


def test_config_is_a_copy():
    model = create_model("global", encoder="test_resnet", num_classes=2, input_size=64)
    model.config["options"]["input_size"] = 1
    assert model.options["input_size"] == 64


def test_bad_base_arguments():
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        create_model("global", encoder="test_resnet", num_classes=0)
    with pytest.raises(ConfigError, match="in_channels must be a positive integer"):
        create_model("global", encoder="test_resnet", num_classes=2, in_channels=True)
    with pytest.raises(TypeError):
        create_model("global", encoder="test_resnet")  # num_classes is required


class _Toy(SegmentationModel):
    default_options = {"width": 4, "mode": "a", "scale": 1.0, "flag": False, "sizes": [1, 2]}
    option_choices = {"mode": ("a", "b")}

    def __init__(self, encoder="none", *, num_classes, in_channels=3, pretrained=False, **options):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)


def _toy_stages(model):
    return ["the toy's stage"]


def _toy_predictor(model, normalization, *, device="cpu", max_memory=None, precision="32", **options):
    return ("a toy predictor", normalization, device, max_memory, precision, options)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(METHODS))  # registrations vanish after the test
    register("toy", model=_Toy, recipe=_toy_stages, predictor=_toy_predictor)
    return _Toy


def test_register_sets_the_name_and_create_model_finds_it(toy):
    assert registry.METHODS["toy"].model is toy and toy.method_name == "toy"
    model = create_model("toy", num_classes=2, width=8, sizes=(3, 4))
    assert model.options == {"width": 8, "mode": "a", "scale": 1.0, "flag": False, "sizes": [3, 4]}
    assert "toy" in available_methods()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"widht": 3}, r"toy: unknown option 'widht'; its options are: flag, mode, scale, sizes, width"),
        ({"width": 2.5}, "option width must be an integer"),
        ({"width": True}, "option width must be an integer"),
        ({"flag": 1}, "option flag must be true or false"),
        ({"scale": "big"}, "option scale must be a number"),
        ({"mode": "c"}, "option mode='c' is not one of 'a', 'b'"),
        ({"sizes": {1, 2}}, "options must be JSON values"),
    ],
)
def test_option_checks(toy, options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("toy", num_classes=2, **options)


def test_a_name_cannot_be_taken_twice(toy):
    class Other(_Toy):
        pass

    with pytest.raises(ValueError, match="'toy' is already registered"):
        register("toy", model=Other, recipe=_toy_stages, predictor=_toy_predictor)
    # re-registering the same class (a re-import) is fine
    assert register("toy", model=_Toy, recipe=_toy_stages, predictor=_toy_predictor).model is _Toy
    with pytest.raises(TypeError, match="GigasegModel subclass"):
        register("thing", model=dict, recipe=_toy_stages, predictor=_toy_predictor)

    class Taskless(GigasegModel):
        pass

    with pytest.raises(TypeError, match="has no task"):
        register("taskless", model=Taskless, recipe=_toy_stages, predictor=_toy_predictor)


def test_recipe_and_predictor_come_from_the_registration(toy):
    model = create_model("toy", num_classes=2)
    assert training_stages(model) == ["the toy's stage"]
    assert build_predictor(model, "norm", max_memory=5, refine=True) == (
        "a toy predictor",
        "norm",
        "cpu",
        5,
        "32",
        {"refine": True},
    )
    assert method_spec(model) is method_spec("toy") is registry.METHODS["toy"]


def test_every_method_registers_a_recipe_and_a_predictor_of_its_task():
    from gigaseg.inference.contract import ClassificationPredictor, DetectionPredictor, SegmentationPredictor
    from gigaseg.io.normalize import Normalization

    tiny = {
        "global": {"input_size": 64},
        "patch": {"patch_size": 64, "overlap": 8},
        "glnet": {"size_g": 64, "size_p": 32, "min_overlap": 8},
        "magnet": {"scales": [[16, 16], [32, 32], [64, 64]], "input_size": [32, 32]},
        "icnet": {"width": 0.25},
        "pspnet": {"width": 0.125},
        "patchgd_classifier": {"patch_size": 32, "latent_dim": 16},
        "downsampled_classifier": {"input_size": 48, "latent_dim": 16},
        "patchgd_segmenter": {"patch_size": 32},
        "fcos": {"input_size": 64, "crop_size": 64, "fpn_channels": 32, "head_convs": 1},
        "patchgd_detector": {"patch_size": 64, "canvas_size": 128, "latent_dim": 16, "head_convs": 1, "max_level": 6},
    }
    assert sorted(tiny) == available_methods()
    contracts = {
        "segmentation": SegmentationPredictor,
        "classification": ClassificationPredictor,
        "detection": DetectionPredictor,
    }
    for name, options in tiny.items():
        model = create_model(name, encoder="test_resnet", num_classes=2, **options)
        assert model.method_name == name
        stages = training_stages(model)
        assert stages and all(stage.epochs > 0 for stage in stages)
        predictor = build_predictor(model, Normalization.for_image(3, np.uint8))
        assert isinstance(predictor, contracts[model.task]), name


def test_inference_options_change_a_copy_with_the_same_weights():
    model = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=16)
    assert model.with_inference_options(overlap=16) is model  # nothing changes
    other = model.with_inference_options(overlap=8, blend="uniform")
    assert other.options["overlap"] == 8 and model.options["overlap"] == 16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ConfigError, match="'patch_size' cannot change after training.*those that can: overlap, blend"):
        model.with_inference_options(patch_size=32)
    with pytest.raises(ConfigError, match="none"):
        create_model("global", encoder="test_resnet", num_classes=3).with_inference_options(input_size=64)
