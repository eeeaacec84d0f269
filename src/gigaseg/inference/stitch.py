"""Predict a block from the patches of a whole-image patch grid, averaging where patches overlap.

The grid is defined on the WHOLE image, and a block only evaluates the grid's patches that
touch it, so the stitched result inside any block equals the in-memory prediction of the
whole image (no seams from blocking). Patches that straddle into the next block of the same
row are kept in a small cache (one column of patches); those straddling into the next row of
blocks are computed again there, which keeps memory independent of the image width.

Every patch-based predictor stitches through :func:`stitch_block`; its options cover the
methods' two conventions: averaging probabilities with blending weights (the sliding-window
baselines, ICNet's tiles) and averaging logits with uniform weights, softmaxed afterwards
(GLNet).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import PatchGrid, Window, blend_weights, resize
from ..io.base import ImageSource

__all__ = ["bounding_window", "patches_touching", "read_patches", "stitch_block"]

AVERAGES = ("probabilities", "logits")


def patches_touching(grid: PatchGrid, block: Window) -> list[Window]:
    """The windows of ``grid`` that overlap ``block``.

    Args:
        grid: a patch grid over the whole image.
        block: a window of the image.

    Returns:
        The overlapping windows, in the grid's order.
    """
    return [w for w in grid.windows if w.intersection(block) is not None]


def bounding_window(windows: list[Window]) -> Window:
    """The smallest window containing every window of ``windows``.

    Args:
        windows: a non-empty list of windows.

    Returns:
        Their bounding window (it may reach past the image, as the windows may).
    """
    return Window.from_bounds(
        min(w.top for w in windows),
        min(w.left for w in windows),
        max(w.bottom for w in windows),
        max(w.right for w in windows),
    )


def read_patches(
    source: ImageSource, windows: list[Window], to_tensor: Callable[[np.ndarray], torch.Tensor], patch: tuple[int, int]
) -> torch.Tensor:
    """The pixels of patch windows, read as one region.

    Args:
        source: the image.
        windows: patch windows (of the patch size; they may reach past the image border).
        to_tensor: source pixels ``(H, W, C)`` -> a normalised tensor ``(1, C, H, W)``.
        patch: the patch size ``(ph, pw)``.

    Returns:
        ``(N, C, ph, pw)``, zero-padded (after normalisation) where a window passes the border.
    """
    region = bounding_window(windows).clip(source.height, source.width)
    pixels = to_tensor(source.read(region))
    return torch.cat([_crop(pixels, w.relative_to(region), patch) for w in windows])


def _crop(pixels: torch.Tensor, window: Window, patch: tuple[int, int]) -> torch.Tensor:
    crop = pixels[:, :, window.top : window.bottom, window.left : window.right]
    pad_h, pad_w = patch[0] - crop.shape[-2], patch[1] - crop.shape[-1]
    if pad_h > 0 or pad_w > 0:
        crop = F.pad(crop, (0, max(pad_w, 0), 0, max(pad_h, 0)))
    return crop


def stitch_block(
    source: ImageSource,
    grid: PatchGrid,
    block: Window,
    patch_logits: Callable[[torch.Tensor, list[Window]], torch.Tensor],
    to_tensor: Callable[[np.ndarray], torch.Tensor],
    num_classes: int,
    sub_batch: int,
    *,
    average: str = "probabilities",
    blend: str = "uniform",
    read_per_sub_batch: bool = False,
    cache: dict | None = None,
    out: torch.Tensor | None = None,
    lookahead: list[Window] | None = None,
    below: dict | None = None,
) -> np.ndarray:
    """Class probabilities of ``block`` from the grid's patches that touch it.

    Args:
        source: the image.
        grid: the patch grid over the whole image.
        block: the window to predict.
        patch_logits: ``patch_logits(batch, windows)`` maps a normalised batch ``(N, C, ph, pw)``
            of the patches at ``windows`` to logits ``(N, K, h, w)``; at a size other than the
            patch's (GLNet's 1/4) they are upsampled bilinearly to the patch size when added.
        to_tensor: source pixels ``(H, W, C)`` -> a normalised tensor ``(1, C, H, W)``.
        num_classes: ``K``.
        sub_batch: patches per ``patch_logits`` call.
        average: ``"probabilities"``: softmax each patch, then average the probabilities
            (MONAI's sliding window); ``"logits"``: average the logits, then softmax (GLNet).
        blend: ``"uniform"`` or ``"gaussian"`` weights over each patch
            (``gigaseg.geometry.blend_weights``).
        read_per_sub_batch: read each sub-batch's bounding region when it runs (less memory)
            instead of the bounding region of all the block's patches at once (fewer reads).
        cache: a dict the caller keeps per image, blocks visited in row-major order: it carries
            the (probabilities or logits) of patches shared with the next block of the row.
        out: a flat float32 CPU tensor of at least ``K * h * w`` elements to hold the result
            (the returned array is then a view of it).
        lookahead: windows of the grid that the next block of the row will need (with ``cache``):
            when the block's last sub-batch is short, it is filled with those not computed yet, and
            their values wait in ``cache`` for that block (sub-batches stay full across block borders).
        below: a dict that receives the values of the patches computed here that reach below the block,
            for the caller to start the next row of blocks' ``cache`` with (they are then not computed
            again there).

    Returns:
        float32 ``(K, block.height, block.width)``.

    Raises:
        ValueError: ``average`` is not ``"probabilities"`` or ``"logits"``.
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    windows = patches_touching(grid, block)
    cached = cache if cache is not None else {}
    todo = [w for w in windows if w not in cached]
    short = (-len(todo)) % sub_batch
    if lookahead and cache is not None and todo and short:
        touching = set(windows)
        todo += [w for w in lookahead if w not in cached and w not in touching][:short]
    ph, pw = grid.patch
    size = num_classes * block.height * block.width
    if out is None or out.numel() < size:
        out = torch.empty(size)
    accum = out[:size].view(num_classes, block.height, block.width).zero_()
    weights = None if blend == "uniform" else torch.from_numpy(blend_weights(ph, pw, mode=blend))
    weight_sum = None if weights is None else torch.zeros((block.height, block.width))

    def add(window: Window, value: torch.Tensor) -> None:
        inside = window.intersection(block)
        if inside is None:  # a lookahead patch: it waits in the cache for the next block
            return
        src, dst = inside.relative_to(window), inside.relative_to(block)
        full = resize(value[None], (ph, pw))[0]
        if weights is None:
            accum[(slice(None), *dst.slices)] += full[(slice(None), *src.slices)]
        else:
            w = weights[src.slices]
            accum[(slice(None), *dst.slices)] += full[(slice(None), *src.slices)] * w
            weight_sum[dst.slices] += w

    for window in windows:
        if window in cached:
            add(window, cached[window])
            if window.right <= block.right:  # not needed by later blocks: release it now
                del cached[window]
    keep = {}
    if todo:
        region = None if read_per_sub_batch else bounding_window(todo).clip(source.height, source.width)
        pixels = None if region is None else to_tensor(source.read(region))  # (1, C, rh, rw)
        for start in range(0, len(todo), sub_batch):
            chunk = todo[start : start + sub_batch]
            if pixels is None:
                batch = read_patches(source, chunk, to_tensor, (ph, pw))
            else:
                batch = torch.cat([_crop(pixels, w.relative_to(region), (ph, pw)) for w in chunk])
            values = patch_logits(batch, chunk).float()
            del batch
            if average == "probabilities":
                values = torch.softmax(values, dim=1)
            values = values.cpu()
            for window, value in zip(chunk, values):
                add(window, value)
                if window.right > block.right or (below is not None and window.bottom > block.bottom):
                    kept = keep[window] = value.clone()  # not a view that holds the whole sub-batch
                    if below is not None and window.bottom > block.bottom:
                        below[window] = kept
            del values
    if cache is not None:
        kept_before = {w: p for w, p in cache.items() if w.right > block.right}
        cache.clear()
        cache.update(kept_before)
        cache.update({w: v for w, v in keep.items() if w.right > block.right})
    if weight_sum is not None:
        accum /= weight_sum.clamp_min(1e-12)
    else:  # uniform weights on a product grid: the overlap count is rows covered x columns covered
        rows, cols = torch.zeros(block.height), torch.zeros(block.width)
        for top in {w.top for w in windows}:
            rows[max(top, block.top) - block.top : min(top + ph, block.bottom) - block.top] += 1
        for left in {w.left for w in windows}:
            cols[max(left, block.left) - block.left : min(left + pw, block.right) - block.left] += 1
        accum /= rows.clamp_min(1).view(1, -1, 1)
        accum /= cols.clamp_min(1).view(1, 1, -1)
    if average == "logits":  # softmax in place: one block-sized buffer
        accum -= accum.amax(dim=0, keepdim=True)
        accum.exp_()
        accum /= accum.sum(dim=0, keepdim=True)
    return accum.numpy()
