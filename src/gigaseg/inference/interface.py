"""The contract between the streaming driver and a method's whole-image logic."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from ..io.base import ImageSource
from ..io.normalize import Normalization
from ..window import Window


class WholeImagePredictor(ABC):
    """Predicts class probabilities of any window of a (huge) image.

    The driver calls ``prepare`` once per image (global context: a thumbnail's
    features, say) and then ``predict_block`` for blocks that tile the image.
    A predictor reads what it needs from the source itself (a block plus a
    halo, a pyramid level), so it decides its own context; the driver only
    bounds the block size. Nothing here keeps per-image state between images:
    whatever ``prepare`` computes is returned and passed back in.
    """

    def __init__(self, model: torch.nn.Module, normalization: Normalization, device: str | torch.device = "cpu",
                 sub_batch: int = 4, precision: str = "32"):
        self.model = model.eval()
        self.normalization = normalization
        self.device = torch.device(device)
        self.sub_batch = max(1, int(sub_batch))
        self.precision = precision

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    #: how far (in full-resolution pixels) a block's prediction depends on pixels outside it;
    #: the driver uses it only to report seams, the predictor reads its own halo.
    halo: int = 0
    #: the block side this predictor planned its memory for (None: the driver's choice by budget)
    block_size: int | None = None

    def prepare(self, source: ImageSource) -> Any:
        """Per-image context computed once (default: none)."""
        return None

    @abstractmethod
    def predict_block(self, source: ImageSource, context: Any, window: Window) -> np.ndarray:
        """Class probabilities of ``window`` as float32 ``(num_classes, h, w)``."""

    # helpers shared by the methods ------------------------------------------------

    def to_tensor(self, array_hwc: np.ndarray) -> torch.Tensor:
        """Source pixels -> normalised (1, C, H, W) float tensor on the device."""
        return torch.from_numpy(self.normalization.apply(array_hwc)).unsqueeze(0).to(self.device)

    def autocast(self):
        """Mixed precision context for ``precision`` "bf16-mixed" / "16-mixed" (no-op for "32")."""
        if self.precision in ("bf16-mixed", "bf16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision in ("16-mixed", "16"):
            return torch.autocast(self.device.type, dtype=torch.float16)
        return torch.autocast(self.device.type, enabled=False)
