"""Synthetic small-object detection scenes: many objects of a few to ~60 pixels on large textured canvases.

Each scene is a colour aerial-style canvas (parcels of grass, soil, asphalt and concrete painted
with scikit-image's photographic textures under smooth lighting, as the segmentation scenes are)
holding objects of four classes (``CLASSES``):

- ``vehicle``: an oriented rectangle in a car colour with a dark windscreen and rear window;
- ``ring_marker``: a yellow disc with a red centre (a circular marker);
- ``cross_marker``: a white plus sign with a red outline, slightly rotated;
- ``digit``: a digit 0-9 in DejaVu Sans Bold (matplotlib's bundled font), rotated up to 30 degrees.

and distractors that are not annotated: grey and brown oriented boxes without windows
(container- and roof-like), filled discs in blues and greens, triangles, and letters of the
same font. Sizes (a vehicle's length, a marker's or a digit's height) are log-uniform in
``ObjectsConfig.sizes``; objects never overlap one another or a distractor (``margin`` pixels
apart), so a box holds exactly its own object. A share (``cross_share``) of the objects is placed
across a multiple of ``border`` pixels (the tile borders of sliced detection, 512 by default).
A box is the tight box of the object's pixels covered at least a quarter (anti-aliased at 4x),
in pixel edges.

Everything follows from ``(seed, index)``: the same arguments give the same pixels and boxes.
Scenes stream to tiled, zlib-compressed BigTIFF band by band (``render_width`` column chunks), so
memory stays bounded at any size: the objects are kept as parameters and boxes, and each sprite is
drawn when a band it touches is rendered. :func:`write_objects_dataset` writes a COCO-layout
detection dataset (``gigaseg.data.detection``): ``images/<split>/*.tif``,
``annotations/instances_<split>.json`` (``area`` = box area, ``iscrowd`` 0), ``dataset.yaml``
and ``synth.json``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ...errors import ConfigError
from ...geometry import Window
from . import textures
from .output import MANIFEST, prepare_output_dir, write_text

__all__ = [
    "CLASSES",
    "PALETTE",
    "ObjectsConfig",
    "ObjectsScene",
    "SceneObject",
    "render_sprite",
    "write_objects_dataset",
]

GENERATOR = "gigaseg synth objects"
FORMAT_VERSION = 1
CLASSES = ("vehicle", "ring_marker", "cross_marker", "digit")
#: the COCO category id of each class (1-based, as COCO's)
CATEGORY_IDS = (1, 2, 3, 4)
PALETTE = np.array([[230, 25, 75], [255, 225, 25], [60, 180, 75], [0, 130, 200]], dtype=np.uint8)
DISTRACTORS = ("box", "disc", "triangle", "letter")

#: supersampling of sprites (anti-aliasing)
_SS = 4
#: a box covers the pixels whose coverage is at least this
_COVERED = 0.25
_CAR_COLOURS = ((235, 235, 235), (25, 25, 30), (170, 20, 25), (30, 60, 150), (160, 165, 170), (200, 160, 40))
_BOX_COLOURS = ((120, 120, 115), (140, 95, 60), (95, 100, 110), (175, 170, 150))
_DISC_COLOURS = ((40, 80, 200), (30, 150, 90), (60, 170, 200))
_GROUNDS = ((92, 120, 60), (140, 150, 85), (120, 95, 70), (100, 100, 100), (165, 160, 150))
_LETTERS = "AEHKRTY"
_PARCEL = 256
#: rows of background rendered at once (bounds the temporaries of a wide band)
_ROWS = 128


@dataclass(frozen=True)
class ObjectsConfig:
    """What a scene holds.

    Args:
        density: annotated objects per megapixel.
        distractors: distractors per annotated object.
        sizes: ``(min, max)`` object size in pixels (a vehicle's length, a marker's or digit's height).
        cross_share: share of objects placed across a multiple of ``border`` (where the canvas has one).
        border: the spacing of the tile borders objects are placed across.
        margin: least gap in pixels between any two objects.

    Raises:
        ConfigError: a value is out of range.
    """

    density: float = 40.0
    distractors: float = 0.5
    sizes: tuple[int, int] = (6, 60)
    cross_share: float = 0.2
    border: int = 512
    margin: int = 2

    def __post_init__(self) -> None:
        if not self.density > 0:
            raise ConfigError(f"density must be positive, got {self.density}")
        if self.distractors < 0:
            raise ConfigError(f"distractors must be at least 0, got {self.distractors}")
        low, high = self.sizes
        if not 3 <= low <= high <= 256:
            raise ConfigError(f"sizes must be 3 <= min <= max <= 256 pixels, got {self.sizes}")
        if not 0 <= self.cross_share <= 1:
            raise ConfigError(f"cross_share must be in [0, 1], got {self.cross_share}")
        if self.border < 16 or self.margin < 0:
            raise ConfigError(f"border must be at least 16 and margin at least 0, got {self.border}, {self.margin}")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: what it is, where its sprite goes, and its box.

    ``kind`` is a class name of ``CLASSES`` or a distractor of ``DISTRACTORS``; ``size`` its
    size in pixels, ``angle`` its rotation in degrees, ``colour`` its main RGB colour and
    ``glyph`` the digit or letter drawn (empty for shapes). The sprite's top-left pixel is
    ``(top, left)``; ``box`` is ``(x0, y0, x1, y1)`` in scene pixels.
    """

    kind: str
    size: float
    angle: float
    colour: tuple[int, int, int]
    glyph: str
    top: int
    left: int
    box: tuple[int, int, int, int]

    @property
    def label(self) -> int | None:
        """The class index, or None for a distractor."""
        return CLASSES.index(self.kind) if self.kind in CLASSES else None


@functools.cache
def _font(size: int):
    import matplotlib
    from PIL import ImageFont

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf")
    return ImageFont.truetype(path, size)


def render_sprite(kind: str, size: float, angle: float, colour, glyph: str = "") -> tuple[np.ndarray, np.ndarray]:
    """An object's colours and coverage, anti-aliased (drawn at 4x and averaged).

    Args:
        kind: a class of ``CLASSES`` or a distractor of ``DISTRACTORS``.
        size: the object's size in pixels.
        angle: rotation in degrees (counter-clockwise).
        colour: the main RGB colour.
        glyph: the character of a ``digit`` or ``letter``.

    Returns:
        ``(rgb float32 (h, w, 3), coverage float32 (h, w) in [0, 1])``.
    """
    from PIL import Image, ImageDraw

    s = size * _SS
    side = int(math.ceil(s * 1.5)) + 2 * _SS
    side += (-side) % _SS
    c = side / 2
    alpha = Image.new("L", (side, side), 0)
    rgb = Image.new("RGB", (side, side), tuple(int(v) for v in colour))
    a, d = ImageDraw.Draw(alpha), ImageDraw.Draw(rgb)
    rot = math.radians(angle)

    def rotated(points):
        cos, sin = math.cos(rot), math.sin(rot)
        return [(c + x * cos + y * sin, c - x * sin + y * cos) for x, y in points]

    def rect(x0, y0, x1, y1):
        return rotated([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    if kind in ("vehicle", "box"):
        length, width = s, s * (0.45 if kind == "vehicle" else 0.7)
        a.polygon(rect(-length / 2, -width / 2, length / 2, width / 2), fill=255)
        if kind == "vehicle":
            dark = (20, 25, 35)
            d.polygon(rect(length * 0.12, -width * 0.4, length * 0.28, width * 0.4), fill=dark)
            d.polygon(rect(-length * 0.42, -width * 0.38, -length * 0.32, width * 0.38), fill=dark)
    elif kind in ("ring_marker", "disc"):
        r = s / 2
        a.ellipse((c - r, c - r, c + r, c + r), fill=255)
        if kind == "ring_marker":
            d.ellipse((c - r * 0.45, c - r * 0.45, c + r * 0.45, c + r * 0.45), fill=(220, 30, 30))
    elif kind == "cross_marker":
        h, t = s / 2, s / 6
        outline = (200, 20, 20)
        for poly in (rect(-h, -t, h, t), rect(-t, -h, t, h)):
            a.polygon(poly, fill=255)
            d.polygon(poly, fill=outline)
        inner = t - max(_SS, s * 0.06)
        for poly in (
            rect(-h + t - inner, -inner, h - t + inner, inner),
            rect(-inner, -h + t - inner, inner, h - t + inner),
        ):
            d.polygon(poly, fill=tuple(int(v) for v in colour))
    elif kind == "triangle":
        r = s / 2
        a.polygon(rotated([(0, -r), (r * 0.87, r / 2), (-r * 0.87, r / 2)]), fill=255)
    elif kind in ("digit", "letter"):
        font = _font(max(4, int(round(s / 0.73))))
        x0, y0, x1, y1 = font.getbbox(glyph)
        ink = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
        ImageDraw.Draw(ink).text((1 - x0, 1 - y0), glyph, font=font, fill=255)
        ink = ink.rotate(angle, resample=Image.BILINEAR, expand=True)
        alpha.paste(ink, (int(c - ink.width / 2), int(c - ink.height / 2)))
    else:
        raise ValueError(f"unknown object kind {kind!r}")
    small = (side // _SS, side // _SS)
    coverage = np.asarray(alpha.resize(small, Image.BOX), dtype=np.float32) / 255.0
    colours = np.asarray(rgb.resize(small, Image.BOX), dtype=np.float32)
    rows, cols = np.flatnonzero(coverage.max(1) > 0), np.flatnonzero(coverage.max(0) > 0)
    crop = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.ascontiguousarray(colours[crop]), np.ascontiguousarray(coverage[crop])


def _covered_box(coverage: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the pixels covered at least ``_COVERED``, in sprite pixels (edges)."""
    covered = coverage >= _COVERED
    if not covered.any():
        covered = coverage >= coverage.max()
    rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


class _Occupancy:
    """Placed rectangles in a grid of cells, for fast overlap tests."""

    def __init__(self, cell: int = 64):
        self.cell = cell
        self.cells: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}

    def _keys(self, top, left, bottom, right):
        c = self.cell
        for i in range(top // c, (bottom - 1) // c + 1):
            for j in range(left // c, (right - 1) // c + 1):
                yield i, j

    def free(self, top, left, bottom, right, margin) -> bool:
        for key in self._keys(max(0, top - margin), max(0, left - margin), bottom + margin, right + margin):
            for t, lft, b, r in self.cells.get(key, ()):
                if top < b + margin and t < bottom + margin and left < r + margin and lft < right + margin:
                    return False
        return True

    def add(self, top, left, bottom, right) -> None:
        for key in self._keys(top, left, bottom, right):
            self.cells.setdefault(key, []).append((top, left, bottom, right))


class ObjectsScene:
    """One scene: its objects (drawn from ``(seed, index)``) and the background it paints them on.

    Args:
        height: rows.
        width: columns.
        seed: the data set's seed.
        index: the scene's index.
        config: what the scene holds.
    """

    def __init__(self, height: int, width: int, seed: int = 0, index: int = 0, config: ObjectsConfig | None = None):
        self.height, self.width = int(height), int(width)
        self.config = config = config or ObjectsConfig()
        self.seed = int(seed)
        self.index = int(index)
        rng = np.random.default_rng([self.seed, self.index, 0x0B1EC7])
        self.noise_seed = int(rng.integers(2**31))
        self.warp = (
            textures.SmoothField.random(rng, 4, (300, 900), 40.0),
            textures.SmoothField.random(rng, 4, (300, 900), 40.0),
        )
        self.light = textures.SmoothField.random(rng, 5, (1500, 5000), 0.12)
        megapixels = self.height * self.width / 1e6
        targets = int(rng.poisson(config.density * megapixels))
        distractors = int(rng.poisson(config.density * config.distractors * megapixels))
        kinds = [CLASSES[i] for i in rng.integers(len(CLASSES), size=targets)]
        kinds += [DISTRACTORS[i] for i in rng.integers(len(DISTRACTORS), size=distractors)]
        order = rng.permutation(len(kinds))
        occupancy = _Occupancy()
        self._sprite_sizes: list[tuple[int, int]] = []
        self.objects: list[SceneObject] = []
        self.unplaced = 0
        for k in order:
            placed = self._place(kinds[k], rng, occupancy)
            if placed is None:
                self.unplaced += 1
            else:
                self.objects.append(placed)
        self._bounds = np.array(
            [(o.top, o.left, o.top + h, o.left + w) for o, (h, w) in zip(self.objects, self._sprite_sizes)], np.int64
        ).reshape(-1, 4)

    def _place(self, kind: str, rng: np.random.Generator, occupancy: _Occupancy) -> SceneObject | None:
        config = self.config
        low, high = config.sizes
        size = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        glyph = ""
        if kind == "vehicle":
            angle, colour = float(rng.uniform(0, 180)), _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))]
        elif kind == "box":
            angle, colour = float(rng.uniform(0, 180)), _BOX_COLOURS[int(rng.integers(len(_BOX_COLOURS)))]
        elif kind == "ring_marker":
            angle, colour = 0.0, (250, 215, 30)
        elif kind == "disc":
            angle, colour = 0.0, _DISC_COLOURS[int(rng.integers(len(_DISC_COLOURS)))]
        elif kind == "cross_marker":
            angle, colour = float(rng.uniform(-20, 20)), (245, 245, 245)
        elif kind == "triangle":
            angle, colour = float(rng.uniform(0, 120)), tuple(int(v) for v in rng.integers(40, 230, 3))
        else:  # digit, letter
            angle = float(rng.uniform(-30, 30))
            colour = (250, 250, 250) if rng.random() < 0.5 else (250, 220, 40)
            glyph = str(int(rng.integers(10))) if kind == "digit" else _LETTERS[int(rng.integers(len(_LETTERS)))]
        _, coverage = render_sprite(kind, size, angle, colour, glyph)
        h, w = coverage.shape
        if h > self.height or w > self.width:
            return None
        x0, y0, x1, y1 = _covered_box(coverage)
        across = kind in CLASSES and rng.random() < config.cross_share
        for _ in range(50):
            top, left = int(rng.integers(self.height - h + 1)), int(rng.integers(self.width - w + 1))
            if across:
                top, left = self._across(rng, top, left, h, w, (x0, y0, x1, y1))
            if occupancy.free(top + y0, left + x0, top + y1, left + x1, config.margin):
                occupancy.add(top + y0, left + x0, top + y1, left + x1)
                self._sprite_sizes.append((h, w))
                box = (left + x0, top + y0, left + x1, top + y1)
                return SceneObject(kind, size, angle, colour, glyph, top, left, box)
        return None

    def _across(self, rng, top: int, left: int, h: int, w: int, box) -> tuple[int, int]:
        """Move the sprite so its box straddles a multiple of ``border`` (rows or columns, drawn)."""
        border = self.config.border
        x0, y0, x1, y1 = box
        vertical = rng.random() < 0.5
        length, low, high = (self.width, x0, x1) if vertical else (self.height, y0, y1)
        lines = (length - 1) // border
        if lines < 1 or high - low < 2:
            return top, left
        line = border * int(rng.integers(1, lines + 1))
        start = line - low - int(rng.integers(1, high - low))  # the line cuts the box, at least a pixel each side
        start = int(np.clip(start, 0, length - (w if vertical else h)))
        return (top, start) if vertical else (start, left)

    # --- what the scene holds --------------------------------------------------------
    @property
    def targets(self) -> list[SceneObject]:
        """The annotated objects (distractors left out), in placement order."""
        return [o for o in self.objects if o.label is not None]

    def boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """The annotated objects' boxes and class indices.

        Returns:
            ``(boxes float32 (N, 4) (x0, y0, x1, y1) pixels, labels int64 (N,))``.
        """
        targets = self.targets
        return (
            np.array([o.box for o in targets], np.float32).reshape(-1, 4),
            np.array([o.label for o in targets], np.int64),
        )

    def describe(self) -> dict:
        """Summarise what the scene holds.

        Returns:
            ``{"objects": count per class and distractor, "unplaced": objects that found no place,
            "across_borders": annotated objects cut by a multiple of ``border``}``.
        """
        counts = {kind: 0 for kind in (*CLASSES, *DISTRACTORS)}
        for o in self.objects:
            counts[o.kind] += 1
        b = self.config.border
        boxes, _ = self.boxes()
        across = int(
            (
                (np.floor((boxes[:, 0]) / b) != np.floor((boxes[:, 2] - 1) / b))
                | (np.floor((boxes[:, 1]) / b) != np.floor((boxes[:, 3] - 1) / b))
            ).sum()
        )
        return {"objects": counts, "unplaced": self.unplaced, "across_borders": across}

    # --- pixels -------------------------------------------------------------------------
    def render_image(self, window: Window) -> np.ndarray:
        """The scene's RGB uint8 pixels in ``window`` (the same pixels whatever the window).

        Args:
            window: the region to render.

        Returns:
            ``(window.height, window.width, 3)`` uint8.
        """
        if window.height > _ROWS:  # the background's intermediates are bounded by _ROWS rows
            return np.concatenate(
                [
                    self.render_image(
                        Window(top, window.left, min(_ROWS, window.top + window.height - top), window.width)
                    )
                    for top in range(window.top, window.top + window.height, _ROWS)
                ]
            )
        image = self._background(window)
        top, left, bottom, right = window.top, window.left, window.top + window.height, window.left + window.width
        b = self._bounds
        hit = np.flatnonzero((b[:, 0] < bottom) & (b[:, 2] > top) & (b[:, 1] < right) & (b[:, 3] > left))
        for i in hit:
            o = self.objects[i]
            colours, coverage = render_sprite(o.kind, o.size, o.angle, o.colour, o.glyph)
            t0, l0 = max(o.top, top), max(o.left, left)
            t1, l1 = min(o.top + coverage.shape[0], bottom), min(o.left + coverage.shape[1], right)
            src = np.s_[t0 - o.top : t1 - o.top, l0 - o.left : l1 - o.left]
            dst = image[t0 - top : t1 - top, l0 - left : l1 - left]
            a = coverage[src][..., None]
            dst *= 1 - a
            dst += a * colours[src]
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    def _background(self, window: Window) -> np.ndarray:
        """Textured parcels under smooth lighting, float32 ``(h, w, 3)``."""
        rows = np.arange(window.top, window.top + window.height)
        cols = np.arange(window.left, window.left + window.width)
        wr, wc = self.warp[0].grid(rows, cols), self.warp[1].grid(rows, cols)
        prow = np.floor_divide(rows[:, None] + wr, _PARCEL).astype(np.int64)
        pcol = np.floor_divide(cols[None, :] + wc, _PARCEL).astype(np.int64)
        key = textures.hash32(prow, pcol, self.seed * 7919 + self.index)
        grounds = np.array(_GROUNDS, np.float32)
        base = grounds[(key % np.uint32(len(_GROUNDS))).astype(np.int64)]
        rr = np.broadcast_to(rows[:, None], key.shape).ravel()
        cc = np.broadcast_to(cols[None, :], key.shape).ravel()
        flat_key = key.ravel()
        choice = (flat_key >> np.uint32(20)) % np.uint32(len(textures.TEXTURES))
        detail = np.empty(flat_key.shape, np.float32)
        for n, name in enumerate(textures.TEXTURES):
            sel = np.flatnonzero(choice == n)
            if sel.size:
                detail[sel] = textures.sample(name, rr[sel], cc[sel], flat_key[sel])
        light = 1.0 + self.light.grid(rows, cols)
        image = base * light[..., None] + 14.0 * detail.reshape(key.shape)[..., None]
        image += 10.0 * textures.pixel_noise(rows[:, None], cols[None, :], self.noise_seed)
        return image.astype(np.float32, copy=False)


def scene_names(count: int) -> list[str]:
    """Names of the scenes of a data set of ``count``.

    Args:
        count: number of scenes.

    Returns:
        ``objects_000``, ``objects_001``, ... (at least three digits).
    """
    digits = max(3, len(str(max(count - 1, 0))))
    return [f"objects_{i:0{digits}d}" for i in range(count)]


def write_objects_dataset(
    out_dir: str | os.PathLike,
    *,
    count: int,
    height: int,
    width: int,
    seed: int = 0,
    val_fraction: float = 0.25,
    tile: int = 512,
    config: ObjectsConfig | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Write ``count`` scenes as a COCO-layout detection dataset in ``out_dir``.

    Images are RGB uint8 tiled, zlib-compressed BigTIFF with a 2x pyramid, streamed in bands of
    ``tile`` rows and column chunks of at most 2048 pixels. The last scenes are the "val" split
    (as ``landcover.split_names``).

    Args:
        out_dir: the output folder (new, empty, or an earlier ``gigaseg synth`` output).
        count: number of scenes (at least 1).
        height: scene rows.
        width: scene columns.
        seed: the data set's seed.
        val_fraction: share of the scenes in "val", in ``[0, 1)``.
        tile: the TIFF tile side, a positive multiple of 16.
        config: what the scenes hold; None: ``ObjectsConfig()``.
        advance: called with 1 after each scene; None: no progress.

    Returns:
        The manifest (also in ``synth.json``): arguments, classes, splits, files and per scene the
        object counts.

    Raises:
        ConfigError: an argument is out of range, or ``out_dir`` cannot be written into.
    """
    import yaml

    from ...io.writers import write_tiled_tiff
    from ..detection import detection_yaml
    from .landcover import pyramid_levels, split_names

    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if height < 16 or width < 16:
        raise ConfigError(f"scene size must be at least 16x16, got {height}x{width}")
    if tile <= 0 or tile % 16:
        raise ConfigError(f"--tile must be a positive multiple of 16, got {tile}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")
    config = config or ObjectsConfig()
    names = scene_names(count)
    splits = {k: v for k, v in split_names(names, val_fraction).items() if v}
    split_of = {name: split for split, members in splits.items() for name in members}
    out = prepare_output_dir(out_dir, [f"images/{s}" for s in splits] + ["annotations"])
    files = [f"images/{split_of[n]}/{n}.tif" for n in names] + [f"annotations/instances_{s}.json" for s in splits]
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
        "splits": splits,
        "files": files,
        "scenes": [],
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    categories = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASSES)]
    coco = {s: {"images": [], "annotations": [], "categories": categories} for s in splits}
    levels = pyramid_levels(height, width, tile)
    chunk = tile * max(1, 2048 // tile) if width > 2048 else None
    for index, name in enumerate(names):
        scene = ObjectsScene(height, width, seed, index, config)
        split = split_of[name]
        write_tiled_tiff(
            out / "images" / split / f"{name}.tif",
            height,
            width,
            3,
            np.uint8,
            scene.render_image,
            tile=tile,
            pyramid_levels=levels,
            pyramid_resample="area",
            photometric="rgb",
            description=json.dumps({"generator": GENERATOR, "seed": seed, "index": index}),
            render_width=chunk,
        )
        image_id = index + 1
        coco[split]["images"].append({"id": image_id, "file_name": f"{name}.tif", "width": width, "height": height})
        annotations = coco[split]["annotations"]
        for o in scene.targets:
            x0, y0, x1, y1 = o.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[o.label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
        manifest["scenes"].append({"name": name, "split": split, **scene.describe()})
        if advance is not None:
            advance(1)
    for split, content in coco.items():
        write_text(out / "annotations" / f"instances_{split}.json", json.dumps(content))
    description = detection_yaml(
        {s: {"images": f"images/{s}", "annotations": f"annotations/instances_{s}.json"} for s in splits},
        name="synthetic-objects",
        palette=PALETTE,
    )
    write_text(out / "dataset.yaml", yaml.safe_dump(description, sort_keys=False, default_flow_style=None))
    manifest["complete"] = True
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
