"""A dataset with a rare, thin class, for the methods' rare-class tests (``from ..rare import ...``)."""

from __future__ import annotations

import numpy as np
import tifffile
import yaml

from gigaseg.data.loader import load_dataset

HEIGHT, WIDTH = 96, 128
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def rare_masks(count: int = 4) -> list[np.ndarray]:
    """``count`` masks: background 0, a block of class 1, and only in the first a 2 x 40 px line of class 2.

    The line is 80 of the ``count * 96 * 128`` pixels (0.16% with four images); 2 px thick, so a
    crop shrunk by up to 2 (nearest) still shows it.
    """
    masks = []
    for i in range(count):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        top, left = (10 + 20 * i) % 40, (64 - 16 * i) % 64
        mask[top : top + 50, left : left + 50] = 1
        if i == 0:
            mask[80:82, 20:60] = 2  # the rare, thin class
        masks.append(mask)
    return masks


def write_rare_dataset(root, count: int = 4):
    """Write :func:`rare_masks` with images whose colour tells the class, and load the train split.

    Args:
        root: the dataset folder to create.
        count: the number of images (all in ``train``).

    Returns:
        The loaded ``train`` split.
    """
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, mask in enumerate(rare_masks(count)):
        image = COLOURS[mask] + rng.integers(-20, 20, (HEIGHT, WIDTH, 3))
        tifffile.imwrite(root / "images" / f"scene_{i}.tif", image.clip(0, 255).astype(np.uint8))
        tifffile.imwrite(root / "masks" / f"scene_{i}.tif", mask)
    (root / "dataset.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "rare",
                "task": "segmentation",
                "images": "images",
                "masks": "masks",
                "mask_encoding": "index",
                "classes": ["ground", "field", "road"],
                "palette": COLOURS.tolist(),
                "ignore_index": 255,
            }
        )
    )
    return load_dataset(root, split="train")
