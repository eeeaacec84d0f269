"""Test-wide settings (small thread counts for 2 CPU cores) and shared fixtures."""

import os

import numpy as np
import pytest
import tifffile
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_tiny_dataset(root, count=4, size=96, seed=0):
    """``count`` RGB images whose class is readable from colour, plus index masks and a dataset.yaml."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = [f"scene_{i:03d}" for i in range(count)]
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for name in names:
        labels = np.zeros((size, size), np.uint8)
        labels[:, size // 3 :] = 1
        labels[size // 2 :, 2 * size // 3 :] = 2
        labels = np.rot90(labels, int(rng.integers(4))).copy()
        image = colours[labels] + rng.integers(-30, 30, (size, size, 3))
        tifffile.imwrite(root / "images" / f"{name}.tif", image.clip(0, 255).astype(np.uint8), tile=(32, 32))
        tifffile.imwrite(root / "masks" / f"{name}.tif", labels, tile=(32, 32))
    (root / "dataset.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "task": "segmentation",
                "images": "images",
                "masks": "masks",
                "mask_encoding": "index",
                "classes": ["red", "green", "blue"],
                "palette": colours.tolist(),
                "ignore_index": 255,
                "splits": {"train": names[:-1], "val": names[-1:]},
            }
        )
    )
    return root


@pytest.fixture
def make_tiny_dataset():
    """The writer itself, for tests that need other sizes (tests/ is not a package, so it cannot be imported)."""
    return write_tiny_dataset


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "data")
