"""The test base every method's test file subclasses (as segmentation_models_pytorch does).

Usage in ``tests/methods/<method>/test_model.py``::

    from ..base import ModelTester

    class TestGLNet(ModelTester):
        method = "glnet"
        options = {...}                 # small sizes so a forward takes milliseconds

It builds the method on a tiny timm encoder (``test_resnet``) with 64x64 inputs and checks
output shapes, predict, a forward/backward, that ``config`` round-trips through
``create_model``, option validation and parameter counting. Override the hooks
(``run_forward``, ``expected_shape``, ``loss_of``) for methods whose forward differs, and
``unused_parameters`` for parameters a plain forward does not reach.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from gigaseg.errors import ConfigError
from gigaseg.methods.registry import METHODS, create_model
from gigaseg.nn.base import SegmentationModel


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module`` (each shared tensor once), optionally only trainable ones."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def conv_parameters(cin: int, cout: int, kernel: int, bias: bool = True) -> int:
    """Parameters of a ``kernel x kernel`` Conv2d, for hand-computed counts."""
    return cin * cout * kernel * kernel + (cout if bias else 0)


class ModelTester:
    """Generic checks for a registered method; subclasses set ``method`` (and options)."""

    method: ClassVar[str] = ""
    encoder: ClassVar[str] = "test_resnet"
    num_classes: ClassVar[int] = 3
    in_channels: ClassVar[int] = 3
    options: ClassVar[dict[str, Any]] = {}
    batch_size: ClassVar[int] = 2
    input_size: ClassVar[tuple[int, int]] = (64, 64)
    #: name prefixes of parameters that a plain forward/backward legitimately leaves without gradient
    unused_parameters: ClassVar[tuple[str, ...]] = ()

    # ---- helpers and hooks

    def build(self, **overrides: Any) -> SegmentationModel:
        kwargs = {
            "encoder": self.encoder,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            **self.options,
        }
        kwargs.update(overrides)
        torch.manual_seed(0)
        return create_model(self.method, **kwargs)

    def make_input(self, batch_size: int | None = None, in_channels: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        shape = (batch_size or self.batch_size, in_channels or self.in_channels, *self.input_size)
        return torch.randn(shape, generator=generator)

    def run_forward(self, model: SegmentationModel, x: torch.Tensor) -> torch.Tensor:
        """Training-mode forward giving logits (override for methods with other forwards)."""
        return model(x)

    def expected_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of ``run_forward``'s logits (default: input resolution)."""
        return (x.shape[0], self.num_classes, *x.shape[-2:])

    def loss_of(self, output: torch.Tensor) -> torch.Tensor:
        return output.float().square().mean()

    # ---- the checks

    def test_registered(self):
        model = self.build()
        assert self.method in METHODS
        assert type(model) is METHODS[self.method].model
        assert model.method_name == self.method
        assert model.config["method"] == self.method

    def test_forward_shape(self):
        model = self.build()
        x = self.make_input()
        out = self.run_forward(model, x)
        assert tuple(out.shape) == self.expected_shape(x)
        assert torch.isfinite(out).all()

    def test_predict_gives_input_size_logits_without_grad(self):
        model = self.build().train()
        x = self.make_input(batch_size=1)
        out = model.predict(x)
        assert tuple(out.shape) == (1, self.num_classes, *self.input_size)
        assert not out.requires_grad
        assert model.training  # predict restores the mode

    def test_forward_backward(self):
        model = self.build().train()
        out = self.run_forward(model, self.make_input())
        self.loss_of(out).backward()
        no_grad = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and p.grad is None and not name.startswith(self.unused_parameters)
        ]
        assert not no_grad, f"parameters without gradient: {no_grad[:10]}"

    def test_config_round_trips_through_create_model(self):
        model = self.build()
        config = json.loads(json.dumps(model.config))  # JSON-serialisable, as a checkpoint stores it
        assert config == model.config
        rebuilt = create_model(**config)
        assert rebuilt.config == model.config
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
        rebuilt.load_state_dict(model.state_dict())  # strict: identical architecture

    def test_config_holds_every_option(self):
        model = self.build()
        assert set(model.config["options"]) == set(type(model).default_options)
        for name, value in self.options.items():
            assert model.config["options"][name] == json.loads(json.dumps(value))

    def test_unknown_option_is_rejected_by_name(self):
        with pytest.raises(ConfigError, match="no_such_option"):
            self.build(no_such_option=1)

    def test_other_in_channels(self):
        channels = 1 if self.in_channels != 1 else 4
        model = self.build(in_channels=channels)
        x = self.make_input(batch_size=1, in_channels=channels)
        assert tuple(self.run_forward(model, x).shape) == self.expected_shape(x)

    def test_num_parameters(self):
        model = self.build()
        total = count_parameters(model)
        assert model.num_parameters() == total > 0
        first = next(model.parameters())
        first.requires_grad_(False)
        assert model.num_parameters(trainable_only=True) == total - first.numel()
        assert model.num_parameters() == total
