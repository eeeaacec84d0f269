"""The contracts between the prediction drivers and a method's whole-image logic, one per task.

- :class:`SegmentationPredictor`: class probabilities of any block of a (huge) image; the
  streaming driver (``gigaseg.inference.stream.predict_image``) tiles the image into blocks
  and writes the labels band by band.
- :class:`ClassificationPredictor`: class probabilities of one whole image.
- :class:`DetectionPredictor`: the objects in one whole image, as :class:`Detections`.

Each method's ``predictor`` factory (see ``gigaseg.methods.registry``) returns the contract
of its network's task. Nothing here keeps per-image state between images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from ..geometry import Detections, Window
from ..io.base import ImageSource
from ..io.normalize import Normalization

__all__ = ["ClassificationPredictor", "DetectionPredictor", "Detections", "Predictor", "SegmentationPredictor"]


class Predictor:
    """What every task's predictor shares: the network in eval mode, normalisation, device, precision.

    Args:
        model: the network (switched to eval mode).
        normalization: how source pixels are normalised for the network.
        device: where the network runs.
        sub_batch: patches (or tiles) per forward pass, at least 1.
        precision: "32", "bf16-mixed" ("bf16") or "16-mixed" ("16").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        normalization: Normalization,
        device: str | torch.device = "cpu",
        sub_batch: int = 4,
        precision: str = "32",
    ):
        self.model = model.eval()
        self.normalization = normalization
        self.device = torch.device(device)
        self.sub_batch = max(1, int(sub_batch))
        self.precision = precision
        #: the fast path's options once :meth:`accelerate` ran (None: the plain path)
        self.fast = None
        #: the model as given (``model`` is the fast copy after :meth:`accelerate`)
        self.plain_model = self.model

    @property
    def num_classes(self) -> int:
        """The network's class count."""
        return int(self.model.num_classes)

    def to_tensor(self, array_hwc: np.ndarray) -> torch.Tensor:
        """Source pixels as the network's input.

        Args:
            array_hwc: pixels ``(H, W, C)`` as read from an ``ImageSource``.

        Returns:
            The normalised float tensor ``(1, C, H, W)`` on the device.
        """
        return torch.from_numpy(self.normalization.apply(array_hwc)).unsqueeze(0).to(self.device)

    def fast_networks(self) -> dict[str, Any]:
        """The networks this predictor runs on patches, for the fast path (``gigaseg.inference.fast``).

        Returns:
            Dotted attribute path of ``model`` (``""``: the model's own forward) -> an example input
            (a tensor or a tuple of positional arguments, on the model's device). Default: none.
        """
        return {}

    def onnx_networks(self) -> tuple[str, ...]:
        """The paths of :meth:`fast_networks` that ONNX Runtime can run (plain tensors in and out).

        Returns:
            Default: none.
        """
        return ()

    def accelerate(self, options) -> Predictor:
        """Switch to the fast path: ``model`` becomes ``gigaseg.inference.fast.accelerate_model``'s copy.

        Args:
            options: a ``gigaseg.inference.fast.FastOptions``.

        Returns:
            This predictor.

        Raises:
            ConfigError: ``backend="onnxruntime"`` with a precision other than 32, with no network
                ONNX Runtime can run, or without onnx / onnxruntime installed.
        """
        from ..errors import ConfigError
        from .fast import accelerate_model

        networks = self.fast_networks()
        if options.backend == "onnxruntime":
            if self.precision not in ("32", "32-true"):
                raise ConfigError(f"--backend onnxruntime runs float32: use --precision 32, not {self.precision}")
            if not self.onnx_networks():
                raise ConfigError(
                    f"{self.model.method_name} has no network ONNX Runtime can run on its own (its patches take "
                    f"per-image context); use --backend torch"
                )
        self.plain_model = self.model
        self.model = accelerate_model(self.model, networks, options, onnx=self.onnx_networks())
        self.fast = options
        return self

    def autocast(self):
        """The mixed-precision context of ``precision``.

        Returns:
            ``torch.autocast`` for "bf16-mixed" / "16-mixed", a disabled one for "32".
        """
        if self.precision in ("bf16-mixed", "bf16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision in ("16-mixed", "16"):
            return torch.autocast(self.device.type, dtype=torch.float16)
        return torch.autocast(self.device.type, enabled=False)


class SegmentationPredictor(Predictor, ABC):
    """Predicts class probabilities of any window of a (huge) image.

    The driver calls ``prepare`` once per image (global context: a thumbnail's features,
    say) and then ``predict_block`` for blocks that tile the image. A predictor reads what
    it needs from the source itself (a block plus a halo, a pyramid level), so it decides
    its own context; the driver only bounds the block size. Whatever ``prepare`` computes
    is returned and passed back in.
    """

    #: how far (in full-resolution pixels) a block's prediction depends on pixels outside it;
    #: the driver uses it only to report seams, the predictor reads its own halo.
    halo: int = 0
    #: the block side this predictor planned its memory for (None: the driver's choice by budget)
    block_size: int | None = None

    def read_margin(self) -> int:
        """Pixels around a block that ``predict_block`` reads at full resolution (the fast path prefetches them).

        Returns:
            Default: ``halo``.
        """
        return int(self.halo)

    def prepare(self, source: ImageSource) -> Any:
        """Per-image context, computed once before the blocks.

        Args:
            source: the image.

        Returns:
            Anything ``predict_block`` needs for every block of this image (default: None).
        """
        return None

    def band_context(self, context: Any) -> Any:
        """The context one row band of blocks starts from.

        The driver calls it at the start of every row band with what ``prepare`` returned, so a
        band's probabilities never depend on the bands predicted before it in the same process:
        a resumed run, and a band predicted by another process (``gigaseg.inference.distributed``)
        with a copy of the context, give what an uninterrupted run gives. A predictor whose context
        carries state from block to block (a cache of the patches shared with the next block, a
        reused output buffer) returns a context with that state fresh and the image-wide parts
        shared; the default returns ``context`` itself (a context that is only read).

        Args:
            context: what ``prepare`` returned for this image.

        Returns:
            The context for the band's blocks, left to right.
        """
        return context

    @abstractmethod
    def predict_block(self, source: ImageSource, context: Any, window: Window) -> np.ndarray:
        """Class probabilities of one block.

        Args:
            source: the image.
            context: what ``prepare`` returned for this image.
            window: the block, inside the image.

        Returns:
            float32 ``(num_classes, window.height, window.width)``.
        """


class ClassificationPredictor(Predictor, ABC):
    """Predicts the class probabilities of a whole (possibly huge) image."""

    @abstractmethod
    def predict(self, source: ImageSource) -> np.ndarray:
        """Class probabilities of ``source``.

        Args:
            source: the image.

        Returns:
            float32 ``(num_classes,)`` summing to 1.
        """


class DetectionPredictor(Predictor, ABC):
    """Finds the objects of a whole (possibly huge) image."""

    @abstractmethod
    def predict(self, source: ImageSource, *, partial=None) -> Detections:
        """The objects of ``source``.

        Args:
            source: the image.
            partial: a ``gigaseg.inference.partial_detections.PartialDetections`` store (opened)
                that a predictor working band by band takes finished bands from and saves them
                to, so an interrupted prediction resumes; None: no store.

        Returns:
            Its ``Detections``.
        """
