"""MagNet's training recipe and whole-image predictor on the shared engine.

Training (``gigaseg train --method magnet --stage backbone|refinement|all``):

1. ``backbone``: the backbone alone on :class:`BackboneCrops` — random crops at a random
   scale (any of them, the coarsest being the whole frame) resized to the network input —
   with cross-entropy. Defaults are the authors' backbone run: SGD lr 1e-3, momentum 0.9,
   weight decay 5e-4, batch 12, 484 epochs, poly schedule.
2. ``refinement``: the backbone frozen (eval mode), the refinement module trained on
   :class:`RefinementPairs` — the coarse view (the whole frame at input size) and a fine
   crop at a random finer scale resized to input size; the coarse probabilities are
   cropped to the fine box (``gigaseg.tiling.crop_resize``) and resized to input size;
   loss: OHEM cross-entropy (threshold 0.7, at least 100000 pixels). SGD lr 1e-3, momentum
   0.9, weight decay 5e-4, batch 8, 50 epochs, lr x0.1 at epochs 10/20/30/40/45.
   Starting the stage sets the model's ``refinement_trained`` flag, so validation (and
   prediction) switch from the backbone alone to the whole method.

The stages hand over through checkpoints: ``--stage refinement --init <backbone run>``.
``--stage all`` runs both in one run folder (``best-backbone.ckpt`` then holds the best
backbone alone — MagNet's coarsest-scale prediction — and ``best.ckpt`` the best MagNet).

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
  without a budget).

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

from ..errors import ConfigError
from ..inference.interface import WholeImagePredictor
from ..io.array import ArraySource
from ..models.losses import FocalLoss, ohem_cross_entropy
from ..models.magnet import REFINE_BAND, REFINE_HALO
from ..tiling import crop_resize
from ..train.budget import MemoryEstimate, inference_estimate, plan_sub_batch, runtime_bytes
from ..train.recipe import Stage, StepContext
from ..train.views import SeededViews, rng_for
from ..window import Window

__all__ = [
    "BackboneCrops",
    "MagNetPredictor",
    "RefinementPairs",
    "backbone_step",
    "block_cells",
    "frame_around",
    "inference_sub_batch",
    "magnet_stages",
    "refinement_step",
]

IGNORE_INDEX = 255
#: OHEM settings of the refinement loss (MagNet, after HRNet-OCR)
OHEM_THRESH = 0.7
OHEM_MIN_KEPT = 100_000


# --------------------------------------------------------------------------- training views


def _flip(array: np.ndarray, axis: int) -> np.ndarray:
    return np.flip(array, axis=axis)


def read_resized(source, window: Window, size: tuple[int, int]) -> np.ndarray:
    """Image pixels of ``window`` resized to ``size``: area when shrinking, bilinear when enlarging.

    (Enlarging is what "area" would degrade to anyway; gigaseg.io's "area" also fails on
    enlarged interior windows at the moment.)
    """
    size = tuple(size)
    if size == window.shape:
        return source.read(window)
    shrinking = size[0] <= window.height and size[1] <= window.width
    return source.read(window, out_size=size, resample="area" if shrinking else "bilinear")


class _MagNetViews(SeededViews):
    """Shared plumbing: per-(seed, epoch, index) randomness, frames, normalisation."""

    def __init__(self, dataset, normalization, model, crops_per_image: int = 1, augment: bool = True, seed: int = 0):
        super().__init__(dataset, normalization, seed, crops_per_image)
        self.model = model
        self.augment = augment
        self.input_size = tuple(model.input_size)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.normalization.apply(np.ascontiguousarray(image)))

    def _frame(self, sample, rng) -> Window:
        """A frame of the image: the whole image, or a random finest-scale window of a large one."""
        height, width = sample.image.height, sample.image.width
        fh, fw = self.model.frame_size(height, width)
        return Window(int(rng.integers(height - fh + 1)), int(rng.integers(width - fw + 1)), fh, fw)

    def _read(self, sample, window: Window) -> tuple[np.ndarray, np.ndarray]:
        size = self.input_size
        image = read_resized(sample.image, window, size)
        label = sample.mask.read(window, out_size=size if size != window.shape else None, resample="nearest")[..., 0]
        return image, label


class BackboneCrops(_MagNetViews):
    """Backbone views: a random crop at a random scale (any of them), resized to the input size.

    At scale ``i`` a crop has the size of that scale's patches in frame pixels (the whole
    frame at scale 0). Augmentation: a random horizontal flip and a rotation by 0/90/180/270
    (0/180 when the input is not square), identical for image and label. Items: ``image``,
    ``label``, ``scale`` and ``window`` (the crop as image pixels ``[top, left, height, width]``).
    """

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        sample = self.dataset[index // self.crops_per_image]
        height, width = sample.image.height, sample.image.width
        geometry = self.model.frame_geometry(self.model.frame_size(height, width))
        scale = int(rng.integers(geometry.num_scales))
        ch, cw = geometry.windows(scale)[0].shape
        window = Window(int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1)), ch, cw)
        image, label = self._read(sample, window)
        if self.augment:
            if rng.random() < 0.5:
                image, label = _flip(image, 1), _flip(label, 1)
            square = self.input_size[0] == self.input_size[1]
            k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
            if k:
                image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
        return {"image": self._tensor(image), "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
                "index": index, "scale": scale, "window": torch.tensor([window.top, window.left, ch, cw])}


class RefinementPairs(_MagNetViews):
    """Refinement views: (coarse whole frame, fine random crop at a random finer scale).

    Items: ``coarse`` (the frame at input size), ``image`` (the fine crop at input size),
    ``label`` (the fine crop's labels at input size, nearest), ``box`` (the crop as a
    normalised box of the frame), and ``frame`` / ``window`` (both as image pixels
    ``[top, left, height, width]``). Augmentation: random horizontal and vertical flips of the
    whole pair (the box mirrored with them).
    """

    def __init__(self, dataset, normalization, model, crops_per_image: int = 1, augment: bool = True, seed: int = 0):
        super().__init__(dataset, normalization, model, crops_per_image, augment, seed)
        if model.num_scales < 2:
            raise ConfigError("magnet: the refinement stage needs at least two scales")

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        sample = self.dataset[index // self.crops_per_image]
        frame = self._frame(sample, rng)
        geometry = self.model.frame_geometry(frame.shape)
        scale = int(rng.integers(1, geometry.num_scales))
        ch, cw = geometry.windows(scale)[0].shape
        top, left = int(rng.integers(frame.height - ch + 1)), int(rng.integers(frame.width - cw + 1))
        crop = Window(frame.top + top, frame.left + left, ch, cw)
        size = self.input_size
        coarse = read_resized(sample.image, frame, size)
        fine, label = self._read(sample, crop)
        y0, x0, y1, x1 = top / frame.height, left / frame.width, (top + ch) / frame.height, (left + cw) / frame.width
        if self.augment:
            if rng.random() < 0.5:
                coarse, fine, label = _flip(coarse, 1), _flip(fine, 1), _flip(label, 1)
                x0, x1 = 1.0 - x1, 1.0 - x0
            if rng.random() < 0.5:
                coarse, fine, label = _flip(coarse, 0), _flip(fine, 0), _flip(label, 0)
                y0, y1 = 1.0 - y1, 1.0 - y0
        return {
            "coarse": self._tensor(coarse),
            "image": self._tensor(fine),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
            "box": torch.tensor([y0, x0, y1, x1], dtype=torch.float64),
            "index": index,
            "scale": scale,
            "frame": torch.tensor([frame.top, frame.left, frame.height, frame.width]),
            "window": torch.tensor([crop.top, crop.left, crop.height, crop.width]),
        }


# --------------------------------------------------------------------------- steps


def backbone_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Cross-entropy of the backbone's logits (training-mode forward), sub-batch by sub-batch."""
    images, labels = batch["image"], batch["label"]
    loss_fn = FocalLoss(gamma=0, ignore_index=IGNORE_INDEX)  # exactly cross-entropy, 0 when all is ignored
    total = images.new_zeros(())
    size = images.shape[0]
    for start in range(0, size, ctx.sub_batch):
        part = slice(start, start + ctx.sub_batch)
        weight = images[part].shape[0] / size
        loss = loss_fn(ctx.wrapped(images[part]), labels[part]) * weight
        ctx.backward(loss)
        total = total + loss.detach()
    return {"loss": total}


def refinement_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """OHEM cross-entropy of ``refinement(coarse crop, fine)`` against the fine crop's labels."""
    model = ctx.model
    size = tuple(model.input_size)
    coarse_images, images, labels = batch["coarse"], batch["image"], batch["label"]
    with torch.no_grad():
        coarse = torch.softmax(model.backbone(coarse_images).float(), dim=1)
        coarse = crop_resize(coarse, batch["box"], size)
    total = images.new_zeros(())
    count = images.shape[0]
    for start in range(0, count, ctx.sub_batch):
        part = slice(start, start + ctx.sub_batch)
        weight = images[part].shape[0] / count
        logits = ctx.wrapped(images[part], coarse[part])
        loss = ohem_cross_entropy(logits, labels[part], thresh=OHEM_THRESH, min_kept=OHEM_MIN_KEPT,
                                  ignore_index=IGNORE_INDEX) * weight
        ctx.backward(loss)
        total = total + loss.detach()
    return {"loss": total}


def magnet_stages(model) -> list[Stage]:
    """The two stages (one when only one scale is configured); paper hyperparameters as defaults."""
    ih, iw = model.input_size
    crops = model.options["crops_per_image"]
    stages = [Stage(
        name="backbone", epochs=484, lr=1e-3, batch_size=12, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
        schedule="poly", sub_batch=12,
        make_data=lambda data, norm, settings: BackboneCrops(data, norm, model, crops_per_image=crops,
                                                             seed=settings.seed),
        step=backbone_step,
        trainable=lambda m: [m.backbone],
        frozen_eval=lambda m: [m.refinement],
        sample_inputs=lambda m: (torch.zeros(1, m.in_channels, ih, iw),),
    )]
    if model.num_scales > 1:
        stages.append(Stage(
            name="refinement", epochs=50, lr=1e-3, batch_size=8, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
            schedule="step", milestones=(10, 20, 30, 40, 45), gamma=0.1, sub_batch=8,
            make_data=lambda data, norm, settings: RefinementPairs(data, norm, model, crops_per_image=crops,
                                                                   seed=settings.seed),
            step=refinement_step,
            trainable=lambda m: [m.refinement],
            frozen_eval=lambda m: [m.backbone],
            sample_inputs=lambda m: (torch.zeros(1, m.in_channels, ih, iw),
                                     torch.full((1, m.num_classes, ih, iw), 1.0 / m.num_classes)),
            before_stage=lambda m: m.mark_refinement_trained(),
        ))
    return stages


# --------------------------------------------------------------------------- prediction


def block_cells(block: Window, frame: tuple[int, int]) -> list[Window]:
    """``block`` split into the fewest equal cells (row-major) no larger than ``frame`` (h, w)."""
    def edges(start: int, length: int, limit: int) -> list[int]:
        n = -(-length // limit)
        return [start + (i * length) // n for i in range(n + 1)]

    rows = edges(block.top, block.height, frame[0])
    cols = edges(block.left, block.width, frame[1])
    return [Window.from_bounds(t, l, b, r) for t, b in zip(rows, rows[1:]) for l, r in zip(cols, cols[1:])]


def frame_around(cell: Window, frame: tuple[int, int], height: int, width: int) -> Window:
    """The ``frame``-sized window centred on ``cell``, shifted to lie inside the image."""
    fh, fw = frame
    top = min(max(cell.top - (fh - cell.height) // 2, 0), height - fh)
    left = min(max(cell.left - (fw - cell.width) // 2, 0), width - fw)
    return Window(top, left, fh, fw)


def working_set_bytes(model, frame_pixels: int, block_pixels: int = 2048 * 2048) -> int:
    """Estimated bytes of MagNet's canvases while patches run, for a frame of ``frame_pixels``.

    The finest scale's accumulating canvas and paste count, the previous scale's prediction,
    the frame's uint8 pixels and one block of float32 output (see the module docstring).
    """
    classes = model.num_classes
    canvases = (classes + classes / 4 + 1) * 4 * frame_pixels
    return int(canvases + 3 * frame_pixels + 4 * classes * min(block_pixels, frame_pixels))


def inference_sub_batch(model, device, max_memory: int | None, default: int | None = None) -> int:
    """Patches per backbone/refinement pass that fit ``max_memory`` next to a frame's canvases.

    Without a budget: 1 on the CPU (batching buys little there and costs memory), 4
    elsewhere. With one: ``gigaseg.train.budget``'s inference estimates of the backbone on
    an input-size patch and of the refinement module on one band of rows (how it runs),
    the larger per patch, plus :func:`working_set_bytes` of a finest-scale frame and what
    the process holds already (on the CPU its resident memory, model included).
    """
    if default is None:
        default = 1 if torch.device(device).type == "cpu" else 4
    ih, iw = model.input_size
    backbone = inference_estimate(model.backbone, (torch.zeros(1, model.in_channels, ih, iw),))
    band = min(ih, REFINE_BAND + 2 * REFINE_HALO)
    refinement = inference_estimate(model.refinement, (torch.zeros(1, model.num_classes, band, iw),) * 2)
    fh, fw = model.scales[-1]
    runtime = runtime_bytes(device)
    fixed = runtime + working_set_bytes(model, fh * fw)
    if runtime == 0:  # on an accelerator the parameters are not in a resident-memory figure
        fixed += backbone.fixed + refinement.fixed
    estimate = MemoryEstimate(fixed=int(fixed), per_sample=max(backbone.per_sample, refinement.per_sample))
    return plan_sub_batch(max_memory, estimate, f"magnet prediction with {fh}x{fw} frames", default=default,
                          maximum=32)


class MagNetPredictor(WholeImagePredictor):
    """MagNet over a whole image of any size; see the module docstring for the two modes.

    ``refine`` None follows the model's ``refines`` (its ``refine`` option and
    ``refinement_trained`` flag: the backbone alone at the coarsest scale until the
    refinement stage has run); True / False force it.
    """

    def __init__(self, model, normalization, device="cpu", sub_batch: int = 4, precision: str = "32",
                 refine: bool | None = None):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.refine = model.refines if refine is None else bool(refine)
        self.halo = max(model.scales[-1])
        #: one dict per frame predicted: its window and the per-scale trace (for tests and benchmarks)
        self.frames: list[dict] = []
        self.keep_trace = False

    def prepare(self, source):
        height, width = source.height, source.width
        if self.model.whole_image(height, width):
            probs = self.predict_frame(source, Window(0, 0, height, width))
            return {"mode": "whole", "probs": probs[0].to("cpu", torch.float16)}
        return {"mode": "blocks", "frame": self.model.frame_size(height, width)}

    def predict_block(self, source, context, window):
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
        """MagNet's probabilities ``(1, C, h, w)`` (float32, on the device) of one frame of ``source``."""
        pixels = ArraySource(source.read(frame))
        size = tuple(self.model.input_size)

        def read_patches(windows: list[Window]) -> torch.Tensor:
            return torch.cat([self.to_tensor(read_resized(pixels, win, size)) for win in windows])

        trace = [] if self.keep_trace else None
        with torch.inference_mode():
            probs = self.model.infer_frame(read_patches, frame.shape, sub_batch=self.sub_batch,
                                           autocast=self.autocast, refine=self.refine, trace=trace)
        if trace is not None:
            self.frames.append({"frame": frame, "trace": trace})
        return probs
