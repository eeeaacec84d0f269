"""A tiny in-memory detection dataset of bright squares on a dark noisy background (the detection contract's shape)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gigaseg.io.array import ArraySource


@dataclass
class Sample:
    """A ``gigaseg.data.detection.DetectionSample`` look-alike with its pixels in memory."""

    name: str
    path: Path
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int
    width: int
    height: int
    iscrowd: np.ndarray | None
    pixels: np.ndarray

    def open(self) -> ArraySource:
        return ArraySource(self.pixels, name=self.name)


class Squares:
    """``count`` images of ``size`` x ``size`` with 1-4 squares each: class 0 bright red, class 1 bright green."""

    classes = ["red", "green"]
    category_ids = [1, 2]
    palette = [[255, 0, 0], [0, 255, 0]]

    def __init__(self, count=6, size=96, side=(10, 20), seed=0):
        rng = np.random.default_rng(seed)
        self.root = Path("squares")
        self.samples = []
        for i in range(count):
            pixels = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
            boxes, labels = [], []
            for _ in range(int(rng.integers(1, 5))):
                s = int(rng.integers(side[0], side[1] + 1))
                x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
                if any(x < b[2] + 2 and b[0] < x + s + 2 and y < b[3] + 2 and b[1] < y + s + 2 for b in boxes):
                    continue  # no overlapping squares
                label = int(rng.integers(2))
                pixels[y : y + s, x : x + s, label] = 230
                boxes.append([x, y, x + s, y + s])
                labels.append(label)
            self.samples.append(
                Sample(
                    f"img_{i}",
                    Path(f"img_{i}.png"),
                    np.array(boxes, np.float32).reshape(-1, 4),
                    np.array(labels, np.int64),
                    i + 1,
                    size,
                    size,
                    None,
                    pixels,
                )
            )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def write_coco(root: Path, splits: dict[str, Squares]) -> Path:
    """Write ``splits`` (name -> Squares) as a COCO-layout gigaseg detection dataset (tiled TIFFs) under ``root``."""
    import json

    import tifffile
    import yaml

    from gigaseg.data.detection import detection_yaml

    entries = {}
    for split, data in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        images, annotations = [], []
        for sample in data.samples:
            tifffile.imwrite(root / "images" / split / f"{sample.name}.tif", sample.pixels)
            images.append(
                {
                    "id": sample.image_id,
                    "file_name": f"{sample.name}.tif",
                    "width": sample.width,
                    "height": sample.height,
                }
            )
            for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
                x0, y0, x1, y1 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": sample.image_id,
                        "category_id": data.category_ids[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
        categories = [{"id": i, "name": n} for i, n in zip(data.category_ids, data.classes)]
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        entries[split] = {"images": f"images/{split}", "annotations": f"annotations/instances_{split}.json"}
    (root / "dataset.yaml").write_text(yaml.safe_dump(detection_yaml(entries, name="squares")))
    return root
