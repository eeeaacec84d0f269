"""Method names -> network classes, and ``create_model``.

``METHODS`` is a plain dict filled by ``@register_method(name)`` when a method's module is
imported; ``create_model`` and ``available_methods`` import the modules listed in
``METHOD_MODULES`` first (those not written yet are skipped).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, TypeVar

from ..errors import ConfigError
from .base import SegmentationModel

__all__ = ["METHODS", "METHOD_MODULES", "available_methods", "create_model", "register_method"]

#: registered method name -> SegmentationModel subclass
METHODS: dict[str, type[SegmentationModel]] = {}

#: modules whose import registers methods (a missing one is skipped)
METHOD_MODULES: list[str] = [
    "gigaseg.models.baselines",
    "gigaseg.models.glnet",
    "gigaseg.models.magnet",
    "gigaseg.models.icnet",
    "gigaseg.models.patchgd",
]

M = TypeVar("M", bound=type[SegmentationModel])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a SegmentationModel subclass as method ``name`` (sets ``method_name``)."""

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, SegmentationModel)):
            raise TypeError(f"@register_method({name!r}) needs a SegmentationModel subclass, got {cls!r}")
        previous = METHODS.get(name)
        if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method {name!r} is already registered to {previous.__module__}.{previous.__qualname__}")
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return decorate


def _import_methods() -> None:
    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # the module exists but something it imports does not
                raise


def available_methods() -> list[str]:
    """Names ``create_model`` accepts, sorted."""
    _import_methods()
    return sorted(METHODS)


def create_model(
    method: str,
    encoder: str | None = None,
    *,
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool | str | os.PathLike | None = False,
    options: dict[str, Any] | None = None,
    **method_options: Any,
) -> SegmentationModel:
    """Build method ``method``'s network.

    Args:
        method: a registered name (``available_methods()``).
        encoder: a timm model name (``"resnet50"``, ``"convnext_tiny"``, ...); ``None`` takes the
            method's ``default_encoder`` (its paper's backbone; ``"resnet50"`` unless it says otherwise).
        num_classes: output classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights from the hub) or a local weights file
            for the encoder(s) (see ``gigaseg.models.encoders``).
        options: method options as a dict (as in ``model.config["options"]``); the
            keyword arguments ``**method_options`` are merged into it.

    ``create_model(**model.config)`` rebuilds an identical architecture.
    """
    _import_methods()
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available methods: {', '.join(sorted(METHODS)) or 'none'}")
    merged = dict(options or {})
    both = sorted(set(merged) & set(method_options))
    if both:
        raise ConfigError(f"option{'s' if len(both) > 1 else ''} {', '.join(both)} given both in options= and as keywords")
    merged.update(method_options)
    if encoder is None:
        encoder = getattr(METHODS[method], "default_encoder", "resnet50")
    return METHODS[method](encoder=encoder, num_classes=num_classes, in_channels=in_channels,
                           pretrained=pretrained, **merged)
