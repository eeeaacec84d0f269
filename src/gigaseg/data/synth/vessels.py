"""Synthetic thin-structure scenes: branching, vessel-like curves 1-5 px wide (DRIVE-style).

A binary segmentation benchmark in the spirit of DRIVE (retinal vessels), at 2048 x 2048
and larger, where a downsampled model loses the thin vessels and a full-resolution one
can find them.

**Geometry.** Vessels are centrelines drawn from the seed before any pixel is
rendered: polylines of 2-px steps, one width per step. The scene is cut into
``CELL x CELL`` cells, each drawing its own trees (``grow_forest``) from its own seed.
A tree has a root inside its cell from which a few trunks (``root_width``, about 5 px)
radiate. A branch is a random walk with momentum: its curvature is an exponentially
weighted sum of random kicks (smooth bends, tortuosity growing as the vessel thins) and
its heading drifts from its start by a leaky sum of the curvature (it bends but does
not curl up). Along a branch, children split off every ``branch_gap`` px at
``branch_angle`` to either side, ``child_ratio`` times as wide as the parent there; the
parent then narrows by Murray's law (``w_parent' ** 3 = w_parent ** 3 - w_child ** 3``)
and tapers slowly between branch points, never below ``min_width`` (1 px). Children
narrower than ``min_width`` are not grown, so every tree ends in 1-px twigs. A cell adds
trees until its trees' vessels inside the image (length times width) reach a share of
the cell's area drawn from ``share``. Branches are cut where they leave the cell by
``REACH`` px (or the image by a small margin), so trees cross cell borders freely.

**Mask rule.** Pixel ``(row, col)`` has its centre at the point ``(row, col)`` of the
centrelines' coordinates. It is a vessel pixel (class 1) exactly when its centre lies
strictly within half the width of some centreline step: ``distance(centre, segment) <
width / 2``, the distance to the closed segment between two consecutive centreline
points and the width that step carries (the mean of its end points' widths). Its
*vessel width* (``render_widths``) is the largest width among the steps that contain it.

**Image.** RGB uint8, fundus-like: an orange-red background under slow illumination
(``textures.SmoothField``), a mottled mid-frequency texture (the ``gravel`` photograph
magnified six times, bilinearly interpolated) and a fine one with thin, line-like blades
(``grass``), both tiled by reflection (no seams), slow colour drift and per-pixel noise.
Vessels darken it, most in green, by their anti-aliased coverage (the
share of a pixel, taken across the vessel, that the vessel covers: 1-px vessels stay
visible wherever they fall) times a contrast that falls with the width, so thick
vessels are clear and 1-px ones faint. Small dark spots (not vessels) are scattered over
the background, so darkness alone does not make a vessel.

**Streaming.** Every rendered pixel is a pure function of its position and the scene's
seed: a window is rasterised from the centreline steps that reach it (a halo of half
the widest vessel plus one pixel), taken from the cell rows within ``REACH`` of it, so
vessels crossing band borders are continuous and a scene renders identically whatever
the bands it is cut into. Memory is bounded by the band being rendered (in chunks of
``_IMAGE_CHUNK`` pixels and batches of segments) plus the centrelines of the last
``_CACHED_ROWS`` cell rows (24 bytes per 2-px step): it grows with the scene's width,
not with its area.

**Self-check** (``VesselCheck``, band by band, ``--report``): the vessel share, the
share of vessel pixels whose vessel width is at most ``thin_width`` (2 px), and the
*4x4 ceiling*: the best F1 any mask that is constant over 4 x 4 cells (e.g. a model's
output at 1/4 resolution, upsampled by nearest) can reach on the thin vessels, the
pixels of thicker vessels left unscored; at full resolution the mask itself scores 1.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import ConfigError
from ...geometry import Window
from ..labels import IGNORE_INDEX
from . import output
from .output import MANIFEST, write_text
from .textures import SmoothField, pixel_noise, texture

CLASSES = ("background", "vessel")
BACKGROUND, VESSEL = 0, 1
PALETTE = np.array([(0, 0, 0), (255, 255, 255)], dtype=np.uint8)

GENERATOR = "gigaseg synth vessels"
FORMAT_VERSION = 1

#: arc length of one centreline step, in pixels
STEP = 2.0
#: vessels of at most this width (px) are "thin" in the self-check
THIN_WIDTH = 2.0
#: side of the cells a coarse mask is constant over, in the self-check
CEILING_FACTOR = 4
#: bounds the self-check holds a scene to
VESSEL_SHARE_BOUNDS = (0.02, 0.15)
THIN_MIN_SHARE = 0.4
THIN_MAX_CEILING_F1 = 0.6
#: the share bounds hold only for scenes of at least this many pixels (in smaller ones a tree's trunks can dominate)
MIN_CHECKED_PIXELS = 1024 * 1024
#: rows per band when a mask is read back and checked (a multiple of CEILING_FACTOR)
BAND_ROWS = 512

#: pixels of one image render chunk (bounds the float32 intermediates)
_IMAGE_CHUNK = (512, 2048)
#: distance-to-segment evaluations per rasterisation batch (bounds its float64 intermediates)
_BATCH_PIXELS = 1 << 19
#: how far (px) a branch may leave the image before it is cut
_MARGIN = 32.0
#: side of the square cells trees are rooted in (each cell draws its own trees)
CELL = 2048
#: how far (px) a tree's branches may reach beyond its cell before they are cut
REACH = 2048
#: cell rows whose centrelines a scene keeps (enough for any band of up to CELL rows)
_CACHED_ROWS = 5
_SCENE_TAG, _TREE_TAG = 0x5CE4E, 0x7E55E15
#: the curvature is the kicks smoothed by this exponential kernel ("momentum")
_MOMENTUM = 0.88
_MOMENTUM_KERNEL = _MOMENTUM ** np.arange(64)
#: a branch's heading drifts from its start by the curvature summed with this leak per step
_RETURN = 0.99
_RETURN_KERNEL = _RETURN ** np.arange(512)
#: mean RGB of the background, and how much a vessel darkens each channel (relative to green)
_BACKGROUND_RGB = (182.0, 94.0, 46.0)
_ABSORB = np.array([0.55, 1.0, 0.8], dtype=np.float32)
_NOISE = 12.0  # peak-to-peak of the per-pixel uniform noise, grey levels
#: the background's mid-frequency and fine textures: (photograph, amplitude, magnification)
_COARSE = ("gravel", 0.05, 6.0)
_FINE = ("grass", 0.03, 1.0)


@dataclass(frozen=True)
class VesselConfig:
    """How a vessel scene is drawn. Sizes are pixels; ranges ``(low, high)`` are drawn uniformly.

    Args:
        share: the share of a cell's area that its trees' vessels inside the image (length times width)
            must reach before it stops adding trees, drawn per cell.
        root_width: width of a tree's trunks.
        min_width: the narrowest vessel; children narrower than this are not grown.
        trunks: ``(min, max)`` trunks radiating from a tree's root, inclusive.
        branch_length: a branch's longest length, per pixel of its starting width.
        branch_gap: distance along a branch between the points where children split off.
        child_ratio: a child's width over its parent's where it splits off.
        branch_angle: angle between a child and its parent, in degrees, to either side.
        taper: the share of its width a branch loses along its whole length, besides branching.
        tortuosity: standard deviation of the per-step curvature kicks of a 1-px vessel, in radians
            (a vessel ``w`` px wide gets ``tortuosity / sqrt(w)``).
        contrast: how much a vessel darkens the green channel where it covers a whole pixel, for a
            1-px and a 5-px vessel (linear in between, constant beyond).
        spots: dark spots (not vessels) per 2048 x 2048 pixels.
        spot_radius: the spots' radius.
        max_trees: trees a cell draws at most, per 2048 x 2048 pixels of its area (at least one).

    Raises:
        ConfigError: a value is out of range.
    """

    share: tuple[float, float] = (0.045, 0.07)
    root_width: tuple[float, float] = (4.2, 5.5)
    min_width: float = 1.0
    trunks: tuple[int, int] = (2, 4)
    branch_length: tuple[float, float] = (120.0, 320.0)
    branch_gap: tuple[float, float] = (60.0, 220.0)
    child_ratio: tuple[float, float] = (0.55, 0.9)
    branch_angle: tuple[float, float] = (30.0, 75.0)
    taper: float = 0.25
    tortuosity: float = 0.012
    contrast: tuple[float, float] = (0.14, 0.42)
    spots: float = 60.0
    spot_radius: tuple[float, float] = (1.5, 5.0)
    max_trees: float = 40.0

    def __post_init__(self) -> None:
        def check_range(name: str, lo: float, hi: float) -> None:
            value = getattr(self, name)
            if not (lo <= value[0] <= value[1] <= hi):
                raise ConfigError(
                    f"vessel config {name} must be (low, high) with {lo} <= low <= high <= {hi}, got {value}"
                )

        if not 0.5 <= self.min_width <= 8:
            raise ConfigError(f"vessel config min_width must be in [0.5, 8], got {self.min_width}")
        for name, lo, hi in (
            ("share", 1e-6, 0.5),
            ("root_width", self.min_width, 16),
            ("trunks", 1, 8),
            ("branch_length", 1, 10000),
            ("branch_gap", 1, 10000),
            ("child_ratio", 0.05, 0.99),
            ("branch_angle", 0, 180),
            ("contrast", 0, 1),
            ("spot_radius", 0.5, 64),
        ):
            check_range(name, lo, hi)
        for name in ("taper", "tortuosity", "spots", "max_trees"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"vessel config {name} must be non-negative, got {getattr(self, name)}")
        if self.taper >= 1:
            raise ConfigError(f"vessel config taper must be below 1, got {self.taper}")


# ----------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True, eq=False)
class Centrelines:
    """Centreline steps (segments) of all vessels, sorted by their top row.

    Args:
        y0: first end point's row, per segment (float32).
        x0: first end point's column.
        y1: second end point's row.
        x1: second end point's column.
        width: the vessel's width along the segment, in pixels (float32).
        top: the segment's top row, ``min(y0, y1)``, ascending.
    """

    y0: np.ndarray
    x0: np.ndarray
    y1: np.ndarray
    x1: np.ndarray
    width: np.ndarray
    top: np.ndarray

    @classmethod
    def from_branches(cls, branches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Centrelines:
        """The segments of polylines, sorted by top row.

        Args:
            branches: ``(points, widths)`` pairs: ``(n + 1, 2)`` (row, col) vertices and the ``(n,)``
                widths of the steps between them.

        Returns:
            The segments (none for no branches).
        """
        parts = [(pts[:-1], pts[1:], w) for pts, w in branches if len(w)]
        if not parts:
            empty = np.zeros(0, dtype=np.float32)
            return cls(empty, empty, empty, empty, empty, empty)
        p0 = np.concatenate([p for p, _, _ in parts]).astype(np.float32)
        p1 = np.concatenate([p for _, p, _ in parts]).astype(np.float32)
        width = np.concatenate([w for _, _, w in parts]).astype(np.float32)
        top = np.minimum(p0[:, 0], p1[:, 0])
        order = np.argsort(top, kind="stable")
        return cls(p0[order, 0], p0[order, 1], p1[order, 0], p1[order, 1], width[order], top[order])

    def __len__(self) -> int:
        return len(self.width)

    @property
    def max_width(self) -> float:
        """The widest segment's width (0 without segments)."""
        return float(self.width.max()) if len(self) else 0.0

    def near(self, window: Window) -> np.ndarray:
        """Indices of the segments whose pixels (anti-aliased fringe included) may lie in ``window``.

        Args:
            window: the region to render.

        Returns:
            int64 indices into the segment arrays.
        """
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        reach = self.max_width / 2 + 1.5
        lo, hi = np.searchsorted(self.top, [window.top - STEP - reach - 1, window.bottom + reach])
        idx = np.arange(lo, hi)
        if not idx.size:
            return idx
        y0, y1, x0, x1 = self.y0[idx], self.y1[idx], self.x0[idx], self.x1[idx]
        pad = self.width[idx] / 2 + 1.5
        keep = (
            (np.minimum(y0, y1) - pad < window.bottom)
            & (np.maximum(y0, y1) + pad > window.top)
            & (np.minimum(x0, x1) - pad < window.right)
            & (np.maximum(x0, x1) + pad > window.left)
        )
        return idx[keep]

    def rasterise(
        self, window: Window, what: str, contrast: tuple[float, float] = (0.0, 0.0), out: np.ndarray | None = None
    ) -> np.ndarray:
        """One raster of the vessels over ``window``.

        Pixel ``(r, c)`` is the point ``(r, c)``; ``d`` is its distance to a segment of width ``w``.

        Args:
            window: the region to render.
            what: ``"mask"`` (bool: ``d < w / 2`` for some segment), ``"width"`` (float32: the largest
                ``w`` among segments with ``d < w / 2``, 0 elsewhere) or ``"dark"`` (float32: the
                largest anti-aliased coverage times ``contrast`` of the width).
            contrast: for ``"dark"``: the contrast of a 1-px and of a 5-px vessel.
            out: a ``window.shape`` array of that type to combine into (logical or, maximum), e.g. the
                raster of other segments; None: start from zeros.

        Returns:
            ``window.shape`` array as described (``out`` when given).

        Raises:
            ValueError: ``what`` is none of those, or ``out`` is not a C-contiguous array of the window's shape.
        """
        if what not in ("mask", "width", "dark"):
            raise ValueError(f"unknown raster {what!r}")
        h, w = window.shape
        if out is None:
            out = np.zeros((h, w), dtype=bool if what == "mask" else np.float32)
        elif out.shape != (h, w) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {h}x{w} array, got {out.shape}")
        idx = self.near(window)
        if not idx.size or not h or not w:
            return out
        flat_out = out.reshape(-1)  # a view: out is contiguous
        width = self.width[idx]
        # box side: rows (cols) of pixels with d < w / 2 + 1/2, for a segment of length STEP
        sides = np.ceil(STEP + width.astype(np.float64) + 1 + 1e-6).astype(np.int64) + 1
        for side in np.unique(sides):
            group = idx[sides == side]
            batch = max(1, _BATCH_PIXELS // int(side * side))
            for start in range(0, group.size, batch):
                self._scatter(flat_out, window, group[start : start + batch], int(side), what, contrast)
        return out

    def _scatter(
        self, out: np.ndarray, window: Window, idx: np.ndarray, side: int, what: str, contrast: tuple[float, float]
    ) -> None:
        y0, x0 = self.y0[idx].astype(np.float64), self.x0[idx].astype(np.float64)
        ey, ex = self.y1[idx] - y0, self.x1[idx] - x0  # float64
        width = self.width[idx]
        half = width.astype(np.float64) / 2
        reach = half + 0.5 if what == "dark" else half
        r0 = np.floor(np.minimum(y0, y0 + ey) - reach).astype(np.int64)
        c0 = np.floor(np.minimum(x0, x0 + ex) - reach).astype(np.int64)
        offsets = np.arange(side)
        rows = r0[:, None] + offsets  # (n, side)
        cols = c0[:, None] + offsets
        dy = (rows - y0[:, None])[:, :, None]
        dx = (cols - x0[:, None])[:, None, :]
        length2 = (ey * ey + ex * ex)[:, None, None]
        eyb, exb = ey[:, None, None], ex[:, None, None]
        t = np.clip((dy * eyb + dx * exb) / length2, 0.0, 1.0)
        qy = dy - t * eyb
        qx = dx - t * exb
        d2 = qy * qy + qx * qx  # (n, side, side)
        del t, qy, qx
        valid = ((rows >= window.top) & (rows < window.bottom))[:, :, None] & (
            (cols >= window.left) & (cols < window.right)
        )[:, None, :]
        flat = (rows - window.top)[:, :, None] * window.width + (cols - window.left)[:, None, :]
        hb = half[:, None, None]
        if what == "mask":
            hit = valid & (d2 < hb * hb)
            out[flat[hit]] = True
        elif what == "width":
            hit = valid & (d2 < hb * hb)
            np.maximum.at(out, flat[hit], np.broadcast_to(width[:, None, None], hit.shape)[hit])
        else:
            d = np.sqrt(d2)
            # the share of the pixel, taken across the vessel (a unit box), that the vessel covers
            coverage = np.clip(np.minimum(d + 0.5, hb) - np.maximum(d - 0.5, -hb), 0.0, 1.0)
            hit = valid & (coverage > 0)
            strength = _contrast(width, contrast).astype(np.float64)[:, None, None]
            values = (coverage * strength).astype(np.float32)
            np.maximum.at(out, flat[hit], values[hit])


def _contrast(width: np.ndarray, contrast: tuple[float, float]) -> np.ndarray:
    """Darkening of a fully covered pixel: ``contrast[0]`` at 1 px, ``contrast[1]`` from 5 px."""
    low, high = contrast
    return (low + (high - low) * np.clip((width.astype(np.float32) - 1) / 4, 0, 1)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Spots:
    """Dark discs on the background (not vessels), sorted by row.

    Args:
        cy: centre rows.
        cx: centre columns.
        radius: radii, in pixels.
        strength: how much each darkens the green channel at its centre.
    """

    cy: np.ndarray
    cx: np.ndarray
    radius: np.ndarray
    strength: np.ndarray

    def darken(self, out: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> None:
        """Raise ``out`` (darkness on the grid ``ys x xs``) to the spots' anti-aliased darkness.

        Args:
            out: ``(len(ys), len(xs))`` float32 darkness, updated in place (maximum).
            ys: the grid's rows, consecutive integers.
            xs: the grid's columns, consecutive integers.
        """
        if not len(self.cy) or not ys.size or not xs.size:
            return
        reach = float(self.radius.max()) + 2
        lo, hi = np.searchsorted(self.cy, [ys[0] - reach, ys[-1] + reach])
        for s in range(lo, hi):
            r = self.radius[s] + 1
            r0, r1 = max(ys[0], math.floor(self.cy[s] - r)), min(ys[-1] + 1, math.ceil(self.cy[s] + r) + 1)
            c0, c1 = max(xs[0], math.floor(self.cx[s] - r)), min(xs[-1] + 1, math.ceil(self.cx[s] + r) + 1)
            if r0 >= r1 or c0 >= c1:
                continue
            dy = (np.arange(r0, r1) - self.cy[s])[:, None]
            dx = (np.arange(c0, c1) - self.cx[s])[None, :]
            coverage = np.clip(self.radius[s] + 0.5 - np.sqrt(dy * dy + dx * dx), 0.0, 1.0)
            block = out[r0 - ys[0] : r1 - ys[0], c0 - xs[0] : c1 - xs[0]]
            np.maximum(block, (coverage * self.strength[s]).astype(np.float32), out=block)


def _grow_branch(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    width0: float,
    config: VesselConfig,
    box: tuple[float, float, float, float],
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, float, float]]]:
    """One branch, cut where it first leaves ``box`` (top, bottom, left, right).

    Returns its ``(n + 1, 2)`` points, ``(n,)`` step widths and children ``(start, heading, width)``.
    """
    c = config
    length = width0 * rng.uniform(*c.branch_length)
    n = max(1, int(math.ceil(length / STEP)))
    kicks = rng.normal(0.0, c.tortuosity / math.sqrt(width0), n)
    curvature = np.convolve(kicks, _MOMENTUM_KERNEL)[:n]
    # the heading's drift from its start is a leaky sum of the curvature: it bends but does not curl up
    theta = heading + np.convolve(curvature, _RETURN_KERNEL)[:n]
    points = np.empty((n + 1, 2))
    points[0] = start
    points[1:, 0] = start[0] + STEP * np.cumsum(np.sin(theta))
    points[1:, 1] = start[1] + STEP * np.cumsum(np.cos(theta))
    widths = width0 * (1.0 - c.taper * np.arange(n + 1) / n)  # at the points

    children = []
    at = rng.uniform(*c.branch_gap) * rng.uniform(0.3, 1.0)
    while at < length:
        k = min(int(at / STEP), n - 1)
        ratio, side, angle = rng.uniform(*c.child_ratio), rng.choice((-1.0, 1.0)), rng.uniform(*c.branch_angle)
        here = widths[k]
        child = here * ratio
        if child >= c.min_width:
            children.append((k, float(theta[k] + side * math.radians(angle)), float(child)))
            remaining = max(here**3 - child**3, 0.0) ** (1 / 3)
            widths[k:] *= max(remaining, c.min_width) / here
        at += rng.uniform(*c.branch_gap)
    widths = np.maximum(widths, c.min_width)
    step_widths = (widths[:-1] + widths[1:]) / 2

    top, bottom, left, right = box
    outside = (points[:, 0] < top) | (points[:, 0] > bottom) | (points[:, 1] < left) | (points[:, 1] > right)
    if outside.any():
        stop = int(np.argmax(outside))  # the first point outside: keep the step that reaches it
        points, step_widths = points[: stop + 1], step_widths[:stop]
        children = [ch for ch in children if ch[0] < stop]
    return points, step_widths, [(points[k].copy(), heading, width) for k, heading, width in children]


def _ink(points: np.ndarray, widths: np.ndarray, height: int, width: int) -> float:
    """Length times width of the steps whose midpoint lies inside the image."""
    if not len(widths):
        return 0.0
    mid = (points[:-1] + points[1:]) / 2
    inside = (mid[:, 0] >= -0.5) & (mid[:, 0] < height - 0.5) & (mid[:, 1] >= -0.5) & (mid[:, 1] < width - 0.5)
    return float(STEP * widths[inside].sum())


def grow_forest(
    rng: np.random.Generator, cell: Window, height: int, width: int, config: VesselConfig
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """The vessel trees rooted in one cell of a scene.

    Trees are added, each rooted uniformly in ``cell``, until the vessels inside the image
    (length times width) reach a share of the cell's area drawn from ``config.share``, or
    ``config.max_trees`` (per 2048 x 2048 pixels) is reached. Branches are cut where they
    leave the image by ``_MARGIN`` or the cell by ``REACH``.

    Args:
        rng: the random generator to draw from.
        cell: the cell, inside the image.
        height: the image's rows.
        width: the image's columns.
        config: how trees are drawn.

    Returns:
        ``(branches, stats)``: ``(points, step widths)`` per branch (float32), and the counts of
        trees and branches and the target share.
    """
    c = config
    box = (
        max(-_MARGIN, cell.top - REACH),
        min(height + _MARGIN, cell.bottom + REACH),
        max(-_MARGIN, cell.left - REACH),
        min(width + _MARGIN, cell.right + REACH),
    )
    share = rng.uniform(*c.share)
    target = share * cell.area
    max_trees = max(1, int(math.ceil(c.max_trees * cell.area / 2048**2)))
    branches: list[tuple[np.ndarray, np.ndarray]] = []
    ink, trees = 0.0, 0
    while ink < target and trees < max_trees:
        trees += 1
        root = rng.uniform((cell.top, cell.left), (cell.bottom, cell.right))
        n_trunks = int(rng.integers(c.trunks[0], c.trunks[1] + 1))
        base = rng.uniform(0, 2 * math.pi)
        queue = deque(
            (root, base + 2 * math.pi * k / n_trunks + rng.uniform(-0.3, 0.3), rng.uniform(*c.root_width))
            for k in range(n_trunks)
        )
        while queue:
            start, heading, w0 = queue.popleft()
            points, widths, children = _grow_branch(rng, start, heading, w0, c, box)
            branches.append((points.astype(np.float32), widths.astype(np.float32)))
            ink += _ink(points, widths, height, width)
            queue.extend(children)
    stats = {"trees": trees, "branches": len(branches), "segments": sum(len(w) for _, w in branches)}
    return branches, {**stats, "target_share": float(share)}


# ----------------------------------------------------------------------------------
# the scene


@dataclass(frozen=True, eq=False)
class VesselScene:
    """One scene: its size, seed and look. Vessels and pixels are generated on demand.

    The scene is cut into ``CELL x CELL`` cells; each draws its own trees
    (``grow_forest``) from ``default_rng([seed, index, tag, cell_row, cell_col])``, so a
    window needs only the centrelines of the cell rows within ``REACH`` of it, and the
    scene keeps those of the last ``_CACHED_ROWS`` cell rows used: memory grows with the
    scene's width, not its area.

    Args:
        height: scene rows.
        width: scene columns.
        seed: the data set's seed.
        index: the scene's index in the data set.
        config: how the scene is drawn.
        spots: the dark spots on the background.
        noise_seed: seed of the per-pixel noise.
        light: the illumination field (relative).
        drift: per channel, the slow colour drift (grey levels).
        texture_shift: the background textures' shifts, ``(rows, cols)`` of the coarse then the fine one.
    """

    height: int
    width: int
    seed: int
    index: int
    config: VesselConfig
    spots: Spots
    noise_seed: int
    light: SmoothField
    drift: tuple[SmoothField, SmoothField, SmoothField]
    texture_shift: tuple[int, int, int, int]
    _rows: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _stats: dict = field(default_factory=dict, repr=False)

    @classmethod
    def generate(
        cls, height: int, width: int, seed: int = 0, index: int = 0, config: VesselConfig | None = None
    ) -> VesselScene:
        """The scene ``index`` of seed ``seed``: its look drawn from ``default_rng([seed, index, tag])``.

        Args:
            height: scene rows.
            width: scene columns.
            seed: the data set's seed.
            index: the scene's index in the data set.
            config: how to draw it; None: ``VesselConfig()``.

        Returns:
            The scene (the same pixels for the same arguments).

        Raises:
            ConfigError: the size is not positive, or the seed or index is negative.
        """
        c = config or VesselConfig()
        if height < 1 or width < 1:
            raise ConfigError(f"scene size must be positive, got {height}x{width}")
        if seed < 0 or index < 0:
            raise ConfigError(f"--seed must be non-negative, got {seed}" if seed < 0 else f"negative index {index}")
        rng = np.random.default_rng([int(seed), int(index), _SCENE_TAG])
        n_spots = int(rng.poisson(c.spots * height * width / 2048**2))
        cy = rng.uniform(0, height, n_spots)
        order = np.argsort(cy, kind="stable")
        spots = Spots(
            cy=cy[order],
            cx=rng.uniform(0, width, n_spots)[order],
            radius=rng.uniform(*c.spot_radius, n_spots)[order],
            strength=rng.uniform(c.contrast[0] * 0.8, c.contrast[1], n_spots)[order],
        )
        return cls(
            height=int(height),
            width=int(width),
            seed=int(seed),
            index=int(index),
            config=c,
            spots=spots,
            noise_seed=int(rng.integers(2**32)),
            light=SmoothField.random(rng, 3, (1500, 6000), 0.12),
            drift=tuple(SmoothField.random(rng, 2, (2000, 8000), 4.0) for _ in range(3)),
            texture_shift=tuple(int(v) for v in rng.integers(0, 1024, 4)),
        )

    # -- vessels -------------------------------------------------------------------------

    @property
    def cell_grid(self) -> tuple[int, int]:
        """Rows and columns of cells (the last ones may be cut by the scene's edge)."""
        return -(-self.height // CELL), -(-self.width // CELL)

    def cell(self, row: int, col: int) -> Window:
        """The pixels of cell ``(row, col)``.

        Args:
            row: the cell's row in the grid.
            col: the cell's column.

        Returns:
            The cell's window, clipped to the scene.
        """
        return Window(row * CELL, col * CELL, CELL, CELL).clip(self.height, self.width)

    def cell_row_vessels(self, row: int) -> Centrelines:
        """The centrelines of the trees rooted in one row of cells (cached).

        Args:
            row: the row of cells.

        Returns:
            Their segments, sorted by top row.
        """
        cached = self._rows.get(row)
        if cached is not None:
            self._rows.move_to_end(row)
            return cached
        branches = []
        for col in range(self.cell_grid[1]):
            rng = np.random.default_rng([self.seed, self.index, _TREE_TAG, row, col])
            grown, stats = grow_forest(rng, self.cell(row, col), self.height, self.width, self.config)
            branches.extend(grown)
            self._stats[row, col] = {**stats, "max_width": max((float(w.max()) for _, w in grown if len(w)), default=0)}
        vessels = Centrelines.from_branches(branches)
        del branches
        self._rows[row] = vessels
        while len(self._rows) > _CACHED_ROWS:
            self._rows.popitem(last=False)
        return vessels

    def vessels_near(self, window: Window) -> Iterator[Centrelines]:
        """The centrelines of every cell row whose trees may reach ``window``.

        Args:
            window: the region to render.

        Yields:
            One ``Centrelines`` per cell row, top to bottom.
        """
        reach = REACH + _MARGIN + self.config.root_width[1]
        first = max(0, int((window.top - reach) // CELL))
        last = min(self.cell_grid[0] - 1, int((window.bottom + reach) // CELL))
        for row in range(first, last + 1):
            yield self.cell_row_vessels(row)

    def _raster(self, window: Window, what: str) -> np.ndarray:
        out = np.zeros(window.shape, dtype=bool if what == "mask" else np.float32)
        for vessels in self.vessels_near(window):
            vessels.rasterise(window, what, self.config.contrast, out=out)
        return out

    def describe(self) -> dict:
        """What the scene holds, for the manifest (draws the trees of cells not drawn yet).

        Returns:
            Counts of cells, trees, branches, centreline segments and spots, the widest vessel and the
            target vessel share (averaged over the cells by area), rounded.
        """
        rows, cols = self.cell_grid
        for row in range(rows):
            if any((row, col) not in self._stats for col in range(cols)):
                self.cell_row_vessels(row)
        stats = [self._stats[row, col] for row in range(rows) for col in range(cols)]
        areas = [self.cell(row, col).area for row in range(rows) for col in range(cols)]
        return {
            "cells": rows * cols,
            "trees": sum(s["trees"] for s in stats),
            "branches": sum(s["branches"] for s in stats),
            "segments": sum(s["segments"] for s in stats),
            "spots": len(self.spots.cy),
            "max_width": round(max(s["max_width"] for s in stats), 3),
            "target_share": round(sum(s["target_share"] * a for s, a in zip(stats, areas)) / sum(areas), 4),
        }

    # -- rendering ---------------------------------------------------------------------

    def render_mask(self, window: Window) -> np.ndarray:
        """The mask of ``window``: 1 where a pixel centre lies within half a vessel's width.

        Args:
            window: the region of the scene.

        Returns:
            ``(h, w)`` uint8 class ids (0 background, 1 vessel).
        """
        return self._raster(window, "mask").view(np.uint8)

    def render_widths(self, window: Window) -> np.ndarray:
        """Per pixel, the width of the widest vessel it belongs to (0 off the vessels).

        Args:
            window: the region of the scene.

        Returns:
            ``(h, w)`` float32 widths in pixels; ``> 0`` exactly where ``render_mask`` is 1.
        """
        return self._raster(window, "width")

    def render_image(self, window: Window) -> np.ndarray:
        """The RGB image of ``window``, rendered in chunks of ``_IMAGE_CHUNK`` pixels.

        Args:
            window: the region of the scene.

        Returns:
            ``(h, w, 3)`` uint8.
        """
        out = np.empty(window.shape + (3,), dtype=np.uint8)
        for chunk in _blocks(window, _IMAGE_CHUNK):
            out[chunk.relative_to(window).slices] = self._image_chunk(chunk)
        return out

    def _image_chunk(self, chunk: Window) -> np.ndarray:
        ys, xs = np.arange(chunk.top, chunk.bottom), np.arange(chunk.left, chunk.right)
        shade = _COARSE[1] * _texture_grid(_COARSE[0], ys, xs, _COARSE[2], self.texture_shift[:2])
        shade += _FINE[1] * _texture_grid(_FINE[0], ys, xs, _FINE[2], self.texture_shift[2:])
        shade += 1.0
        shade *= 1 + self.light.grid(ys, xs)
        rgb = np.empty(chunk.shape + (3,), dtype=np.float32)
        for channel, (mean, drift) in enumerate(zip(_BACKGROUND_RGB, self.drift)):
            rgb[..., channel] = mean * shade + drift.grid(ys, xs)
        dark = self._raster(chunk, "dark")
        self.spots.darken(dark, ys, xs)
        rgb *= 1 - dark[..., None] * _ABSORB
        rgb += _NOISE * pixel_noise(ys[:, None], xs[None, :], self.noise_seed)
        np.clip(rgb + 0.5, 0, 255, out=rgb)
        return rgb.astype(np.uint8)


def _mirror(index: np.ndarray, side: int) -> np.ndarray:
    """Indices into a ``side``-long axis tiled by reflection (``0 .. side-1, side-1 .. 0, ...``): no seams."""
    index = np.mod(index, 2 * side)
    return np.where(index < side, index, 2 * side - 1 - index)


def _texture_grid(name: str, ys: np.ndarray, xs: np.ndarray, scale: float, shift: tuple[int, int]) -> np.ndarray:
    """Texture ``name`` tiled by reflection, shifted, magnified ``scale`` times (bilinear) on ``ys x xs``.

    Args:
        name: one of ``textures.TEXTURES``.
        ys: absolute rows (integers).
        xs: absolute columns.
        scale: the magnification (1: one photograph pixel per image pixel).
        shift: ``(rows, cols)`` the photograph is shifted by, in its own pixels.

    Returns:
        ``(len(ys), len(xs))`` float32, mean 0 and standard deviation about 1.
    """
    tex = texture(name)
    side = tex.shape[0]
    fy, fx = ys / scale, xs / scale
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ay, ax = (fy - iy).astype(np.float32)[:, None], (fx - ix).astype(np.float32)[None, :]
    r0, r1 = _mirror(iy + shift[0], side), _mirror(iy + shift[0] + 1, side)
    c0, c1 = _mirror(ix + shift[1], side), _mirror(ix + shift[1] + 1, side)
    top = tex[np.ix_(r0, c0)] * (1 - ax) + tex[np.ix_(r0, c1)] * ax
    bottom = tex[np.ix_(r1, c0)] * (1 - ax) + tex[np.ix_(r1, c1)] * ax
    return top * (1 - ay) + bottom * ay


def _blocks(window: Window, size: tuple[int, int]) -> Iterator[Window]:
    rows, cols = size
    for top in range(window.top, window.bottom, rows):
        for left in range(window.left, window.right, cols):
            yield Window.from_bounds(top, left, min(top + rows, window.bottom), min(left + cols, window.right))


# ----------------------------------------------------------------------------------
# the self-check


def _cell_sums(values: np.ndarray, factor: int) -> np.ndarray:
    """Sums of ``values`` (bool or int, 2-D) over ``factor x factor`` cells, zero-padded at the edges."""
    rows, cols = values.shape
    pr, pc = -rows % factor, -cols % factor
    padded = np.pad(values.astype(np.int16), ((0, pr), (0, pc)))
    return padded.reshape((rows + pr) // factor, factor, (cols + pc) // factor, factor).sum(axis=(1, 3))


def best_cell_f1(histogram: np.ndarray) -> float | None:
    """The best F1 of a mask that is constant over cells, from the cells' counts.

    Choosing a set ``S`` of cells to mark gives ``F1 = 2 sum_S t / (sum_S n + T)`` (``t``: target
    pixels of a cell, ``n``: its scored pixels, ``T``: all target pixels), which is largest for the
    cells whose target fraction ``t / n`` exceeds a threshold: every threshold is tried.

    Args:
        histogram: ``histogram[t, n]``: the number of cells with ``t`` target and ``n`` scored pixels.

    Returns:
        The best F1, or None when there is no target pixel.
    """
    t_values, n_values = np.nonzero(histogram)
    counts = histogram[t_values, n_values].astype(np.float64)
    total = float((t_values * counts).sum())
    if total == 0:
        return None
    useful = t_values > 0
    t_values, n_values, counts = t_values[useful], n_values[useful], counts[useful]
    order = np.argsort(-(t_values / n_values), kind="stable")
    fraction = (t_values / n_values)[order]
    tp = np.cumsum(t_values[order] * counts[order])
    marked = np.cumsum(n_values[order] * counts[order])
    # only whole groups of equal fraction can be a threshold's choice
    last = np.r_[fraction[1:] != fraction[:-1], True]
    return float((2 * tp[last] / (marked[last] + total)).max())


class VesselCheck:
    """The vessel scene's self-check, accumulated over full-width row bands.

    Args:
        height: mask rows.
        width: mask columns.
        factor: side of the cells of the coarse masks.
        thin_width: vessels at most this wide are thin.
    """

    def __init__(self, height: int, width: int, factor: int = CEILING_FACTOR, thin_width: float = THIN_WIDTH):
        self.height, self.width, self.factor, self.thin_width = int(height), int(width), int(factor), float(thin_width)
        side = factor * factor + 1
        self.vessel_pixels = 0
        self.thin_pixels = 0
        self.pixels = 0
        self.hist_all = np.zeros((side, side), dtype=np.int64)
        self.hist_thin = np.zeros((side, side), dtype=np.int64)

    def update(self, mask: np.ndarray, widths: np.ndarray, top: int) -> None:
        """Add one band.

        Args:
            mask: ``(rows, width)`` class ids (1: vessel).
            widths: ``(rows, width)`` vessel widths (``VesselScene.render_widths``).
            top: the band's first row.

        Raises:
            ValueError: the band is not full-width, not aligned with the cells, or its mask and widths
                disagree.
        """
        rows = mask.shape[0]
        if mask.shape[1] != self.width or widths.shape != mask.shape:
            raise ValueError(f"bands must span the full width {self.width}, got {mask.shape} and {widths.shape}")
        if top % self.factor or (rows % self.factor and top + rows != self.height):
            raise ValueError(f"band rows {top}..{top + rows} do not align with {self.factor}x{self.factor} cells")
        vessel = mask == VESSEL
        if not np.array_equal(vessel, widths > 0):
            raise ValueError(f"rows {top}..{top + rows}: the mask differs from the rendered vessels")
        thin = vessel & (widths <= self.thin_width)
        thick = vessel & ~thin
        self.pixels += mask.size
        self.vessel_pixels += int(np.count_nonzero(vessel))
        self.thin_pixels += int(np.count_nonzero(thin))
        side = self.hist_all.shape[0]
        everything = np.ones(mask.shape, dtype=bool)
        for hist, target, scored in ((self.hist_all, vessel, everything), (self.hist_thin, thin, ~thick)):
            t = _cell_sums(target, self.factor).ravel()
            n = _cell_sums(scored, self.factor).ravel()
            hist += np.bincount(t * side + n, minlength=side * side).reshape(side, side)

    def result(self) -> VesselReport:
        """The report so far.

        Returns:
            The ``VesselReport``.
        """
        return VesselReport(
            self.height,
            self.width,
            self.pixels,
            self.vessel_pixels,
            self.thin_pixels,
            self.hist_all.copy(),
            self.hist_thin.copy(),
            self.factor,
            self.thin_width,
        )


@dataclass
class VesselReport:
    """The self-check's figures for one scene (or pooled over several, ``combine_reports``).

    Args:
        height: mask rows (0 for a pooled report).
        width: mask columns (likewise).
        pixels: pixels checked.
        vessel_pixels: vessel pixels.
        thin_pixels: vessel pixels whose vessel width is at most ``thin_width``.
        hist_all: cells by (vessel pixels, pixels): the histogram ``best_cell_f1`` reads.
        hist_thin: cells by (thin pixels, pixels other than thick-vessel pixels).
        factor: side of the cells.
        thin_width: the width thin vessels are at most.
        scene_pixels: pixels of the smallest scene pooled (None: ``pixels``); the share bounds hold only
            from ``MIN_CHECKED_PIXELS``.
    """

    height: int
    width: int
    pixels: int
    vessel_pixels: int
    thin_pixels: int
    hist_all: np.ndarray
    hist_thin: np.ndarray
    factor: int = CEILING_FACTOR
    thin_width: float = THIN_WIDTH
    scene_pixels: int | None = None

    @property
    def shares_checked(self) -> bool:
        """Whether the scenes are large enough for the share bounds to hold."""
        return (self.pixels if self.scene_pixels is None else self.scene_pixels) >= MIN_CHECKED_PIXELS

    @property
    def vessel_share(self) -> float | None:
        """Vessel pixels over all pixels (None for no pixels)."""
        return self.vessel_pixels / self.pixels if self.pixels else None

    @property
    def thin_share(self) -> float | None:
        """Thin-vessel pixels over vessel pixels (None without vessels)."""
        return self.thin_pixels / self.vessel_pixels if self.vessel_pixels else None

    @property
    def ceiling_f1_thin(self) -> float | None:
        """Best F1 on the thin vessels of a mask constant over ``factor``-px cells (thick ones unscored)."""
        return best_cell_f1(self.hist_thin)

    @property
    def ceiling_f1_all(self) -> float | None:
        """Best F1 on all vessels of a mask constant over ``factor``-px cells."""
        return best_cell_f1(self.hist_all)

    @property
    def checks(self) -> dict[str, bool | None]:
        """Each figure against its bound (None where undefined).

        Returns:
            ``{"vessel_share": ok, "thin_share": ok, "ceiling_f1_thin": ok}``.
        """
        share, thin, ceiling = self.vessel_share, self.thin_share, self.ceiling_f1_thin
        low, high = VESSEL_SHARE_BOUNDS
        if not self.shares_checked:
            share = thin = None
        return {
            "vessel_share": None if share is None else low <= share <= high,
            "thin_share": None if thin is None else thin >= THIN_MIN_SHARE,
            "ceiling_f1_thin": None if ceiling is None else ceiling <= THIN_MAX_CEILING_F1,
        }

    @property
    def passed(self) -> bool:
        """No figure out of its bound (an undefined one does not fail)."""
        return all(ok is not False for ok in self.checks.values())

    def as_dict(self) -> dict:
        """Every figure, bound and verdict as plain (JSON-safe) values, for the manifest.

        Returns:
            A dict keyed ``size``, ``vessel_share``, ``thin_share``, ``ceiling_f1_thin``, ...
        """
        return {
            "size": [self.height, self.width],
            "pixels": self.pixels,
            "vessel_pixels": self.vessel_pixels,
            "thin_pixels": self.thin_pixels,
            "thin_width": self.thin_width,
            "vessel_share": self.vessel_share,
            "vessel_share_bounds": list(VESSEL_SHARE_BOUNDS),
            "shares_checked": self.shares_checked,
            "thin_share": self.thin_share,
            "thin_min_share": THIN_MIN_SHARE,
            "cell": self.factor,
            "ceiling_f1_thin": self.ceiling_f1_thin,
            "ceiling_f1_thin_max": THIN_MAX_CEILING_F1,
            "ceiling_f1_all": self.ceiling_f1_all,
            "full_resolution_f1": 1.0 if self.vessel_pixels else None,
            "checks": self.checks,
            "passed": self.passed,
        }


def combine_reports(reports: Sequence[VesselReport]) -> VesselReport | None:
    """The figures pooled over several scenes (counts and cell histograms summed).

    Args:
        reports: the scenes' reports, with the same cell side and thin width.

    Returns:
        The pooled report (size 0 x 0), or None for no reports.
    """
    if not reports:
        return None
    first = reports[0]
    return VesselReport(
        0,
        0,
        sum(r.pixels for r in reports),
        sum(r.vessel_pixels for r in reports),
        sum(r.thin_pixels for r in reports),
        sum(r.hist_all for r in reports),
        sum(r.hist_thin for r in reports),
        first.factor,
        first.thin_width,
        min(r.pixels if r.scene_pixels is None else r.scene_pixels for r in reports),
    )


def format_report(name: str, report: VesselReport) -> str:
    """One line per scene: the figures, their bounds and whether they hold.

    Args:
        name: the scene's name, at the start of the line.
        report: the scene's report.

    Returns:
        The line (no newline).
    """
    ok = report.checks
    low, high = VESSEL_SHARE_BOUNDS
    f = report.factor
    small = "" if report.shares_checked else " (share bounds n/a below 1024x1024 px)"
    return (
        f"{name}: vessel share {_fmt(report.vessel_share)} ({low}-{high}) {_verdict(ok['vessel_share'])} | "
        f"thin (<= {report.thin_width:g} px) {_fmt(report.thin_share)} of vessel pixels "
        f"(>= {THIN_MIN_SHARE}) {_verdict(ok['thin_share'])} | best F1 of a mask constant over {f}x{f} cells: "
        f"thin vessels {_fmt(report.ceiling_f1_thin)} (<= {THIN_MAX_CEILING_F1}) {_verdict(ok['ceiling_f1_thin'])}, "
        f"all vessels {_fmt(report.ceiling_f1_all)}; full resolution 1.000{small}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _verdict(ok: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "n/a"}[ok]


def run_check(bands: Iterable[tuple[int, np.ndarray, np.ndarray]], height: int, width: int) -> VesselReport:
    """The self-check over ``(top, mask, widths)`` bands covering a ``height x width`` scene.

    Args:
        bands: full-width bands, top to bottom, starting on multiples of ``CEILING_FACTOR``.
        height: scene rows.
        width: scene columns.

    Returns:
        The report.
    """
    check = VesselCheck(height, width)
    for top, mask, widths in bands:
        check.update(mask, widths, top)
    return check.result()


def check_scene(scene: VesselScene, rows: int = BAND_ROWS) -> VesselReport:
    """The self-check on a scene's rendering (no file), band by band.

    Args:
        scene: the scene.
        rows: rows per band, a multiple of ``CEILING_FACTOR``.

    Returns:
        The report.
    """

    def bands():
        for top in range(0, scene.height, rows):
            window = Window(top, 0, min(rows, scene.height - top), scene.width)
            yield top, scene.render_mask(window), scene.render_widths(window)

    return run_check(bands(), scene.height, scene.width)


def check_mask(
    path: str | os.PathLike, scene: VesselScene, advance: Callable[[int], None] | None = None
) -> VesselReport:
    """The self-check on a written mask, read back band by band, with the scene's vessel widths.

    Args:
        path: the mask file (``write_vessels_dataset``).
        scene: the scene it was rendered from (for the widths of its vessels).
        advance: called with 1 after each band (progress), or None.

    Returns:
        The report.

    Raises:
        ValueError: the file's size or pixels differ from the scene's rendering.
    """
    from ...io.sources import open_image

    with open_image(path) as source:
        if (source.height, source.width, source.channels) != (scene.height, scene.width, 1):
            raise ValueError(f"{path}: {source.height}x{source.width}x{source.channels} is not the scene's size")

        def bands():
            for top in range(0, source.height, BAND_ROWS):
                window = Window(top, 0, min(BAND_ROWS, source.height - top), source.width)
                yield top, source.read(window)[..., 0], scene.render_widths(window)
                if advance is not None:
                    advance(1)

        return run_check(bands(), source.height, source.width)


# ----------------------------------------------------------------------------------
# datasets on disk


def scene_names(count: int) -> list[str]:
    """Names of the scenes of a data set of ``count``.

    Args:
        count: number of scenes.

    Returns:
        ``vessels_000``, ``vessels_001``, ... (at least three digits, more when ``count`` needs them).
    """
    digits = max(3, len(str(max(count - 1, 0))))
    return [f"vessels_{i:0{digits}d}" for i in range(count)]


def dataset_yaml(names: list[str], val_fraction: float) -> dict:
    """The dataset.yaml content of a vessel dataset (schema: ``gigaseg.data.folder.DatasetConfig``).

    Args:
        names: the scene names.
        val_fraction: share of the scenes in the "val" split (``landcover.split_names``).

    Returns:
        The mapping for ``yaml.safe_dump``: index-encoded binary masks, ``CLASSES``, ``PALETTE``, splits.

    Raises:
        ConfigError: ``val_fraction`` is outside ``[0, 1)``.
    """
    from .landcover import split_names

    return {
        "name": "synthetic-vessels",
        "task": "segmentation",
        "images": "images",
        "masks": "masks",
        "mask_encoding": "index",
        "classes": list(CLASSES),
        "palette": PALETTE.tolist(),
        "ignore_index": IGNORE_INDEX,
        "exclude_from_miou": [],
        "splits": split_names(names, val_fraction),
    }


def dataset_steps(count: int, height: int, width: int, tile: int, report: bool) -> int:
    """Progress steps of ``write_vessels_dataset``: bands written (all levels) and bands checked.

    Args:
        count: number of scenes.
        height: scene rows.
        width: scene columns.
        tile: the TIFF tile side (rows per written band).
        report: whether each mask is read back and checked.

    Returns:
        The total number of steps ``advance`` will be given.

    Raises:
        ConfigError: ``tile`` is not a positive multiple of 16.
    """
    from ...io.writers import pyramid_shapes

    _check_tile(tile)
    per_file = sum(math.ceil(h / tile) for h, _ in pyramid_shapes(height, width, tile, 64))
    checked = math.ceil(height / BAND_ROWS) if report else 0
    return count * (2 * per_file + checked)


def write_vessels_dataset(
    out_dir: str | os.PathLike,
    *,
    count: int,
    height: int,
    width: int,
    seed: int = 0,
    val_fraction: float = 0.25,
    tile: int = 512,
    config: VesselConfig | None = None,
    report: bool = False,
    advance: Callable[[int], None] | None = None,
    on_scene: Callable[[str, VesselReport | None], None] | None = None,
) -> dict:
    """Write ``count`` vessel scenes to ``out_dir/images``, ``out_dir/masks`` and ``dataset.yaml``.

    Images are RGB uint8, masks uint8 0/1 with the palette as ColorMap; both are tiled
    (``tile``), zlib-compressed BigTIFF with a 2x pyramid, streamed band by band. The same
    arguments give the same pixels. With ``report`` each written mask is read back band by
    band and checked (``VesselCheck``). ``advance(n)`` counts ``dataset_steps`` steps;
    ``on_scene(name, report)`` is called after each scene.

    Args:
        out_dir: the output folder (see ``output.prepare_output_dir``).
        count: number of scenes (at least 1).
        height: scene rows.
        width: scene columns.
        seed: the data set's seed.
        val_fraction: share of the scenes in the "val" split, in ``[0, 1)``.
        tile: the TIFF tile side, a positive multiple of 16.
        config: how scenes are drawn; None: ``VesselConfig()``.
        report: read every written mask back and run the self-check on it.
        advance: progress callback, called with a number of steps; None: no progress.
        on_scene: called with each scene's name and its ``VesselReport`` (None without ``report``).

    Returns:
        The manifest (also written to ``synth.json``): arguments, classes, splits, every file, each
        scene's description, and with ``report`` the checks per scene and overall.

    Raises:
        ConfigError: an argument is out of range, or ``out_dir`` cannot be written into.
    """
    from ...io.writers import pyramid_shapes, write_tiled_tiff

    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if height < 1 or width < 1:
        raise ConfigError(f"scene size must be positive, got {height}x{width}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")
    _check_tile(tile)
    config = config or VesselConfig()
    names = scene_names(count)
    yaml_content = dataset_yaml(names, val_fraction)
    out = output.prepare_output_dir(out_dir, ("images", "masks"))
    step = advance or (lambda n=1: None)
    manifest = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "seed": int(seed),
        "count": int(count),
        "size": [int(height), int(width)],
        "tile": int(tile),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "classes": list(CLASSES),
        "mask_rule": "a pixel is a vessel when its centre lies within half the width of a centreline step",
        "splits": yaml_content["splits"],
        "files": [f"{folder}/{name}.tif" for name in names for folder in ("images", "masks")],
        "scenes": [],
    }
    # the manifest goes first: an interrupted run leaves a folder that can be overwritten
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    levels = len(pyramid_shapes(height, width, tile, 64)) - 1
    reports = []
    for index, name in enumerate(names):
        scene = VesselScene.generate(height, width, seed, index, config)
        description = json.dumps({"generator": GENERATOR, "seed": seed, "index": index, "size": [height, width]})
        for path, channels, render, extra in (
            (out / "images" / f"{name}.tif", 3, scene.render_image, dict(photometric="rgb", description=description)),
            (
                out / "masks" / f"{name}.tif",
                1,
                scene.render_mask,
                dict(colormap=PALETTE, description=json.dumps({"classes": list(CLASSES)})),
            ),
        ):
            write_tiled_tiff(
                path,
                height,
                width,
                channels,
                np.uint8,
                render,
                tile=tile,
                pyramid_levels=levels,
                pyramid_resample="area" if channels == 3 else "nearest",
                progress=_band_counter(step),
                **extra,
            )
        entry = {"name": name, **scene.describe()}
        result = None
        if report:
            result = check_mask(out / "masks" / f"{name}.tif", scene, advance=step)
            reports.append(result)
            entry["checks"] = result.as_dict()
        manifest["scenes"].append(entry)
        if on_scene is not None:
            on_scene(name, result)
    if reports:
        manifest["checks_overall"] = combine_reports(reports).as_dict()
    import yaml

    write_text(out / "dataset.yaml", yaml.safe_dump(yaml_content, sort_keys=False, default_flow_style=None))
    manifest["complete"] = True
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _check_tile(tile: int) -> None:
    if tile <= 0 or tile % 16:
        raise ConfigError(f"--tile must be a positive multiple of 16, got {tile}")


def _band_counter(advance: Callable[[int], None]) -> Callable[[int, int], None]:
    """Adapts the writer's ``progress(done, total)`` to ``advance(n)``."""
    last = [0]

    def progress(done: int, total: int) -> None:
        advance(done - last[0])
        last[0] = done

    return progress
