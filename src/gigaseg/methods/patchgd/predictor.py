"""PatchGD's whole-image predictors.

:class:`PatchGDImageClassifier` fills ``Z`` reading one row band of patches
at a time from the (lazy) image, so memory does not grow with the image beyond ``Z``;
:class:`PatchGDSegmentationPredictor` predicts any block from the whole-image grid's
patches touching it plus the global patch (exact, since theta2 is 1x1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ...budget import inference_estimate, runtime_bytes
from ...geometry import Window, upsample_window
from ...inference.contract import ClassificationPredictor, DetectionPredictor, SegmentationPredictor
from ...inference.planner import InferencePlan, plan_inference
from ...io.normalize import Normalization
from .model import (
    DEFAULT_FILL_BATCH,
    MAX_FILL_BATCH,
    DownsampledClassifier,
    PatchGDClassifier,
    PatchGDSegmenter,
    patch_at,
)

__all__ = [
    "DownsampledImageClassifier",
    "PatchGDDetectionPredictor",
    "PatchGDImageClassifier",
    "PatchGDSegmentationPredictor",
    "downsampled_classifier_predictor",
    "inference_plan",
    "patchgd_classifier_predictor",
    "patchgd_detector_predictor",
    "patchgd_segmenter_predictor",
    "segmentation_block_bytes",
]


def inference_plan(
    model: PatchGDClassifier | PatchGDSegmenter,
    device="cpu",
    max_memory: int | None = None,
    block_bytes: Callable[[int], int] | None = None,
) -> InferencePlan:
    """Patches per no-grad theta1 pass that fit ``max_memory``.

    Args:
        model: a PatchGD classifier or segmenter.
        device: where it runs.
        max_memory: the budget in bytes; None gives ``DEFAULT_FILL_BATCH`` patches.
        block_bytes: ``block_bytes(block_side)``, the working memory of one streamed block
            (segmentation), held next to the patches.

    Returns:
        The ``InferencePlan``.

    Raises:
        BudgetError: not even one patch fits.
    """
    p = model.patch_size
    sample = (torch.zeros(1, model.in_channels, p, p),)

    def estimate(block: int):
        extra = block_bytes(block) if block_bytes is not None else 0
        return inference_estimate(model.theta1, sample, runtime=runtime_bytes(device), extra=extra)

    return plan_inference(
        max_memory,
        estimate,
        f"{model.method_name} prediction with {p}-px patches",
        default=DEFAULT_FILL_BATCH,
        maximum=MAX_FILL_BATCH,
    )


def segmentation_block_bytes(model, block: int) -> int:
    """Working memory of one streamed block of the segmenter's prediction.

    Its pixels and Z with a patch of margin on every side, the upsampled global features,
    the fused map, logits and probabilities (float32).

    Args:
        model: a ``patchgd_segmenter`` network.
        block: the block's side in pixels.

    Returns:
        The estimate in bytes.
    """
    p, c = model.patch_size, model.latent_channels
    margin = (block + 2 * p) ** 2
    return margin * (model.in_channels * 5 + c * 4) + block * block * 4 * (3 * c + 4 * model.num_classes)


class _Theta1Fast:
    """The fast path of the PatchGD predictors: theta1 on ``patch_size`` patches (the global patch,
    whose BatchNorm statistics may be its own, runs on the plain model)."""

    def fast_networks(self):
        p = self.model.patch_size
        return {"theta1": torch.rand(1, self.model.in_channels, p, p, device=self.device)}

    def onnx_networks(self):
        return ("theta1",)


class PatchGDImageClassifier(_Theta1Fast, ClassificationPredictor):
    """Fill Z without gradients, one row band of patches at a time, add the global patch, classify.

    Constructed as :class:`~gigaseg.inference.contract.Predictor`; ``sub_batch`` is the
    patches per theta1 pass.
    """

    def latents(self, source) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Z and the global latent of a whole image, read band by band.

        Args:
            source: the image (an ``ImageSource``).

        Returns:
            (Z ``(1, latent_dim, m, n)``, g ``(1, latent_dim)`` or None without the global
            patch), float32 on the device.
        """
        model, p = self.model, self.model.patch_size
        rows, cols = model.grid((source.height, source.width))
        z = torch.empty((1, model.latent_channels, rows, cols), device=self.device)
        with torch.inference_mode(), self.autocast():
            for r in range(rows):
                band = Window(r * p, 0, min(p, source.height - r * p), source.width)
                pixels = self.to_tensor(source.read(band))[0]
                for start in range(0, cols, self.sub_batch):
                    chunk = range(start, min(cols, start + self.sub_batch))
                    patches = torch.stack([patch_at(pixels, 0, c * p, p) for c in chunk])
                    z[0, :, r, chunk.start : chunk.stop] = model.theta1(patches).float().T
            g = None
            if model.options["global_patch"]:
                thumb = source.read(out_size=(p, p), resample="area")
                g = self.plain_model.encode_global(self.to_tensor(thumb)).float()
        return z, g

    def predict(self, source) -> np.ndarray:
        """Class probabilities of a whole image.

        Args:
            source: the image (an ``ImageSource``).

        Returns:
            float32 ``(num_classes,)`` summing to 1.
        """
        z, g = self.latents(source)
        with torch.inference_mode():
            logits = self.model.classify(z, g)
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


class DownsampledImageClassifier(ClassificationPredictor):
    """The whole image read at ``input_size`` x ``input_size`` (area averaging), classified.

    Constructed as :class:`~gigaseg.inference.contract.Predictor`.
    """

    def fast_networks(self):
        """theta1 on the ``input_size`` view.

        Returns:
            Dotted path -> example input (``Predictor.fast_networks``).
        """
        size = self.model.options["input_size"]
        return {"theta1": torch.rand(1, self.model.in_channels, size, size, device=self.device)}

    def onnx_networks(self):
        """theta1 (a view in, its latent vector out).

        Returns:
            The paths ONNX Runtime runs (``Predictor.onnx_networks``).
        """
        return ("theta1",)

    def predict(self, source) -> np.ndarray:
        """Class probabilities of a whole image.

        Args:
            source: the image (an ``ImageSource``).

        Returns:
            float32 ``(num_classes,)`` summing to 1.
        """
        size = self.model.options["input_size"]
        view = source.read(out_size=(size, size), resample="area")
        with torch.inference_mode(), self.autocast():
            logits = self.model(self.to_tensor(view))
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()


class PatchGDSegmentationPredictor(_Theta1Fast, SegmentationPredictor):
    """Blocks of the image from the whole-image patch grid's patches that touch them plus the global patch.

    The halo is one patch. With a budget, ``prepare`` plans the patches per theta1 pass for
    each image, leaving room for one block's buffers (:func:`segmentation_block_bytes`).

    Args:
        model: a ``patchgd_segmenter`` network.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: the budget in bytes, or None.
        precision: "32", "bf16-mixed" or "16-mixed".

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """

    def __init__(
        self,
        model: PatchGDSegmenter,
        normalization: Normalization,
        device="cpu",
        max_memory: int | None = None,
        precision: str = "32",
    ):
        super().__init__(
            model,
            normalization,
            device=device,
            sub_batch=inference_plan(model, device, max_memory).sub_batch,
            precision=precision,
        )
        self.max_memory = max_memory
        self.halo = model.patch_size

    def prepare(self, source):
        """Plans the sub-batch for this image's size and returns the global patch's features (or None)."""
        model, p = self.model, self.model.patch_size
        if self.max_memory is not None:
            # the budget also holds one block's buffers; a block is at most the image
            side = max(source.height, source.width)
            self.sub_batch = inference_plan(
                model, self.device, self.max_memory, lambda block: segmentation_block_bytes(model, min(block, side))
            ).sub_batch
        if not model.options["global_patch"]:
            return None
        thumb = source.read(out_size=(p, p), resample="area")
        with torch.inference_mode(), self.autocast():
            return self.plain_model.global_features(self.to_tensor(thumb)).float()

    def predict_block(self, source, context, window: Window) -> np.ndarray:
        """Class probabilities of a block, from the grid's patches touching it and the global features."""
        model, p = self.model, self.model.patch_size
        r0, r1 = window.top // p, (window.bottom - 1) // p + 1
        c0, c1 = window.left // p, (window.right - 1) // p + 1
        region = Window(r0 * p, c0 * p, (r1 - r0) * p, (c1 - c0) * p)
        readable = region.clip(source.height, source.width)
        with torch.inference_mode():
            pixels = self.to_tensor(source.read(readable))[0]
            z = torch.zeros((1, model.latent_channels, region.height, region.width), device=self.device)
            corners = [(r * p - region.top, c * p - region.left) for r in range(r0, r1) for c in range(c0, c1)]
            for start in range(0, len(corners), self.sub_batch):
                chunk = corners[start : start + self.sub_batch]
                with self.autocast():
                    out = model.encode(torch.stack([patch_at(pixels, top, left, p) for top, left in chunk])).float()
                for (top, left), patch_out in zip(chunk, out):
                    z[0, :, top : top + p, left : left + p] = patch_out
            inside = window.relative_to(region)
            z = z[:, :, inside.top : inside.bottom, inside.left : inside.right]
            g_up = None if context is None else upsample_window(context, (source.height, source.width), window)
            logits = model.head(z, g_up)
            return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float32)


def patchgd_classifier_predictor(
    model: PatchGDClassifier,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
) -> PatchGDImageClassifier:
    """The PatchGD classifier's predictor, with patches per no-grad pass planned from ``max_memory``.

    Args:
        model: a ``patchgd_classifier`` network.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: the budget in bytes, or None.
        precision: "32", "bf16-mixed" or "16-mixed".

    Returns:
        A ``PatchGDImageClassifier``.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    return PatchGDImageClassifier(
        model,
        normalization,
        device=device,
        sub_batch=inference_plan(model, device, max_memory).sub_batch,
        precision=precision,
    )


def downsampled_classifier_predictor(
    model: DownsampledClassifier,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
) -> DownsampledImageClassifier:
    """The downsampled baseline's predictor (one ``input_size`` view per image; no budget to plan).

    Args:
        model: a ``downsampled_classifier`` network.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: unused.
        precision: "32", "bf16-mixed" or "16-mixed".

    Returns:
        A ``DownsampledImageClassifier``.
    """
    return DownsampledImageClassifier(
        model, normalization, device=device, sub_batch=DEFAULT_FILL_BATCH, precision=precision
    )


def patchgd_segmenter_predictor(
    model: PatchGDSegmenter,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
) -> PatchGDSegmentationPredictor:
    """The PatchGD segmenter's predictor; its sub-batch is planned per image from ``max_memory``.

    Args:
        model: a ``patchgd_segmenter`` network.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: the budget in bytes, or None.
        precision: "32", "bf16-mixed" or "16-mixed".

    Returns:
        A ``PatchGDSegmentationPredictor``.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    return PatchGDSegmentationPredictor(model, normalization, device=device, max_memory=max_memory, precision=precision)


# ------------------------------------------------------------------------------- detection


class PatchGDDetectionPredictor(DetectionPredictor):
    """The detection framework on any image: whole canvases, or canvas-sized tiles merged.

    ``mode="auto"``: an image whose longer side is at most ``canvas_size`` is resized (longer
    side) and padded to the canvas (``WholeImageDetectionPredictor``); a larger one is cut
    into full-resolution canvas-sized tiles sharing ``overlap_ratio`` of their side, read band
    by band, whose detections are merged (``SlicedDetectionPredictor``). ``"whole"`` and
    ``"sliced"`` use one of the two for every image.

    Args:
        model: a ``patchgd_detector`` network.
        normalization: how the images' pixels are normalised.
        whole: the whole-canvas predictor.
        sliced: the canvas-tile predictor.
        device: where the network runs.
        precision: "32", "bf16-mixed" or "16-mixed".
    """

    def __init__(self, model, normalization: Normalization, *, whole, sliced, device="cpu", precision: str = "32"):
        super().__init__(model, normalization, device=device, sub_batch=1, precision=precision)
        self.whole = whole
        self.sliced = sliced

    def predict(self, source, *, partial=None):
        """The objects of ``source`` in its full-resolution pixels.

        Args:
            source: the image.
            partial: a store of finished bands for the canvas tiles (see ``SlicedDetectionPredictor.predict``).

        Returns:
            Its ``Detections``, best first.
        """
        mode = self.model.options["mode"]
        canvas = self.model.options["canvas_size"]
        if mode == "sliced" or (mode == "auto" and max(source.height, source.width) > canvas):
            return self.sliced.predict(source, partial=partial)
        return self.whole.predict(source, partial=partial)


def detection_fill_bytes(model, canvas: int) -> int:
    """Working memory of one canvas's prediction besides theta1's patches: ``Z``, fused maps, heads.

    Args:
        model: a ``patchgd_detector`` network.
        canvas: the canvas side in pixels.

    Returns:
        Bytes (float32 ``Z`` once, the fused maps and three tower maps live per fused point).
    """
    return model.map_bytes(1, canvas, canvas) // 3


def patchgd_detector_predictor(
    model,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
    default_sub_batch: int = DEFAULT_FILL_BATCH,
) -> DetectionPredictor:
    """The ``patchgd_detector``'s predictor, ``fill_batch`` patches per theta1 pass planned from ``max_memory``.

    One canvas per pass; the budget holds theta1's no-grad patches, a band of canvas-sized
    tiles (decoded and normalised), ``Z``, the fused maps and the heads.

    Args:
        model: a ``patchgd_detector`` network.
        normalization: how the images' pixels are normalised.
        device: where the network runs.
        max_memory: the budget in bytes (None: ``default_sub_batch`` patches per pass).
        precision: "32", "bf16-mixed" or "16-mixed".
        default_sub_batch: patches per theta1 pass without a budget.

    Returns:
        A :class:`PatchGDDetectionPredictor`.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    from ...inference.merge import MergeSettings
    from ...inference.sliced import SlicedDetectionPredictor, WholeImageDetectionPredictor

    o = model.options
    canvas = o["canvas_size"]
    p = model.patch_size
    sample = (torch.zeros(1, model.in_channels, p, p),)

    def estimate(block: int):
        # a band of canvas-tall tiles, decoded and as float32, next to Z, the fused maps and the heads
        band = model.in_channels * canvas * max(block, canvas) * (1 + 4)
        extra = band + detection_fill_bytes(model, canvas)
        return inference_estimate(model.theta1, sample, runtime=runtime_bytes(device), extra=extra)

    plan = plan_inference(
        max_memory,
        estimate,
        f"patchgd_detector prediction with {p}-px patches on {canvas}-px canvases",
        default=default_sub_batch,
        maximum=MAX_FILL_BATCH,
    )
    model.fill_batch = max(1, plan.sub_batch)
    common = {
        "score_threshold": o["score_threshold"],
        "max_detections": o["image_max_detections"],
        "device": device,
        "precision": precision,
    }
    whole = WholeImageDetectionPredictor(model, normalization, size=canvas, **common)
    merge = MergeSettings(
        method=o["merge"], metric=o["merge_metric"], threshold=o["merge_threshold"], class_agnostic=o["class_agnostic"]
    )
    overlap = int(o["overlap_ratio"] * canvas + 0.5)
    sliced = SlicedDetectionPredictor(
        model, normalization, tile_size=canvas, overlap=overlap, merge=merge, sub_batch=1, **common
    )
    if plan.block_size is not None:
        sliced.block_size = plan.block_size
    return PatchGDDetectionPredictor(
        model, normalization, whole=whole, sliced=sliced, device=device, precision=precision
    )
