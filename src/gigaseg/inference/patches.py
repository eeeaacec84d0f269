"""Predict a block from the patches of a whole-image patch grid, blending overlaps.

The grid is defined on the WHOLE image, and a block only evaluates the grid's
patches that touch it, so the stitched result inside any block equals the
in-memory prediction of the whole image (no seams from blocking). Patches that
straddle into the next block of the same row are kept in a small cache (one
column of patches); those straddling into the next row of blocks are computed
again there, which keeps memory independent of the image width.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..io.base import ImageSource
from ..tiling import PatchGrid, blend_weights
from ..window import Window


def patches_touching(grid: PatchGrid, block: Window) -> list[Window]:
    return [w for w in grid.windows if w.intersection(block) is not None]


def bounding_window(windows: list[Window]) -> Window:
    return Window.from_bounds(
        min(w.top for w in windows), min(w.left for w in windows),
        max(w.bottom for w in windows), max(w.right for w in windows),
    )


def stitch_block(
    source: ImageSource,
    grid: PatchGrid,
    block: Window,
    patch_logits: Callable[[torch.Tensor, list[Window]], torch.Tensor],
    to_tensor: Callable[[np.ndarray], torch.Tensor],
    num_classes: int,
    patch_size: tuple[int, int],
    sub_batch: int,
    blend: str = "gaussian",
    cache: dict | None = None,
) -> np.ndarray:
    """Blended class probabilities ``(C, h, w)`` of ``block``.

    ``patch_logits(batch, windows)`` maps a normalised batch ``(N, C, ph, pw)`` of the
    patches at ``windows`` to logits ``(N, K, ph, pw)`` at patch resolution.
    Patches smaller than ``patch_size`` (images smaller than a patch) are zero-padded.
    ``cache`` (a dict the caller keeps per image, blocks visited in row-major order)
    carries the probabilities of patches shared with the next block of the row.
    """
    windows = patches_touching(grid, block)
    cached = cache if cache is not None else {}
    todo = [w for w in windows if w not in cached]
    ph, pw = patch_size
    weights = torch.from_numpy(blend_weights(ph, pw, mode=blend))
    accum = torch.zeros((num_classes, block.height, block.width))
    norm = torch.zeros((block.height, block.width))

    def add(window: Window, prob: torch.Tensor) -> None:
        inside = window.intersection(block)
        src, dst = inside.relative_to(window), inside.relative_to(block)
        w = weights[src.slices]
        accum[(slice(None), *dst.slices)] += prob[(slice(None), *src.slices)] * w
        norm[dst.slices] += w

    for window in windows:
        if window in cached:
            add(window, cached[window])
    keep = {}
    if todo:
        region = bounding_window(todo).clip(source.height, source.width)
        pixels = to_tensor(source.read(region))  # (1, C, rh, rw), read once for the patches to compute
        for start in range(0, len(todo), sub_batch):
            chunk = todo[start:start + sub_batch]
            batch = torch.cat([_patch(pixels, w.relative_to(region), ph, pw) for w in chunk])
            probs = torch.softmax(patch_logits(batch, chunk).float(), dim=1).cpu()
            for window, prob in zip(chunk, probs):
                add(window, prob)
                if window.right > block.right:
                    keep[window] = prob
    if cache is not None:
        kept_before = {w: p for w, p in cache.items() if w.right > block.right}
        cache.clear()
        cache.update(kept_before)
        cache.update(keep)
    return (accum / norm.clamp_min(1e-12)).numpy().astype(np.float32)


def _patch(pixels: torch.Tensor, window: Window, ph: int, pw: int) -> torch.Tensor:
    crop = pixels[:, :, window.top:window.bottom, window.left:window.right]
    pad_h, pad_w = ph - crop.shape[-2], pw - crop.shape[-1]
    if pad_h > 0 or pad_w > 0:
        crop = F.pad(crop, (0, max(pad_w, 0), 0, max(pad_h, 0)))
    return crop
