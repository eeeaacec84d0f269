"""create_model, the METHODS mapping and method registration."""

from __future__ import annotations

import json

import pytest
import torch

from gigaseg.errors import ConfigError
from gigaseg.models import registry
from gigaseg.models.base import SegmentationModel
from gigaseg.models.registry import METHODS, available_methods, create_model, register_method


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
    assert a.config == b.config == {
        "method": "patch", "encoder": "test_resnet", "num_classes": 3, "in_channels": 3,
        "options": {**METHODS["patch"].default_options, "patch_size": 64, "overlap": 8},
    }
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


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(METHODS))  # registrations vanish after the test
    return register_method("toy")(_Toy)


def test_register_method_sets_the_name_and_create_model_finds_it(toy):
    assert registry.METHODS["toy"] is toy and toy.method_name == "toy"
    model = create_model("toy", num_classes=2, width=8, sizes=(3, 4))
    assert model.options == {"width": 8, "mode": "a", "scale": 1.0, "flag": False, "sizes": [3, 4]}
    assert "toy" in available_methods()


@pytest.mark.parametrize("options, message", [
    ({"widht": 3}, r"toy: unknown option 'widht'; its options are: flag, mode, scale, sizes, width"),
    ({"width": 2.5}, "option width must be an integer"),
    ({"width": True}, "option width must be an integer"),
    ({"flag": 1}, "option flag must be true or false"),
    ({"scale": "big"}, "option scale must be a number"),
    ({"mode": "c"}, "option mode='c' is not one of 'a', 'b'"),
    ({"sizes": {1, 2}}, "options must be JSON values"),
])
def test_option_checks(toy, options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("toy", num_classes=2, **options)


def test_a_name_cannot_be_taken_twice(toy):
    class Other(_Toy):
        pass

    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_method("toy")(Other)
    assert register_method("toy")(_Toy) is _Toy  # re-registering the same class (a re-import) is fine
    with pytest.raises(TypeError, match="SegmentationModel subclass"):
        register_method("thing")(dict)


def test_method_modules_not_written_yet_are_skipped(monkeypatch):
    monkeypatch.setattr(registry, "METHOD_MODULES", ["gigaseg.models.baselines", "gigaseg.models.not_written_yet"])
    assert {"global", "patch"} <= set(available_methods())
    monkeypatch.setattr(registry, "METHOD_MODULES", ["gigaseg.models.baselines", "no_such_package.module"])
    with pytest.raises(ModuleNotFoundError):  # a missing dependency is not hidden
        available_methods()


def test_engine_hooks_say_what_is_missing(toy):
    model = create_model("toy", num_classes=2)
    with pytest.raises(NotImplementedError, match="toy has no training recipe"):
        model.training_stages()


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
