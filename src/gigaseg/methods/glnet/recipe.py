"""GLNet's training recipe: three stages, the paper's schedules, memory-planned patch sub-batches.

Paper defaults, overridable with ``--epochs``/``--lr``/``--batch-size``:

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
them with GLNet's own estimate (:func:`training_estimate`) when their data is built, and raise
``BudgetError`` before training when even one patch does not fit; stage 1 splits its batch of
global views by the training loop's plan. Each sub-batch loss is weighted by ``patches / 6``
(stage 1: ``views / batch``), so the gradient equals the paper's whatever sub-batch the budget
allows (up to BatchNorm's batch statistics). Losses (FL below: the option ``loss``, by default
the paper's focal loss with ``focal_gamma`` 3) compare the logits with the labels at the logits'
resolution: nearest-resized to 1/4 with the paper's heads (output stride 4), the items' own
labels at output stride 1 (the patches' full-resolution labels and the global view's label at
``size_g``; ``GLNetViews`` carries both), nearest-resized to 1/2 at 2:

- stage 1: FL(global);
- stage 2: per sub-batch FL(local) + FL(ensemble) + fmreg * MSE(ps3_local, ps3_global crop);
- stage 3: the frozen local branch runs over all patches (fed by the stage-1 global copy) and
  its maps are merged onto the global grid; then FL(global through the ``_ext`` layers) and,
  per sub-batch, FL(ensemble). The ensemble losses reach the global branch through one
  leaf tensor holding the global ps3, so the global graph is backpropagated once per image
  (no ``retain_graph``); the local maps are recomputed for the ensemble instead of being kept
  (with a full-resolution ensemble head, the local stride-2 map with them).

The feature-map regulariser compares the 1/4-resolution ps3 maps whatever the output stride.

Rare classes: ``loss`` may be any of ``gigaseg.nn.losses.LOSSES`` (one loss for every term of
every stage); each stage's data prepares what it needs (``prepare_class_balance``: the dataset's
ignore index and, for ``weighted_ce``, the class weights of the training masks). There is no
``crop_sampling`` option: every stage trains on every patch of GLNet's grid of every image
(stage 1 on the whole image), so no crop is placed that a class-balanced draw could move.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...budget import MemoryEstimate, parameter_bytes, plan_sub_batch, runtime_bytes
from ...data.labels import IGNORE_INDEX
from ...errors import ConfigError
from ...geometry import PatchGrid
from ...io.normalize import Normalization
from ...io.resample import resize as resize_array
from ...nn.losses import FocalLoss
from ...training.recipe import Stage, StepContext, prepare_class_balance, stage_loss
from ...training.views import GlobalViews, SeededViews, rng_for
from .memory import context_bytes, head_bytes, patch_bytes, skip_bytes, unit_bytes
from .model import STAGES, LocalToGlobal

__all__ = [
    "GLNetViews",
    "PAPER_SUB_BATCH",
    "glnet_stages",
    "image_sizes",
    "median_longer_side",
    "training_estimate",
    "training_sub_batch",
]

#: patches per backward in the paper; sub-batch losses are weighted by (patches / this)
PAPER_SUB_BATCH = 6
_SHARED = frozenset(("c", "p", "ps1", "ps2"))


# --------------------------------------------------------------------------- training views


def _augment(array: np.ndarray, flip: bool, k: int) -> np.ndarray:
    """Horizontal flip then rotation by ``k`` x 90 degrees (as ``gigaseg.training.views.augment_pair``), HW or HWC."""
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
    colour (normalised to about 0, as the predictor pads) and the dataset's ignore index
    (``255`` unless it says otherwise), which every loss ignores.
    Randomness comes from ``rng_for(seed, epoch, index)``.

    Args:
        dataset: the training samples (each with an ``image`` and a ``mask`` source).
        normalization: how pixels are normalised (here for the global view; the step
            normalises the patches with ``norm``).
        size_g: the global view's side in pixels.
        size_p: the patches' side in pixels.
        min_overlap: the least overlap of neighbouring patches on GLNet's grid, in pixels.
        augment: draw one random flip/rotation per item and epoch; False: none.
        seed: the seed of the augmentation.
    """

    def __init__(
        self,
        dataset,
        normalization: Normalization,
        size_g: int,
        size_p: int,
        min_overlap: int,
        augment: bool = True,
        seed: int = 0,
    ):
        super().__init__(dataset, normalization, seed)
        self.ignore_index = int(getattr(dataset, "ignore_index", IGNORE_INDEX))
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
            padded_label = np.full((ph, pw), self.ignore_index, dtype=label.dtype)
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
            "patch_labels": torch.from_numpy(
                patch_labels if patch_labels.dtype == np.uint8 else patch_labels.astype(np.int64)
            ),
            "boxes": torch.tensor(grid.normalized_boxes(), dtype=torch.float32),
            "norm": self._norm.clone(),
            "index": index,
        }


def image_sizes(dataset) -> list[tuple[int, int, str]]:
    """The size and name of every image of ``dataset``, read once when a stage builds its data.

    Args:
        dataset: the training samples (each closed once its size is read).

    Returns:
        ``(height, width, name)`` per image; the name is the image's path, else ``"image <index>"``.
    """
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
    """The median of the training images' longer sides.

    It is the scene side the model learns its global view at, recorded in the weights
    (``GLNet.scene_side``) for the "tile" policy.

    Args:
        sizes: ``(height, width, name)`` per image (:func:`image_sizes`).

    Returns:
        The median longer side in pixels (rounded down); 0 without images.
    """
    return int(np.median([max(h, w) for h, w, _ in sizes])) if sizes else 0


def _same_sized(sizes: list[tuple[int, int, str]], batch_size: int) -> None:
    """Batches stack whole images with all their patches: sizes must agree when batch_size > 1."""
    if batch_size <= 1:
        return
    first = sizes[0] if sizes else None
    for other in sizes[1:]:
        if other[:2] != first[:2]:
            raise ConfigError(
                f"glnet batches whole images with all their patches, so its training images must "
                f"all have one size: {first[2]} is {first[0]}x{first[1]} but {other[2]} is "
                f"{other[0]}x{other[1]}; train with --batch-size 1 (or tile the images to one size)"
            )


# --------------------------------------------------------------------------- steps


def _loss(ctx: StepContext):
    """The stage's segmentation loss: the option ``loss``; ``"focal"`` is the paper's, with ``focal_gamma``."""
    name = ctx.model.options.get("loss", "focal")
    if name == "focal":  # segmentation_loss's focal loss has gamma 3; GLNet's gamma is an option
        options = ctx.stage.options if ctx.stage is not None else {}  # needs no stage, as before the option
        ignore_index = int(options.get("ignore_index", IGNORE_INDEX))
        return FocalLoss(gamma=ctx.model.options["focal_gamma"], ignore_index=ignore_index)
    return stage_loss(ctx, name)


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
    """Stage 1: the loss (option ``loss``) of the global branch on the global views (sub-batches when memory is short).

    Each sub-batch's loss is weighted by its share of the batch, one backward each.

    Args:
        ctx: the step's context (``ctx.sub_batch``: views per backward).
        batch: ``image`` (normalised global views) and ``label``, as ``GlobalViews`` collates them.

    Returns:
        ``{"loss": the batch's mean loss}``, detached.
    """
    criterion = _loss(ctx)
    images = batch["image"].shape[0]
    total = 0.0
    for part in _chunks(images, ctx.sub_batch):
        features = ctx.wrapped(batch["image"][part], "global", keep=frozenset({"logits"}))
        loss = criterion(features.logits, _labels_like(batch["label"][part], features.logits))
        n = features.logits.shape[0]
        ctx.backward(loss * (n / images))
        total += float(loss.detach()) * n
    return {"loss": torch.tensor(total / max(images, 1))}


def global2local_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Stage 2: per image, frozen global features once; per patch sub-batch local + ensemble + fmreg, backward.

    Each sub-batch's loss is weighted by ``patches / PAPER_SUB_BATCH`` (module docstring).

    Args:
        ctx: the step's context (patches per backward: the stage's ``sub_batch`` option).
        batch: collated :class:`GLNetViews` items.

    Returns:
        ``loss``, ``loss_local``, ``loss_ensemble`` and ``loss_fmreg``: means per patch, detached.
    """
    model, criterion = ctx.model, _loss(ctx)
    fmreg = model.options["fmreg"]
    sums = {"loss": 0.0, "loss_local": 0.0, "loss_ensemble": 0.0, "loss_fmreg": 0.0}
    total = 0
    for i in range(batch["global"].shape[0]):
        with torch.no_grad():
            context = ctx.wrapped(batch["global"][i : i + 1], "global", keep=_SHARED | {"ps3"})
        norm = batch["norm"][i]
        for part in _chunks(batch["patches"].shape[1], _sub_batch(ctx)):
            patches = _normalise(batch["patches"][i, part], norm)
            boxes = batch["boxes"][i, part]
            out = ctx.wrapped(patches, "local", boxes=boxes, context=context, keep=frozenset({"ps3", "logits"}))
            labels = _labels_like(batch["patch_labels"][i, part], out.local.logits)
            local = criterion(out.local.logits, labels)
            ensemble = criterion(out.ensemble, labels)
            reg = F.mse_loss(out.local.ps3.float(), out.global_ps3.float())
            loss = local + ensemble + fmreg * reg
            n = patches.shape[0]
            ctx.backward(loss * (n / PAPER_SUB_BATCH))
            for key, value in (("loss", loss), ("loss_local", local), ("loss_ensemble", ensemble), ("loss_fmreg", reg)):
                sums[key] += float(value.detach()) * n
            total += n
    return {k: torch.tensor(v / max(total, 1)) for k, v in sums.items()}


def local2global_step(ctx: StepContext, batch: dict) -> dict[str, torch.Tensor]:
    """Stage 3: merged frozen local maps -> global through ``_ext``; FL(global) + per sub-batch FL(ensemble).

    The ensemble losses reach the global branch through one leaf tensor holding the global
    ps3, so the global graph is backpropagated once per image (module docstring).

    Args:
        ctx: the step's context (patches per pass: the stage's ``sub_batch`` option).
        batch: collated :class:`GLNetViews` items.

    Returns:
        ``loss_global`` (mean per image), ``loss_ensemble`` (mean per patch) and their sum
        ``loss``, detached.
    """
    criterion = _loss(ctx)
    sums = {"loss_global": 0.0, "loss_ensemble": 0.0}
    images = batch["global"].shape[0]
    patches_seen = 0
    for i in range(images):
        view = batch["global"][i : i + 1]
        norm = batch["norm"][i]
        count = batch["patches"].shape[1]
        with torch.no_grad():
            fixed = ctx.wrapped(view, "global", fixed=True, keep=_SHARED)
            merger = LocalToGlobal.like(fixed)
            for part in _chunks(count, _sub_batch(ctx)):
                boxes = batch["boxes"][i, part]
                local = ctx.wrapped(
                    _normalise(batch["patches"][i, part], norm),
                    "local",
                    boxes=boxes,
                    context=fixed,
                    ensemble=False,
                    keep=_SHARED,
                )
                merger.add(local.local, boxes)
                del local
            merged = merger.result()
            del merger
        glob = ctx.wrapped(view, "global", merged=merged, keep=frozenset({"ps3", "logits"}))
        loss_global = criterion(glob.logits, _labels_like(batch["global_label"][i : i + 1], glob.logits))
        # the ensemble losses reach the global branch through this leaf: one backward of the global graph
        leaf = glob.ps3.detach().requires_grad_(True)
        leaf_grad = torch.zeros_like(leaf)
        for part in _chunks(count, _sub_batch(ctx)):
            boxes = batch["boxes"][i, part]
            patches = _normalise(batch["patches"][i, part], norm)
            with torch.no_grad():
                local = ctx.wrapped(
                    patches, "local", boxes=boxes, context=fixed, ensemble=False, keep=frozenset({"ps3", "skip"})
                )
            logits = ctx.wrapped(
                local.local.ps3, "ensemble", global_ps3=leaf, boxes=boxes, image=patches, skip=local.skip
            )
            labels = _labels_like(batch["patch_labels"][i, part], logits)
            loss = criterion(logits, labels)
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
    return {
        "loss": torch.tensor(loss_global + loss_ensemble),
        "loss_global": torch.tensor(loss_global),
        "loss_ensemble": torch.tensor(loss_ensemble),
    }


def _starting(stage: int):
    """``before_stage`` hook: check the hand-over, copy the stage-1 global branch for stage 3, record the stage."""
    name = STAGES[stage - 1]

    def hook(model) -> None:
        previous = int(model.trained_stage)
        if stage > 1 and previous < stage - 1:
            trained = STAGES[previous - 1] if previous else "nothing yet (fresh weights)"
            raise ConfigError(
                f"glnet stage {name!r} continues a {STAGES[stage - 2]!r} run, as in the paper: pass "
                f"--init <that run's folder or checkpoint> (this model's weights have trained: {trained})"
            )
        if stage == 3 and previous < 3:
            model.copy_global_to_fixed()  # the local branch keeps the global features it was trained with
        model.set_stage(stage)

    return hook


def glnet_stages(model) -> list[Stage]:
    """The paper's three stages (see the module docstring).

    Args:
        model: the GLNet to train; building a stage's data records the training images' median
            longer side in its ``scene_side`` buffer.

    Returns:
        The stages ``global``, ``global2local`` and ``local2global``, in order.
    """
    size_g, size_p, overlap = model.options["size_g"], model.options["size_p"], model.options["min_overlap"]
    channels = model.in_channels

    def global_views(stage: Stage):
        def make(data, norm, settings):
            prepare_class_balance(stage, data, model.options["loss"])
            model.scene_side.fill_(median_longer_side(image_sizes(data)))
            return GlobalViews(data, norm, (size_g, size_g), seed=settings.seed)

        return make

    def patch_views(stage: Stage):
        def make(data, norm, settings):
            prepare_class_balance(stage, data, model.options["loss"])
            batch_size = settings.batch_size or stage.batch_size
            sizes = image_sizes(data)
            _same_sized(sizes, batch_size)
            model.scene_side.fill_(median_longer_side(sizes))
            views = GLNetViews(data, norm, size_g, size_p, overlap, seed=settings.seed)
            stage.options["sub_batch"] = training_sub_batch(model, stage.name, views, batch_size, settings)
            return views

        return make

    common: dict[str, Any] = {
        "batch_size": 6,
        "weight_decay": 5e-4,
        "optimizer": "adam",
        "schedule": "poly",
        "sub_batch": PAPER_SUB_BATCH,
    }
    stages = [
        # stage 1 splits its batch of global views by the loop's own plan (sample_inputs)
        Stage(
            name="global",
            epochs=120,
            lr=5e-5,
            make_data=None,
            step=global_step,
            trainable=lambda m: [m.global_branch],
            # not global_fixed: until stage 3 it shares the global branch's tensors (freezing it would
            # freeze them); it does not run in this stage
            frozen_eval=lambda m: [m.local_branch, m.global_ext],
            sample_inputs=lambda m: (torch.zeros(1, channels, size_g, size_g), "global"),
            before_stage=_starting(1),
            **common,
        ),
        # stages 2 and 3 plan their patch sub-batches themselves (training_sub_batch), in make_data
        Stage(
            name="global2local",
            epochs=50,
            lr=2e-5,
            make_data=None,
            step=global2local_step,
            trainable=lambda m: [m.local_branch, m.ensemble],
            frozen_eval=lambda m: [m.global_branch, m.global_ext, m.global_fixed],
            before_stage=_starting(2),
            **common,
        ),
        Stage(
            name="local2global",
            epochs=120,
            lr=5e-5,
            make_data=None,
            step=local2global_step,
            trainable=lambda m: [m.global_branch, m.global_ext, m.ensemble],
            frozen_eval=lambda m: [m.local_branch, m.global_fixed],
            before_stage=_starting(3),
            **common,
        ),
    ]
    stages[0].make_data = global_views(stages[0])
    for stage in stages[1:]:
        stage.make_data = patch_views(stage)
    return stages


# --------------------------------------------------------------------------- memory


def item_bytes(views: GLNetViews) -> int:
    """Bytes of one training item (one image's global view and patches) as the loader batches it.

    Sized from the dataset's first image: the patches at 1 byte per uint8 channel value (4
    otherwise) plus a 1-byte label, the global view as float32 with an int64 label.

    Args:
        views: the stage's training views.

    Returns:
        Bytes; 0 for an empty dataset.
    """
    dataset = views.dataset
    if len(dataset) == 0:
        return 0
    with dataset[0] as sample:
        height, width, channels, dtype = (
            sample.image.height,
            sample.image.width,
            sample.image.channels,
            np.dtype(sample.image.dtype),
        )
    grid = PatchGrid.glnet(height, width, views.size_p, views.min_overlap)
    pixel = dtype.itemsize if dtype == np.uint8 else 4
    patches = len(grid) * views.size_p**2 * (channels * pixel + 1)
    return patches + views.size_g**2 * (4 * channels + 8)


def training_estimate(model, stage: str, views: GLNetViews, batch_size: int, device="cpu") -> MemoryEstimate:
    """Memory of a GLNet stage-2 or stage-3 step: fixed + per patch of the sub-batch.

    Fixed: the process now (on CPU its resident memory, which holds the weights; on CUDA
    the weights), gradients and Adam's two states of the trainable weights, the batch (twice:
    the items and their collated copy), one image's global features. Stage 3 adds the global
    branch's own graph (about one training patch), the merged local maps, and per patch
    only the frozen local pass (inference) plus the ensemble's small graph. At output
    stride 1 or 2 the per-patch figures include the full-resolution heads
    (``gigaseg.methods.glnet.memory.head_bytes``): stage 2 the graphs of the local and
    ensemble heads, stage 3 the ensemble head's graph and the local stride-2 map it reads.

    Args:
        model: the GLNet.
        stage: ``"global2local"`` or ``"local2global"``.
        views: the stage's training views (they size the batch).
        batch_size: images per batch.
        device: where it trains (on CPU the process's resident memory counts).

    Returns:
        Bytes fixed and per patch of a sub-batch.
    """
    on_cpu = torch.device(device).type == "cpu"
    process = runtime_bytes(device) if on_cpu else parameter_bytes(model)
    trainable = {
        "global2local": [model.local_branch, model.ensemble],
        "local2global": [model.global_branch, model.global_ext, model.ensemble],
    }[stage]
    optimiser = 3 * sum(parameter_bytes(m) for m in trainable)  # gradient + Adam's two moments
    context = context_bytes(model)
    fixed = process + optimiser + 2 * batch_size * item_bytes(views) + context
    if stage == "global2local":
        return MemoryEstimate(fixed=fixed, per_sample=patch_bytes(model, training=True))
    fixed += patch_bytes(model, training=True) + context  # the global graph, the merged maps
    per_patch = patch_bytes(model, training=False) + 6 * unit_bytes(model)
    # a full-resolution ensemble head runs with autograd here, on the kept stride-2 map (0 at output stride 4)
    per_patch += head_bytes(model, "ensemble", training=True) + skip_bytes(model)
    return MemoryEstimate(fixed=fixed, per_sample=per_patch)


def training_sub_batch(model, stage: str, views: GLNetViews, batch_size: int, settings) -> int:
    """Patches per backward under ``settings.max_memory`` (the paper's 6 without a budget).

    Args:
        model: the GLNet.
        stage: ``"global2local"`` or ``"local2global"``.
        views: the stage's training views.
        batch_size: images per batch.
        settings: the training settings (``max_memory``; ``accelerator`` picks CPU or CUDA).

    Returns:
        The sub-batch, from 1 to ``PAPER_SUB_BATCH``.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    if settings.max_memory is None:
        return PAPER_SUB_BATCH
    device = "cuda" if settings.accelerator in ("cuda", "gpu") else "cpu"
    estimate = training_estimate(model, stage, views, batch_size, device)
    return plan_sub_batch(
        settings.max_memory,
        estimate,
        f"glnet training stage {stage!r}",
        default=PAPER_SUB_BATCH,
        maximum=PAPER_SUB_BATCH,
    )
