"""MagNet's whole-image predictor.

Prediction (:class:`MagNetPredictor`, driven block by block by
``gigaseg.inference.stream.predict_image``):

- whole-image mode (images up to 1.25x the finest scale per side): ``prepare`` runs MagNet
  on the whole image as one frame and keeps its C-channel prediction as float16 on the
  CPU (``2 C H W`` bytes: 84 MB for 7 classes at 2448x2448); blocks are crops of it;
- block mode (larger images): ``predict_block`` splits its block into the fewest equal
  cells no larger than the finest scale, and predicts each cell from a frame of the finest
  scale's size centred on it (shifted inside the image), i.e. at the native resolution of
  the configured scales, keeping only the cell. With 2048-px blocks and the DeepGlobe
  preset every block is one cell with a 200-px margin on each side. Cells are predicted
  independently, so their borders may show seams; nothing is held between blocks.

Memory, for C classes and a frame of P pixels (P is at most the finest scale's area in block
mode, at most 1.5625x it in whole-image mode):

- the finest scale's canvas: the refined/merged prediction ``4 C P`` bytes, its paste count
  and a few single-channel score maps (certainty, upsampled uncertainty, error, chosen
  points: ``~6 x 4 P``); the current prediction of the previous scale (``4 C P / 4``). The
  upsampled current prediction is merged in bands of rows (exact crops of its bilinear
  upsampling), the median blur runs in bands, and the refinement module runs in bands of
  128 rows of its input (same values as one pass), so no other full-size map exists;
- the frame's pixels (``3 P`` bytes, uint8) and one block of output probabilities
  (``4 C`` bytes per block pixel); in whole-image mode the kept float16 prediction
  (``2 C H W``);
- the backbone and the refinement module on ``sub_batch`` input-size patches (1 on the CPU
  without a budget). The backbone's share is its own estimate on an input-size patch (a
  forward pass on the meta device), so a full-resolution backbone (option ``output_stride``
  1: its head's maps at the patch's size) is counted without anything here knowing of it;
  the canvases above are at the frame's resolution whatever the backbone's stride.

Coarser scales' canvases are 1/4, 1/16, ... of the finest and are freed as the next scale
is built, so more scales add at most a third to the canvases' share of the peak; they
multiply the compute (1, 4, 16, 64 ... patches per frame). In block mode nothing of MagNet's
depends on the image's size (the driver's row band of uint8 labels, block height x image
width bytes, is the only thing that grows, with the width); in whole-image mode the image
is at most 1.25x the finest scale per side. For the DeepGlobe preset (7 classes,
2448-px frames, ResNet-50 FPN) the peak RSS of the whole process, torch runtime included,
is measured by ``benchmarks/magnet_inference.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...budget import MemoryEstimate, inference_estimate, runtime_bytes
from ...geometry import Window
from ...inference.contract import SegmentationPredictor
from ...inference.planner import InferencePlan, plan_inference
from ...io.array import ArraySource
from ...io.base import read_resized
from ...io.normalize import Normalization
from .model import REFINE_BAND, REFINE_HALO, MagNet

__all__ = [
    "MagNetPredictor",
    "block_cells",
    "frame_around",
    "inference_estimate_for",
    "inference_plan",
    "magnet_predictor",
    "working_set_bytes",
]


def block_cells(block: Window, frame: tuple[int, int]) -> list[Window]:
    """``block`` split into the fewest equal cells no larger than ``frame``.

    Args:
        block: the block, in image pixels.
        frame: ``(h, w)``, the largest cell.

    Returns:
        The cells, row-major, tiling ``block`` exactly (sides differ by at most one pixel).
    """

    def edges(start: int, length: int, limit: int) -> list[int]:
        n = -(-length // limit)
        return [start + (i * length) // n for i in range(n + 1)]

    rows = edges(block.top, block.height, frame[0])
    cols = edges(block.left, block.width, frame[1])
    return [
        Window.from_bounds(top, left, bottom, right)
        for top, bottom in zip(rows, rows[1:])
        for left, right in zip(cols, cols[1:])
    ]


def frame_around(cell: Window, frame: tuple[int, int], height: int, width: int) -> Window:
    """The ``frame``-sized window centred on ``cell``, shifted to lie inside the image.

    Args:
        cell: a window of the image no larger than ``frame``.
        frame: ``(h, w)`` of the frame, at most the image's size.
        height: the image's height in pixels.
        width: the image's width in pixels.

    Returns:
        The frame's window, in image pixels; it contains ``cell``.
    """
    fh, fw = frame
    top = min(max(cell.top - (fh - cell.height) // 2, 0), height - fh)
    left = min(max(cell.left - (fw - cell.width) // 2, 0), width - fw)
    return Window(top, left, fh, fw)


def working_set_bytes(model, frame_pixels: int, block_pixels: int = 2048 * 2048) -> int:
    """Estimated bytes of MagNet's canvases while patches run, for a frame of ``frame_pixels``.

    The finest scale's accumulating canvas and paste count, the previous scale's prediction,
    the frame's uint8 pixels and one block of float32 output (see the module docstring).

    Args:
        model: a MagNet (its ``num_classes`` is read).
        frame_pixels: P, the frame's area in pixels.
        block_pixels: the area of one output block (the driver's default 2048x2048); the
            output counted is at most the frame's.

    Returns:
        The estimate in bytes.
    """
    classes = model.num_classes
    canvases = (classes + classes / 4 + 1) * 4 * frame_pixels
    return int(canvases + 3 * frame_pixels + 4 * classes * min(block_pixels, frame_pixels))


def inference_estimate_for(model: MagNet, device="cpu") -> MemoryEstimate:
    """Memory of MagNet prediction: a finest-scale frame's canvases and the process, plus per patch.

    Per patch: the larger of the backbone's inference estimate on an input-size patch and the
    refinement module's on one band of rows (how it runs). Fixed: :func:`working_set_bytes` of
    a finest-scale frame and what the process holds already (on the CPU its resident memory,
    model included; on an accelerator the parameters).

    Args:
        model: a MagNet.
        device: where it runs.

    Returns:
        The ``MemoryEstimate``.
    """
    ih, iw = model.input_size
    backbone = inference_estimate(model.backbone, (torch.zeros(1, model.in_channels, ih, iw),))
    band = min(ih, REFINE_BAND + 2 * REFINE_HALO)
    refinement = inference_estimate(model.refinement, (torch.zeros(1, model.num_classes, band, iw),) * 2)
    fh, fw = model.scales[-1]
    runtime = runtime_bytes(device)
    fixed = runtime + working_set_bytes(model, fh * fw)
    if runtime == 0:  # on an accelerator the parameters are not in a resident-memory figure
        fixed += backbone.fixed + refinement.fixed
    return MemoryEstimate(fixed=int(fixed), per_sample=max(backbone.per_sample, refinement.per_sample))


def inference_plan(
    model: MagNet, device="cpu", max_memory: int | None = None, default: int | None = None
) -> InferencePlan:
    """Patches per backbone/refinement pass that fit ``max_memory`` next to a frame's canvases.

    Args:
        model: a MagNet.
        device: where it runs.
        max_memory: the budget in bytes, or None.
        default: patches per pass without a budget; None: 1 on the CPU (batching buys little
            there and costs memory), 4 elsewhere.

    Returns:
        The ``InferencePlan``.

    Raises:
        BudgetError: not even one patch fits.
    """
    if default is None:
        default = 1 if torch.device(device).type == "cpu" else 4
    fh, fw = model.scales[-1]
    return plan_inference(
        max_memory,
        lambda _block: inference_estimate_for(model, device),
        f"magnet prediction with {fh}x{fw} frames",
        default=default,
    )


class MagNetPredictor(SegmentationPredictor):
    """MagNet over a whole image of any size; see the module docstring for the two modes.

    ``refine`` None follows the model's ``refines`` (its ``refine`` option and
    ``refinement_trained`` flag: the backbone alone at the coarsest scale until the
    refinement stage has run); True / False force it.

    Args:
        model: a MagNet.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        sub_batch: patches per backbone / refinement pass.
        precision: "32", "bf16-mixed" or "16-mixed".
        refine: None follows the model; True / False force refinement on or off.
    """

    def __init__(
        self, model, normalization, device="cpu", sub_batch: int = 4, precision: str = "32", refine: bool | None = None
    ):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.refine = model.refines if refine is None else bool(refine)
        self.halo = max(model.scales[-1])
        #: one dict per frame predicted: its window and the per-scale trace (for tests and benchmarks)
        self.frames: list[dict] = []
        self.keep_trace = False

    def fast_networks(self):
        """The backbone on input-size patches and the refinement module on two predictions of them.

        Returns:
            Dotted path -> example input (``Predictor.fast_networks``).
        """
        ih, iw = self.model.input_size
        k = self.model.num_classes
        probs = torch.full((1, k, ih, iw), 1.0 / k, device=self.device)
        return {
            "backbone": torch.rand(1, self.model.in_channels, ih, iw, device=self.device),
            "refinement": (probs, probs.clone()),
        }

    def onnx_networks(self):
        """Both (plain tensors in and out).

        Returns:
            The paths ONNX Runtime runs (``Predictor.onnx_networks``).
        """
        return ("backbone", "refinement")

    def prepare(self, source):
        """Whole-image mode: MagNet on the whole image, kept as float16 on the CPU; else the frame size."""
        height, width = source.height, source.width
        if self.model.whole_image(height, width):
            probs = self.predict_frame(source, Window(0, 0, height, width))
            return {"mode": "whole", "probs": probs[0].to("cpu", torch.float16)}
        return {"mode": "blocks", "frame": self.model.frame_size(height, width)}

    def predict_block(self, source, context, window):
        """A crop of the kept prediction, or each cell of the block from a finest-scale frame around it."""
        if context["mode"] == "whole":
            return context["probs"][(slice(None), *window.slices)].float().numpy()
        out = None
        for cell in block_cells(window, context["frame"]):
            frame = frame_around(cell, context["frame"], source.height, source.width)
            probs = self.predict_frame(source, frame)
            if out is None:  # allocated after the first frame's work, not during it
                out = np.empty((self.num_classes, window.height, window.width), dtype=np.float32)
            inside = cell.relative_to(frame)
            out[(slice(None), *cell.relative_to(window).slices)] = probs[(0, slice(None), *inside.slices)].cpu().numpy()
            del probs
        return out

    def predict_frame(self, source, frame: Window) -> torch.Tensor:
        """MagNet's probabilities of one frame of ``source``.

        The frame's pixels are read once; patches are resized from them. With ``keep_trace``
        the per-scale trace is appended to :attr:`frames`.

        Args:
            source: the image.
            frame: the frame's window, in image pixels.

        Returns:
            float32 probabilities ``(1, C, frame.height, frame.width)`` on the device.
        """
        pixels = ArraySource(source.read(frame))
        size = tuple(self.model.input_size)

        def read_patches(windows: list[Window]) -> torch.Tensor:
            return torch.cat([self.to_tensor(read_resized(pixels, win, size)) for win in windows])

        trace = [] if self.keep_trace else None
        with torch.inference_mode():
            probs = self.model.infer_frame(
                read_patches,
                frame.shape,
                sub_batch=self.sub_batch,
                autocast=self.autocast,
                refine=self.refine,
                trace=trace,
            )
        if trace is not None:
            self.frames.append({"frame": frame, "trace": trace})
        return probs


def magnet_predictor(
    model: MagNet,
    normalization: Normalization,
    *,
    device="cpu",
    max_memory: int | None = None,
    precision: str = "32",
    refine: bool | None = None,
) -> MagNetPredictor:
    """MagNet's predictor, with patches per pass planned from ``max_memory``.

    Args:
        model: a MagNet.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: the budget in bytes, or None.
        precision: "32", "bf16-mixed" or "16-mixed".
        refine: None follows the model (the backbone alone until the refinement stage has
            trained); True / False force refinement on or off.

    Returns:
        A ``MagNetPredictor``.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    plan = inference_plan(model, device, max_memory)
    return MagNetPredictor(
        model, normalization, device=device, sub_batch=plan.sub_batch, precision=precision, refine=refine
    )
