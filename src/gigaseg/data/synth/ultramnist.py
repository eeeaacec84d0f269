"""Synthetic UltraMNIST-style classification images: digits of very different sizes on a large canvas.

In the spirit of UltraMNIST (the benchmark PatchGD was introduced on): each image is a
black canvas holding a few white digits whose heights range from a few pixels to a
large part of the canvas, plus distracting shapes (lines, ellipses, triangles,
rectangles) of the same range of sizes and intensities. The class is the **sum of the
digits modulo 10**, so it depends on every digit: a downsampled view loses the small
ones, a single patch cannot see the large ones whole.

Digits are rendered offline with the scalable font Pillow ships
(``ImageFont.load_default(size=...)``, Pillow >= 10.1 with FreeType), rotated by a
small random angle. Per image (``UltraMnistConfig`` / :func:`generate_image`):

- the number of digits is drawn from ``digits`` (inclusive range); values from ``values``;
- the first digit is *large*: ink height uniform in ``large`` (fractions of the canvas
  side); the second is *small*: height log-uniform in ``[min_digit, 3 * min_digit]``;
  any others are log-uniform over the whole range. So every image mixes scales;
- digits never overlap (boxes kept apart by a margin); shapes are drawn only in boxes
  that avoid every digit's box, so a digit's box holds exactly its own rendering — the
  property the tests use to check that the labels match the digits drawn;
- intensities are random in ``intensity`` for digits and shapes alike.

Everything follows from ``(seed, index)``: the same arguments give the same pixels.
:func:`write_ultramnist_dataset` writes ``images/<name>.tif`` (1-channel uint8, tiled,
zlib), a classification ``dataset.yaml`` (``gigaseg.data.classification``: classes
"0".."9", ``labels``, ``splits``) and ``synth.json`` with every digit's value, box,
height and angle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import ConfigError
from .output import MANIFEST, prepare_output_dir, write_text

GENERATOR = "gigaseg synth ultramnist"
FORMAT_VERSION = 1
#: tries (each a new angle and up to 200 positions) a digit gets at its smallest height before giving up
_PLACE_TRIES_AT_FLOOR = 20
CLASSES = tuple(str(d) for d in range(10))
#: ink height / font size of Pillow's default font's digits (measured; only sets the font size)
_INK_RATIO = 0.72


@dataclass(frozen=True)
class UltraMnistConfig:
    """What an image holds. Sizes are pixels or fractions of the canvas side.

    Args:
        digits: ``(min, max)`` digits per image, inclusive; at least 2 (a large and a small one).
        values: the digit values drawn from (among 0..9).
        min_digit: the smallest digit's ink height in pixels (0: automatic, ``max(8, side // 64)``).
        large: height range of the large (first) digit, as fractions of the canvas side (at most 0.9).
        shapes: distracting shapes per image (-1: automatic, ``6 + side // 128``).
        max_angle: digits are rotated by an angle uniform in ``[-max_angle, max_angle]`` degrees.
        intensity: ``(min, max)`` grey value of digits and shapes, within 1..255.

    Raises:
        ConfigError: a value is out of range.
    """

    digits: tuple[int, int] = (3, 5)
    values: tuple[int, ...] = tuple(range(10))
    #: the smallest digit's ink height in pixels (0: automatic, max(8, side // 64))
    min_digit: int = 0
    #: height range of the large (first) digit, as fractions of the canvas side
    large: tuple[float, float] = (0.3, 0.6)
    #: distracting shapes per image (-1: automatic, 6 + side // 128)
    shapes: int = -1
    max_angle: float = 15.0
    intensity: tuple[int, int] = (160, 255)

    def __post_init__(self) -> None:
        lo, hi = self.digits
        if not 2 <= lo <= hi:
            raise ConfigError(
                f"digits per image must be a range with at least 2 (a large and a small digit), got {lo}-{hi}"
            )
        if not self.values or any(not 0 <= v <= 9 for v in self.values):
            raise ConfigError(f"digit values must be among 0..9, got {list(self.values)}")
        if not 0 < self.large[0] <= self.large[1] <= 0.9:
            raise ConfigError(f"large digit heights must be fractions 0 < min <= max <= 0.9, got {list(self.large)}")
        if self.min_digit < 0:
            raise ConfigError(f"min_digit must be >= 0 (0: automatic), got {self.min_digit}")
        if not 1 <= self.intensity[0] <= self.intensity[1] <= 255:
            raise ConfigError(f"intensity must be a range within 1..255, got {list(self.intensity)}")

    def smallest(self, side: int) -> int:
        """The smallest digit's ink height on a canvas of ``side`` pixels.

        Args:
            side: the canvas side, in pixels.

        Returns:
            ``min_digit``, or ``max(8, side // 64)`` when it is 0.
        """
        return self.min_digit if self.min_digit > 0 else max(8, side // 64)

    def largest(self, side: int) -> int:
        """The largest digit's ink height on a canvas of ``side`` pixels.

        Args:
            side: the canvas side, in pixels.

        Returns:
            ``large[1] * side`` (truncated), at least ``smallest(side)``.
        """
        return max(self.smallest(side), int(self.large[1] * side))

    def small_digit_heights(self, side: int) -> tuple[int, int]:
        """The ink heights the small (second) digit is drawn between, log-uniformly.

        Args:
            side: the canvas side, in pixels.

        Returns:
            ``(smallest, min(3 * smallest, largest))``.
        """
        smallest = self.smallest(side)
        return smallest, min(3 * smallest, self.largest(side))

    def shape_count(self, side: int) -> int:
        """How many distracting shapes are tried on a canvas of ``side`` pixels.

        Args:
            side: the canvas side, in pixels.

        Returns:
            ``shapes``, or ``6 + side // 128`` when it is -1 (automatic).
        """
        return self.shapes if self.shapes >= 0 else 6 + side // 128


@dataclass
class Digit:
    """A digit as drawn: value, box (top, left, height, width of its rendering), ink height, angle, intensity."""

    value: int
    top: int
    left: int
    height: int
    width: int
    ink_height: int
    angle: float
    intensity: int


@dataclass
class UltraMnistImage:
    """One generated image: pixels, the digits drawn and the class they give.

    Args:
        pixels: ``(side, side)`` uint8 canvas.
        digits: the digits as drawn.
        shapes: how many distracting shapes were drawn.

    ``label`` (not an argument) is ``label_of`` the digits' values.
    """

    pixels: np.ndarray  # (side, side) uint8
    digits: list[Digit]
    shapes: int
    label: int = field(init=False)

    def __post_init__(self) -> None:
        self.label = label_of([d.value for d in self.digits])


def label_of(values) -> int:
    """The class of an image holding digits ``values``: their sum modulo 10.

    Args:
        values: the digit values.

    Returns:
        The class id, 0..9.
    """
    return int(sum(int(v) for v in values) % 10)


# ----------------------------------------------------------------------------------
# rendering


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no scalable default font
        raise ConfigError(
            "gigaseg synth ultramnist needs Pillow >= 10.1 with FreeType (ImageFont.load_default(size=...))"
        ) from None


def render_digit(value: int, ink_height: int, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased ink mask of digit ``value``, cropped to its ink. Deterministic.

    Args:
        value: the digit, 0..9.
        ink_height: about how tall the ink is before rotating, in pixels (sets the font size).
        angle: rotation, in degrees counter-clockwise.

    Returns:
        ``(h, w)`` uint8 ink coverage, 0..255.

    Raises:
        ConfigError: Pillow is older than 10.1 (no scalable default font).
    """
    from PIL import Image, ImageDraw

    font = _font(max(4, int(round(ink_height / _INK_RATIO))))
    text = str(int(value))
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2))
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, font=font, fill=255)
    if angle:
        canvas = canvas.rotate(angle, resample=Image.BILINEAR, expand=True)
    ink = np.asarray(canvas)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return np.ascontiguousarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def scaled(mask: np.ndarray, intensity: int) -> np.ndarray:
    """An ink mask drawn at ``intensity`` (what the canvas holds inside a digit's box).

    Args:
        mask: uint8 ink coverage, 0..255.
        intensity: the grey value of full coverage, 0..255.

    Returns:
        uint8 ``mask * intensity / 255``, rounded, of ``mask``'s shape.
    """
    return ((mask.astype(np.uint16) * int(intensity) + 127) // 255).astype(np.uint8)


def _overlaps(box, boxes, margin: int) -> bool:
    top, left, h, w = box
    for t, lft, bh, bw in boxes:
        if top < t + bh + margin and t < top + h + margin and left < lft + bw + margin and lft < left + w + margin:
            return True
    return False


def _place(rng: np.random.Generator, side: int, h: int, w: int, boxes, margin: int, attempts: int = 200):
    if h > side or w > side:
        return None
    for _ in range(attempts):
        top, left = int(rng.integers(side - h + 1)), int(rng.integers(side - w + 1))
        if not _overlaps((top, left, h, w), boxes, margin):
            return top, left
    return None


def _digit_heights(rng: np.random.Generator, count: int, side: int, config: UltraMnistConfig) -> list[int]:
    smallest, largest = config.smallest(side), config.largest(side)
    low, high = config.small_digit_heights(side)
    heights = [
        int(rng.uniform(max(smallest, config.large[0] * side), largest)),
        int(round(math.exp(rng.uniform(math.log(low), math.log(high))))),
    ]
    for _ in range(count - 2):
        heights.append(int(round(math.exp(rng.uniform(math.log(smallest), math.log(largest))))))
    return heights


def _draw_shape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One random outline/line/filled shape filling a ``h x w`` box (uint8 mask 0/255)."""
    from PIL import Image, ImageDraw

    layer = Image.new("L", (w, h))
    draw = ImageDraw.Draw(layer)
    width = int(rng.integers(1, max(2, min(h, w) // 12) + 1))
    kind = int(rng.integers(4))
    if kind == 0:  # line
        if rng.random() < 0.5:
            draw.line([(0, 0), (w - 1, h - 1)], fill=255, width=width)
        else:
            draw.line([(0, h - 1), (w - 1, 0)], fill=255, width=width)
    elif kind == 1:  # ellipse
        draw.ellipse([0, 0, w - 1, h - 1], outline=255, width=width)
    elif kind == 2:  # triangle
        points = [(float(rng.uniform(0, w - 1)), 0.0), (0.0, float(h - 1)), (float(w - 1), float(h - 1))]
        if rng.random() < 0.3:
            draw.polygon(points, fill=255)
        else:
            draw.line(points + points[:1], fill=255, width=width)
    else:  # rectangle
        draw.rectangle([0, 0, w - 1, h - 1], outline=255, width=width)
    return np.asarray(layer)


def generate_image(side: int, seed: int = 0, index: int = 0, config: UltraMnistConfig | None = None) -> UltraMnistImage:
    """Image ``index`` of a data set drawn from ``seed``: a ``side x side`` canvas (see the module docstring).

    Args:
        side: the canvas side, in pixels (at least 32).
        seed: the data set's seed.
        index: the image's index in the data set.
        config: what an image holds; None: ``UltraMnistConfig()``.

    Returns:
        The image; the same arguments give the same pixels.

    Raises:
        ConfigError: ``side`` is below 32, the digits cannot be placed, or Pillow is too old.
    """
    config = config or UltraMnistConfig()
    if side < 32:
        raise ConfigError(f"ultramnist images must be at least 32 px, got {side}")
    rng = np.random.default_rng([int(seed), int(index), 0x0D161750])
    canvas = np.zeros((side, side), np.uint8)
    count = int(rng.integers(config.digits[0], config.digits[1] + 1))
    values = [int(v) for v in rng.choice(np.asarray(config.values), size=count)]
    heights = _digit_heights(rng, count, side, config)
    # the largest first: they are the hardest to place
    order = sorted(range(count), key=lambda i: -heights[i])
    boxes: list[tuple[int, int, int, int]] = []
    digits: list[Digit | None] = [None] * count
    for i in order:
        ink = heights[i]
        # a failed digit is redrawn smaller, down to this height, then tried a bounded number of times more
        floor = config.smallest(side) if i != 0 else 2
        tries_at_floor = 0
        while True:
            angle = float(np.round(rng.uniform(-config.max_angle, config.max_angle), 2))
            mask = render_digit(values[i], ink, angle)
            h, w = mask.shape
            place = _place(rng, side, h, w, boxes, margin=max(2, ink // 10))
            if place is not None:
                break
            if ink <= floor:
                tries_at_floor += 1
                if tries_at_floor >= _PLACE_TRIES_AT_FLOOR:
                    raise ConfigError(
                        f"cannot place {count} digits on a {side}x{side} canvas: only {len(boxes)} fit, the next "
                        f"found no free spot at the smallest ink height ({ink} px) in {_PLACE_TRIES_AT_FLOOR} tries; "
                        f"use fewer digits (got {config.digits[0]}-{config.digits[1]}, at least 2), "
                        "a smaller min_digit or a larger canvas"
                    )
            ink = max(floor, int(ink * 0.85))
            if ink <= 2:
                raise ConfigError(f"cannot place {count} digits on a {side}x{side} canvas; use fewer digits")
        top, left = place
        intensity = int(rng.integers(config.intensity[0], config.intensity[1] + 1))
        canvas[top : top + h, left : left + w] = scaled(mask, intensity)
        boxes.append((top, left, h, w))
        digits[i] = Digit(values[i], top, left, h, w, ink, angle, intensity)
    # shapes: boxes that avoid every digit box (they may cross one another)
    drawn = 0
    smallest, largest = config.smallest(side), config.largest(side)
    for _ in range(config.shape_count(side)):
        h = int(round(math.exp(rng.uniform(math.log(smallest), math.log(largest)))))
        w = int(np.clip(h * math.exp(rng.uniform(-0.7, 0.7)), 3, side))
        place = _place(rng, side, h, w, boxes, margin=2, attempts=50)
        if place is None:
            continue
        top, left = place
        shape = scaled(_draw_shape(rng, h, w), int(rng.integers(config.intensity[0], config.intensity[1] + 1)))
        region = canvas[top : top + h, left : left + w]
        np.maximum(region, shape, out=region)
        drawn += 1
    return UltraMnistImage(canvas, [d for d in digits if d is not None], drawn)


# ----------------------------------------------------------------------------------
# data set


def image_names(count: int) -> list[str]:
    """Names of the images of a data set of ``count``.

    Args:
        count: number of images.

    Returns:
        ``img_0000``, ``img_0001``, ... (at least four digits, more when ``count`` needs them).
    """
    digits = max(4, len(str(count - 1)))
    return [f"img_{i:0{digits}d}" for i in range(count)]


def write_ultramnist_dataset(
    out_dir: str | os.PathLike,
    *,
    count: int,
    size: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    config: UltraMnistConfig | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Write ``count`` images of ``size x size`` to ``out_dir`` (images/, dataset.yaml, synth.json).

    The last ``round(count * val_fraction)`` images form the ``val`` split (at least one
    when ``val_fraction > 0`` and ``count > 1``), the rest ``train``.

    Args:
        out_dir: the output folder (see ``output.prepare_output_dir``).
        count: number of images (at least 1).
        size: the images' side, in pixels (at least 32).
        seed: the data set's seed; the same arguments give the same files.
        val_fraction: share of the images in the ``val`` split, in ``[0, 1)``.
        config: what an image holds; None: ``UltraMnistConfig()``.
        advance: called with 1 after each image is written (progress), or None.

    Returns:
        The manifest, also written to ``synth.json``.

    Raises:
        ConfigError: an argument is out of range, ``out_dir`` cannot be written into, or an image
            cannot be generated.
    """
    import tifffile
    import yaml

    from ..classification import classification_yaml

    config = config or UltraMnistConfig()
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if size < 32:
        raise ConfigError(f"--size must be at least 32 px, got {size}")
    names = image_names(count)
    n_val = 0 if val_fraction == 0 or count == 1 else max(1, int(round(count * val_fraction)))
    splits = {"train": names[: count - n_val], "val": names[count - n_val :]}
    out = prepare_output_dir(out_dir, ("images",))
    images = out / "images"
    manifest = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "seed": int(seed),
        "count": int(count),
        "size": int(size),
        "label_rule": "sum of the digits modulo 10",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "classes": list(CLASSES),
        "splits": splits,
        "files": [f"images/{name}.tif" for name in names],
        "images": [],
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    labels = {}
    tile = min(256, -(-size // 16) * 16)
    for index, name in enumerate(names):
        image = generate_image(size, seed, index, config)
        tifffile.imwrite(
            images / f"{name}.tif",
            image.pixels,
            tile=(tile, tile),
            compression="zlib",
            photometric="minisblack",
            description=json.dumps({"generator": GENERATOR, "seed": seed, "index": index}),
        )
        labels[name] = image.label
        manifest["images"].append(
            {"name": name, "label": image.label, "shapes": image.shapes, "digits": [asdict(d) for d in image.digits]}
        )
        if advance is not None:
            advance(1)
    content = classification_yaml(CLASSES, labels, splits=splits, name="ultramnist-synthetic")
    write_text(out / "dataset.yaml", yaml.safe_dump(content, sort_keys=False, default_flow_style=None))
    manifest["complete"] = True
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
