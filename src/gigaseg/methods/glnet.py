"""GLNet's training recipe and whole-image predictor on the shared engine.

Training (``gigaseg train --method glnet --stage S``; the network is
``gigaseg.models.glnet.GLNet``). Paper defaults, overridable with --epochs/--lr/--batch-size:

| stage | trains | frozen (eval) | epochs | lr |
|---|---|---|---|---|
| ``global`` | global encoder + FPN | local | 120 | 5e-5 |
| ``global2local`` | local encoder + FPN, ensemble | global | 50 | 2e-5 |
| ``local2global`` | global incl. ``_ext``, ensemble | local, stage-1 global copy | 120 | 5e-5 |

Adam, weight decay 5e-4, poly schedule (power 0.9, per iteration), batches of 6 images.
``--stage all`` runs the three in order; a single later stage starts from the previous
stage's run with ``--init`` (a ConfigError says so otherwise). When ``local2global`` starts
from a ``global2local`` model, ``before_stage`` copies the (stage-1) global branch into the
frozen ``global_fixed`` that keeps feeding the local branch.

Stages 2 and 3 see one item per image (:class:`GLNetViews`): the global view (the whole
image resized to ``size_g``), all patches of GLNet's grid at full resolution with their
labels and normalised boxes, all cut from the image after ONE random flip/rotation, so the
global and the local views are augmented identically. A step processes the images of the
batch one by one: the global features once per image (frozen, no_grad), then the patches in
sub-batches, each with its own backward; the loop makes one optimiser step per image batch.
Sub-batches hold the paper's 6 patches, or what ``--max-memory`` allows: stages 2 and 3 plan
them with GLNet's own estimate (:func:`training_estimate`, calibrated on measured peaks) when
their data is built, and raise ``BudgetError`` before training when even one patch does not
fit; stage 1 splits its batch of global views by the training loop's plan. Each sub-batch
loss is weighted by ``patches / 6`` (stage 1: ``views / batch``), so the gradient equals the
paper's whatever sub-batch the budget allows (up to BatchNorm's batch statistics). Losses (focal, gamma 3, labels nearest-resized to the logits):

- stage 1: FL(global);
- stage 2: per sub-batch FL(local) + FL(ensemble) + fmreg * MSE(ps3_local, ps3_global crop);
- stage 3: the frozen local branch runs over all patches (fed by the stage-1 global copy) and
  its maps are merged onto the global grid; then FL(global through the ``_ext`` layers) and,
  per sub-batch, FL(ensemble). The ensemble losses reach the global branch through one
  leaf tensor holding the global ps3, so the global graph is backpropagated once per image
  (no ``retain_graph``); the local maps are recomputed for the ensemble instead of being kept
  (36 patches' ps3 maps would take 1.2 GB per 2448 px image).

Prediction (:class:`GLNetPredictor`, through ``gigaseg predict`` / ``gigaseg.api.predict``):

- ``prepare`` reads the thumbnail ``source.read(out_size=(size_g, size_g))`` once and keeps
  the global features (stage 1: the global probabilities). Stage 3 also runs the local branch
  over every patch of the image, in sub-batches, keeping only the merged local -> global
  maps at global-feature resolution, and then the global branch through the ``_ext`` layers.
  What ``prepare`` keeps is a few global-resolution maps (about 120 MB for ResNet-50 at 508
  px), whatever the image size.
- ``predict_block`` evaluates the patches of GLNet's grid over the WHOLE image that touch the
  block, in sub-batches sized by ``--max-memory`` (:func:`inference_estimate`: the process's
  resident memory, the context, one block's buffers, and a per-patch figure calibrated on
  measured peaks; 2 patches without a budget); each gets crops of the global features;
  the ensemble logits, upsampled to the patch size, are averaged where patches overlap (as
  GLNet does: logits, uniform weights) and softmaxed. Blocks therefore have no seams; the
  logits of patches shared with the next block of a row are cached, those shared with the
  next row band are computed again. The probabilities are returned in one buffer per image
  (see :class:`GLNetPredictor`).

Measured (benchmarks/results/glnet_memory.md): ``gigaseg predict --max-memory 2GB`` of a
6749 x 4499 scene with ResNet-50 branches peaks below 2 GB for stage-2 and stage-3 models
on CPU, fp32; stage-2 training on 2448 px scenes with ``--max-memory 4GB`` stays below 4 GB.

Huge images, ``global_context="image"`` (the default, as the paper): the global view is the
whole image at ``size_g`` whatever its size. Memory stays bounded (the global maps have a
fixed size: 119 MB for ResNet-50 at 508 px), but for a 20000 x 20000 image a 508 px view is a
40x downsample, against 4.8x for the 2448 px scenes GLNet trains on, and each 508 px patch
covers about 3 x 3 cells of the global c2 map (26 x 26 for a 2448 px scene): the global branch
sees a scale it never trained on, and the local branch gets little context.
``global_context="tile"`` (``gigaseg.methods.glnet_tiles``) keeps the training scale: each
block is predicted by GLNet on the ``context_tile``-px tile around it (by default the training
scenes' side, recorded in the weights by training), at the cost of context farther than a tile
and of the tiles' overlap.

Measured (benchmarks/results/glnet_global_view.md): a GLNet trained on 1536 px synthetic scenes
(512 px global view, a 3x downsample) scores 0.447 mIoU on 1536 px scenes. On 6144 px scenes
of the same generator (a 12x downsample) it scores 0.305 with the whole-image view and 0.421
with 1536 px tiles, where the patch baseline goes from 0.404 to 0.433: the whole-image view
loses 0.171 mIoU against the baseline, the tiles 0.055, at 1.34 and 1.13 GB peaks; the tiles
run at 0.12 Mpx/s against 0.19. For images well beyond the training scenes' side, predict with
``--set global_context=tile`` (the tile is the training scenes' side unless
``--set context_tile=...`` says otherwise; checkpoints from before it was recorded use 2448).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..inference.interface import WholeImagePredictor
from ..inference.patches import bounding_window, patches_touching
from ..inference.heap import release_free_memory
from ..inference.stream import block_size_for
from ..inference.upsample import upsample_window
from ..io.normalize import Normalization
from ..io.resample import resize as resize_array
from ..models.encoders import Encoder
from ..models.fpn import FPNFeatures, resize
from ..models.glnet import STAGES, LocalToGlobal
from ..models.losses import FocalLoss
from ..tiling import PatchGrid, normalized_box
from ..train.budget import MemoryEstimate, leaf_output_bytes, parameter_bytes, plan_sub_batch, runtime_bytes
from ..train.recipe import Stage, StepContext
from ..train.views import GlobalViews, SeededViews, rng_for
from ..window import Window

__all__ = ["GLNetViews", "GLNetPredictor", "GLNetContext", "glnet_stages", "inference_estimate",
           "inference_sub_batch", "training_estimate", "training_sub_batch", "patch_bytes", "read_patches",
           "stitch_logits", "PAPER_SUB_BATCH"]

#: patches per backward in the paper; sub-batch losses are weighted by (patches / this)
PAPER_SUB_BATCH = 6
IGNORE_INDEX = 255
_SHARED = frozenset(("c", "p", "ps1", "ps2"))


# --------------------------------------------------------------------------- training views


def _augment(array: np.ndarray, flip: bool, k: int) -> np.ndarray:
    """Horizontal flip then rotation by ``k`` x 90 degrees (as ``views.augment_pair``), HW or HWC."""
    if flip:
        array = array[:, ::-1]
    if k:
        array = np.rot90(array, k, axes=(0, 1))
    return np.ascontiguousarray(array)


def _pad_value(normalization: Normalization, dtype: np.dtype) -> np.ndarray:
    """Raw pixel value per channel that normalises to (about) 0: the mean colour."""
    value = np.asarray(normalization.mean, dtype=np.float64) * normalization.scale
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        value = np.clip(np.round(value), info.min, info.max)
    return value.astype(dtype)


class GLNetViews(SeededViews):
    """One item per image: its global view and every patch of GLNet's grid, augmented alike.

    Item keys: ``global`` (normalised float32 ``(C, size_g, size_g)``), ``global_label``
    (``(size_g, size_g)``, nearest), ``patches`` (raw pixels ``(N, C, size_p, size_p)``;
    uint8 stays uint8, other integers become int32, floats float32: 4x less memory than
    normalised floats for 8-bit images), ``patch_labels`` (``(N, size_p, size_p)``; uint8 masks
    stay uint8, others become int64),
    ``boxes`` (``(N, 4)`` normalised boxes on the augmented image), ``norm`` (``(2, C)``:
    the step normalises as ``x * norm[0] - norm[1]``), ``index``.

    Patches reaching past the border (images smaller than a patch) are padded with the mean
    colour (normalised to about 0, as the predictor pads) and label ``255`` (ignored).
    Randomness comes from ``rng_for(seed, epoch, index)``.
    """

    def __init__(self, dataset, normalization: Normalization, size_g: int, size_p: int, min_overlap: int,
                 augment: bool = True, seed: int = 0):
        super().__init__(dataset, normalization, seed)
        self.size_g = int(size_g)
        self.size_p = int(size_p)
        self.min_overlap = int(min_overlap)
        self.augment = augment
        a = [1.0 / (normalization.scale * s) for s in normalization.std]
        b = [m / s for m, s in zip(normalization.mean, normalization.std)]
        self._norm = torch.tensor([a, b], dtype=torch.float32)

    def __getitem__(self, index: int) -> dict:
        rng = rng_for(self.seed, self.epoch, index)
        flip, k = (bool(rng.random() < 0.5), int(rng.integers(4))) if self.augment else (False, 0)
        sample = self.dataset[index]
        image = _augment(sample.image.read(), flip, k)
        label = _augment(sample.mask.read()[..., 0], flip, k)
        height, width = label.shape
        size_g = (self.size_g, self.size_g)
        view = resize_array(image, size_g, "area")
        view_label = resize_array(label, size_g, "nearest")

        grid = PatchGrid.glnet(height, width, self.size_p, self.min_overlap)
        if grid.needs_padding:
            ph, pw = grid.padded_shape
            padded = np.empty((ph, pw, image.shape[2]), dtype=image.dtype)
            padded[...] = _pad_value(self.normalization, image.dtype)
            padded[:height, :width] = image
            image = padded
            padded_label = np.full((ph, pw), IGNORE_INDEX, dtype=label.dtype)
            padded_label[:height, :width] = label
            label = padded_label
        patches = np.stack([image[w.slices] for w in grid.windows]).transpose(0, 3, 1, 2)
        patch_labels = np.stack([label[w.slices] for w in grid.windows])
        if patches.dtype != np.uint8:
            patches = patches.astype(np.int32 if np.issubdtype(patches.dtype, np.integer) else np.float32)
        return {
            "global": torch.from_numpy(self.normalization.apply(view)),
            "global_label": torch.from_numpy(view_label.astype(np.int64)),
            "patches": torch.from_numpy(np.ascontiguousarray(patches)),
            "patch_labels": torch.from_numpy(patch_labels if patch_labels.dtype == np.uint8
                                             else patch_labels.astype(np.int64)),
            "boxes": torch.tensor(grid.normalized_boxes(), dtype=torch.float32),
            "norm": self._norm.clone(),
            "index": index,
        }


def image_sizes(dataset) -> list[tuple[int, int, str]]:
    """``(height, width, name)`` of every image of ``dataset``, read once when a stage builds its data."""
    sizes = []
    for index in range(len(dataset)):
        sample = dataset[index]
        try:
            image = sample.image
            sizes.append((image.height, image.width, getattr(image, "path", None) or f"image {index}"))
        finally:
            sample.close()
    return sizes


def median_longer_side(sizes: list[tuple[int, int, str]]) -> int:
    """The median of the training images' longer sides: the scene side the model learns its
    global view at, recorded in the weights (``GLNet.scene_side``) for the "tile" policy."""
    return int(np.median([max(h, w) for h, w, _ in sizes])) if sizes else 0


def _same_sized(sizes: list[tuple[int, int, str]], batch_size: int) -> None:
    """Batches stack whole images with all their patches: sizes must agree when batch_size > 1."""
    if batch_size <= 1:
        return
    first = sizes[0] if sizes else None
    for other in sizes[1:]:
        if other[:2] != first[:2]:
            raise ConfigError(f"glnet batches whole images with all their patches, so its training images must "
                              f"all have one size: {first[2]} is {first[0]}x{first[1]} but {other[2]} is "
                              f"{other[0]}x{other[1]}; train with --batch-size 1 (or tile the images to one size)")


# --------------------------------------------------------------------------- steps


def _focal(model) -> FocalLoss:
    return FocalLoss(gamma=model.options["focal_gamma"], ignore_index=IGNORE_INDEX)


def _labels_like(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels ``(N, H, W)`` resized (nearest, pixel centres) to the logits' size."""
    size = tuple(logits.shape[-2:])
    if tuple(labels.shape[-2:]) != size:
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0]
    return labels.long()


def _normalise(patches: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    a, b = norm[0].view(-1, 1, 1), norm[1].view(-1, 1, 1)
    return patches.float() * a - b


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(j, min(j + size, count)) for j in range(0, count, max(1, size))]


def _sub_batch(ctx: StepContext) -> int:
    """Patches per backward: GLNet's own plan under --max-memory (stages 2, 3), else the loop's."""
    return int(ctx.stage.options.get("sub_batch") or ctx.sub_batch)


def global_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Stage 1: focal loss of the global branch on the global views (in sub-batches when memory is short)."""
    focal = _focal(ctx.model)
    images = batch["image"].shape[0]
    total = 0.0
    for part in _chunks(images, ctx.sub_batch):
        features = ctx.wrapped(batch["image"][part], "global", keep=frozenset({"logits"}))
        loss = focal(features.logits, _labels_like(batch["label"][part], features.logits))
        n = features.logits.shape[0]
        ctx.backward(loss * (n / images))
        total += float(loss.detach()) * n
    return {"loss": torch.tensor(total / max(images, 1))}


def global2local_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Stage 2: per image, frozen global features once; per patch sub-batch local + ensemble + fmreg, backward."""
    model, focal = ctx.model, _focal(ctx.model)
    fmreg = model.options["fmreg"]
    sums = {"loss": 0.0, "loss_local": 0.0, "loss_ensemble": 0.0, "loss_fmreg": 0.0}
    total = 0
    for i in range(batch["global"].shape[0]):
        with torch.no_grad():
            context = ctx.wrapped(batch["global"][i:i + 1], "global", keep=_SHARED | {"ps3"})
        norm = batch["norm"][i]
        for part in _chunks(batch["patches"].shape[1], _sub_batch(ctx)):
            patches = _normalise(batch["patches"][i, part], norm)
            boxes = batch["boxes"][i, part]
            out = ctx.wrapped(patches, "local", boxes=boxes, context=context, keep=frozenset({"ps3", "logits"}))
            labels = _labels_like(batch["patch_labels"][i, part], out.local.logits)
            local = focal(out.local.logits, labels)
            ensemble = focal(out.ensemble, labels)
            reg = F.mse_loss(out.local.ps3.float(), out.global_ps3.float())
            loss = local + ensemble + fmreg * reg
            n = patches.shape[0]
            ctx.backward(loss * (n / PAPER_SUB_BATCH))
            for key, value in (("loss", loss), ("loss_local", local), ("loss_ensemble", ensemble), ("loss_fmreg", reg)):
                sums[key] += float(value.detach()) * n
            total += n
    return {k: torch.tensor(v / max(total, 1)) for k, v in sums.items()}


def local2global_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Stage 3: merged frozen local maps -> global through ``_ext``; FL(global) + per sub-batch FL(ensemble)."""
    model, focal = ctx.model, _focal(ctx.model)
    sums = {"loss_global": 0.0, "loss_ensemble": 0.0}
    images = batch["global"].shape[0]
    patches_seen = 0
    for i in range(images):
        view = batch["global"][i:i + 1]
        norm = batch["norm"][i]
        count = batch["patches"].shape[1]
        with torch.no_grad():
            fixed = ctx.wrapped(view, "global", fixed=True, keep=_SHARED)
            merger = LocalToGlobal.like(fixed)
            for part in _chunks(count, _sub_batch(ctx)):
                boxes = batch["boxes"][i, part]
                local = ctx.wrapped(_normalise(batch["patches"][i, part], norm), "local", boxes=boxes, context=fixed,
                                    ensemble=False, keep=_SHARED)
                merger.add(local.local, boxes)
                del local
            merged = merger.result()
            del merger
        glob = ctx.wrapped(view, "global", merged=merged, keep=frozenset({"ps3", "logits"}))
        loss_global = focal(glob.logits, _labels_like(batch["global_label"][i:i + 1], glob.logits))
        # the ensemble losses reach the global branch through this leaf: one backward of the global graph
        leaf = glob.ps3.detach().requires_grad_(True)
        leaf_grad = torch.zeros_like(leaf)
        for part in _chunks(count, _sub_batch(ctx)):
            boxes = batch["boxes"][i, part]
            with torch.no_grad():
                local = ctx.wrapped(_normalise(batch["patches"][i, part], norm), "local", boxes=boxes, context=fixed,
                                    ensemble=False, keep=frozenset({"ps3"}))
            logits = ctx.wrapped(local.local.ps3, "ensemble", global_ps3=leaf, boxes=boxes)
            labels = _labels_like(batch["patch_labels"][i, part], logits)
            loss = focal(logits, labels)
            weighted = loss * (logits.shape[0] / PAPER_SUB_BATCH)
            (grad,) = torch.autograd.grad(weighted, leaf, retain_graph=True)
            leaf_grad += grad
            ctx.backward(weighted)  # the ensemble head's own gradient (precision plugins may scale it)
            sums["loss_ensemble"] += float(loss.detach()) * logits.shape[0]
            patches_seen += logits.shape[0]
        ctx.backward(loss_global + (glob.ps3 * leaf_grad.to(glob.ps3.dtype)).sum())
        sums["loss_global"] += float(loss_global.detach())
    loss_global = sums["loss_global"] / max(images, 1)
    loss_ensemble = sums["loss_ensemble"] / max(patches_seen, 1)
    return {"loss": torch.tensor(loss_global + loss_ensemble), "loss_global": torch.tensor(loss_global),
            "loss_ensemble": torch.tensor(loss_ensemble)}


def _starting(stage: int):
    """``before_stage`` hook: check the hand-over, copy the stage-1 global branch for stage 3, record the stage."""
    name = STAGES[stage - 1]

    def hook(model) -> None:
        previous = int(model.trained_stage)
        if stage > 1 and previous < stage - 1:
            trained = STAGES[previous - 1] if previous else "nothing yet (fresh weights)"
            raise ConfigError(f"glnet stage {name!r} continues a {STAGES[stage - 2]!r} run, as in the paper: pass "
                              f"--init <that run's folder or checkpoint> (this model's weights have trained: {trained})")
        if stage == 3 and previous < 3:
            model.copy_global_to_fixed()  # the local branch keeps the global features it was trained with
        model.set_stage(stage)

    return hook


def glnet_stages(model) -> list[Stage]:
    """The paper's three stages (see the module docstring)."""
    size_g, size_p, overlap = model.options["size_g"], model.options["size_p"], model.options["min_overlap"]
    channels = model.in_channels

    def global_views(data, norm, settings):
        model.scene_side.fill_(median_longer_side(image_sizes(data)))
        return GlobalViews(data, norm, (size_g, size_g), seed=settings.seed)

    def patch_views(stage: Stage):
        def make(data, norm, settings):
            batch_size = settings.batch_size or stage.batch_size
            sizes = image_sizes(data)
            _same_sized(sizes, batch_size)
            model.scene_side.fill_(median_longer_side(sizes))
            views = GLNetViews(data, norm, size_g, size_p, overlap, seed=settings.seed)
            stage.options["sub_batch"] = training_sub_batch(model, stage.name, views, batch_size, settings)
            return views

        return make

    common: dict[str, Any] = {"batch_size": 6, "weight_decay": 5e-4, "optimizer": "adam", "schedule": "poly",
                              "sub_batch": PAPER_SUB_BATCH}
    stages = [
        # stage 1 splits its batch of global views by the loop's own plan (sample_inputs)
        Stage(name="global", epochs=120, lr=5e-5, make_data=global_views, step=global_step,
              trainable=lambda m: [m.global_branch],
              # not global_fixed: until stage 3 it shares the global branch's tensors (freezing it would
              # freeze them); it does not run in this stage
              frozen_eval=lambda m: [m.local_branch, m.global_ext],
              sample_inputs=lambda m: (torch.zeros(1, channels, size_g, size_g), "global"),
              before_stage=_starting(1), **common),
        # stages 2 and 3 plan their patch sub-batches themselves (training_sub_batch), in make_data
        Stage(name="global2local", epochs=50, lr=2e-5, make_data=None, step=global2local_step,
              trainable=lambda m: [m.local_branch, m.ensemble],
              frozen_eval=lambda m: [m.global_branch, m.global_ext, m.global_fixed],
              before_stage=_starting(2), **common),
        Stage(name="local2global", epochs=120, lr=5e-5, make_data=None, step=local2global_step,
              trainable=lambda m: [m.global_branch, m.global_ext, m.ensemble],
              frozen_eval=lambda m: [m.local_branch, m.global_fixed],
              before_stage=_starting(3), **common),
    ]
    for stage in stages[1:]:
        stage.make_data = patch_views(stage)
    return stages


# --------------------------------------------------------------------------- prediction


@dataclass
class GLNetContext:
    """What ``prepare`` computes once per image (returned, never stored on the predictor)."""

    stage: int
    image_shape: tuple[int, int]
    probs: torch.Tensor | None = None            # stage 1: global probabilities (1, K, h, w)
    grid: PatchGrid | None = None                # stages 2, 3: GLNet's grid over the whole image
    context: FPNFeatures | None = None           # the global maps the local branch crops
    ensemble_from: torch.Tensor | None = None    # the global ps3 the ensemble crops
    cache: dict = field(default_factory=dict)    # logits of patches shared with the next block of the row
    output: torch.Tensor | None = None           # the buffer predict_block returns its probabilities in

    def nbytes(self) -> int:
        tensors = [self.probs, self.ensemble_from]
        if self.context is not None:
            tensors += [*self.context.c, *self.context.p, *self.context.ps1, *self.context.ps2, self.context.ps3]
        seen, total = set(), 0
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def read_patches(source, windows: list[Window], to_tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Normalised patches ``(N, C, ph, pw)`` read as one region, zero-padded where they pass the border."""
    region = bounding_window(windows).clip(source.height, source.width)
    pixels = to_tensor(source.read(region))
    out = []
    for window in windows:
        rel = window.relative_to(region)
        crop = pixels[:, :, rel.top:rel.bottom, rel.left:rel.right]
        pad_h, pad_w = patch[0] - crop.shape[-2], patch[1] - crop.shape[-1]
        if pad_h > 0 or pad_w > 0:
            crop = F.pad(crop, (0, max(pad_w, 0), 0, max(pad_h, 0)))
        out.append(crop)
    return torch.cat(out)


def stitch_logits(source, grid: PatchGrid, block: Window, patch_logits, to_tensor, num_classes: int,
                  sub_batch: int, cache: dict | None = None, out: torch.Tensor | None = None) -> np.ndarray:
    """Class probabilities ``(K, h, w)`` of ``block``: softmax of the patch logits averaged over overlaps.

    Like ``inference.patches.stitch_block`` (the grid's patches touching the block;
    ``cache``, a dict kept per image with blocks visited in row-major order, carries the
    logits of patches shared with the next block of the row), but GLNet averages logits, not
    probabilities, with uniform weights, and pixels are read per sub-batch (one sub-batch's
    bounding region), not per block. ``patch_logits(batch, windows)`` gives logits
    ``(N, K, h, w)`` at any resolution (GLNet's: 1/4 of the patch); each is upsampled
    bilinearly to the patch size when added, and cached at its own resolution. The overlap
    count of a product grid is separable (rows covered x columns covered), so no count map
    is stored. ``out``, a flat float32 CPU tensor of at least ``K * h * w`` elements, holds
    the result (the returned array is a view of it).
    """
    windows = patches_touching(grid, block)
    cached = cache if cache is not None else {}
    todo = [w for w in windows if w not in cached]
    size = num_classes * block.height * block.width
    if out is None or out.numel() < size:
        out = torch.empty(size)
    accum = out[:size].view(num_classes, block.height, block.width).zero_()
    ph, pw = grid.patch

    def add(window: Window, logits: torch.Tensor) -> None:
        inside = window.intersection(block)
        src, dst = inside.relative_to(window), inside.relative_to(block)
        full = resize(logits[None], (ph, pw))[0]
        accum[(slice(None), *dst.slices)] += full[(slice(None), *src.slices)]

    for window in windows:
        if window in cached:
            add(window, cached[window])
            if window.right <= block.right:  # not needed by later blocks: release it now
                del cached[window]
    keep = {}
    for start in range(0, len(todo), sub_batch):
        chunk = todo[start:start + sub_batch]
        logits = patch_logits(read_patches(source, chunk, to_tensor, grid.patch), chunk).float().cpu()
        for window, patch in zip(chunk, logits):
            add(window, patch)
            if window.right > block.right:
                keep[window] = patch.clone()
        del logits
    if cache is not None:
        kept_before = {w: p for w, p in cache.items() if w.right > block.right}
        cache.clear()
        cache.update(kept_before)
        cache.update(keep)
    rows, cols = torch.zeros(block.height), torch.zeros(block.width)
    for top in {w.top for w in windows}:
        rows[max(top, block.top) - block.top:min(top + ph, block.bottom) - block.top] += 1
    for left in {w.left for w in windows}:
        cols[max(left, block.left) - block.left:min(left + pw, block.right) - block.left] += 1
    accum /= rows.clamp_min(1).view(1, -1, 1)
    accum /= cols.clamp_min(1).view(1, 1, -1)
    accum -= accum.amax(dim=0, keepdim=True)  # softmax in place: one block-sized buffer
    accum.exp_()
    accum /= accum.sum(dim=0, keepdim=True)
    return accum.numpy()


class GLNetPredictor(WholeImagePredictor):
    """Whole-image GLNet prediction for a model of any stage (see the module docstring).

    Memory: the probabilities ``predict_block`` returns for stages 2 and 3 live in one buffer
    per image (in the context ``prepare`` returned), which the next ``predict_block`` call with
    that context overwrites: the driver consumes each block (argmax, optional probability
    store) before asking for the next, and the previous block's array would otherwise still be
    alive while the next one is computed (117 MB for a 2048 px block of 7 classes). Copy a
    result to keep it across calls.
    """

    def __init__(self, model, normalization, device="cpu", sub_batch: int = 4, precision: str = "32"):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.stage = model.stage
        self.halo = model.options["size_p"] if self.stage > 1 else 0

    def _view(self, source) -> torch.Tensor:
        size = self.model.options["size_g"]
        return self.to_tensor(source.read(out_size=(size, size), resample="area"))

    def prepare(self, source) -> GLNetContext:
        model = self.model
        shape = (source.height, source.width)
        view = self._view(source)
        with torch.inference_mode(), self.autocast():
            if self.stage == 1:
                logits = model.global_features(view, keep=frozenset({"logits"})).logits
                return GLNetContext(1, shape, probs=torch.softmax(logits.float(), dim=1))
            grid = model.grid(*shape)
            if self.stage == 2:
                context = model.global_features(view, keep=_SHARED | {"ps3"})
                release_free_memory()
                return GLNetContext(2, shape, grid=grid, context=context, ensemble_from=context.ps3)
            fixed = model.global_features(view, fixed=True, keep=_SHARED)
            merger = LocalToGlobal.like(fixed)
            for start in range(0, len(grid), self.sub_batch):
                windows = grid.windows[start:start + self.sub_batch]
                boxes = [normalized_box(w, *shape) for w in windows]
                patches = read_patches(source, windows, self.to_tensor, grid.patch)

                def visit(point, maps, boxes=boxes):
                    merger.add_point(point, [m.float() for m in maps], boxes)

                model.local_features(patches, boxes, fixed, keep=frozenset(), visit=visit)
                del patches
            merged = merger.result()
            del merger
            glob = model.global_features(view, merged, keep=frozenset({"ps3"}))
            del merged
        release_free_memory()
        return GLNetContext(3, shape, grid=grid, context=fixed, ensemble_from=glob.ps3)

    def predict_block(self, source, context: GLNetContext, window: Window) -> np.ndarray:
        if context.stage == 1:
            with torch.inference_mode():
                probs = upsample_window(context.probs, context.image_shape, window)
            return probs[0].cpu().numpy()
        model = self.model
        height, width = context.image_shape

        def logits(batch: torch.Tensor, windows: list[Window]) -> torch.Tensor:
            boxes = [normalized_box(w, height, width) for w in windows]
            with self.autocast():
                out = model.patch_forward(batch, boxes, context.context, ensemble_from=context.ensemble_from,
                                          keep=frozenset())
            return out.ensemble.float()  # at 1/4 of the patch: stitch_logits upsamples each when adding it

        needed = self.num_classes * window.height * window.width
        if context.output is None or context.output.numel() < needed:
            context.output = None  # release the old buffer before allocating the larger one
            context.output = torch.empty(needed)
        with torch.inference_mode():
            return stitch_logits(source, context.grid, window, logits, self.to_tensor, self.num_classes, self.sub_batch,
                                 cache=context.cache, out=context.output)


# --------------------------------------------------------------------------- memory


def context_bytes(model) -> int:
    """What ``prepare`` keeps for one image: the global maps at the sharing points and ps3.

    Stage 3 builds the merged local maps (as large again, without ps3) next to them while it
    prepares; that phase has no block buffers, so it peaks lower than a block does.
    """
    shapes = model.context_shapes()
    return 4 * sum(int(np.prod(s)) for point in ("c", "p", "ps1", "ps2", "ps3") for s in shapes[point])


def _unit(model) -> int:
    """Bytes of one lateral-width map at the local branch's finest level (16.5 MB for 508-px patches)."""
    size_p = model.options["size_p"]
    side = -(-size_p // model.local_branch.encoder.reductions[0])
    return 4 * model.local_branch.fpn.lateral_convs[0].out_channels * side * side


def _encoder_bytes(model, training: bool) -> int:
    """Summed leaf outputs of the local encoder on one patch (meta-device shapes)."""
    size_p = model.options["size_p"]
    with torch.device("meta"):
        encoder = Encoder(model.encoder_name, in_channels=model.in_channels,
                          out_indices=model.local_branch.encoder.out_indices)
    total, _ = leaf_output_bytes(encoder, (torch.zeros(1, model.in_channels, size_p, size_p),), training=training)
    return total


def patch_bytes(model, training: bool) -> int:
    """Peak memory one patch adds to GLNet's local pass (+ ensemble), calibrated on measurements.

    Inference (no autograd, no concatenations built): 7 level-2 lateral maps + 10% of the
    encoder's summed leaf outputs + the upsampled logits. Training (the local branch's graph):
    62% of the encoder's summed leaf outputs + 30 level-2 lateral maps (the FPN's
    concatenations, crops and resized maps autograd keeps). Measured peaks per patch of
    508 px (peak RSS differences of fresh processes running 1, 2 and 4 patches, 7 classes):
    ResNet-50 146-178 MB inference, 880-980 MB training; ResNet-18 123-154 MB, 600-730 MB;
    the formulas give 202 / 943 and 149 / 611 MB.
    """
    unit = _unit(model)
    if training:
        return int(0.62 * _encoder_bytes(model, True) + 30 * unit)
    size_p = model.options["size_p"]
    return int(7 * unit + 0.1 * _encoder_bytes(model, False) + 4 * model.num_classes * size_p * size_p)


def glnet_block_bytes(block: int, size_p: int, num_classes: int, grid_step: int) -> int:
    """One streamed block's buffers while its patches run: logits sums (softmaxed in place into
    the returned probabilities) and the cached logits (at 1/4 of the patch) of one column of
    patches shared with the next block. (The driver's argmax of the probabilities comes after
    the patches' memory is released.)"""
    column = -(-block // max(grid_step, 1)) + 1
    return 4 * num_classes * block * block + column * 4 * num_classes * (size_p // 4 + 1) ** 2


def inference_estimate(model, device="cpu", block_size: int = 2048) -> MemoryEstimate:
    """Memory of GLNet prediction: fixed (process, global context, one block's buffers) + per patch.

    Fixed: on CPU the process's resident memory now (it already holds the weights), on CUDA
    the weights; the global context (:func:`context_bytes`); one block's buffers. Per patch:
    :func:`patch_bytes`. benchmarks/glnet_memory.py checks the figures against measured peaks.
    """
    size_p = model.options["size_p"]
    on_cpu = torch.device(device).type == "cpu"
    process = runtime_bytes(device) if on_cpu else parameter_bytes(model)
    step = size_p - model.options["min_overlap"]
    context = context_bytes(model)
    blocks = context + glnet_block_bytes(block_size, size_p, model.num_classes, step)
    fixed = process + max(blocks, 2 * context if model.stage == 3 else 0)
    per_patch = patch_bytes(model, training=False)
    if model.stage == 3:
        # stage 3's prepare runs every patch once and keeps its maps at all sharing points
        # until they are pasted into the global-resolution averages
        per_patch += int(context * (size_p / model.options["size_g"]) ** 2)
    return MemoryEstimate(fixed=fixed, per_sample=per_patch)


#: below this many patches per pass a block's buffers are worth shrinking
SMALL_SUB_BATCH = 2
SMALL_BLOCK = 1024


def inference_plan(model, device="cpu", max_memory: int | None = None, default: int = 2) -> tuple[int, int | None]:
    """(patches per forward pass, block side) that fit ``max_memory``.

    Without a budget: ``default`` patches and the driver's block. With one, when the driver's
    block leaves room for at most ``SMALL_SUB_BATCH`` patches, 1024-px blocks are used: a
    2048-px block's logit sums alone hold 117 MB for 7 classes (measured: stage 3 at
    6749x4499 peaked 2.09 GB with 2048-px blocks and 2 patches under a 2 GB budget).
    Smaller blocks recompute some patches that straddle block rows.
    """
    if max_memory is None:
        return default, None
    what = f"glnet prediction with {model.options['size_p']}-px patches"
    block = block_size_for(max_memory)
    sub_batch = plan_sub_batch(max_memory, inference_estimate(model, device, block), what, default=default, maximum=32)
    if sub_batch <= SMALL_SUB_BATCH and block > SMALL_BLOCK:
        block = SMALL_BLOCK
        sub_batch = plan_sub_batch(max_memory, inference_estimate(model, device, block), what, default=default,
                                   maximum=SMALL_SUB_BATCH)
    return sub_batch, block


def inference_sub_batch(model, device="cpu", max_memory: int | None = None, default: int = 2) -> int:
    """Patches per forward pass that fit ``max_memory`` (``default`` without a budget)."""
    return inference_plan(model, device, max_memory, default)[0]


def item_bytes(views: GLNetViews) -> int:
    """Bytes of one training item (one image's global view and patches) as the loader batches it."""
    dataset = views.dataset
    if len(dataset) == 0:
        return 0
    image = dataset[0].image
    grid = PatchGrid.glnet(image.height, image.width, views.size_p, views.min_overlap)
    pixel = np.dtype(image.dtype).itemsize if np.dtype(image.dtype) == np.uint8 else 4
    patches = len(grid) * views.size_p ** 2 * (image.channels * pixel + 1)
    return patches + views.size_g ** 2 * (4 * image.channels + 8)


def training_estimate(model, stage: str, views: GLNetViews, batch_size: int, device="cpu") -> MemoryEstimate:
    """Memory of a GLNet stage-2 or stage-3 step: fixed + per patch of the sub-batch.

    Fixed: the process now (on CPU its resident memory, which holds the weights; on CUDA
    the weights), gradients and Adam's two states of the trainable weights, the batch (twice:
    the items and their collated copy), one image's global features. Stage 3 adds the global
    branch's own graph (about one training patch), the merged local maps, and per patch
    only the frozen local pass (inference) plus the ensemble's small graph.
    """
    on_cpu = torch.device(device).type == "cpu"
    process = runtime_bytes(device) if on_cpu else parameter_bytes(model)
    trainable = {"global2local": [model.local_branch, model.ensemble],
                 "local2global": [model.global_branch, model.global_ext, model.ensemble]}[stage]
    optimiser = 3 * sum(parameter_bytes(m) for m in trainable)  # gradient + Adam's two moments
    context = context_bytes(model)
    fixed = process + optimiser + 2 * batch_size * item_bytes(views) + context
    if stage == "global2local":
        return MemoryEstimate(fixed=fixed, per_sample=patch_bytes(model, training=True))
    fixed += patch_bytes(model, training=True) + context  # the global graph, the merged maps
    return MemoryEstimate(fixed=fixed, per_sample=patch_bytes(model, training=False) + 6 * _unit(model))


def training_sub_batch(model, stage: str, views: GLNetViews, batch_size: int, settings) -> int:
    """Patches per backward under ``settings.max_memory`` (the paper's 6 without a budget)."""
    if settings.max_memory is None:
        return PAPER_SUB_BATCH
    device = "cuda" if settings.accelerator in ("cuda", "gpu") else "cpu"
    estimate = training_estimate(model, stage, views, batch_size, device)
    return plan_sub_batch(settings.max_memory, estimate, f"glnet training stage {stage!r}",
                          default=PAPER_SUB_BATCH, maximum=PAPER_SUB_BATCH)
