"""Pixel geometry shared by every method: windows, patch grids, coordinate maps, resizing.

No IO here, and torch is imported only inside the functions that handle tensors, so
processes that must not pay torch's memory (``gigaseg synth``) can use the geometry.
Conventions:

- Offsets and sizes are integer pixels; a :class:`Window` is a half-open rectangle
  (``top/left/height/width``).
- **Every grid window has the patch size**, so every patch has the network's input shape.
  A window may reach past the image border (an image side shorter than the patch, or the
  non-flush :func:`ceil_starts` grid); :attr:`PatchGrid.needs_padding` says so. The caller
  then reads ``window.clip(h, w)`` from the image and pads the read to the patch size
  (bottom/right), e.g. with :meth:`PatchGrid.padding`. Predictions for the padded part
  are discarded when stitching (clip the window again).
- A *normalised box* is ``(y0, x0, y1, x1)`` in units of the image side (0..1 inside the
  image); it moves a window between the full image, a downsampled global view and feature
  maps of any stride.
- Rounding is half up (``floor(x + 0.5)``) everywhere, never banker's rounding.
- :class:`Detections` are the objects found in an image: ``(x0, y0, x1, y1)`` boxes in its
  full-resolution pixel coordinates (pixel edges: a box over pixels 0..9 has x0=0, x1=10).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where feature maps are handled, so the geometry
    import torch  # stays usable by processes that must not pay torch's memory (synth)

Box = tuple[float, float, float, float]

__all__ = [
    "Box",
    "Detections",
    "Window",
    "resize",
    "PatchGrid",
    "PasteAverager",
    "blend_weights",
    "box_on_grid",
    "ceil_starts",
    "crop_resize",
    "glnet_starts",
    "normalized_box",
    "paste_average",
    "sliding_starts",
    "upsample_window",
]


@dataclass(frozen=True, order=True)
class Window:
    """Half-open pixel rectangle: rows ``top .. top+height``, columns ``left .. left+width``.

    Args:
        top: first row (may be negative or past the image: a window is not tied to an image).
        left: first column.
        height: number of rows (>= 0).
        width: number of columns (>= 0).

    Raises:
        ValueError: ``height`` or ``width`` is negative.
    """

    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 0 or self.width < 0:
            raise ValueError(f"window size must be non-negative, got {self.height}x{self.width}")

    @classmethod
    def from_bounds(cls, top: int, left: int, bottom: int, right: int) -> Window:
        """The window with the given edges.

        Args:
            top: first row.
            left: first column.
            bottom: row after the last one (exclusive).
            right: column after the last one (exclusive).

        Returns:
            ``Window(top, left, bottom - top, right - left)``.
        """
        return cls(top, left, bottom - top, right - left)

    @property
    def bottom(self) -> int:
        """Row after the last one (exclusive)."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """Column after the last one (exclusive)."""
        return self.left + self.width

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    @property
    def area(self) -> int:
        """Number of pixels, ``height * width``."""
        return self.height * self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """Numpy index for this window in an array whose origin is the image origin."""
        return (slice(self.top, self.bottom), slice(self.left, self.right))

    def intersection(self, other: Window) -> Window | None:
        """The overlap of this window and ``other``.

        Args:
            other: a window in the same coordinates.

        Returns:
            The common rectangle, or None when the two do not overlap (touching edges do not).
        """
        top, left = max(self.top, other.top), max(self.left, other.left)
        bottom, right = min(self.bottom, other.bottom), min(self.right, other.right)
        if bottom <= top or right <= left:
            return None
        return Window.from_bounds(top, left, bottom, right)

    def clip(self, height: int, width: int) -> Window:
        """This window clipped to an image of ``height x width``.

        Args:
            height: image height in pixels.
            width: image width in pixels.

        Returns:
            The part inside ``[0, height) x [0, width)``; it may be empty (zero height or width).
        """
        top, left = min(max(self.top, 0), height), min(max(self.left, 0), width)
        bottom, right = min(max(self.bottom, top), height), min(max(self.right, left), width)
        return Window.from_bounds(top, left, bottom, right)

    def relative_to(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer``.

        Args:
            outer: the window whose top-left becomes the origin.

        Returns:
            The same size, shifted by ``(-outer.top, -outer.left)``.
        """
        return Window(self.top - outer.top, self.left - outer.left, self.height, self.width)

    def contains(self, other: Window) -> bool:
        """Whether ``other`` lies entirely inside this window.

        Args:
            other: a window in the same coordinates.

        Returns:
            True when every pixel of ``other`` is in this window (an equal window counts).
        """
        return (
            self.top <= other.top
            and self.left <= other.left
            and other.bottom <= self.bottom
            and other.right <= self.right
        )


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _check_side(length: int, patch: int) -> None:
    if length < 1 or patch < 1:
        raise ValueError(f"side length and patch size must be >= 1, got L={length}, p={patch}")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


# --------------------------------------------------------------------------- 1-D grids


def glnet_starts(length: int, patch: int, min_overlap: int = 50) -> list[int]:
    """GLNet's tile starts along one side: evenly spread, overlapping, last tile flush.

    ``n`` is the smallest tile count whose tiles cover ``length`` with neighbouring tiles
    overlapping by at least ``min_overlap`` pixels; ``step = (length - patch) / (n - 1)``
    and tile ``i`` starts at ``round(i * step)`` (half up, computed exactly in integers),
    so the first tile is at 0 and the last ends exactly at the border. Because
    ``patch - min_overlap`` is an integer, ``step <= patch - min_overlap`` also bounds the
    rounded gaps, so the realised overlap is ``>= min_overlap`` for every pair.
    ``length <= patch`` gives ``[0]`` (one tile reaching past the border: pad).

    >>> glnet_starts(2448, 508)
    [0, 388, 776, 1164, 1552, 1940]

    Args:
        length: the image side in pixels.
        patch: the tile side in pixels.
        min_overlap: the least overlap, in pixels, between neighbouring tiles (GLNet's 50 by default).

    Returns:
        The tile starts, ascending.

    Raises:
        ValueError: ``length`` or ``patch`` is below 1, or ``min_overlap`` is not in ``[0, patch)``.
    """
    _check_side(length, patch)
    if not 0 <= min_overlap < patch:
        raise ValueError(f"min_overlap must be in [0, patch), got {min_overlap} for patch {patch}")
    if length <= patch:
        return [0]
    span = length - patch
    # smallest n with span / (n - 1) <= patch - min_overlap; it also covers (n >= ceil(L/p))
    n = 1 + -(-span // (patch - min_overlap))
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def ceil_starts(length: int, patch: int, flush: bool = False) -> list[int]:
    """Non-overlapping tiles at multiples of ``patch`` (MagNet's grid): ``ceil(L / p)`` tiles.

    With ``flush=False`` the last tile may reach past the border when ``patch`` does not
    divide ``length``; the caller pads the image (bottom/right) to ``n * patch``. With
    ``flush=True`` the last tile is shifted back inside (``start = length - patch``), so it
    overlaps its neighbour instead. A side shorter than the patch always gives ``[0]``,
    a tile that needs padding.

    Args:
        length: the image side in pixels.
        patch: the tile side in pixels.
        flush: shift the last tile back inside the image.

    Returns:
        The tile starts, ascending.

    Raises:
        ValueError: ``length`` or ``patch`` is below 1.
    """
    _check_side(length, patch)
    n = -(-length // patch)
    starts = [i * patch for i in range(n)]
    if flush and length >= patch:
        starts[-1] = length - patch
    return starts


def sliding_starts(length: int, patch: int, stride: int) -> list[int]:
    """Sliding-window starts ``0, stride, 2*stride, ...`` with the last tile flush.

    The last tile starts at ``length - patch`` (so its gap to the previous one is at most
    ``stride``). ``stride`` must be in ``1..patch`` (a larger stride would leave pixels
    uncovered). ``length <= patch`` gives ``[0]`` (pad).

    Args:
        length: the image side in pixels.
        patch: the tile side in pixels.
        stride: pixels between consecutive starts (before the last, flush one).

    Returns:
        The tile starts, ascending.

    Raises:
        ValueError: ``length`` or ``patch`` is below 1, or ``stride`` is not in ``1..patch``.
    """
    _check_side(length, patch)
    if not 1 <= stride <= patch:
        raise ValueError(f"stride must be in [1, patch={patch}] so tiles cover the side, got {stride}")
    if length <= patch:
        return [0]
    return list(range(0, length - patch, stride)) + [length - patch]


# --------------------------------------------------------------------------- 2-D grid


@dataclass(frozen=True)
class PatchGrid:
    """A 2-D grid of patch-size windows: the product of per-axis starts.

    Windows are in row-major order (all tiles of the first row band, left to right, then
    the next band). Every window is ``patch`` sized; see the module docstring for windows
    that reach past the image border. The constructors :meth:`glnet`, :meth:`ceil` and
    :meth:`sliding` build the starts.

    Args:
        image_shape: ``(height, width)`` of the image in pixels.
        patch: ``(height, width)`` of every window.
        row_starts: the windows' top rows, ascending.
        col_starts: the windows' left columns, ascending.

    Raises:
        ValueError: an axis has no start.
    """

    image_shape: tuple[int, int]
    patch: tuple[int, int]
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.row_starts or not self.col_starts:
            raise ValueError("a patch grid needs at least one start per axis")

    # ---- constructors
    @classmethod
    def glnet(cls, height: int, width: int, patch: int | Sequence[int], min_overlap: int = 50) -> PatchGrid:
        """GLNet's overlapping grid (:func:`glnet_starts` on each axis).

        Args:
            height: image height in pixels.
            width: image width in pixels.
            patch: the patch side, or a ``(height, width)`` pair.
            min_overlap: the least overlap, in pixels, between neighbouring patches.

        Returns:
            The grid.
        """
        ph, pw = _pair(patch, "patch")
        return cls(
            (height, width),
            (ph, pw),
            tuple(glnet_starts(height, ph, min_overlap)),
            tuple(glnet_starts(width, pw, min_overlap)),
        )

    @classmethod
    def ceil(cls, height: int, width: int, patch: int | Sequence[int], flush: bool = False) -> PatchGrid:
        """MagNet's non-overlapping grid (:func:`ceil_starts` on each axis).

        Args:
            height: image height in pixels.
            width: image width in pixels.
            patch: the patch side, or a ``(height, width)`` pair.
            flush: shift the last patch of each axis back inside the image.

        Returns:
            The grid.
        """
        ph, pw = _pair(patch, "patch")
        return cls(
            (height, width), (ph, pw), tuple(ceil_starts(height, ph, flush)), tuple(ceil_starts(width, pw, flush))
        )

    @classmethod
    def sliding(cls, height: int, width: int, patch: int | Sequence[int], stride: int | Sequence[int]) -> PatchGrid:
        """Sliding windows (:func:`sliding_starts` on each axis).

        Args:
            height: image height in pixels.
            width: image width in pixels.
            patch: the patch side, or a ``(height, width)`` pair.
            stride: the stride, or a ``(rows, cols)`` pair; each in ``1..patch``.

        Returns:
            The grid.
        """
        ph, pw = _pair(patch, "patch")
        sh, sw = _pair(stride, "stride")
        return cls(
            (height, width), (ph, pw), tuple(sliding_starts(height, ph, sh)), tuple(sliding_starts(width, pw, sw))
        )

    # ---- contents
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the grid."""
        return len(self.row_starts), len(self.col_starts)

    @cached_property
    def windows(self) -> list[Window]:
        """Every window of the grid, in row-major order."""
        ph, pw = self.patch
        return [Window(top, left, ph, pw) for top in self.row_starts for left in self.col_starts]

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[Window]:
        return iter(self.windows)

    def __getitem__(self, index: int) -> Window:
        return self.windows[index]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Size of the canvas the windows span (>= the image; larger means padding)."""
        return (
            max(self.image_shape[0], self.row_starts[-1] + self.patch[0]),
            max(self.image_shape[1], self.col_starts[-1] + self.patch[1]),
        )

    @property
    def needs_padding(self) -> bool:
        """True when some window reaches past the image border."""
        return self.padded_shape != tuple(self.image_shape)

    def padding(self, window: Window) -> tuple[int, int]:
        """How much the clipped read of ``window`` must be padded back to patch size.

        Args:
            window: a window of this grid.

        Returns:
            ``(bottom, right)`` pixels; ``(0, 0)`` for a window inside the image.
        """
        h, w = self.image_shape
        return max(0, window.bottom - h), max(0, window.right - w)

    def normalized_boxes(self) -> list[Box]:
        """The windows as normalised boxes.

        Returns:
            :func:`normalized_box` of every window, in grid order.
        """
        h, w = self.image_shape
        return [normalized_box(win, h, w) for win in self.windows]


# --------------------------------------------------------------------------- coordinate maps


def normalized_box(window: Window, image_h: int, image_w: int) -> Box:
    """``window`` as ``(y0, x0, y1, x1)`` in units of the image side.

    Values are in [0, 1] for windows inside the image; a window reaching past the border
    gives values > 1 (they are not clipped, so the box keeps the patch's true scale).

    Args:
        window: the window in image pixels.
        image_h: image height in pixels.
        image_w: image width in pixels.

    Returns:
        ``(top / image_h, left / image_w, bottom / image_h, right / image_w)``.
    """
    return (window.top / image_h, window.left / image_w, window.bottom / image_h, window.right / image_w)


def box_on_grid(norm_box: Sequence[float], grid_h: int, grid_w: int) -> Window:
    """The cells of a ``grid_h x grid_w`` map that a normalised box covers (GLNet's rule).

    ``top = round(y0 * grid_h)`` and, independently, ``height = round((y1 - y0) * grid_h)``
    (likewise for columns), rounding half up; the size is at least one cell. Rounding offset
    and size separately (rather than both edges) gives every patch of a grid the same cell
    size, as GLNet does (e.g. 508 px of 2448 on a 127 map: 26 cells). The result may reach
    one cell past the map (rounding) or further (boxes past the image border); clip it with
    ``Window.clip`` where that matters. On a grid of the image's own size the round trip
    ``box_on_grid(normalized_box(win, h, w), h, w) == win`` is exact.

    Args:
        norm_box: ``(y0, x0, y1, x1)`` in units of the image side.
        grid_h: rows of the map.
        grid_w: columns of the map.

    Returns:
        The covered cells, unclipped.
    """
    y0, x0, y1, x1 = (float(v) for v in norm_box)
    top, left = _round_half_up(y0 * grid_h), _round_half_up(x0 * grid_w)
    height = max(1, _round_half_up((y1 - y0) * grid_h))
    width = max(1, _round_half_up((x1 - x0) * grid_w))
    return Window(top, left, height, width)


def _box_list(norm_boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> list[Box]:
    import torch

    if isinstance(norm_boxes, torch.Tensor):
        norm_boxes = norm_boxes.detach().cpu().tolist()
    elif isinstance(norm_boxes, np.ndarray):
        norm_boxes = norm_boxes.tolist()
    boxes = [tuple(float(v) for v in box) for box in norm_boxes]
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a normalised box is (y0, x0, y1, x1), got {box!r}")
    return boxes  # type: ignore[return-value]


def resize(x: torch.Tensor, size: Sequence[int], *, area_when_shrinking: bool = False) -> torch.Tensor:
    """Resize the maps ``x`` (``(N, C, h, w)``) to ``size`` = ``(H, W)``; ``x`` itself when already that size.

    Args:
        x: a batch of maps (a float tensor).
        size: the output height and width.
        area_when_shrinking: average over each output pixel's area (``mode="area"``) when
            neither side grows, as for images read at a lower resolution; otherwise (and by
            default) bilinear with ``align_corners=False``, as feature maps are resized.

    Returns:
        A tensor ``(N, C, H, W)``.
    """
    import torch.nn.functional as F

    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if area_when_shrinking and size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def crop_resize(
    features: torch.Tensor,
    norm_boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
    out_size: int | Sequence[int],
    batch_index: Sequence[int] | None = None,
    *,
    to_cells: Callable[[Box, int, int], Window] | None = None,
) -> torch.Tensor:
    """Crop each box's region from a global feature map and resize it to ``out_size``.

    GLNet's global -> local crop. The region is :func:`box_on_grid` on ``H x W``, clipped
    to the map (GLNet slices the same way), then resized bilinearly (``align_corners=False``).
    Differentiable. Crops of equal size are resized in one call.

    Args:
        features: the global maps, ``(B, C, H, W)``.
        norm_boxes: ``N`` normalised boxes ``(y0, x0, y1, x1)`` (a sequence, an ``(N, 4)`` array or tensor).
        out_size: the output side, or an ``(oh, ow)`` pair.
        batch_index: box ``i`` is cut from map ``batch_index[i]``; None means map 0 when
            ``B == 1`` and map ``i`` when ``B == N``.
        to_cells: ``to_cells(box, H, W)`` replaces the clipped ``box_on_grid`` rule, for
            callers that place boxes on the map otherwise
            (``gigaseg.methods.glnet.model.crop_global`` keeps them inside).

    Returns:
        The crops, ``(N, C, oh, ow)``, in box order.

    Raises:
        ValueError: ``features`` is not 4-D, ``batch_index`` is missing or of the wrong length,
            a box is not 4 numbers, or a box lies outside the map.
    """
    import torch

    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    b, c, height, width = features.shape
    boxes = _box_list(norm_boxes)
    size = _pair(out_size, "out_size")
    if batch_index is None:
        if b not in (1, len(boxes)):
            raise ValueError(f"{len(boxes)} boxes for {b} feature maps: pass batch_index or a single map")
        batch_index = [0] * len(boxes) if b == 1 else list(range(len(boxes)))
    elif len(batch_index) != len(boxes):
        raise ValueError(f"batch_index has {len(batch_index)} entries for {len(boxes)} boxes")
    if not boxes:
        return features.new_empty((0, c, *size))

    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for i, (box, bi) in enumerate(zip(boxes, batch_index)):
        if to_cells is None:
            cells = box_on_grid(box, height, width).clip(height, width)
        else:
            cells = to_cells(box, height, width)
        if cells.area == 0:
            raise ValueError(f"box {box} lies outside the {height}x{width} feature map")
        rows, cols = cells.slices
        groups.setdefault(cells.shape, []).append((i, features[bi, :, rows, cols]))
    order: list[int] = []
    parts = []
    for members in groups.values():
        order.extend(i for i, _ in members)
        parts.append(resize(torch.stack([crop for _, crop in members]), size))
    out = torch.cat(parts)
    if order != sorted(order):
        out = out[torch.as_tensor(np.argsort(order), device=out.device)]
    return out


def upsample_window(maps: torch.Tensor, full_size: tuple[int, int], window: Window) -> torch.Tensor:
    """``window`` of ``F.interpolate(maps, full_size, mode="bilinear", align_corners=False)``.

    Sampling positions are the window's pixel centres mapped onto the small map, so the
    result equals cropping the full-size upsampling (to float rounding) while only the
    window is ever allocated: a global view can be used on a huge image block by block.

    Args:
        maps: ``(N, C, h, w)``.
        full_size: the ``(H, W)`` of the (never built) full-size upsampling.
        window: the part of it to compute.

    Returns:
        float32 ``(N, C, window.height, window.width)`` on ``maps``' device.
    """
    import torch
    import torch.nn.functional as F

    H, W = full_size
    device = maps.device
    ys = (torch.arange(window.top, window.bottom, device=device, dtype=torch.float32) + 0.5) / H * 2 - 1
    xs = (torch.arange(window.left, window.right, device=device, dtype=torch.float32) + 0.5) / W * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0).expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


class PasteAverager:
    """Accumulates patch maps onto a global grid and averages over overlaps.

    GLNet's local -> global merge, usable sub-batch by sub-batch: :meth:`add` resizes each
    patch map (bilinear, ``align_corners=False``) to its footprint :func:`box_on_grid` on
    the ``out_size`` grid, adds it there (parts past the grid are dropped) and counts the
    overlap; :meth:`result` divides by the count (cells no patch covered stay 0).
    Differentiable if the patch maps are.

    Args:
        out_size: the global grid's side, or an ``(H, W)`` pair.
    """

    def __init__(self, out_size: int | Sequence[int]):
        self.size = _pair(out_size, "out_size")
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def add(self, patch_maps: torch.Tensor, norm_boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor) -> None:
        """Paste a batch of patch maps onto the grid.

        Args:
            patch_maps: ``(N, C, h, w)``; ``C`` must match earlier batches.
            norm_boxes: the ``N`` patches' normalised boxes ``(y0, x0, y1, x1)``.

        Raises:
            ValueError: ``patch_maps`` is not 4-D, the counts of maps and boxes differ, or the
                channel count changed.
        """
        if patch_maps.dim() != 4:
            raise ValueError(f"patch maps must be (N, C, h, w), got shape {tuple(patch_maps.shape)}")
        boxes = _box_list(norm_boxes)
        if len(boxes) != patch_maps.shape[0]:
            raise ValueError(f"{patch_maps.shape[0]} patch maps for {len(boxes)} boxes")
        height, width = self.size
        if self._sum is None:
            self._sum = patch_maps.new_zeros((1, patch_maps.shape[1], height, width))
            self._count = patch_maps.new_zeros((1, 1, height, width))
        elif patch_maps.shape[1] != self._sum.shape[1]:
            raise ValueError(f"patch maps have {patch_maps.shape[1]} channels, earlier ones {self._sum.shape[1]}")
        assert self._count is not None

        groups: dict[tuple[int, int], list[tuple[int, Window]]] = {}
        for i, box in enumerate(boxes):
            cells = box_on_grid(box, height, width)
            groups.setdefault(cells.shape, []).append((i, cells))
        for shape, members in groups.items():
            resized = resize(patch_maps[[i for i, _ in members]], shape)
            for k, (_, cells) in enumerate(members):
                inside = cells.clip(height, width)
                if inside.area == 0:
                    continue
                rows, cols = inside.slices
                rel_rows, rel_cols = inside.relative_to(cells).slices
                self._sum[:, :, rows, cols] += resized[k : k + 1, :, rel_rows, rel_cols]
                self._count[:, :, rows, cols] += 1

    def result(self) -> torch.Tensor:
        """The average of the pasted maps.

        Returns:
            ``(1, C, H, W)``: the sum of the pasted maps divided by their overlap count (0 where
            no patch landed).

        Raises:
            ValueError: no patch maps were added.
        """
        if self._sum is None or self._count is None:
            raise ValueError("no patch maps were added")
        return self._sum / self._count.clamp(min=1)


def paste_average(
    patch_maps: torch.Tensor,
    norm_boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
    out_size: int | Sequence[int],
) -> torch.Tensor:
    """All patch maps at once through :class:`PasteAverager`: ``(N, C, h, w) -> (1, C, H, W)``.

    Args:
        patch_maps: ``(N, C, h, w)``.
        norm_boxes: the ``N`` patches' normalised boxes ``(y0, x0, y1, x1)``.
        out_size: the global grid's side, or an ``(H, W)`` pair.

    Returns:
        ``(1, C, H, W)``, averaged over overlaps.
    """
    paster = PasteAverager(out_size)
    paster.add(patch_maps, norm_boxes)
    return paster.result()


# --------------------------------------------------------------------------- blending


def blend_weights(
    height: int, width: int, mode: str = "uniform", sigma_scale: float = 0.125, min_weight: float = 1e-3
) -> np.ndarray:
    """Per-pixel weights (float32, ``height x width``) for stitching overlapping predictions.

    ``"uniform"``: all ones. ``"gaussian"`` (as MONAI's sliding-window inferer): a separable
    Gaussian centred on the patch with ``sigma = sigma_scale * side`` per axis, scaled so
    its maximum is 1 and clamped below at ``min_weight`` so border pixels, which may be
    covered by this patch alone, never get weight 0. Stitch as
    ``sum(w * pred) / sum(w)``; ``torch.from_numpy`` gives the tensor.

    Args:
        height: patch height in pixels.
        width: patch width in pixels.
        mode: ``"uniform"`` or ``"gaussian"``.
        sigma_scale: the Gaussian's sigma as a fraction of each side.
        min_weight: the least weight, in ``(0, 1]``.

    Returns:
        float32 ``(height, width)`` weights.

    Raises:
        ValueError: a side is below 1, ``mode`` is unknown, or ``sigma_scale``/``min_weight``
            are out of range.
    """
    if height < 1 or width < 1:
        raise ValueError(f"blend size must be >= 1, got {height}x{width}")
    if mode == "uniform":
        return np.ones((height, width), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"blend mode must be 'uniform' or 'gaussian', got {mode!r}")
    if sigma_scale <= 0 or not 0 < min_weight <= 1:
        raise ValueError("sigma_scale must be > 0 and min_weight in (0, 1]")

    def axis(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-0.5 * (x / (sigma_scale * n)) ** 2)

    weights = np.outer(axis(height), axis(width))
    weights /= weights.max()
    return np.maximum(weights, min_weight).astype(np.float32)


@dataclass(frozen=True)
class Detections:
    """The objects found in one image, in its full-resolution pixel coordinates.

    Attributes:
        boxes: float32 ``(N, 4)``, ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``.
        scores: float32 ``(N,)``, the confidence of each box.
        labels: int64 ``(N,)``, the class of each box.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels: one each per object")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise ValueError("a box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.scores)
