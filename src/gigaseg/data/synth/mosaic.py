"""COCO-mosaic: the images of a local detection dataset pasted many at a time on large blank canvases.

The Resource Efficient Perception paper evaluates its patch-global detector on 4096 x 4096
canvases holding 36 COCO images each. :func:`write_coco_mosaic` builds such a dataset from any
detection dataset gigaseg reads (``gigaseg.data.detection``: COCO's own ``instances_*.json``
layout, YOLO, or a synthetic one): per split, the images in an order drawn from the seed,
``per_canvas`` at a time, each in its cell of a ``ceil(sqrt(per_canvas))``-square grid at a
random offset, shrunk (aspect kept, area averaging) only where it is larger than its cell; the
boxes are shifted and scaled with it (areas by the square of the scale, crowd flags kept). The
last canvas of a split holds what is left. A canvas is held in memory (3 bytes a pixel: 48 MiB
at 4096) and written as tiled, zlib-compressed BigTIFF with a pyramid.

Output, a COCO-layout detection dataset: ``images/<split>/mosaic_<n>.tif``,
``annotations/instances_<split>.json`` (the source's categories and ids), ``dataset.yaml``, and
``synth.json`` listing every canvas's source images with their scale and offset.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError, SplitNotFound
from ...geometry import Window
from .output import MANIFEST, prepare_output_dir, write_text

__all__ = ["write_coco_mosaic"]

GENERATOR = "gigaseg synth coco-mosaic"
FORMAT_VERSION = 1


def write_coco_mosaic(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "val"),
    per_canvas: int = 36,
    canvas: int = 4096,
    seed: int = 0,
    tile: int = 512,
    limit: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Paste the images of the detection dataset at ``source`` on canvases; write a COCO dataset to ``out_dir``.

    Args:
        source: a detection dataset folder (or its yaml) that ``gigaseg.data.loader.load_dataset`` reads.
        out_dir: the output folder (new, empty, or an earlier ``gigaseg synth`` output).
        splits: the source's splits to build (those it lacks are skipped; at least one must exist).
        per_canvas: images per canvas.
        canvas: the canvas side in pixels.
        seed: draws the image order and the offsets in the cells.
        tile: the TIFF tile side, a positive multiple of 16.
        limit: at most this many canvases per split; None: every image is used.
        advance: called with 1 after each canvas; None: no progress.

    Returns:
        The manifest (also in ``synth.json``).

    Raises:
        ConfigError: an argument is out of range, or ``out_dir`` cannot be written into.
        DatasetError: ``source`` is not a detection dataset, is malformed, or has none of ``splits``.
    """
    import yaml

    from ...errors import DatasetError
    from ...io.writers import write_tiled_tiff
    from ..detection import DetectionDataset, detection_yaml
    from ..loader import load_dataset
    from .landcover import pyramid_levels

    if per_canvas < 1:
        raise ConfigError(f"--per-canvas must be at least 1, got {per_canvas}")
    grid = math.ceil(math.sqrt(per_canvas))
    if canvas < 16 * grid:
        raise ConfigError(f"--canvas must be at least {16 * grid} pixels for {per_canvas} images, got {canvas}")
    if tile <= 0 or tile % 16:
        raise ConfigError(f"--tile must be a positive multiple of 16, got {tile}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    datasets: dict[str, DetectionDataset] = {}
    for split in splits:
        try:
            data = load_dataset(source, split)
        except SplitNotFound:
            continue
        if not isinstance(data, DetectionDataset):
            raise DatasetError(source, "is not a detection dataset (a COCO or YOLO layout with boxes)")
        datasets[split] = data
    if not datasets:
        raise DatasetError(source, f"has none of the splits {', '.join(splits)}")
    first = next(iter(datasets.values()))
    plans: dict[str, tuple[np.random.Generator, list[np.ndarray], list[str]]] = {}
    for split_index, (split, data) in enumerate(datasets.items()):
        if list(data.category_ids) != list(first.category_ids) or list(data.classes) != list(first.classes):
            raise DatasetError(data.annotations, f"split {split!r} has other categories than the first split's")
        rng = np.random.default_rng([seed, split_index, 0x3051C])
        order = rng.permutation(len(data))
        groups = [order[i : i + per_canvas] for i in range(0, len(order), per_canvas)][:limit]
        digits = max(4, len(str(len(groups) - 1)))
        plans[split] = (rng, groups, [f"mosaic_{n:0{digits}d}" for n in range(len(groups))])
    out = prepare_output_dir(out_dir, [f"images/{s}" for s in datasets] + ["annotations"])
    manifest = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "source": str(Path(source).resolve()),
        "seed": int(seed),
        "per_canvas": int(per_canvas),
        "canvas": int(canvas),
        "tile": int(tile),
        "classes": list(first.classes),
        "category_ids": list(first.category_ids),
        "splits": {split: names for split, (_, _, names) in plans.items()},
        "files": [f"images/{split}/{n}.tif" for split, (_, _, names) in plans.items() for n in names]
        + [f"annotations/instances_{split}.json" for split in plans],
        "canvases": [],
    }
    # the manifest goes first: an interrupted run leaves a folder that can be overwritten
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    cell = canvas // grid
    levels = pyramid_levels(canvas, canvas, tile)
    categories = [{"id": int(c), "name": n} for c, n in zip(first.category_ids, first.classes)]
    for split, data in datasets.items():
        rng, groups, names = plans[split]
        coco = {"images": [], "annotations": [], "categories": categories}
        for number, (group, name) in enumerate(zip(groups, names)):
            pixels = np.zeros((canvas, canvas, data.channels or 3), np.uint8)
            placed = []
            image_id = number + 1
            for slot, index in enumerate(group):
                sample = data[int(index)]
                scale = min(1.0, cell / sample.width, cell / sample.height)
                h, w = max(1, round(sample.height * scale)), max(1, round(sample.width * scale))
                top = (slot // grid) * cell + int(rng.integers(cell - h + 1))
                left = (slot % grid) * cell + int(rng.integers(cell - w + 1))
                with sample.open() as image:
                    if image.dtype != np.uint8:
                        raise DatasetError(sample.path, f"is {image.dtype}; a COCO mosaic pastes uint8 images")
                    pixels[top : top + h, left : left + w] = image.read(None, (h, w) if scale < 1 else None)
                sx, sy = w / sample.width, h / sample.height
                boxes = sample.boxes * np.array([sx, sy, sx, sy], np.float32) + np.array(
                    [left, top, left, top], np.float32
                )
                crowd = sample.iscrowd if sample.iscrowd is not None else np.zeros(len(boxes), bool)
                for box, label, is_crowd, area in zip(boxes, sample.labels, crowd, sample.areas):
                    x0, y0, x1, y1 = (float(v) for v in box)
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": image_id,
                            "category_id": int(data.category_ids[int(label)]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float(area) * sx * sy,
                            "iscrowd": int(bool(is_crowd)),
                        }
                    )
                placed.append({"image": str(sample.path), "scale": scale, "top": top, "left": left})

            def render(window: Window, pixels=pixels) -> np.ndarray:
                return pixels[window.top : window.top + window.height, window.left : window.left + window.width]

            write_tiled_tiff(
                out / "images" / split / f"{name}.tif",
                canvas,
                canvas,
                pixels.shape[2],
                np.uint8,
                render,
                tile=tile,
                pyramid_levels=levels,
                photometric="rgb" if pixels.shape[2] == 3 else "minisblack",
                description=json.dumps({"generator": GENERATOR, "seed": seed, "split": split, "canvas": number}),
            )
            del pixels
            coco["images"].append({"id": image_id, "file_name": f"{name}.tif", "width": canvas, "height": canvas})
            manifest["canvases"].append({"name": name, "split": split, "images": placed})
            if advance is not None:
                advance(1)
        write_text(out / "annotations" / f"instances_{split}.json", json.dumps(coco))
    description = detection_yaml(
        {s: {"images": f"images/{s}", "annotations": f"annotations/instances_{s}.json"} for s in datasets},
        name="coco-mosaic",
        palette=first.palette,
    )
    write_text(out / "dataset.yaml", yaml.safe_dump(description, sort_keys=False, default_flow_style=None))
    manifest["complete"] = True
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
