"""Synthetic land-cover scenes that make the failure modes of naive methods measurable.

A scene is a set of vector shapes drawn from a seed (no pixels are stored):

- lakes (smooth star-shaped blobs) and wide rivers (polylines 14-34 px wide): class
  ``water``, the cue for the context classes;
- fields (blobs cut into a rotated grid of parcels; the 2-px tracks between parcels
  are ``road``) and towns (blobs with a rotated street grid, streets ``road``);
- roads crossing the scene (2-3 px polylines) and streams (2-2.6 px polylines):
  the fine classes ``road`` and ``stream``, which a 4x downsampled view loses;
- everything else is vegetation, split by *distance to water* into
  ``vegetation_near_water`` (within ``context_radius``, default 700 px, farther than
  a 508-px GLNet patch reaches) and ``vegetation_far_from_water``. Both are rendered
  by exactly the same texture and colour process: only context tells them apart.

Feature sizes are fixed in pixels and feature counts grow with the scene's area (or
side, for lines crossing it), so a 20000 x 20000 scene looks like many 2448 x 2448
ones side by side. Any window renders on its own: ``render_image(window)`` is purely
local; ``render_mask(window)`` renders the water of the window grown by
``context_radius`` and takes a Euclidean distance transform of it. Bounded memory
whatever the scene size is what lets ``write_landcover_dataset`` stream scenes to tiled
BigTIFF through ``gigaseg.io.writers.write_tiled_tiff``.

Textures are photographs that scikit-image ships (grass, gravel, brick), shifted and
flipped per region, coloured per class, under smooth lighting and colour drift and
per-pixel noise (see ``textures``), so no class is separable by colour alone.

A scene is accepted only if both self-checks (see ``checks``) hold and both vegetation
classes occur: checked exactly for scenes up to 4096 x 4096, predicted from a coarse
preview (with a margin) for larger ones. Otherwise the generator redraws the scene from
the next sub-seed ``(seed, index, attempt)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...errors import ConfigError
from ...geometry import Window
from ..labels import IGNORE_INDEX
from . import checks, output
from .output import MANIFEST, write_text
from .textures import SmoothField, hash32, pixel_noise, sample, unit_hash

CLASSES = (
    "water",
    "vegetation_near_water",
    "vegetation_far_from_water",
    "cropland",
    "urban",
    "road",
    "stream",
)
WATER, VEG_NEAR, VEG_FAR, CROPLAND, URBAN, ROAD, STREAM = range(len(CLASSES))
PALETTE = np.array(
    [
        (0, 90, 255),  # water
        (0, 200, 90),  # vegetation near water
        (190, 220, 60),  # vegetation far from water
        (240, 170, 40),  # cropland
        (220, 40, 40),  # urban
        (255, 255, 255),  # road
        (0, 230, 255),  # stream
    ],
    dtype=np.uint8,
)
#: classes a 4x downsampled (global) view destroys
FINE_CLASSES = {"road": ROAD, "stream": STREAM}
#: classes that look the same locally and differ only by distance to the cue
CONTEXT_CLASSES = {"vegetation_near_water": VEG_NEAR, "vegetation_far_from_water": VEG_FAR}
#: the class whose presence within ``context_radius`` decides between the context classes
CUE_CLASSES = (WATER,)
#: the context class held to the context check's bound
CONTEXT_CLASS = "vegetation_near_water"

GENERATOR = "gigaseg synth landcover"
FORMAT_VERSION = 1

#: pixels of one render chunk (bounds the float32 intermediates of the image renderer)
_IMAGE_CHUNK = (512, 2048)
#: scenes up to this many pixels are checked exactly (full render) before being accepted
EXACT_CHECK_PIXELS = 4096 * 4096
#: side of a mask block whose distance transform is taken with the context margin
_MASK_BLOCK = 2048

# region keys of the classes rendered as one continuous region
_VEG_KEYS = (0x5EED0001, 0x5EED0002)
_WATER_KEY, _ROAD_KEY, _STREAM_KEY = 0x5EED0003, 0x5EED0004, 0x5EED0005
_FIELD_TAG, _TOWN_TAG = 0x0F1E1D00, 0x70770000


@dataclass(frozen=True)
class LandcoverConfig:
    """Shape statistics of a scene. Counts are per reference area (``reference_side``
    squared) or, for lines that cross the scene, per reference side; sizes are pixels.

    Counts are Poisson means; ranges ``(low, high)`` are drawn uniformly.

    Args:
        context_radius: vegetation within this distance of water is ``vegetation_near_water``.
        reference_side: side of the reference area the counts are given for.
        lakes: lakes per reference area (at least one per scene).
        lake_radius: the lakes' base radius.
        rivers: rivers crossing the scene per reference side.
        river_width: the rivers' width.
        towns: towns per reference area.
        town_radius: the towns' base radius.
        street_spacing: distance between a town's streets.
        street_width: width of a town's streets (class ``road``).
        fields: fields per reference area.
        field_radius: the fields' base radius.
        parcel_size: side of a field's parcels.
        track_width: width of the tracks between parcels (class ``road``).
        roads: roads crossing the scene per reference side (at least one per scene).
        road_width: the roads' width.
        streams: streams per reference side (at least one per scene).
        stream_width: the streams' width.
        stream_length: the streams' length.
        context_margin: the coarse preview of a large scene must predict the context check's
            bound plus this margin.
        min_class_share: each vegetation class must cover at least this share of the scene.
        max_attempts: scenes drawn at most before the best one is kept.

    Raises:
        ConfigError: ``context_radius`` is not positive, or ``max_attempts`` is not an integer >= 1.
    """

    context_radius: float = 700.0
    reference_side: int = 2448
    lakes: float = 2.2
    lake_radius: tuple[float, float] = (80.0, 260.0)
    rivers: float = 0.35
    river_width: tuple[float, float] = (14.0, 34.0)
    towns: float = 0.8
    town_radius: tuple[float, float] = (160.0, 420.0)
    street_spacing: tuple[float, float] = (45.0, 90.0)
    street_width: tuple[float, float] = (2.0, 2.5)
    fields: float = 2.5
    field_radius: tuple[float, float] = (220.0, 650.0)
    parcel_size: tuple[float, float] = (90.0, 220.0)
    track_width: float = 2.0
    roads: float = 2.5
    road_width: tuple[float, float] = (2.4, 3.0)
    streams: float = 2.0
    stream_width: tuple[float, float] = (2.0, 2.6)
    stream_length: tuple[float, float] = (600.0, 2400.0)
    #: the coarse preview of a large scene must predict the context check's bound plus this margin
    context_margin: float = 0.06
    #: each vegetation class must cover at least this share of the scene
    min_class_share: float = 0.03
    max_attempts: int = 64

    def __post_init__(self) -> None:
        if not self.context_radius > 0:
            raise ConfigError(f"context radius must be positive, got {self.context_radius}")
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, (int, np.integer)) or attempts < 1:
            raise ConfigError(f"max_attempts must be an integer >= 1 (scenes drawn at most), got {attempts!r}")


# ----------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True, eq=False)
class Blobs:
    """Star-shaped blobs: radius ``r0 * (1 + Re(sum_k c_k e^{i k theta}))``, k = 2, 3, ..."""

    cy: np.ndarray
    cx: np.ndarray
    r0: np.ndarray
    coeffs: np.ndarray  # (N, K) complex

    @classmethod
    def random(
        cls, rng: np.random.Generator, count: int, height: int, width: int, radius: tuple[float, float], wobble: float
    ) -> Blobs:
        """``count`` blobs centred uniformly in the scene, with harmonics ``k = 2..5``.

        Args:
            rng: the random generator to draw from.
            count: number of blobs.
            height: scene rows (centres lie in ``[0, height)``).
            width: scene columns.
            radius: ``(low, high)`` range of the base radius ``r0``, in pixels.
            wobble: the sum of the harmonics' amplitudes (relative to ``r0``): 0 gives circles.

        Returns:
            The blobs.
        """
        k = np.arange(2, 6)
        amplitudes = rng.uniform(0, 1, (count, k.size)) / k
        amplitudes *= wobble / np.maximum(amplitudes.sum(axis=1, keepdims=True), 1e-9)
        phases = rng.uniform(0, 2 * np.pi, (count, k.size))
        return cls(
            cy=rng.uniform(0, height, count),
            cx=rng.uniform(0, width, count),
            r0=rng.uniform(*radius, count),
            coeffs=amplitudes * np.exp(1j * phases),
        )

    def __len__(self) -> int:
        return len(self.cy)

    @property
    def rmax(self) -> np.ndarray:
        """Per blob, a radius no point of the blob lies beyond."""
        return self.r0 * (1 + np.abs(self.coeffs).sum(axis=1))

    def hits(self, ys: np.ndarray, xs: np.ndarray) -> Iterator[tuple[int, slice, slice, np.ndarray]]:
        """The blobs' pixels on the grid ``ys x xs``.

        Args:
            ys: sorted row coordinates.
            xs: sorted column coordinates.

        Yields:
            ``(blob, rows, cols, inside)`` for every blob whose bounding box meets the grid:
            its index, the slices of ``ys`` and ``xs`` the box covers, and a boolean array over
            that sub-grid, True inside the blob.
        """
        rmax = self.rmax
        for b in range(len(self)):
            rows = _span(ys, self.cy[b] - rmax[b], self.cy[b] + rmax[b])
            cols = _span(xs, self.cx[b] - rmax[b], self.cx[b] + rmax[b])
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            dy = (ys[rows] - self.cy[b]).astype(np.float32)[:, None]
            dx = (xs[cols] - self.cx[b]).astype(np.float32)[None, :]
            z = dx + 1j * dy  # complex64
            rho = np.abs(z)
            unit = z / np.maximum(rho, 1e-6)
            power = unit * unit
            radius = np.ones(z.shape, dtype=np.float32)
            for c in self.coeffs[b]:
                radius += (np.complex64(c) * power).real
                power *= unit
            radius *= self.r0[b]
            yield b, rows, cols, rho < radius


@dataclass(frozen=True, eq=False)
class Segments:
    """Thick line segments: pixels within ``half_width`` of ``p0 -> p1`` (row, col)."""

    p0: np.ndarray  # (M, 2)
    p1: np.ndarray  # (M, 2)
    half_width: np.ndarray  # (M,)

    @classmethod
    def from_polylines(cls, polylines: list[tuple[np.ndarray, float]]) -> Segments:
        """The segments of thick polylines.

        Args:
            polylines: ``(points, width)`` pairs: ``(n, 2)`` (row, col) vertices and the line's
                full width in pixels; polylines of one point are skipped.

        Returns:
            Every consecutive pair of vertices as a segment.
        """
        p0 = [pts[:-1] for pts, _ in polylines if len(pts) > 1]
        p1 = [pts[1:] for pts, _ in polylines if len(pts) > 1]
        hw = [np.full(len(pts) - 1, width / 2) for pts, width in polylines if len(pts) > 1]
        if not p0:
            return cls(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
        return cls(np.concatenate(p0), np.concatenate(p1), np.concatenate(hw))

    def __len__(self) -> int:
        return len(self.half_width)

    def mask(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Pixels of the grid ``ys x xs`` covered by any segment.

        Args:
            ys: sorted row coordinates.
            xs: sorted column coordinates.

        Returns:
            Boolean ``(len(ys), len(xs))``.
        """
        out = np.zeros((ys.size, xs.size), dtype=bool)
        if not len(self) or not ys.size or not xs.size:
            return out
        pad = self.half_width + 1
        lo = np.minimum(self.p0, self.p1) - pad[:, None]
        hi = np.maximum(self.p0, self.p1) + pad[:, None]
        near = np.flatnonzero((hi[:, 0] >= ys[0]) & (lo[:, 0] <= ys[-1]) & (hi[:, 1] >= xs[0]) & (lo[:, 1] <= xs[-1]))
        for s in near:
            rows = _span(ys, lo[s, 0], hi[s, 0])
            cols = _span(xs, lo[s, 1], hi[s, 1])
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            (y0, x0), (y1, x1) = self.p0[s], self.p1[s]
            dy, dx = y1 - y0, x1 - x0
            length2 = dy * dy + dx * dx
            ry = (ys[rows] - y0)[:, None]
            rx = (xs[cols] - x0)[None, :]
            t = np.clip((ry * dy + rx * dx) / length2, 0.0, 1.0) if length2 > 0 else 0.0
            ey, ex = ry - t * dy, rx - t * dx
            out[rows, cols] |= ey * ey + ex * ex < self.half_width[s] ** 2
        return out


@dataclass(frozen=True, eq=False)
class Grids:
    """A rotated rectangular grid per blob: cells (parcels, blocks) and lines (tracks, streets)."""

    angle: np.ndarray
    spacing: np.ndarray  # (N, 2)
    offset: np.ndarray  # (N, 2)
    line_width: np.ndarray  # (N,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, count: int, spacing: tuple[float, float], line_width: tuple[float, float]
    ) -> Grids:
        """``count`` grids of random angle, spacing, offset and line width.

        Args:
            rng: the random generator to draw from.
            count: number of grids (one per blob).
            spacing: ``(low, high)`` range of the cell sides, drawn per axis, in pixels.
            line_width: ``(low, high)`` range of the line width, in pixels.

        Returns:
            The grids.
        """
        return cls(
            angle=rng.uniform(0, np.pi / 2, count),
            spacing=rng.uniform(*spacing, (count, 2)),
            offset=rng.uniform(0, 1, (count, 2)),
            line_width=rng.uniform(*line_width, count),
        )

    def cells(self, b: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grid ``b`` on the pixel grid ``ys x xs``.

        Args:
            b: the grid's index.
            ys: row coordinates (1-D).
            xs: column coordinates (1-D).

        Returns:
            ``(cell_u, cell_v, on_line)``, each ``(len(ys), len(xs))``: the int64 cell indices
            along the grid's two axes, and whether the pixel lies on a grid line.
        """
        ca, sa = math.cos(self.angle[b]), math.sin(self.angle[b])
        su, sv = self.spacing[b]
        y = ys[:, None].astype(np.float64)
        x = xs[None, :].astype(np.float64)
        u = (x * ca + y * sa) / su + self.offset[b, 0]
        v = (y * ca - x * sa) / sv + self.offset[b, 1]
        cu, cv = np.floor(u), np.floor(v)
        width = self.line_width[b]
        on_line = ((u - cu) * su < width) | ((v - cv) * sv < width)
        return cu.astype(np.int64), cv.astype(np.int64), on_line


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Index range of the sorted ``coords`` lying in ``[lo, hi]``."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    step: float,
    length: float,
    turn: float,
    pull: float,
    height: int,
    width: int,
    margin: float = 64.0,
) -> np.ndarray:
    """A smoothly curving polyline: its curvature is a damped random walk, its heading is
    pulled back towards the initial one (so roads and rivers cross the scene)."""
    points = [start.astype(np.float64)]
    position, direction, curvature = start.astype(np.float64), heading, 0.0
    for _ in range(max(1, int(length / step))):
        curvature = 0.85 * curvature + rng.normal(0.0, turn)
        direction += curvature + pull * (heading - direction)
        position = position + step * np.array([math.sin(direction), math.cos(direction)])
        points.append(position)
        if not (-margin <= position[0] <= height + margin and -margin <= position[1] <= width + margin):
            break
    return np.array(points)


def _border_start(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, float]:
    """A point on the border and a heading into the scene."""
    side = rng.choice(4, p=np.array([width, width, height, height]) / (2 * (height + width)))
    along = rng.uniform(0, 1)
    jitter = rng.uniform(-0.7, 0.7)
    if side == 0:  # top, heading down
        return np.array([0.0, along * width]), math.pi / 2 + jitter
    if side == 1:  # bottom, heading up
        return np.array([float(height), along * width]), -math.pi / 2 + jitter
    if side == 2:  # left, heading right
        return np.array([along * height, 0.0]), jitter
    return np.array([along * height, float(width)]), math.pi + jitter


# ----------------------------------------------------------------------------------
# the scene


@dataclass(frozen=True)
class _Look:
    """How one class (or crop variant) is painted: texture photograph, mean RGB, contrast."""

    texture: str
    mean: tuple[float, float, float]
    contrast: float
    jitter: float = 0.0  # per-region brightness/colour jitter (fraction)


_VEGETATION = _Look("grass", (66, 98, 48), 0.32)
_CROPS = (
    _Look("grass", (96, 122, 60), 0.22, 0.10),  # green crop
    _Look("grass", (160, 146, 86), 0.20, 0.10),  # ripe crop
    _Look("gravel", (128, 102, 78), 0.24, 0.10),  # bare soil
    _Look("gravel", (98, 84, 68), 0.22, 0.10),  # dark soil
)
_URBAN = (
    _Look("brick", (150, 116, 104), 0.38, 0.15),  # tiled roofs
    _Look("brick", (126, 126, 130), 0.30, 0.15),  # grey roofs, concrete
)
_ROAD = _Look("gravel", (176, 170, 160), 0.12)
_WATER = _Look("gravel", (38, 66, 92), 0.07)
_NOISE = 18.0  # peak-to-peak of the per-pixel uniform noise, grey levels


@dataclass(frozen=True, eq=False)
class LandcoverScene:
    """One scene: its size, seed and shapes. Cheap to build; pixels are rendered on demand."""

    height: int
    width: int
    seed: int
    index: int
    attempt: int
    config: LandcoverConfig
    lakes: Blobs
    rivers: Segments
    fields: Blobs
    parcels: Grids
    towns: Blobs
    streets: Grids
    roads: Segments
    streams: Segments
    noise_seed: int
    light: SmoothField
    drift: tuple[SmoothField, SmoothField, SmoothField]
    vigour: SmoothField
    blend: SmoothField
    #: how the scene fared against the acceptance criteria (filled by ``generate``)
    assessment: dict = field(default_factory=dict)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def generate(
        cls, height: int, width: int, seed: int = 0, index: int = 0, config: LandcoverConfig | None = None
    ) -> LandcoverScene:
        """The scene ``index`` of seed ``seed``: the first attempt that passes ``assess``.

        Attempt ``a`` draws from ``numpy.random.default_rng([seed, index, a])``. If no
        attempt of ``config.max_attempts`` passes (e.g. a scene too small to hold
        vegetation farther than ``context_radius`` from water), the best one is kept:
        one passing the self-checks if any, then the highest score.

        Args:
            height: scene rows.
            width: scene columns.
            seed: the data set's seed.
            index: the scene's index in the data set.
            config: shape statistics; None: ``LandcoverConfig()``.

        Returns:
            The scene, with ``assessment`` filled.

        Raises:
            ConfigError: the size is not positive.
        """
        config = config or LandcoverConfig()
        if height < 1 or width < 1:
            raise ConfigError(f"scene size must be positive, got {height}x{width}")
        best = None
        for attempt in range(config.max_attempts):
            scene = cls.build(height, width, seed, index, attempt, config)
            scene.assessment.update(scene.assess())
            if scene.assessment["score"] >= 0:
                return scene
            if best is None or _rank(scene) > _rank(best):
                best = scene
        return best

    @classmethod
    def build(
        cls, height: int, width: int, seed: int, index: int, attempt: int, config: LandcoverConfig
    ) -> LandcoverScene:
        """Draw the shapes of one attempt (no acceptance test).

        Args:
            height: scene rows.
            width: scene columns.
            seed: the data set's seed.
            index: the scene's index in the data set.
            attempt: the attempt number; shapes are drawn from ``default_rng([seed, index, attempt])``.
            config: shape statistics.

        Returns:
            The scene, with an empty ``assessment``.
        """
        rng = np.random.default_rng([int(seed), int(index), int(attempt)])
        c = config
        area = height * width / c.reference_side**2
        side = (height + width) / (2 * c.reference_side)

        lakes = Blobs.random(rng, max(1, rng.poisson(c.lakes * area)), height, width, c.lake_radius, 0.45)
        rivers = [
            _walk(
                rng,
                *_border_start(rng, height, width),
                step=20,
                length=4 * (height + width),
                turn=0.035,
                pull=0.05,
                height=height,
                width=width,
            )
            for _ in range(rng.poisson(c.rivers * side))
        ]
        rivers = Segments.from_polylines([(pts, rng.uniform(*c.river_width)) for pts in rivers])

        n_fields = rng.poisson(c.fields * area)
        fields = Blobs.random(rng, n_fields, height, width, c.field_radius, 0.3)
        parcels = Grids.random(rng, n_fields, c.parcel_size, (c.track_width, c.track_width))
        n_towns = rng.poisson(c.towns * area)
        towns = Blobs.random(rng, n_towns, height, width, c.town_radius, 0.35)
        streets = Grids.random(rng, n_towns, c.street_spacing, c.street_width)

        roads = [
            (
                _walk(
                    rng,
                    *_border_start(rng, height, width),
                    step=24,
                    length=4 * (height + width),
                    turn=0.012,
                    pull=0.02,
                    height=height,
                    width=width,
                ),
                rng.uniform(*c.road_width),
            )
            for _ in range(max(1, rng.poisson(c.roads * side)))
        ]
        streams = []
        lake_reach = lakes.rmax + 16
        for _ in range(max(1, rng.poisson(c.streams * side))):
            # start on land, away from the border, so that every scene shows streams
            inset = np.minimum(200.0, np.array([height, width]) / 4)
            for _ in range(32):
                start = rng.uniform(inset, np.array([height, width]) - inset)
                if np.all(np.hypot(start[0] - lakes.cy, start[1] - lakes.cx) > lake_reach):
                    break
            pts = _walk(
                rng,
                start,
                rng.uniform(0, 2 * np.pi),
                step=12,
                length=rng.uniform(*c.stream_length),
                turn=0.06,
                pull=0.03,
                height=height,
                width=width,
            )
            streams.append((pts, rng.uniform(*c.stream_width)))

        return cls(
            height=int(height),
            width=int(width),
            seed=int(seed),
            index=int(index),
            attempt=int(attempt),
            config=c,
            lakes=lakes,
            rivers=rivers,
            fields=fields,
            parcels=parcels,
            towns=towns,
            streets=streets,
            roads=Segments.from_polylines(roads),
            streams=Segments.from_polylines(streams),
            noise_seed=int(rng.integers(2**32)),
            light=SmoothField.random(rng, 3, (2500, 9000), 0.07),
            drift=tuple(SmoothField.random(rng, 2, (3000, 10000), 4.0) for _ in range(3)),
            vigour=SmoothField.random(rng, 3, (500, 2500), 0.08),
            blend=SmoothField.random(rng, 3, (400, 1600), 0.3),
        )

    def describe(self) -> dict:
        """Counts of shapes (for the manifest).

        Returns:
            The attempt, the number of each kind of shape and the ``assessment`` (floats rounded to
            4 decimals).
        """
        return {
            "attempt": self.attempt,
            "lakes": len(self.lakes),
            "river_segments": len(self.rivers),
            "fields": len(self.fields),
            "towns": len(self.towns),
            "road_segments": len(self.roads),
            "stream_segments": len(self.streams),
            "assessment": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.assessment.items()},
        }

    # -- labels -------------------------------------------------------------------------

    def _water(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        water = self.rivers.mask(ys, xs)
        for _, rows, cols, inside in self.lakes.hits(ys, xs):
            water[rows, cols] |= inside
        return water

    def _labels(
        self, ys: np.ndarray, xs: np.ndarray, fine: bool = True, regions: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Classes before the near/far split (all vegetation is ``VEG_FAR``) on ``ys x xs``,
        and with ``regions`` a uint32 key per pixel (parcel, town block, ...) for textures."""
        labels = np.full((ys.size, xs.size), VEG_FAR, dtype=np.uint8)
        region = np.full(labels.shape, _VEG_KEYS[0], dtype=np.uint32) if regions else None
        for blobs, grids, cls, tag in (
            (self.fields, self.parcels, CROPLAND, _FIELD_TAG),
            (self.towns, self.streets, URBAN, _TOWN_TAG),
        ):
            for b, rows, cols, inside in blobs.hits(ys, xs):
                cu, cv, on_line = grids.cells(b, ys[rows], xs[cols])
                sub = labels[rows, cols]
                sub[inside] = cls
                if fine:
                    sub[inside & on_line] = ROAD
                if regions:
                    keys = hash32(cu, cv, tag + b)
                    region[rows, cols][inside] = keys[inside]
        if fine:
            labels[self.roads.mask(ys, xs)] = ROAD
            labels[self.streams.mask(ys, xs)] = STREAM
        labels[self._water(ys, xs)] = WATER
        return labels, region

    def _near_water(self, block: Window) -> np.ndarray:
        """Pixels of ``block`` within ``context_radius`` of water (water included)."""
        radius = self.config.context_radius
        margin = int(math.ceil(radius)) + 1
        grown = Window.from_bounds(
            block.top - margin, block.left - margin, block.bottom + margin, block.right + margin
        ).clip(self.height, self.width)
        water = self._water(np.arange(grown.top, grown.bottom), np.arange(grown.left, grown.right))
        if not water.any():
            return np.zeros(block.shape, dtype=bool)
        # the feature transform (nearest water pixel of every pixel) over the grown window;
        # squared distances in integers on the block only: exact and cheaper than distances
        # over the whole grown window
        nearest = ndimage.distance_transform_edt(~water, return_distances=False, return_indices=True)
        inner = block.relative_to(grown)
        dy = nearest[0][inner.slices] - np.arange(inner.top, inner.bottom, dtype=np.int32)[:, None]
        dx = nearest[1][inner.slices] - np.arange(inner.left, inner.right, dtype=np.int32)[None, :]
        del nearest
        return dy * dy + dx * dx <= radius * radius

    def render_mask(self, window: Window) -> np.ndarray:
        """The mask of ``window``, rendered in blocks of ``_MASK_BLOCK`` pixels.

        Args:
            window: the region of the scene.

        Returns:
            ``(h, w)`` uint8 class ids.
        """
        out = np.empty(window.shape, dtype=np.uint8)
        for block in _blocks(window, (_MASK_BLOCK, _MASK_BLOCK)):
            labels, _ = self._labels(np.arange(block.top, block.bottom), np.arange(block.left, block.right))
            vegetation = labels == VEG_FAR
            if vegetation.any():
                labels[vegetation & self._near_water(block)] = VEG_NEAR
            out[block.relative_to(window).slices] = labels
        return out

    def mask_renderer(self, rows: int = _MASK_BLOCK) -> Callable[[Window], np.ndarray]:
        """``render(window)`` for row-major band requests, as ``write_tiled_tiff`` makes them.

        It renders ``rows``-row, full-width bands once and serves the windows inside them
        (one distance transform per block instead of one per requested band). Only the last
        band is kept.

        Args:
            rows: rows per rendered band.

        Returns:
            ``render(window)`` -> ``(h, w)`` uint8 class ids (a copy the caller may keep).
        """
        cache: dict = {}

        def render(window: Window) -> np.ndarray:
            band = cache.get("band")
            if band is None or not band.contains(window):
                top = (window.top // rows) * rows
                bottom = max(min(top + rows, self.height), window.bottom)
                band = Window.from_bounds(top, 0, bottom, self.width)
                cache.clear()  # drop the old band before rendering the new one
                cache["labels"] = self.render_mask(band)
                cache["band"] = band
            return cache["labels"][window.relative_to(band).slices].copy()

        return render

    # -- image -----------------------------------------------------------------------------

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
        labels, region = self._labels(ys, xs, regions=True)
        labels, region = labels.ravel(), region.ravel()
        width = xs.size
        rgb = np.empty((labels.size, 3), dtype=np.float32)

        def paint(index: np.ndarray, look: _Look, keys) -> None:
            rows, cols = ys[index // width], xs[index % width]
            keys = np.broadcast_to(np.asarray(keys, dtype=np.uint32), index.shape)
            shade = 1 + look.contrast * sample(look.texture, rows, cols, keys)
            colour = np.asarray(look.mean, dtype=np.float32)[None, :] * shade[:, None]
            if look.jitter:
                for channel in range(3):
                    colour[:, channel] *= 1 + look.jitter * (2 * unit_hash(keys, 91 + channel) - 1).astype(np.float32)
                colour *= (1 + look.jitter * (2 * unit_hash(keys, 97) - 1).astype(np.float32))[:, None]
            rgb[index] = colour

        # vegetation (both context classes): two shifted copies of the grass photograph,
        # blended by a smooth field, and a slow "vigour" colour variation; nothing depends on water
        index = np.flatnonzero(labels == VEG_FAR)
        if index.size:
            rows, cols = ys[index // width], xs[index % width]
            weight = np.clip(0.5 + self.blend.grid(ys, xs).ravel()[index], 0.0, 1.0)
            t = weight * sample("grass", rows, cols, np.full(index.shape, _VEG_KEYS[0], np.uint32)) + (
                1 - weight
            ) * sample("grass", rows, cols, np.full(index.shape, _VEG_KEYS[1], np.uint32))
            t /= np.sqrt(weight**2 + (1 - weight) ** 2)
            vigour = self.vigour.grid(ys, xs).ravel()[index]
            colour = np.asarray(_VEGETATION.mean, dtype=np.float32)[None, :] * (1 + _VEGETATION.contrast * t)[:, None]
            colour *= 1 + vigour[:, None] * np.array([-0.6, 0.8, -0.4], dtype=np.float32)
            rgb[index] = colour

        for cls, looks in ((CROPLAND, _CROPS), (URBAN, _URBAN)):
            index = np.flatnonzero(labels == cls)
            if index.size:
                keys = region[index]
                variant = hash32(keys, 7) % np.uint32(len(looks))
                for v, look in enumerate(looks):
                    pick = variant == v
                    if pick.any():
                        paint(index[pick], look, keys[pick])
        for cls, look, key in ((ROAD, _ROAD, _ROAD_KEY), (WATER, _WATER, _WATER_KEY), (STREAM, _WATER, _STREAM_KEY)):
            index = np.flatnonzero(labels == cls)
            if index.size:
                paint(index, look, key)

        rgb = rgb.reshape(ys.size, xs.size, 3)
        rgb *= (1 + self.light.grid(ys, xs))[..., None]
        for channel, drift in enumerate(self.drift):
            rgb[..., channel] += drift.grid(ys, xs)
        rgb += _NOISE * pixel_noise(ys[:, None], xs[None, :], self.noise_seed)
        np.clip(rgb + 0.5, 0, 255, out=rgb)
        return rgb.astype(np.uint8)

    # -- preview ---------------------------------------------------------------------------

    def preview_labels(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels (near/far split, no fine classes) at every ``step``-th pixel.

        Distances to water are computed on the coarse grid, so the near/far split is approximate.

        Args:
            step: the sampling step, in pixels (samples at ``step // 2``, ``step // 2 + step``, ...).

        Returns:
            ``(ys, xs, labels)``: the sampled rows and columns and ``(len(ys), len(xs))`` uint8 class ids.
        """
        ys = np.arange(step // 2, self.height, step)
        xs = np.arange(step // 2, self.width, step)
        labels, _ = self._labels(ys, xs, fine=False)
        water = labels == WATER
        if water.any():
            near = ndimage.distance_transform_edt(~water, sampling=step) <= self.config.context_radius
            labels[(labels == VEG_FAR) & near] = VEG_NEAR
        return ys, xs, labels

    def assess(self) -> dict:
        """The acceptance score of this scene (``>= 0``: accept) and the figures behind it.

        Both vegetation classes must cover ``min_class_share`` of the scene, the context
        fraction must reach its bound and the fine-structure IoU stay under its bound,
        with every fine class present. Scenes of at most ``EXACT_CHECK_PIXELS`` are
        rendered and checked exactly (``check_scene``: what ``--report`` will find).
        Larger ones are judged on a coarse preview (``preview_labels``) which predicts
        the context fraction and the shares; their fine IoU holds by construction (line
        widths of 2-3 px, averaged over many lines).

        Returns:
            ``method`` ("exact" or the preview step), ``context_fraction``, ``fine_iou``, the
            ``share_<class>`` of both vegetation classes, ``checks_pass`` (both self-checks within
            their bounds) and ``score``: the smallest margin to a bound (``>= 0``: accept).
        """
        c = self.config
        pixels = self.height * self.width
        if pixels <= EXACT_CHECK_PIXELS:
            report = check_scene(self)
            context_target = checks.CONTEXT_MIN_FRACTION
            share = {name: (entry["pixels"] or 0) / pixels for name, entry in report.context.items()}
            fraction = report.context_fraction
            fine = report.fine
            method = "exact"
        else:
            step = max(4, math.ceil(max(self.height, self.width) / 1024))
            ys, xs, labels = self.preview_labels(step)
            share = {name: float(np.mean(labels == cls)) for name, cls in CONTEXT_CLASSES.items()}
            context = checks.ContextCheck(self.height, self.width, CONTEXT_CLASSES, CUE_CLASSES)
            context.update(labels, ys=ys, xs=xs)
            fraction = context.result()[CONTEXT_CLASS]["fraction"]
            context_target = checks.CONTEXT_MIN_FRACTION + c.context_margin
            fine = {}
            method = f"preview every {step} px"
        margins = []  # of the two self-checks
        if checks.patch_grid(self.height, self.width) is not None:
            margins.append(-1.0 if fraction is None else fraction - context_target)
        if fine:
            margins.append(-1.0 if any(v is None for v in fine.values()) else checks.FINE_MAX_IOU - max(fine.values()))
        share_margin = min(share.values()) - c.min_class_share
        return {
            "method": method,
            "context_fraction": fraction,
            "fine_iou": fine.get("all"),
            **{f"share_{name}": value for name, value in share.items()},
            "checks_pass": all(m >= 0 for m in margins),
            "score": float(min(margins + [share_margin])),
        }


def _rank(scene: LandcoverScene) -> tuple[bool, float]:
    """Fallback order of rejected attempts: passing the self-checks first, then the score."""
    return scene.assessment["checks_pass"], scene.assessment["score"]


def _blocks(window: Window, size: tuple[int, int]) -> Iterator[Window]:
    rows, cols = size
    for top in range(window.top, window.bottom, rows):
        for left in range(window.left, window.right, cols):
            yield Window.from_bounds(top, left, min(top + rows, window.bottom), min(left + cols, window.right))


# ----------------------------------------------------------------------------------
# datasets on disk


def scene_names(count: int) -> list[str]:
    """Names of the scenes of a data set of ``count``.

    Args:
        count: number of scenes.

    Returns:
        ``landcover_000``, ``landcover_001``, ... (at least three digits, more when ``count`` needs them).
    """
    digits = max(3, len(str(max(count - 1, 0))))
    return [f"landcover_{i:0{digits}d}" for i in range(count)]


def split_names(names: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Split scene names into "train" and "val".

    The last ``round(count * val_fraction)`` scenes are "val" (at least one when the
    fraction is positive and there are two scenes or more; never all of them).

    Args:
        names: the scene names, in order.
        val_fraction: share of the scenes in "val", in ``[0, 1)``.

    Returns:
        ``{"train": [...], "val": [...]}``.

    Raises:
        ConfigError: ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(names) * val_fraction)
    if val_fraction > 0 and len(names) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(names) - 1) if names else 0
    return {"train": names[: len(names) - n_val], "val": names[len(names) - n_val :]}


def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """``output.prepare_output_dir`` with the ``images/`` and ``masks/`` a landcover dataset fills.

    Args:
        out_dir: the output folder.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ConfigError: ``out_dir`` is a file, or a non-empty folder that is not an earlier output.
    """
    return output.prepare_output_dir(out_dir, ("images", "masks"))


def dataset_yaml(names: list[str], val_fraction: float) -> dict:
    """The dataset.yaml content of a landcover dataset (schema: ``gigaseg.data.folder.DatasetConfig``).

    Args:
        names: the scene names.
        val_fraction: share of the scenes in the "val" split (``split_names``).

    Returns:
        The mapping for ``yaml.safe_dump``: index-encoded masks, ``CLASSES``, ``PALETTE``, splits.

    Raises:
        ConfigError: ``val_fraction`` is outside ``[0, 1)``.
    """
    return {
        "name": "synthetic-landcover",
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


def pyramid_levels(height: int, width: int, tile: int) -> int:
    """How many reduced levels the writer keeps (each halving while the longer side >= tile).

    Args:
        height: scene rows.
        width: scene columns.
        tile: the TIFF tile side.

    Returns:
        The number of pyramid levels below full resolution.
    """
    from ...io.writers import pyramid_shapes

    return len(pyramid_shapes(height, width, tile, 64)) - 1


def dataset_steps(count: int, height: int, width: int, tile: int, report: bool) -> int:
    """Progress steps of ``write_landcover_dataset``: bands written (all levels) and bands checked.

    Args:
        count: number of scenes.
        height: scene rows.
        width: scene columns.
        tile: the TIFF tile side (rows per written band).
        report: whether each mask is read back and checked.

    Returns:
        The total number of steps ``advance`` will be given.
    """
    from ...io.writers import pyramid_shapes

    per_file = sum(math.ceil(h / tile) for h, _ in pyramid_shapes(height, width, tile, 64))
    checked = math.ceil(height / checks.BAND_ROWS) if report else 0
    return count * (2 * per_file + checked)


def write_landcover_dataset(
    out_dir: str | os.PathLike,
    *,
    count: int,
    height: int,
    width: int,
    seed: int = 0,
    val_fraction: float = 0.25,
    tile: int = 512,
    config: LandcoverConfig | None = None,
    report: bool = False,
    advance: Callable[[int], None] | None = None,
    on_scene: Callable[[str, checks.CheckReport | None], None] | None = None,
) -> dict:
    """Write ``count`` scenes to ``out_dir/images``, ``out_dir/masks`` and ``dataset.yaml``.

    Images are RGB uint8, masks uint8 class ids with the palette as ColorMap; both are
    tiled (``tile``), zlib-compressed BigTIFF with a 2x pyramid, streamed band by band.
    The same arguments give the same pixels. With ``report`` each written mask is read
    back band-wise and checked (``checks.run_checks``). ``advance(n)`` counts
    ``dataset_steps`` steps; ``on_scene(name, report)`` is called after each scene.

    Args:
        out_dir: the output folder (see ``output.prepare_output_dir``).
        count: number of scenes (at least 1).
        height: scene rows.
        width: scene columns.
        seed: the data set's seed.
        val_fraction: share of the scenes in the "val" split, in ``[0, 1)``.
        tile: the TIFF tile side, a positive multiple of 16.
        config: shape statistics; None: ``LandcoverConfig()``.
        report: read every written mask back and run the self-checks on it.
        advance: progress callback, called with a number of steps; None: no progress.
        on_scene: called with each scene's name and its ``CheckReport`` (None without ``report``).

    Returns:
        The manifest (also written to ``synth.json``): arguments, classes, splits, every file,
        each scene's shape counts and assessment, and with ``report`` the checks per scene and
        overall.

    Raises:
        ConfigError: an argument is out of range, or ``out_dir`` cannot be written into.
    """
    from ...io.writers import write_tiled_tiff

    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if height < 1 or width < 1:
        raise ConfigError(f"scene size must be positive, got {height}x{width}")
    if tile <= 0 or tile % 16:
        raise ConfigError(f"--tile must be a positive multiple of 16, got {tile}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")
    config = config or LandcoverConfig()
    names = scene_names(count)
    yaml_content = dataset_yaml(names, val_fraction)
    out = prepare_output_dir(out_dir)
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
        "fine_classes": FINE_CLASSES,
        "context_classes": CONTEXT_CLASSES,
        "cue_classes": list(CUE_CLASSES),
        "splits": yaml_content["splits"],
        "files": [f"{folder}/{name}.tif" for name in names for folder in ("images", "masks")],
        "scenes": [],
    }
    # the manifest goes first: an interrupted run leaves a folder that can be overwritten
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    levels = pyramid_levels(height, width, tile)
    reports = []
    for index, name in enumerate(names):
        scene = LandcoverScene.generate(height, width, seed, index, config)
        description = json.dumps({"generator": GENERATOR, "seed": seed, "index": index, "size": [height, width]})
        bands = _band_counter(step)
        write_tiled_tiff(
            out / "images" / f"{name}.tif",
            height,
            width,
            3,
            np.uint8,
            scene.render_image,
            tile=tile,
            pyramid_levels=levels,
            pyramid_resample="area",
            photometric="rgb",
            description=description,
            progress=bands(),
        )
        mask_path = out / "masks" / f"{name}.tif"
        write_tiled_tiff(
            mask_path,
            height,
            width,
            1,
            np.uint8,
            scene.mask_renderer(),
            tile=tile,
            colormap=PALETTE,
            pyramid_levels=levels,
            pyramid_resample="nearest",
            description=json.dumps({"classes": list(CLASSES)}),
            progress=bands(),
        )
        entry = {"name": name, **scene.describe()}
        result = None
        if report:
            result = check_mask(mask_path, advance=step)
            reports.append(result)
            entry["checks"] = result.as_dict()
        manifest["scenes"].append(entry)
        if on_scene is not None:
            on_scene(name, result)
    if reports:
        manifest["checks_overall"] = checks.combine(reports).as_dict()
    import yaml

    write_text(out / "dataset.yaml", yaml.safe_dump(yaml_content, sort_keys=False, default_flow_style=None))
    manifest["complete"] = True
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _band_counter(advance: Callable[[int], None]) -> Callable[[], Callable[[int, int], None]]:
    """Adapts the writer's ``progress(done, total)`` to ``advance(n)``."""

    def make() -> Callable[[int, int], None]:
        last = [0]

        def progress(done: int, total: int) -> None:
            advance(done - last[0])
            last[0] = done

        return progress

    return make


def check_mask(path: str | os.PathLike, advance: Callable[[int], None] | None = None) -> checks.CheckReport:
    """Both self-checks on a written land-cover mask, read back band by band.

    Args:
        path: the mask file (1-channel class ids, as ``write_landcover_dataset`` writes).
        advance: called with 1 after each band is checked (progress), or None.

    Returns:
        The ``CheckReport`` of the mask.
    """
    from ...io.sources import open_image

    with open_image(path) as source:

        def bands():
            for top, band in checks.iter_source_bands(source):
                yield top, band
                if advance is not None:
                    advance(1)

        return checks.run_checks(
            bands(),
            source.height,
            source.width,
            fine_classes=FINE_CLASSES,
            context_classes=CONTEXT_CLASSES,
            cue_classes=CUE_CLASSES,
            context_class=CONTEXT_CLASS,
        )


def check_scene(scene: LandcoverScene) -> checks.CheckReport:
    """Both self-checks on a scene's rendered mask (no file), band by band.

    Args:
        scene: the scene to render.

    Returns:
        The ``CheckReport`` of the scene's mask.
    """
    bands = checks.iter_render_bands(scene.mask_renderer(), scene.height, scene.width)
    return checks.run_checks(
        bands,
        scene.height,
        scene.width,
        fine_classes=FINE_CLASSES,
        context_classes=CONTEXT_CLASSES,
        cue_classes=CUE_CLASSES,
        context_class=CONTEXT_CLASS,
    )
