"""The two naive baselines' networks: FPNSegmenters (``gigaseg.nn.segmenters``) with their options.

- ``"global"``: the whole image downsampled to ``input_size`` x ``input_size`` (GLNet's
  global-only baseline). Defaults follow GLNet's global stage: 120 epochs, lr 5e-5, batch 6.
- ``"patch"``: full-resolution ``patch_size`` windows; at prediction neighbouring windows
  overlap by ``overlap`` pixels (stride ``patch_size - overlap``; 120 is GLNet's overlap on a
  2448 px DeepGlobe side) and are stitched with ``blend`` weights ("gaussian" or "uniform",
  see ``gigaseg.geometry.blend_weights``). Training uses ``crops_per_image`` random crops per
  image and epoch. Defaults follow GLNet's local stage: 50 epochs, lr 2e-5, batch 6.

Both take ``loss`` ("focal": GLNet's focal loss with gamma 3, or "ce"), ``decoder`` and
``output_stride`` (see ``gigaseg.nn.segmenters``): with the "fpn" decoder 4 (the default, GLNet's
head at 1/4 of the input), 2 or 1 (``gigaseg.nn.decoders.FullResolutionHead``: logits at 1/2 or
full resolution, for thin structures); the smp decoders are at full resolution (1, their only
value). ``coarse_logits`` (with the "fpn" decoder at output stride 1 or 2) adds the FPN's own
1/4-resolution classifier's upsampled logits to the full-resolution head's. A checkpoint
written before these options existed loads as output stride 4 (1 for smp) without coarse logits.
"""

from __future__ import annotations

from ...data.statistics import CROP_SAMPLINGS
from ...errors import ConfigError
from ...nn.losses import LOSSES
from ...nn.segmenters import DECODERS, OUTPUT_STRIDES, FPNSegmenter

__all__ = ["BLEND_MODES", "LOSSES", "GlobalSegmenter", "PatchSegmenter"]

BLEND_MODES = ("gaussian", "uniform")


class GlobalSegmenter(FPNSegmenter):
    """Global-only baseline: the whole image at ``input_size`` x ``input_size``."""

    default_options = {
        "input_size": 508,
        "decoder": "fpn",
        "fpn_channels": 256,
        "output_stride": 4,
        "coarse_logits": False,
        "loss": "focal",
    }
    option_choices = {"decoder": DECODERS, "output_stride": OUTPUT_STRIDES, "loss": LOSSES}
    size_option = "input_size"

    def check_options(self) -> None:
        """Positive ``input_size`` and ``fpn_channels``."""
        self._require_positive("input_size", "fpn_channels")


class PatchSegmenter(FPNSegmenter):
    """Patch-only baseline: full-resolution ``patch_size`` windows, ``overlap`` px apart at prediction."""

    default_options = {
        "patch_size": 508,
        "overlap": 120,
        "blend": "gaussian",
        "decoder": "fpn",
        "fpn_channels": 256,
        "output_stride": 4,
        "coarse_logits": False,
        "loss": "focal",
        "crops_per_image": 8,
        "crop_sampling": "uniform",
        "sampling_temperature": 0.0,
    }
    option_choices = {
        "decoder": DECODERS,
        "output_stride": OUTPUT_STRIDES,
        "loss": LOSSES,
        "blend": BLEND_MODES,
        "crop_sampling": CROP_SAMPLINGS,
    }
    inference_options = ("overlap", "blend")
    size_option = "patch_size"

    def check_options(self) -> None:
        """Positive ``patch_size``, ``crops_per_image`` and ``fpn_channels``; ``0 <= overlap < patch_size``."""
        self._require_positive("patch_size", "crops_per_image", "fpn_channels")
        self._require_sampling_temperature()
        if not 0 <= self.options["overlap"] < self.options["patch_size"]:
            raise ConfigError(
                f"patch: option overlap must be in [0, patch_size={self.options['patch_size']}), "
                f"got {self.options['overlap']}"
            )
