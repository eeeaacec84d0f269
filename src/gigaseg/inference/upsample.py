"""Exact window crops of a bilinear upsampling, without upsampling the whole map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..window import Window


def upsample_window(maps: torch.Tensor, full_size: tuple[int, int], window: Window) -> torch.Tensor:
    """``window`` of ``F.interpolate(maps, full_size, mode="bilinear", align_corners=False)``.

    ``maps`` is ``(N, C, h, w)``. Sampling positions are the window's pixel centres
    mapped onto the small map, so the result equals cropping the full-size
    upsampling (to float rounding) while only the window is ever allocated —
    what lets a global view be used on a 20000x20000 image in blocks.
    """
    H, W = full_size
    device = maps.device
    ys = (torch.arange(window.top, window.bottom, device=device, dtype=torch.float32) + 0.5) / H * 2 - 1
    xs = (torch.arange(window.left, window.right, device=device, dtype=torch.float32) + 0.5) / W * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0).expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
