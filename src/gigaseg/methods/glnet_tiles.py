"""GLNet's ``"tile"`` global-context policy: a global view per training-scene-sized tile.

With the ``"image"`` policy the global branch sees the whole image at ``size_g`` whatever its
size, so on an image much larger than the training scenes it sees a scale it never trained
on (measured in benchmarks/results/glnet_global_view.md). The tile policy keeps the training
scale: the image is cut into *cores*, square blocks of ``core`` px from the origin (the last
ones shorter), and each core is predicted by GLNet run on its *tile*, the core grown to
``context_tile`` px a side (the training scenes' side) and shifted back inside the image.
Within a tile everything is GLNet's own whole-image prediction
(:class:`~gigaseg.methods.glnet.GLNetPredictor` on a :class:`~gigaseg.io.crop.CroppedSource`):
the tile's thumbnail at ``size_g`` is the global view, its patch grid and boxes are relative
to the tile, and in stage 3 the local -> global merge runs over the tile's patches.

The core is the largest multiple of the mask writer's tile (512 px) that leaves every side of
the tile at least half a patch (``(context_tile - size_p) / 2``), and never larger than the
block the memory budget allows. The predictor asks the driver for blocks of exactly that size
(``block_size``), so every block is one core and each tile's context is computed once; memory
is that of the image policy (one context at a time). The price is compute: tiles overlap, so
pixels near core borders go through the local branch of two to four tiles (for 2448 px tiles
of 508 px patches and 1536 px cores, (2448 / 1536)^2 = 2.5x the local passes of the image
policy), and context farther than a tile is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..inference.stream import WRITER_TILE
from ..io.crop import CroppedSource
from ..window import Window
from .glnet import GLNetPredictor

__all__ = ["ContextTile", "GLNetTilePredictor", "axis_tiles", "context_tiles", "core_size"]


@dataclass(frozen=True)
class ContextTile:
    """``core``: the pixels this tile predicts; ``tile``: the region GLNet runs on to predict them."""

    core: Window
    tile: Window


def core_size(context_tile: int, size_p: int, block_limit: int | None = None) -> int:
    """Side of the cores: a multiple of ``WRITER_TILE`` at most ``context_tile - size_p`` (half a
    patch of margin each side) and at most ``block_limit``; at least ``WRITER_TILE``."""
    side = (context_tile - size_p) // WRITER_TILE * WRITER_TILE
    if block_limit is not None:
        side = min(side, block_limit // WRITER_TILE * WRITER_TILE)
    return max(WRITER_TILE, side)


def axis_tiles(length: int, core: int, side: int) -> list[tuple[int, int, int, int]]:
    """``(core_start, core_end, tile_start, tile_end)`` along an axis of ``length`` px.

    Cores of ``core`` px from 0 cover the axis exactly once. Each tile is its core grown to
    ``side`` px (half the growth before, the rest after; never shorter than its core nor longer
    than the axis), shifted back inside ``[0, length)``.
    """
    out = []
    for start in range(0, length, core):
        end = min(start + core, length)
        span = min(max(side, end - start), length)
        first = min(max(start - (span - (end - start)) // 2, 0), length - span)
        out.append((start, end, first, first + span))
    return out


def context_tiles(height: int, width: int, core: int, side: int) -> list[ContextTile]:
    """Every core of an image with its tile, row-major."""
    return [ContextTile(Window.from_bounds(r0, c0, r1, c1), Window.from_bounds(t0, l0, t1, l1))
            for r0, r1, t0, t1 in axis_tiles(height, core, side)
            for c0, c1, l0, l1 in axis_tiles(width, core, side)]


@dataclass
class TileState:
    """Per image: the tiles, and the context of the last tile used (one at a time bounds memory)."""

    tiles: list[ContextTile]
    current: ContextTile | None = None
    context: object = None
    crop: CroppedSource | None = None
    contexts_computed: int = 0


class GLNetTilePredictor(GLNetPredictor):
    """Whole-image GLNet prediction with the ``"tile"`` global-context policy (module docstring).

    ``block_limit``: the largest block the memory plan allows (None: no limit beyond the tile's).
    ``block_size`` is set to the core size, so the driver's blocks are the cores.
    """

    def __init__(self, model, normalization, device="cpu", sub_batch: int = 4, precision: str = "32",
                 block_limit: int | None = None):
        super().__init__(model, normalization, device=device, sub_batch=sub_batch, precision=precision)
        self.context_tile = model.context_side
        self.core = core_size(self.context_tile, model.options["size_p"], block_limit)
        self.block_size = self.core
        # a block's prediction depends on its whole tile
        self.halo = max(self.halo, (self.context_tile - self.core + 1) // 2)

    def prepare(self, source) -> TileState:
        return TileState(context_tiles(source.height, source.width, self.core, self.context_tile))

    def _context_of(self, source, state: TileState, tile: ContextTile):
        if state.current != tile:
            state.context = state.crop = None  # release the previous tile's maps first
            state.crop = CroppedSource(source, tile.tile)
            state.context = super().prepare(state.crop)
            state.current = tile
            state.contexts_computed += 1
        return state.crop, state.context

    def predict_block(self, source, state: TileState, window: Window) -> np.ndarray:
        parts = [(tile, part) for tile in state.tiles if (part := tile.core.intersection(window)) is not None]
        if len(parts) == 1 and parts[0][1] == window:  # the driver's blocks are cores: no copy
            tile = parts[0][0]
            crop, context = self._context_of(source, state, tile)
            return super().predict_block(crop, context, window.relative_to(tile.tile))
        out = np.empty((self.num_classes, window.height, window.width), dtype=np.float32)
        for tile, part in parts:  # a block across cores (another block size): each part from its tile
            crop, context = self._context_of(source, state, tile)
            out[(slice(None), *part.relative_to(window).slices)] = \
                super().predict_block(crop, context, part.relative_to(tile.tile))
        return out
