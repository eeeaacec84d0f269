"""ICNet's and PSPNet's whole-image predictor.

Prediction (:class:`TilePredictor`): frames up to ``tile_size`` (1024x2048, ICNet's
Cityscapes frame) are segmented in one pass at their own size; larger images are cut
into a whole-image grid of ``tile_size`` tiles overlapping by ``tile_overlap`` pixels,
blended with ``blend`` weights (``gigaseg.inference.stitch.stitch_block``), so a block's result
equals the in-memory prediction of the whole image. The network runs as an eval-mode copy
with batch norms folded into the convolutions, channels_last, the predictor's
``precision`` as autocast (bf16/fp16 on GPU) and optionally ``torch.compile``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...budget import inference_estimate, runtime_bytes
from ...export import optimize_for_inference
from ...geometry import PatchGrid, Window
from ...inference.contract import SegmentationPredictor
from ...inference.planner import plan_inference
from ...inference.stitch import stitch_block
from ...io.normalize import Normalization
from .pspnet import tile_shape

__all__ = ["TilePredictor", "tile_predictor"]


class TilePredictor(SegmentationPredictor):
    """Frames in one pass; larger images as a whole-image grid of overlapping, blended tiles.

    ``net`` is ``optimize_for_inference(model, fold_bn=..., channels_last=..., compile=...)``:
    an eval-mode copy. ``channels_last`` defaults to True: faster on GPUs and, with oneDNN, on CPUs
    (``benchmarks/icnet_speed.py`` measures it).

    Args:
        model: an ``icnet`` or ``pspnet`` network (its ``tile_size``, ``tile_overlap`` and
            ``blend`` options are read).
        normalization: how the images' pixels are normalised.
        device: where it runs.
        sub_batch: tiles per forward pass.
        precision: "32", "bf16-mixed" or "16-mixed".
        fold_bn: fold batch norms into the convolutions.
        channels_last: run in channels_last memory format; None: True.
        compile: ``torch.compile`` the network; a dict gives its options.

    Raises:
        ConfigError: ``compile`` is asked for and this torch has no ``torch.compile``.
    """

    def __init__(
        self,
        model,
        normalization,
        device="cpu",
        sub_batch: int = 1,
        precision: str = "32",
        *,
        fold_bn: bool = True,
        channels_last: bool | None = None,
        compile: bool | dict = False,
    ):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.tile = tile_shape(model)
        self.overlap = int(model.options["tile_overlap"])
        self.blend = model.options["blend"]
        self.halo = self.overlap
        self.channels_last = True if channels_last is None else bool(channels_last)
        example = torch.zeros(1, model.in_channels, 64, 64, device=next(model.parameters()).device)
        self.net = optimize_for_inference(
            model, example, fold_bn=fold_bn, channels_last=self.channels_last, compile=compile
        )

    def fast_networks(self):
        """The network on a tile (it is folded and channels_last already unless told otherwise).

        Returns:
            Dotted path -> example input (``Predictor.fast_networks``).
        """
        return {"": torch.rand(1, self.model.in_channels, 64, 64, device=self.device)}

    def onnx_networks(self):
        """The network itself (tiles in, logits out).

        Returns:
            The paths ONNX Runtime runs (``Predictor.onnx_networks``).
        """
        return ("",)

    def accelerate(self, options):
        """The fast path (``Predictor.accelerate``): ``net`` becomes the fast copy of the network.

        Args:
            options: a ``gigaseg.inference.fast.FastOptions``.

        Returns:
            This predictor.
        """
        super().accelerate(options)
        self.net, self.model = self.model, self.plain_model
        self.channels_last = False  # the fast copy converts its inputs itself
        return self

    def grid(self, height: int, width: int) -> PatchGrid:
        """The whole-image tile grid.

        Along a side longer than the tile, tiles step by ``tile - tile_overlap`` (the last one
        flush with the edge); along a side that fits, one tile spans it.

        Args:
            height: the image's height in pixels.
            width: the image's width in pixels.

        Returns:
            The grid; one tile (the image itself) when it fits in ``tile_size``.
        """
        th, tw = min(self.tile[0], height), min(self.tile[1], width)
        stride = (max(1, th - self.overlap) if th < height else th, max(1, tw - self.overlap) if tw < width else tw)
        return PatchGrid.sliding(height, width, (th, tw), stride)

    def prepare(self, source):
        """The image's tile grid (:meth:`grid`)."""
        return self.grid(source.height, source.width)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits of a normalised batch (the optimised eval-mode network).

        Args:
            batch: normalised tiles ``(N, C_in, h, w)`` on the device.

        Returns:
            Logits ``(N, num_classes, h, w)``, computed under inference mode and autocast.
        """
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            return self.net(batch)

    def predict_block(self, source, grid: PatchGrid, window: Window) -> np.ndarray:
        """The block's probabilities, blended from the grid's tiles that overlap it."""
        with torch.inference_mode():
            return stitch_block(
                source,
                grid,
                window,
                lambda batch, _windows: self.logits(batch),
                self.to_tensor,
                self.num_classes,
                self.sub_batch,
                blend=self.blend,
            )


def tile_predictor(
    model,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
    **options,
) -> TilePredictor:
    """ICNet's (or PSPNet's) predictor, with tiles per forward pass planned from ``max_memory``.

    Args:
        model: an ``icnet`` or ``pspnet`` network.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: the budget in bytes (None: one tile per pass).
        precision: "32", "bf16-mixed" or "16-mixed".
        **options: ``TilePredictor``'s ``fold_bn``, ``channels_last`` and ``compile``.

    Returns:
        A ``TilePredictor``.

    Raises:
        BudgetError: not even one tile fits ``max_memory``.
    """
    th, tw = tile_shape(model)
    sample = (torch.zeros(1, model.in_channels, th, tw),)
    plan = plan_inference(
        max_memory,
        lambda _block: inference_estimate(model, sample, runtime=runtime_bytes(device)),
        f"{model.method_name} prediction with {th}x{tw} tiles",
        default=1,
        maximum=16,
    )
    return TilePredictor(model, normalization, device=device, sub_batch=plan.sub_batch, precision=precision, **options)
