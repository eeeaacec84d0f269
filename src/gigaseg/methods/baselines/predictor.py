"""Whole-image prediction of the two naive baselines.

``global``: the thumbnail segmented once; every block is an exact crop of its bilinear
upsampling. ``patch``: full-resolution sliding windows over the whole image, blended with
``blend`` weights where they overlap (``gigaseg.inference.stitch``).
"""

from __future__ import annotations

import torch

from ...budget import MemoryEstimate, inference_estimate, runtime_bytes
from ...geometry import PatchGrid, Window, upsample_window
from ...inference.contract import SegmentationPredictor
from ...inference.planner import plan_inference
from ...inference.stitch import patches_touching, stitch_block
from ...io.normalize import Normalization
from .model import GlobalSegmenter, PatchSegmenter

__all__ = ["GlobalPredictor", "PatchPredictor", "block_bytes", "global_predictor", "patch_predictor"]


class GlobalPredictor(SegmentationPredictor):
    """Segment the thumbnail once; every block is an exact crop of its bilinear upsampling."""

    def fast_networks(self):
        """The network's forward on an ``input_size`` thumbnail.

        Returns:
            Dotted path -> example input (``Predictor.fast_networks``).
        """
        size = self.model.options["input_size"]
        size = min(size, 64)  # folding does not depend on the size
        return {"": torch.rand(1, self.model.in_channels, size, size, device=self.device)}

    def onnx_networks(self):
        """The network itself (image in, logits out).

        Returns:
            The paths ONNX Runtime runs (``Predictor.onnx_networks``).
        """
        return ("",)

    def prepare(self, source):
        """The thumbnail's class probabilities ``(1, K, input_size, input_size)``, computed once."""
        size = self.model.options["input_size"]
        view = source.read(out_size=(size, size), resample="area")
        with torch.inference_mode(), self.autocast():
            logits = self.model(self.to_tensor(view))
        return torch.softmax(logits.float(), dim=1)

    def predict_block(self, source, context, window):
        """The block's window of the bilinear upsampling of the thumbnail's probabilities."""
        with torch.inference_mode():
            probs = upsample_window(context, (source.height, source.width), window)
        return probs[0].cpu().numpy()


class PatchPredictor(SegmentationPredictor):
    """Sliding windows over the whole image, blended with the ``blend`` weights, predicted per block."""

    @property
    def patch_size(self) -> int:
        """The window side in pixels (the ``patch_size`` option)."""
        return self.model.options["patch_size"]

    @property
    def stride(self) -> int:
        """Pixels between window starts: ``patch_size - overlap``, at least 1."""
        return max(1, self.patch_size - self.model.options["overlap"])

    def read_margin(self):
        """Pixels around a block that its windows read: up to a window's side.

        Returns:
            Pixels.
        """
        return self.patch_size

    def fast_networks(self):
        """The network's forward on ``patch_size`` windows.

        Returns:
            Dotted path -> example input (``Predictor.fast_networks``).
        """
        size = min(self.patch_size, 64)  # folding does not depend on the size
        return {"": torch.rand(1, self.model.in_channels, size, size, device=self.device)}

    def onnx_networks(self):
        """The network itself (windows in, logits out).

        Returns:
            The paths ONNX Runtime runs (``Predictor.onnx_networks``).
        """
        return ("",)

    def prepare(self, source):
        """The sliding-window grid over the image, and an empty cache of logits shared between blocks."""
        grid = PatchGrid.sliding(source.height, source.width, self.patch_size, self.stride)
        return {"grid": grid, "cache": {}, "below": {}}

    def band_context(self, context):
        """The image's grid with an empty cache: a band never reuses the patches of the band above.

        On the fast path (``fast.full_batches``) the cache starts with the patches the band predicted
        before this one in this process left reaching into it (the values of those windows, whichever
        band computed them), so they are not computed twice; they are then handed over once.
        """
        below = context.get("below")
        if self.fast is None or not self.fast.full_batches or below is None:
            return {"grid": context["grid"], "cache": {}}
        cache = dict(below)
        below.clear()
        return {"grid": context["grid"], "cache": cache, "below": below}

    def predict_block(self, source, context, window):
        """The blended probabilities of the windows touching the block (``gigaseg.inference.stitch``)."""

        def logits(batch, _windows):
            with torch.inference_mode(), self.autocast():
                return self.model(batch)

        lookahead = None
        if self.fast is not None and self.fast.full_batches and window.right < source.width:
            following = Window(window.top, window.right, window.height, min(window.width, source.width - window.right))
            lookahead = patches_touching(context["grid"], following)
        with torch.inference_mode():
            return stitch_block(
                source,
                context["grid"],
                window,
                logits,
                self.to_tensor,
                self.num_classes,
                self.sub_batch,
                blend=self.model.options["blend"],
                cache=context["cache"],
                lookahead=lookahead,
                below=context.get("below"),
            )


def block_bytes(block: int, patch: int, num_classes: int, channels: int) -> int:
    """Working memory of one streamed block, in bytes.

    The probabilities (accumulated, normalised, and the argmax's copy), the blending weights,
    and the block's pixels with a patch of margin on each side (as a float32 tensor and as the
    decoded uint8 read).

    Args:
        block: the block side in pixels.
        patch: the window side in pixels.
        num_classes: the class count.
        channels: the input bands.

    Returns:
        Bytes.
    """
    probs = 3 * num_classes * block * block * 4
    pixels = channels * (block + 2 * patch) ** 2 * (4 + 1)  # float32 tensor + the decoded uint8 read
    return probs + block * block * 4 + pixels


def global_predictor(
    model: GlobalSegmenter,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
) -> GlobalPredictor:
    """The ``global`` method's predictor (its memory does not depend on a budget).

    Args:
        model: a ``global`` network.
        normalization: how the images' pixels are normalised.
        device: where the network runs.
        max_memory: unused: one thumbnail and one block are all it holds.
        precision: "32", "bf16-mixed" or "16-mixed".

    Returns:
        A ``GlobalPredictor``.
    """
    return GlobalPredictor(model, normalization, device=device, precision=precision)


def patch_predictor(
    model: PatchSegmenter,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
    default_sub_batch: int = 4,
) -> PatchPredictor:
    """The ``patch`` method's predictor, with patches per forward pass planned from ``max_memory``.

    The budget holds the process, the patches' activations and one block's working buffers
    (:func:`block_bytes`).

    Args:
        model: a ``patch`` network.
        normalization: how the images' pixels are normalised.
        device: where the network runs.
        max_memory: the budget in bytes (None: ``default_sub_batch`` patches).
        precision: "32", "bf16-mixed" or "16-mixed".
        default_sub_batch: patches per forward pass without a budget.

    Returns:
        A ``PatchPredictor``.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    patch = model.options["patch_size"]
    sample = (torch.zeros(1, model.in_channels, patch, patch),)

    def estimate(block: int) -> MemoryEstimate:
        extra = block_bytes(block, patch, model.num_classes, model.in_channels)
        return inference_estimate(model, sample, runtime=runtime_bytes(device), extra=extra)

    plan = plan_inference(
        max_memory, estimate, f"{model.method_name} prediction with {patch}-px patches", default=default_sub_batch
    )
    predictor = PatchPredictor(model, normalization, device=device, sub_batch=plan.sub_batch, precision=precision)
    predictor.block_size = plan.block_size
    return predictor
