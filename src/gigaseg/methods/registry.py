"""Method names -> (network, training recipe, whole-image predictor), and ``create_model``.

Each method package registers itself in its ``__init__.py`` with :func:`register`:

    register("glnet", model=GLNet, recipe=glnet_stages, predictor=glnet_predictor)

``gigaseg.methods`` imports every method package, so importing this module (which imports
the ``gigaseg.methods`` package first) fills ``METHODS``. This module imports no method.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..nn.base import GigasegModel

if TYPE_CHECKING:
    from ..inference.contract import Predictor
    from ..io.normalize import Normalization
    from ..training.recipe import Stage

__all__ = [
    "METHODS",
    "MethodSpec",
    "available_methods",
    "build_predictor",
    "create_model",
    "method_spec",
    "register",
    "training_stages",
]


@dataclass(frozen=True)
class MethodSpec:
    """What one registered method provides.

    Attributes:
        name: the method's name (``create_model``'s first argument).
        model: its network class (a ``GigasegModel`` subclass).
        recipe: ``recipe(model) -> list[Stage]``, the training stages in order.
        predictor: ``predictor(model, normalization, *, device, max_memory, precision, **options)``
            -> the ``gigaseg.inference.contract.Predictor`` of the model's task.
    """

    name: str
    model: type[GigasegModel]
    recipe: Callable[[GigasegModel], list[Stage]]
    predictor: Callable[..., Predictor]


#: registered method name -> its MethodSpec
METHODS: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    model: type[GigasegModel],
    recipe: Callable[[GigasegModel], list[Stage]],
    predictor: Callable[..., Predictor],
) -> MethodSpec:
    """Register a method: its network class, training recipe and predictor factory.

    Sets ``model.method_name`` to ``name``. Registering the same class under the same name
    again (a module imported twice) is allowed.

    Args:
        name: the method's name.
        model: a ``GigasegModel`` subclass (with its ``task``).
        recipe: ``recipe(model)`` returns the method's training stages.
        predictor: ``predictor(model, normalization, *, device, max_memory, precision, **options)``
            returns the method's whole-image predictor.

    Returns:
        The registered ``MethodSpec``.

    Raises:
        TypeError: ``model`` is not a ``GigasegModel`` subclass, or has no ``task``.
        ValueError: ``name`` is registered to another class.
    """
    if not (isinstance(model, type) and issubclass(model, GigasegModel)):
        raise TypeError(f"register({name!r}) needs a GigasegModel subclass, got {model!r}")
    if not model.task:
        raise TypeError(
            f"register({name!r}): {model.__qualname__} has no task (subclass SegmentationModel, "
            f"ClassificationModel, ...)"
        )
    previous = METHODS.get(name)
    if previous is not None and (previous.model.__module__, previous.model.__qualname__) != (
        model.__module__,
        model.__qualname__,
    ):
        raise ValueError(
            f"method {name!r} is already registered to {previous.model.__module__}.{previous.model.__qualname__}"
        )
    model.method_name = name
    spec = MethodSpec(name=name, model=model, recipe=recipe, predictor=predictor)
    METHODS[name] = spec
    return spec


def available_methods() -> list[str]:
    """The names ``create_model`` accepts.

    Returns:
        The registered method names, sorted.
    """
    return sorted(METHODS)


def method_spec(method: str | GigasegModel) -> MethodSpec:
    """The registration of a method.

    Args:
        method: a method name, or a network built by ``create_model``.

    Returns:
        Its ``MethodSpec``.

    Raises:
        ConfigError: no method of that name is registered.
    """
    name = method if isinstance(method, str) else method.method_name
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS)) or 'none'}")
    return METHODS[name]


def create_model(
    method: str,
    encoder: str | None = None,
    *,
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool | str | os.PathLike | None = False,
    options: dict[str, Any] | None = None,
    **method_options: Any,
) -> GigasegModel:
    """Build method ``method``'s network; ``create_model(**model.config)`` rebuilds an identical one.

    Args:
        method: a registered name (``available_methods()``).
        encoder: a timm model name (``"resnet50"``, ``"convnext_tiny"``, ...); None takes the
            method's ``default_encoder`` (its paper's backbone; ``"resnet50"`` unless it says otherwise).
        num_classes: output classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights from the hub) or a local weights file
            for the encoder(s) (see ``gigaseg.nn.encoders``).
        options: method options as a dict (as in ``model.config["options"]``).
        **method_options: more options, merged into ``options``.

    Returns:
        The network, with fresh (or pretrained encoder) weights.

    Raises:
        ConfigError: an unknown method or option, an option given twice, a bad value.
    """
    spec = method_spec(method)
    merged = dict(options or {})
    both = sorted(set(merged) & set(method_options))
    if both:
        raise ConfigError(
            f"option{'s' if len(both) > 1 else ''} {', '.join(both)} given both in options= and as keywords"
        )
    merged.update(method_options)
    if encoder is None:
        encoder = getattr(spec.model, "default_encoder", "resnet50")
    return spec.model(
        encoder=encoder, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, **merged
    )


def training_stages(model: GigasegModel) -> list[Stage]:
    """The training recipe of ``model``'s method.

    Args:
        model: a network built by ``create_model``.

    Returns:
        Its stages (``gigaseg.training.recipe.Stage``), in the order they train.
    """
    return method_spec(model).recipe(model)


def build_predictor(
    model: GigasegModel,
    normalization: Normalization,
    *,
    device: str = "cpu",
    max_memory: int | None = None,
    precision: str = "32",
    fast=None,
    **options: Any,
) -> Predictor:
    """The whole-image predictor of ``model``'s method.

    Args:
        model: a network built by ``create_model`` (its weights as they are).
        normalization: how the images' pixels are normalised for the network.
        device: where the network runs.
        max_memory: a memory budget in bytes that sets sub-batch and block sizes (None: none).
        precision: "32", "bf16-mixed" or "16-mixed".
        fast: a ``gigaseg.inference.fast.FastOptions``: the predictor runs the fast path
            (``Predictor.accelerate``); None: the plain network.
        **options: method-specific predictor settings (MagNet's ``refine``, say).

    Returns:
        A ``SegmentationPredictor`` for segmentation methods, an ``ImageClassifier`` for
        classification methods.

    Raises:
        BudgetError: ``max_memory`` is too small for even one patch.
    """
    predictor = method_spec(model).predictor(
        model, normalization, device=device, max_memory=max_memory, precision=precision, **options
    )
    if fast is not None:
        predictor.accelerate(fast)
    return predictor
