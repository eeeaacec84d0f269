"""A synthetic scene for the viewer's tests: smooth class regions, an image coloured by class, two masks.

The labels are the argmax of four smooth random fields (bilinear between grid points every
``cell`` pixels), so every class forms large regions whose interiors are uniform; mask "b" is
mask "a" with a second, weaker field added, so the two methods disagree along some borders.
The image is each class's ground colour plus gentle shading and fine noise. Everything is
computed here, independently of the viewer, so the tests can check what it shows against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gigaseg.geometry import Window
from gigaseg.io.writers import MaskWriter, write_tiled_tiff

CLASSES = ["water", "forest", "cropland", "urban"]
#: the masks' colours (the legend's)
PALETTE = np.array([(30, 110, 230), (30, 170, 70), (240, 190, 40), (220, 50, 60)], np.uint8)
#: the image's ground colour per class (duller than the palette, so the overlay shows)
GROUND = np.array([(45, 75, 105), (60, 95, 55), (160, 145, 95), (130, 125, 120)], np.int16)


def _field(rng: np.random.Generator, size: int, cell: int, classes: int, step: int = 4) -> np.ndarray:
    """``(size, size)`` labels: argmax over ``classes`` fields interpolated bilinearly from a grid every ``cell`` px.

    Computed every ``step`` pixels and repeated (region borders are ``step``-pixel stairs).
    """
    small, cell = size // step, cell // step
    points = small // cell + 2
    grid = rng.random((classes, points, points)).astype(np.float32)
    position = (np.arange(small, dtype=np.float32) + 0.5) / cell
    below = np.floor(position).astype(int)
    weight = position - below
    interp = np.zeros((small, points), np.float32)  # rows of the interpolation matrix
    interp[np.arange(small), below] = 1 - weight
    interp[np.arange(small), below + 1] = weight
    values = np.stack([interp @ grid[index] @ interp.T for index in range(classes)])
    labels = values.argmax(axis=0).astype(np.uint8)
    return np.repeat(np.repeat(labels, step, axis=0), step, axis=1)


@dataclass
class Scene:
    """The scene's files and the truth they were made from."""

    size: int
    image: Path
    masks: list[Path]
    labels: list[np.ndarray]  # (size, size) uint8 per mask

    def image_pixels(self, window: Window) -> np.ndarray:
        """The image's pixels over ``window`` as written (before the TIFF's JPEG compression)."""
        return render_image(self.labels[0], window)

    def counts(self, mask: int) -> np.ndarray:
        """Pixels per class of a mask, counted here."""
        return np.bincount(self.labels[mask].ravel(), minlength=len(CLASSES))


def render_image(labels: np.ndarray, window: Window) -> np.ndarray:
    """The image over ``window``: ground colour of the class, shading and fine noise, uint8 RGB."""
    ys = np.arange(window.top, window.bottom, dtype=np.float32)[:, None]
    xs = np.arange(window.left, window.right, dtype=np.float32)[None, :]
    # 14 sin(x/610) cos(y/830) + 6 sin((x+y)/170), written as sums of outer products (fast)
    shade = 14 * np.sin(xs / 610) * np.cos(ys / 830)
    shade += 6 * (np.sin(xs / 170) * np.cos(ys / 170) + np.cos(xs / 170) * np.sin(ys / 170))
    noise = _NOISE[ys[:, 0].astype(int) % 64][:, xs[0].astype(int) % 64]
    detail = (np.round(shade).astype(np.int16) + noise)[..., None]
    return np.clip(GROUND[labels[window.slices]] + detail, 0, 255).astype(np.uint8)


#: fine texture: a fixed 64 x 64 tile of values in -3..3, repeated
_NOISE = np.random.default_rng(1).integers(-3, 4, (64, 64)).astype(np.int16)


def write_scene(folder: Path, size: int = 8192, *, tile: int = 512, cell: int = 384, seed: int = 0) -> Scene:
    """Write ``image.tif`` (RGB, JPEG-compressed, with a pyramid) and two masks, ``method_a/scene.tif`` and
    ``method_b/scene.tif``, written by ``MaskWriter`` as ``gigaseg predict`` writes them (palette, class
    names, pyramid).
    """
    rng = np.random.default_rng(seed)
    labels_a = _field(rng, size, cell, len(CLASSES))
    disagree = _field(rng, size, cell // 2, len(CLASSES))
    labels_b = np.where((disagree == 3) & (labels_a != 0), 3, labels_a).astype(np.uint8)
    image = folder / "image.tif"
    write_tiled_tiff(
        image,
        size,
        size,
        3,
        np.uint8,
        lambda window: render_image(labels_a, window),
        tile=tile,
        compression="jpeg",
        pyramid_levels=8,
        pyramid_layout="cog",
    )
    masks = []
    for name, labels in (("method_a", labels_a), ("method_b", labels_b)):
        path = folder / name / "scene.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with MaskWriter(path, size, size, palette=PALETTE, class_names=CLASSES, tile=tile) as writer:
            for top in writer.band_tops:
                writer.write_band(top, labels[writer.band_window(top).slices])
        masks.append(path)
    return Scene(size, image, masks, [labels_a, labels_b])
