"""The FCOS detector: a timm encoder, torchvision's feature pyramid and FCOS's heads.

FCOS ("FCOS: Fully Convolutional One-Stage Object Detection", Tian et al., ICCV 2019) as
torchvision builds ``fcos_resnet50_fpn``: the encoder's maps c3..c5 go through
:class:`torchvision.ops.FeaturePyramidNetwork` (1x1 laterals, nearest top-down sums, 3x3
outputs, ``fpn_channels`` wide), P6 and P7 come from P5 by stride-2 3x3 convolutions
(``LastLevelP6P7``), and :class:`gigaseg.nn.fcos.FCOSHeads` runs on P3..P7. With ResNet-50,
256 channels and 91 classes it has exactly the parameters of torchvision's
``fcos_resnet50_fpn``.

For small objects the pyramid's range is an option: ``min_level`` 2 adds the stride-4 map
(c2 -> P2; points every 4 pixels, objects up to 32 px on it) and ``max_level`` 5, 6 or 7
stops at P5, at P6 (torchvision's ``LastLevelMaxPool``, no weights) or at P7 (FCOS's).

How it is trained and run (``mode``):

- ``"whole"``: the whole image resized so its longer side is ``input_size`` (the downsampled
  baseline); prediction resizes it the same way
  (``gigaseg.inference.sliced.WholeImageDetectionPredictor``).
- ``"sliced"``: random ``crop_size`` crops at full resolution (``crops_per_image`` per image
  and epoch); prediction runs overlapping tiles (``tile_size``, 0: ``crop_size``; neighbours
  share ``overlap_ratio`` of it, SAHI's 0.2 by default) and merges the tiles' detections
  (``merge`` "nms" or "nmm", by ``merge_metric`` "iou" or "ios" above ``merge_threshold``,
  ``class_agnostic`` or per class), optionally with a downsampled whole-image pass
  (``full_image_size`` > 0, SAHI's standard prediction)
  (``gigaseg.inference.sliced.SlicedDetectionPredictor``).

``score_threshold``, ``nms_threshold`` and ``max_detections`` set the network's
post-processing (per view: the resized image or a tile); ``image_max_detections`` caps an
image's merged detections (0, the default: no cap, as an image of any size holds any number of
objects); they, ``mode`` and the tiling and merging options are
inference options (``gigaseg predict --set``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ...errors import ConfigError
from ...nn.base import DetectionModel
from ...nn.encoders import Encoder, PretrainedSpec
from ...nn.fcos import FCOSHeads

__all__ = ["MERGE_METHODS", "MERGE_METRICS", "MODES", "FCOSDetector"]

MODES = ("whole", "sliced")
MERGE_METHODS = ("nms", "nmm")
MERGE_METRICS = ("iou", "ios")


class FCOSDetector(DetectionModel):
    """FCOS on a timm encoder: ``features`` are the pyramid's P``min_level``..P``max_level``.

    Args:
        encoder: a timm model name (its maps must include strides ``2**min_level`` .. 32).
        num_classes: object classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        **options: see ``default_options`` and the module docstring.

    Raises:
        ConfigError: bad options, or an encoder without the maps the levels need.
    """

    default_options = {
        "mode": "whole",
        "input_size": 1024,
        "crop_size": 512,
        "crops_per_image": 8,
        "min_level": 3,
        "max_level": 7,
        "fpn_channels": 256,
        "head_convs": 4,
        "center_sampling_radius": 1.5,
        "min_visible": 0.5,
        "tile_size": 0,
        "overlap_ratio": 0.2,
        "full_image_size": 0,
        "merge": "nms",
        "merge_metric": "iou",
        "merge_threshold": 0.5,
        "class_agnostic": False,
        "score_threshold": 0.05,
        "nms_threshold": 0.6,
        "max_detections": 100,
        "image_max_detections": 0,
    }
    option_choices = {
        "mode": MODES,
        "min_level": (2, 3),
        "max_level": (5, 6, 7),
        "merge": MERGE_METHODS,
        "merge_metric": MERGE_METRICS,
    }
    inference_options = (
        "mode",
        "tile_size",
        "overlap_ratio",
        "full_image_size",
        "merge",
        "merge_metric",
        "merge_threshold",
        "class_agnostic",
        "score_threshold",
        "nms_threshold",
        "max_detections",
        "image_max_detections",
    )

    def __init__(
        self,
        *,
        encoder: str = "resnet50",
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        o = self.options
        self.encoder = Encoder(encoder, in_channels=in_channels, pretrained=pretrained)
        levels = range(o["min_level"], 6)
        wanted = [2**level for level in levels]
        missing = [s for s in wanted if s not in self.encoder.reductions]
        if missing:
            raise ConfigError(
                f"fcos: encoder {encoder!r} has maps at strides {self.encoder.reductions}, not at "
                f"{', '.join(map(str, missing))} (min_level={o['min_level']} needs {wanted})"
            )
        #: indices into the encoder's maps of c_min_level .. c5
        self.encoder_levels = [self.encoder.reductions.index(s) for s in wanted]
        channels = o["fpn_channels"]
        extra = None
        if o["max_level"] == 7:
            extra = LastLevelP6P7(channels, channels)  # FCOS: P6 from P5, P7 from P6
        elif o["max_level"] == 6:
            extra = LastLevelMaxPool()  # P6 = P5 max-pooled (no weights)
        self.fpn = FeaturePyramidNetwork(
            [self.encoder.out_channels[i] for i in self.encoder_levels], channels, extra_blocks=extra
        )
        self.heads = FCOSHeads(
            channels,
            num_classes,
            num_convs=o["head_convs"],
            strides=self.strides,
            center_sampling_radius=o["center_sampling_radius"],
        )

    def check_options(self) -> None:
        """Positive sizes and counts, thresholds and the overlap ratio in range."""
        o = self.options
        self._require_positive("input_size", "crop_size", "crops_per_image", "fpn_channels", "max_detections")
        for name in ("head_convs", "tile_size", "full_image_size", "image_max_detections"):
            if o[name] < 0:
                raise ConfigError(f"fcos: option {name} must be >= 0, got {o[name]}")
        for name in ("min_visible", "score_threshold", "nms_threshold"):
            if not 0.0 <= o[name] <= 1.0:
                raise ConfigError(f"fcos: option {name} must be in [0, 1], got {o[name]}")
        if not 0.0 <= o["merge_threshold"] < 1.0:
            raise ConfigError(f"fcos: option merge_threshold must be in [0, 1), got {o['merge_threshold']}")
        if o["center_sampling_radius"] <= 0:
            raise ConfigError(f"fcos: option center_sampling_radius must be > 0, got {o['center_sampling_radius']}")
        if not 0.0 <= o["overlap_ratio"] < 1.0:
            raise ConfigError(f"fcos: option overlap_ratio must be in [0, 1), got {o['overlap_ratio']}")

    @property
    def overlap(self) -> int:
        """Pixels shared by neighbouring tiles: ``overlap_ratio`` of :attr:`tile_size`, rounded half up."""
        return int(self.options["overlap_ratio"] * self.tile_size + 0.5)

    @property
    def strides(self) -> tuple[int, ...]:
        """Input pixels per map pixel of each pyramid level, finest first."""
        return tuple(2**level for level in range(self.options["min_level"], self.options["max_level"] + 1))

    @property
    def tile_size(self) -> int:
        """The side of the sliced prediction's tiles (``tile_size``, or ``crop_size`` when 0)."""
        return self.options["tile_size"] or self.options["crop_size"]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid's maps P``min_level``..P``max_level``.

        Args:
            images: normalised images ``(B, in_channels, H, W)``.

        Returns:
            One ``(B, fpn_channels, ~H / s, ~W / s)`` map per stride ``s`` of :attr:`strides`.
        """
        maps = self.encoder(images)
        pyramid = self.fpn(OrderedDict((str(i), maps[j]) for i, j in enumerate(self.encoder_levels)))
        return list(pyramid.values())
