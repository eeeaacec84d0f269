"""GLNet's whole-image predictors: the paper's whole-image global view, and one global view per tile.

``global_context="image"`` (the default, as the paper), :class:`GLNetPredictor`:

- ``prepare`` reads the thumbnail ``source.read(out_size=(size_g, size_g))`` once and keeps
  the global features (stage 1: the global probabilities). Stage 3 also runs the local branch
  over every patch of the image, in sub-batches, keeping only the merged local -> global maps
  at global-feature resolution, and then the global branch through the ``_ext`` layers. What
  ``prepare`` keeps is a few global-resolution maps, whatever the image size.
- ``predict_block`` evaluates the patches of GLNet's grid over the WHOLE image that touch the
  block, in sub-batches sized by ``--max-memory`` (:func:`inference_estimate`: the process's
  resident memory, the context, one block's buffers, and a calibrated per-patch figure;
  2 patches without a budget); each gets crops of the global features; the ensemble logits,
  upsampled to the patch size, are averaged where patches overlap (as GLNet does: logits,
  uniform weights) and softmaxed (``gigaseg.inference.stitch.stitch_block``). Blocks therefore
  have no seams.

On an image far larger than the training scenes the whole-image view is a much stronger
downsample than the one the global branch trained at, and each patch covers few cells of the
global maps. ``global_context="tile"``, :class:`GLNetTilePredictor`, keeps the training scale:
the image is cut into *cores*, square blocks of ``core`` px from the origin (the last ones
shorter), and each core is predicted by GLNet run on its *tile*, the core grown to
``context_tile`` px a side (by default the training scenes' side, recorded in the weights)
and shifted back inside the image. Within a tile everything is :class:`GLNetPredictor` on a
:class:`~gigaseg.io.crop.CroppedSource`. The core is the largest multiple of the mask writer's
tile (512 px) that leaves every side of the tile at least half a patch
(``(context_tile - size_p) / 2``), and never larger than the block the budget allows; the
predictor asks the driver for blocks of exactly that size, so each tile's context is computed
once and memory is that of the image policy. The price is compute: tiles overlap, so pixels
near core borders go through the local branch of two to four tiles, and context farther than
a tile is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ...budget import MemoryEstimate, parameter_bytes, runtime_bytes
from ...geometry import PatchGrid, Window, normalized_box, upsample_window
from ...inference.contract import SegmentationPredictor
from ...inference.heap import release_free_memory
from ...inference.planner import InferencePlan, block_size_for, plan_inference
from ...inference.stitch import read_patches, stitch_block
from ...inference.stream import WRITER_TILE
from ...io.crop import CroppedSource
from ...io.normalize import Normalization
from ...nn.fpn import FPNFeatures
from .memory import context_bytes, patch_bytes
from .model import GLNet, LocalToGlobal

__all__ = [
    "ContextTile",
    "GLNetContext",
    "GLNetPredictor",
    "GLNetTilePredictor",
    "axis_tiles",
    "context_tiles",
    "core_size",
    "glnet_predictor",
    "inference_estimate",
    "inference_plan",
]

_SHARED = frozenset(("c", "p", "ps1", "ps2"))


@dataclass
class GLNetContext:
    """What ``prepare`` computes once per image (returned, never stored on the predictor).

    Attributes:
        stage: the model's stage, 1, 2 or 3.
        image_shape: the image's ``(height, width)``.
        probs: stage 1: the global probabilities ``(1, K, h, w)``; None otherwise.
        grid: stages 2 and 3: GLNet's grid over the whole image; None in stage 1.
        context: the global maps the local branch crops (stage 3: the frozen stage-1 copy's).
        ensemble_from: the global ps3 the ensemble crops (stage 3: the ``_ext`` pass's).
        cache: logits of the patches shared with the next block of the row.
        output: the buffer ``predict_block`` returns its probabilities in (reused by each call).
    """

    stage: int
    image_shape: tuple[int, int]
    probs: torch.Tensor | None = None
    grid: PatchGrid | None = None
    context: FPNFeatures | None = None
    ensemble_from: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)
    output: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of the tensors kept for the image.

        Returns:
            The bytes of ``probs``, the ``context`` maps and ``ensemble_from``, each tensor
            counted once (the ``output`` buffer and the ``cache`` are not counted).
        """
        tensors = [self.probs, self.ensemble_from]
        if self.context is not None:
            tensors += [*self.context.c, *self.context.p, *self.context.ps1, *self.context.ps2, self.context.ps3]
        seen, total = set(), 0
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


class GLNetPredictor(SegmentationPredictor):
    """Whole-image GLNet prediction for a model of any stage (see the module docstring).

    Memory: the probabilities ``predict_block`` returns for stages 2 and 3 live in one buffer
    per image (in the context ``prepare`` returned), which the next ``predict_block`` call with
    that context overwrites: the driver consumes each block (argmax, optional probability
    store) before asking for the next, and the previous block's array would otherwise still be
    alive while the next one is computed (117 MB for a 2048 px block of 7 classes). Copy a
    result to keep it across calls.

    Args:
        model: a GLNet of any trained stage (its stage decides how it predicts).
        normalization: how the images' pixels are normalised.
        device: where the network runs.
        sub_batch: patches per forward pass.
        precision: "32", "bf16-mixed" or "16-mixed".
    """

    def __init__(self, model, normalization, device="cpu", sub_batch: int = 4, precision: str = "32"):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.stage = model.stage
        self.halo = model.options["size_p"] if self.stage > 1 else 0

    def fast_networks(self):
        """The encoders of the global and local branches (and stage 3's frozen global copy).

        Returns:
            Dotted path -> example input (``Predictor.fast_networks``).
        """
        x = torch.rand(1, self.model.in_channels, 64, 64, device=self.device)
        names = ["global_branch.encoder", "local_branch.encoder"]
        if self.stage == 3:
            names.append("global_fixed.encoder")
        return {name: x for name in names}

    def onnx_networks(self):
        """The encoders (an image in, its feature maps out).

        Returns:
            The paths ONNX Runtime runs (``Predictor.onnx_networks``).
        """
        return tuple(self.fast_networks())

    def _view(self, source) -> torch.Tensor:
        size = self.model.options["size_g"]
        return self.to_tensor(source.read(out_size=(size, size), resample="area"))

    def prepare(self, source) -> GLNetContext:
        """The image's global context (stage 3: after the local -> global pass); see the module docstring."""
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
                windows = grid.windows[start : start + self.sub_batch]
                boxes = [normalized_box(w, *shape) for w in windows]
                patches = read_patches(source, windows, self.to_tensor, grid.patch)

                def visit(point, maps, boxes=boxes):
                    merger.add_point(point, [m.float() for m in maps], boxes)

                model.local_features(patches, boxes, fixed, keep=frozenset(), visit=visit)
                del patches
            merged = merger.result()
            merger = None  # release the averages before the global pass
            glob = model.global_features(view, merged, keep=frozenset({"ps3"}))
            del merged
        release_free_memory()
        return GLNetContext(3, shape, grid=grid, context=fixed, ensemble_from=glob.ps3)

    def band_context(self, context: GLNetContext) -> GLNetContext:
        """The image's maps with an empty cache of logits and an output buffer of the band's own."""
        return replace(context, cache={}, output=None)

    def predict_block(self, source, context: GLNetContext, window: Window) -> np.ndarray:
        """Probabilities of one block (stages 2 and 3: in the context's reused buffer, see the class docstring)."""
        if context.stage == 1:
            with torch.inference_mode():
                probs = upsample_window(context.probs, context.image_shape, window)
            return probs[0].cpu().numpy()
        model = self.model
        height, width = context.image_shape

        def logits(batch: torch.Tensor, windows: list[Window]) -> torch.Tensor:
            boxes = [normalized_box(w, height, width) for w in windows]
            with self.autocast():
                out = model.patch_forward(
                    batch, boxes, context.context, ensemble_from=context.ensemble_from, keep=frozenset()
                )
            # at 1/output_stride of the patch (1/4: the paper's): stitch_block upsamples each when adding it
            return out.ensemble.float()

        needed = self.num_classes * window.height * window.width
        if context.output is None or context.output.numel() < needed:
            context.output = None  # release the old buffer before allocating the larger one
            context.output = torch.empty(needed)
        with torch.inference_mode():
            return stitch_block(
                source,
                context.grid,
                window,
                logits,
                self.to_tensor,
                self.num_classes,
                self.sub_batch,
                average="logits",
                read_per_sub_batch=True,
                cache=context.cache,
                out=context.output,
            )


# --------------------------------------------------------------------------- memory


def glnet_block_bytes(block: int, size_p: int, num_classes: int, grid_step: int, output_stride: int = 4) -> int:
    """Bytes of one streamed block's buffers while its patches run.

    The logit sums (softmaxed in place into the returned probabilities) and the cached logits
    (at 1/``output_stride`` of the patch: 1/4 with the paper's heads, the patch's size at 1)
    of one column of patches shared with the next block. The driver's argmax of the
    probabilities comes after the patches' memory is released.

    Args:
        block: the block side in pixels.
        size_p: the patch side in pixels.
        num_classes: the class count.
        grid_step: pixels between patch starts on GLNet's grid (``size_p - min_overlap``).
        output_stride: input pixels per logit pixel of the ensemble (the model's option).

    Returns:
        Bytes.
    """
    column = -(-block // max(grid_step, 1)) + 1
    side = size_p // output_stride + 1
    return 4 * num_classes * block * block + column * 4 * num_classes * side**2


def inference_estimate(model, device="cpu", block_size: int = 2048) -> MemoryEstimate:
    """Memory of GLNet prediction: fixed (process, global context, one block's buffers) + per patch.

    Fixed: on CPU the process's resident memory now (it already holds the weights), on CUDA
    the weights; then the global context (:func:`context_bytes`) with one block's buffers
    (:func:`glnet_block_bytes`, its cache of logits at the ensemble's resolution), or in stage 3
    twice the context (``prepare`` holds the merged local maps next to it) when that is more.
    Per patch: :func:`patch_bytes` (with the full-resolution ensemble head's term at output
    stride 1 or 2); stage 3 adds the maps ``prepare`` keeps of each patch until they are
    pasted into the global-resolution averages. ``benchmarks/glnet_memory.py`` compares the
    figures with measured peaks.

    Args:
        model: a GLNet (its trained stage decides what prediction holds).
        device: where it runs (on CPU the process's resident memory counts).
        block_size: the side of the driver's blocks, in pixels.

    Returns:
        Bytes fixed and per patch of a sub-batch.
    """
    size_p = model.options["size_p"]
    on_cpu = torch.device(device).type == "cpu"
    process = runtime_bytes(device) if on_cpu else parameter_bytes(model)
    step = size_p - model.options["min_overlap"]
    context = context_bytes(model)
    blocks = context + glnet_block_bytes(block_size, size_p, model.num_classes, step, model.options["output_stride"])
    fixed = process + max(blocks, 2 * context if model.stage == 3 else 0)
    per_patch = patch_bytes(model, training=False)
    if model.stage == 3:
        # stage 3's prepare runs every patch once and keeps its maps at all sharing points
        # until they are pasted into the global-resolution averages
        per_patch += int(context * (size_p / model.options["size_g"]) ** 2)
    return MemoryEstimate(fixed=fixed, per_sample=per_patch)


#: at most this many patches per pass: plan 1024-px blocks (a 2048-px block's logit sums are large)
FEW_PATCHES = 2


def inference_plan(model: GLNet, device="cpu", max_memory: int | None = None, default: int = 2) -> InferencePlan:
    """Patches per forward pass and block side that fit ``max_memory``.

    Without a budget: ``default`` patches and the driver's block. With one, when the driver's
    block leaves room for at most ``FEW_PATCHES`` patches, 1024-px blocks (see
    ``gigaseg.inference.planner.plan_inference``).

    Args:
        model: a GLNet (its trained stage decides what prediction holds).
        device: where it runs.
        max_memory: the budget in bytes, or None.
        default: patches per pass without a budget.

    Returns:
        The ``InferencePlan``.

    Raises:
        BudgetError: not even one patch fits.
    """
    return plan_inference(
        max_memory,
        lambda block: inference_estimate(model, device, block),
        f"glnet prediction with {model.options['size_p']}-px patches",
        default=default,
        few_patches=FEW_PATCHES,
    )


# --------------------------------------------------------------------------- the tile policy


@dataclass(frozen=True)
class ContextTile:
    """A core of the "tile" policy and the tile GLNet runs on to predict it.

    Attributes:
        core: the pixels this tile predicts (image coordinates).
        tile: the region GLNet runs on to predict them (image coordinates; it contains ``core``).
    """

    core: Window
    tile: Window


def core_size(context_tile: int, size_p: int, block_limit: int | None = None) -> int:
    """Side of the cores of the "tile" policy.

    The largest multiple of ``WRITER_TILE`` (the mask writer's tile) that is at most
    ``context_tile - size_p`` (half a patch of margin each side) and at most ``block_limit``;
    never less than ``WRITER_TILE``.

    Args:
        context_tile: the tile side in pixels.
        size_p: the patch side in pixels.
        block_limit: the largest block the memory plan allows; None: no limit.

    Returns:
        The core side in pixels.
    """
    side = (context_tile - size_p) // WRITER_TILE * WRITER_TILE
    if block_limit is not None:
        side = min(side, block_limit // WRITER_TILE * WRITER_TILE)
    return max(WRITER_TILE, side)


def axis_tiles(length: int, core: int, side: int) -> list[tuple[int, int, int, int]]:
    """The cores and tiles along one axis.

    Cores of ``core`` px from 0 cover the axis exactly once (the last one may be shorter).
    Each tile is its core grown to ``side`` px (half the growth before, the rest after; never
    shorter than its core nor longer than the axis), shifted back inside ``[0, length)``.

    Args:
        length: the axis length in pixels.
        core: the core side in pixels.
        side: the tile side in pixels.

    Returns:
        ``(core_start, core_end, tile_start, tile_end)`` per core, in order; ends exclusive.
    """
    out = []
    for start in range(0, length, core):
        end = min(start + core, length)
        span = min(max(side, end - start), length)
        first = min(max(start - (span - (end - start)) // 2, 0), length - span)
        out.append((start, end, first, first + span))
    return out


def context_tiles(height: int, width: int, core: int, side: int) -> list[ContextTile]:
    """Every core of an image with its tile, row-major.

    Args:
        height: the image height in pixels.
        width: the image width in pixels.
        core: the core side (:func:`core_size`).
        side: the tile side.

    Returns:
        One :class:`ContextTile` per core (each axis cut by :func:`axis_tiles`).
    """
    return [
        ContextTile(Window.from_bounds(r0, c0, r1, c1), Window.from_bounds(t0, l0, t1, l1))
        for r0, r1, t0, t1 in axis_tiles(height, core, side)
        for c0, c1, l0, l1 in axis_tiles(width, core, side)
    ]


@dataclass
class TileState:
    """Per image: the tiles, and the context of the last tile used (one at a time bounds memory).

    Attributes:
        tiles: every core with its tile (:func:`context_tiles`).
        current: the tile whose context is held; None before the first block.
        context: ``GLNetPredictor.prepare``'s context of ``current``.
        crop: ``current``'s tile of the image, as a source.
        contexts_computed: how many tile contexts were computed so far (one per tile when the
            driver's blocks are the cores).
    """

    tiles: list[ContextTile]
    current: ContextTile | None = None
    context: object = None
    crop: CroppedSource | None = None
    contexts_computed: int = 0


class GLNetTilePredictor(GLNetPredictor):
    """Whole-image GLNet prediction with the ``"tile"`` global-context policy (see the module docstring).

    ``block_size`` is set to the core size, so the driver's blocks are the cores; ``halo``
    covers the tile around a core, on which a block's prediction depends.

    Args:
        model: a GLNet of any trained stage; its :attr:`~GLNet.context_side` is the tile side.
        normalization: how the images' pixels are normalised.
        device: where the network runs.
        sub_batch: patches per forward pass.
        precision: "32", "bf16-mixed" or "16-mixed".
        block_limit: the largest block the memory plan allows (None: no limit beyond the tile's).
    """

    def __init__(
        self,
        model,
        normalization,
        device="cpu",
        sub_batch: int = 4,
        precision: str = "32",
        block_limit: int | None = None,
    ):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.context_tile = model.context_side
        self.core = core_size(self.context_tile, model.options["size_p"], block_limit)
        self.block_size = self.core
        # a block's prediction depends on its whole tile
        self.halo = max(self.halo, (self.context_tile - self.core + 1) // 2)

    def prepare(self, source) -> TileState:
        """The image's cores and tiles; a tile's context is computed when its first block comes."""
        return TileState(context_tiles(source.height, source.width, self.core, self.context_tile))

    def band_context(self, context: TileState) -> TileState:
        """The image's tiles with no tile context held yet (a band's cores compute their own)."""
        return TileState(context.tiles)

    def _context_of(self, source, state: TileState, tile: ContextTile):
        if state.current != tile:
            state.context = state.crop = None  # release the previous tile's maps first
            state.crop = CroppedSource(source, tile.tile)
            state.context = super().prepare(state.crop)
            state.current = tile
            state.contexts_computed += 1
        return state.crop, state.context

    def predict_block(self, source, state: TileState, window: Window) -> np.ndarray:
        """Probabilities of one block, each part predicted by the tile whose core holds it."""
        parts = [(tile, part) for tile in state.tiles if (part := tile.core.intersection(window)) is not None]
        if len(parts) == 1 and parts[0][1] == window:  # the driver's blocks are cores: no copy
            tile = parts[0][0]
            crop, context = self._context_of(source, state, tile)
            return super().predict_block(crop, context, window.relative_to(tile.tile))
        out = np.empty((self.num_classes, window.height, window.width), dtype=np.float32)
        for tile, part in parts:  # a block across cores (another block size): each part from its tile
            crop, context = self._context_of(source, state, tile)
            out[(slice(None), *part.relative_to(window).slices)] = super().predict_block(
                crop, context, part.relative_to(tile.tile)
            )
        return out


def glnet_predictor(
    model: GLNet, normalization: Normalization, *, device="cpu", max_memory: int | None = None, precision: str = "32"
) -> GLNetPredictor:
    """GLNet's predictor for its ``global_context`` option, planned from ``max_memory``.

    Args:
        model: a GLNet of any trained stage.
        normalization: how the images' pixels are normalised.
        device: where it runs.
        max_memory: the budget in bytes (None: 2 patches per pass, the driver's blocks).
        precision: "32", "bf16-mixed" or "16-mixed".

    Returns:
        A ``GLNetPredictor``, or a ``GLNetTilePredictor`` for ``global_context="tile"``.

    Raises:
        BudgetError: not even one patch fits ``max_memory``.
    """
    plan = inference_plan(model, device, max_memory)
    if model.options["global_context"] == "tile":
        return GLNetTilePredictor(
            model,
            normalization,
            device=device,
            sub_batch=plan.sub_batch,
            precision=precision,
            block_limit=plan.block_size or block_size_for(max_memory),
        )
    predictor = GLNetPredictor(model, normalization, device=device, sub_batch=plan.sub_batch, precision=precision)
    predictor.block_size = plan.block_size
    return predictor
