"""The base classes of every gigaseg network: options, a reproducible configuration, one task.

``GigasegModel`` holds what every method's network shares: the encoder name, class and
band counts, and the method's options, checked against ``default_options`` (every option
the method accepts, with its default) and ``option_choices`` (allowed values). A method's
constructor takes ``encoder``, ``num_classes``, ``in_channels``, ``pretrained`` and the
options as keyword arguments, and calls ``super().__init__`` with all but ``pretrained``.
``inference_options`` names the options that only change how a trained network is run,
which ``gigaseg predict --set`` may change.

``config`` is a JSON-serialisable dict (``method``, ``encoder``, ``num_classes``,
``in_channels``, ``options``); ``create_model(**model.config)`` rebuilds the same
architecture with fresh weights.

The task subclasses say what a network's ``predict`` returns: ``SegmentationModel``
class logits per pixel, ``ClassificationModel`` class logits per image;
``DetectionModel`` returns losses when given targets and finds objects with ``detect``. The method's name
(``method_name``) is set when ``gigaseg.methods.registry.register`` registers the class.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..geometry import Detections

__all__ = ["ClassificationModel", "DetectionModel", "GigasegModel", "SegmentationModel"]


class GigasegModel(nn.Module):
    """A network with checked options and a configuration that rebuilds it.

    Unknown options are a ``ConfigError`` naming them. An option whose default is a bool,
    int, float or str must be given as one (an int is accepted for a float);
    ``option_choices`` restricts values further.

    Args:
        encoder: the timm name of the encoder (a non-empty string).
        num_classes: output classes (a positive integer).
        in_channels: input bands (a positive integer).
        **options: the method's options; those not given take ``default_options``.

    Raises:
        ConfigError: an unknown option, a value of the wrong type or out of range.
    """

    #: what the network predicts: "segmentation", "classification" (or "detection")
    task: ClassVar[str] = ""
    method_name: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}
    option_choices: ClassVar[dict[str, tuple]] = {}
    #: options that may differ between training and prediction (they do not change the weights)
    inference_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, encoder: str = "resnet50", num_classes: int, in_channels: int = 3, **options: Any):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(encoder, str) or not encoder:
            raise ConfigError(f"encoder must be a model name, got {encoder!r}")
        self.encoder_name = encoder
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.options: dict[str, Any] = self._resolve_options(options)
        self.check_options()

    # ---- configuration

    @classmethod
    def _resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        label = cls.method_name or cls.__name__
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            known = ", ".join(sorted(cls.default_options)) or "none"
            raise ConfigError(
                f"{label}: unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)}; its options are: {known}"
            )
        resolved = {**copy.deepcopy(cls.default_options), **options}
        for name, value in resolved.items():
            resolved[name] = _check_type(label, name, value, cls.default_options[name])
            choices = cls.option_choices.get(name)
            if choices is not None and resolved[name] not in choices:
                raise ConfigError(
                    f"{label}: option {name}={resolved[name]!r} is not one of {', '.join(repr(c) for c in choices)}"
                )
        try:
            return json.loads(json.dumps(resolved))  # JSON-serialisable, and as it reads back
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{label}: options must be JSON values (numbers, strings, lists): {error}") from None

    def check_options(self) -> None:
        """Subclass hook: raise ConfigError for option values out of range (types are checked already)."""

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if not self.options[name] > 0:
                raise ConfigError(
                    f"{self.method_name or type(self).__name__}: option {name} must be > 0, got {self.options[name]!r}"
                )

    def _require_sampling_temperature(self) -> None:
        """The option ``sampling_temperature`` of a method with class-balanced crops lies in [0, 1]."""
        value = self.options["sampling_temperature"]
        if not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"{self.method_name or type(self).__name__}: option sampling_temperature must be in [0, 1] "
                f"(0: classes drawn uniformly, 1: by frequency), got {value}"
            )

    @property
    def config(self) -> dict[str, Any]:
        """``create_model(**config)`` rebuilds this architecture (a fresh copy each time)."""
        return {
            "method": self.method_name,
            "encoder": self.encoder_name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "options": copy.deepcopy(self.options),
        }

    def canonical_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """A configuration with its options completed by this method's defaults.

        So a checkpoint written before an option existed matches a model that leaves it at its
        default. Another method's config, or options this method does not know, come back
        unchanged.

        Args:
            config: a configuration (a checkpoint's), as :attr:`config` writes it.

        Returns:
            A deep copy of ``config``, its options completed and checked where they are this
            method's.
        """
        config = copy.deepcopy(config)
        if config.get("method") == self.method_name and isinstance(config.get("options"), dict):
            try:
                config["options"] = self._resolve_options(config["options"])
            except ConfigError:
                pass  # the caller's comparison reports the difference
        return config

    def architecture(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """A configuration without the inference options.

        What a checkpoint must match for its weights to start this run (``train(init=...)``).

        Args:
            config: a configuration (a checkpoint's), completed by :meth:`canonical_config`;
                None: this model's.

        Returns:
            The configuration without the options named in ``inference_options``.
        """
        config = self.config if config is None else self.canonical_config(config)
        for name in self.inference_options:
            config.get("options", {}).pop(name, None)
        return config

    def with_options(self, **options: Any) -> GigasegModel:
        """A copy with other options and the same weights, device and train/eval mode.

        Args:
            **options: the options to change; the others keep their values.

        Returns:
            The new model.

        Raises:
            ConfigError: an unknown option or a bad value.
        """
        other = type(self)(
            encoder=self.encoder_name,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            **{**self.options, **options},
        )
        other.load_state_dict(self.state_dict())
        device = next(self.parameters()).device
        return other.to(device).train(self.training)

    def with_inference_options(self, **options: Any) -> GigasegModel:
        """``with_options`` limited to ``inference_options``.

        Args:
            **options: inference options to change.

        Returns:
            A copy with the new options and the same weights, or ``self`` when nothing changes.

        Raises:
            ConfigError: an option that is not in ``inference_options``, or a bad value.
        """
        label = self.method_name or type(self).__name__
        other = sorted(set(options) - set(self.inference_options))
        if other:
            allowed = ", ".join(self.inference_options) or "none"
            raise ConfigError(
                f"{label}: option{'s' if len(other) > 1 else ''} {', '.join(repr(o) for o in other)} "
                f"cannot change after training (they shape the network or its training); "
                f"those that can: {allowed}"
            )
        if all(self.options.get(k) == v for k, v in options.items()):
            return self
        return self.with_options(**options)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """The number of parameters.

        Args:
            trainable_only: count only those with ``requires_grad``.

        Returns:
            The parameter count.
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        """The method, encoder and class count, for ``repr``."""
        return f"method={self.method_name!r}, encoder={self.encoder_name!r}, num_classes={self.num_classes}"


class SegmentationModel(GigasegModel):
    """A network that labels every pixel: ``predict`` returns class logits at the input's size."""

    task: ClassVar[str] = "segmentation"

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size, in eval mode, under inference_mode.

        Calls ``forward`` (which in eval mode must return logits at any resolution) and
        upsamples bilinearly when needed. The module's train/eval mode is restored after.

        Args:
            x: normalised images ``(B, C, H, W)``.

        Returns:
            Logits ``(B, num_classes, H, W)``.

        Raises:
            TypeError: ``forward`` returned something other than a tensor (a method whose
                forward returns more than logits must override ``predict``).
        """
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                logits = self(x)
                if not isinstance(logits, torch.Tensor):
                    raise TypeError(
                        f"{type(self).__name__}.forward returned {type(logits).__name__} in eval "
                        f"mode; override predict() for methods whose forward returns more than logits"
                    )
                if logits.shape[-2:] != x.shape[-2:]:
                    logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        finally:
            self.train(was_training)
        return logits


class ClassificationModel(GigasegModel):
    """A network that labels whole images: ``forward`` and ``predict`` return logits ``(B, num_classes)``."""

    task: ClassVar[str] = "classification"

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images ``x``, in eval mode under inference_mode.

        Args:
            x: normalised images ``(B, C, H, W)``.

        Returns:
            The logits; the module's train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return self(x)
        finally:
            self.train(was_training)


class DetectionModel(GigasegModel):
    """A network that finds objects: losses with targets, :class:`Detections` from ``detect``.

    A subclass builds ``self.heads`` (a :class:`gigaseg.nn.fcos.FCOSHeads`, or anything with
    its ``losses(features, targets)`` and ``detections(features, image_sizes, ...)``) and
    implements :meth:`features`; ``forward`` and ``detect`` then come from here. A network that
    computes its pyramid otherwise (the patch-global detector) overrides ``forward`` and
    :meth:`detect_tensors` instead.

    Boxes everywhere are ``(x0, y0, x1, y1)`` in the input images' pixel coordinates, labels
    0-based class indices.
    """

    task: ClassVar[str] = "detection"
    #: the detection heads (set by the subclass)
    heads: nn.Module

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The per-level feature maps the heads run on, finest first (a subclass implements it).

        Args:
            images: normalised images ``(B, C, H, W)``.

        Returns:
            One map ``(B, d, H_l, W_l)`` per level of ``heads``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement features() or override forward()")

    def forward(
        self, images: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses for training, or the heads' raw outputs.

        Args:
            images: normalised images ``(B, C, H, W)``.
            targets: B dicts ``{"boxes": float (N, 4), "labels": int64 (N,)}`` in the images'
                pixel coordinates (N may be 0); None: the raw outputs.

        Returns:
            With targets, named scalar losses whose sum is trained (FCOS: "classification",
            "bbox_regression", "bbox_ctrness"); without, the heads' outputs (FCOS:
            ``cls_logits`` ``(B, P, num_classes)``, ``bbox_regression`` ``(B, P, 4)``,
            ``bbox_ctrness`` ``(B, P, 1)`` over all points) with no post-processing, so the
            pass has fixed shapes (memory estimates on the meta device, exports). Use
            :meth:`detect` for objects.
        """
        features = self.features(images)
        if targets is None:
            return self.heads(features)
        return self.heads.losses(features, targets)

    def detect_tensors(
        self,
        images: torch.Tensor,
        *,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """The objects of each image as tensors (in the current mode, with autograd as set by the caller).

        Args:
            images: normalised images ``(B, C, H, W)``.
            score_threshold: candidates scoring at most this are dropped (None: see
                :meth:`detection_settings`).
            nms_threshold: the IoU above which class-wise NMS drops the lower-scoring box.
            max_detections: the most objects kept per image.

        Returns:
            B dicts with ``boxes`` float ``(N, 4)`` (clipped to the image), ``scores`` ``(N,)``
            and ``labels`` int64 ``(N,)``, best first.
        """
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self.heads.detections(
            self.features(images),
            [size] * images.shape[0],
            **self.detection_settings(score_threshold, nms_threshold, max_detections),
        )

    def detection_settings(
        self,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> dict[str, Any]:
        """The post-processing settings: each value given, else the model's option of that name, else the default.

        Args:
            score_threshold: None: the ``score_threshold`` option, else 0.05.
            nms_threshold: None: the ``nms_threshold`` option, else 0.6.
            max_detections: None: the ``max_detections`` option, else 100.

        Returns:
            ``{"score_threshold", "nms_threshold", "max_detections"}``.
        """
        given = {"score_threshold": score_threshold, "nms_threshold": nms_threshold, "max_detections": max_detections}
        defaults = {"score_threshold": 0.05, "nms_threshold": 0.6, "max_detections": 100}
        return {
            name: value if value is not None else self.options.get(name, defaults[name])
            for name, value in given.items()
        }

    def detect(
        self,
        images: torch.Tensor,
        *,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[Detections]:
        """The objects of each image, in eval mode under inference_mode.

        Args:
            images: normalised images ``(B, C, H, W)``.
            score_threshold: candidates scoring at most this are dropped (None: see
                :meth:`detection_settings`).
            nms_threshold: the IoU above which class-wise NMS drops the lower-scoring box.
            max_detections: the most objects kept per image.

        Returns:
            One :class:`Detections` per image, boxes in that image's pixel coordinates (clipped
            to it), best first; the module's train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                found = self.detect_tensors(
                    images,
                    score_threshold=score_threshold,
                    nms_threshold=nms_threshold,
                    max_detections=max_detections,
                )
        finally:
            self.train(was_training)
        return [
            Detections(
                boxes=d["boxes"].float().cpu().numpy(),
                scores=d["scores"].float().cpu().numpy(),
                labels=d["labels"].cpu().numpy(),
            )
            for d in found
        ]


def _check_type(label: str, name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (bool, int, float, str); other defaults accept anything."""

    def fail() -> ConfigError:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]
        return ConfigError(f"{label}: option {name} must be {kind}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail()
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise fail()
    return value
