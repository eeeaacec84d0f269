"""Test-wide settings (small thread counts for 2 CPU cores) and shared fixtures."""

import os

import numpy as np
import pytest
import tifffile
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_tiny_dataset(root, count=4, size=96, seed=0, val=True):
    """``count`` RGB images whose class is readable from colour, plus index masks and a dataset.yaml.

    The last image is the ``val`` split and the others ``train``; with ``val=False`` all are ``train``.
    """
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
                "splits": {"train": names[:-1], "val": names[-1:]} if val else {"train": names},
            }
        )
    )
    return root


@pytest.fixture(scope="session")
def make_tiny_dataset():
    """The writer itself, for tests that need other sizes (tests/ is not a package, so it cannot be imported)."""
    return write_tiny_dataset


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "data")


#: a patch model small enough that a child process predicts a 7000 x 256 scene in about a second
TINY_PATCH_OPTIONS = {"patch_size": 64, "overlap": 16, "fpn_channels": 16}


@pytest.fixture(scope="session")
def sharpened_checkpoint(tmp_path_factory):
    """A factory of checkpoints of 3-class models on test_resnet with fixed random weights (seed 0),
    sharpened (every weight times 20) so the classes differ across a scene.

    Called as ``sharpened_checkpoint(method, name, **options)``: ``create_model``'s method and options;
    the checkpoint is written to a new temporary folder as ``<name>.ckpt`` and its path returned.
    """
    import torch

    import gigaseg
    from gigaseg.io.normalize import Normalization
    from gigaseg.training.checkpoint import save_checkpoint

    def make(method: str, name: str, **options):
        torch.manual_seed(0)
        model = gigaseg.create_model(method, encoder="test_resnet", num_classes=3, **options)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(20)
        data = {
            "classes": ["a", "b", "c"],
            "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
            "ignore_index": 255,
            "exclude_from_miou": [],
            "normalization": Normalization.for_image(3, np.uint8).to_dict(),
        }
        return save_checkpoint(tmp_path_factory.mktemp(name) / f"{name}.ckpt", model, data)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(sharpened_checkpoint):
    """A patch model on test_resnet with fixed random weights, sharpened so the classes differ across a scene."""
    return sharpened_checkpoint("patch", "tiny", **TINY_PATCH_OPTIONS)


# ------------------------------------------------------------------ a detector (predict and view tests)


@pytest.fixture(scope="session")
def objects(tmp_path_factory):
    """Two 160 x 192 images of the synthetic objects dataset (train and val)."""
    from gigaseg.data.synth.objects import ObjectsConfig, write_objects_dataset

    root = tmp_path_factory.mktemp("objects") / "data"
    config = ObjectsConfig(density=400)  # about 12 objects an image
    write_objects_dataset(root, count=2, height=160, width=192, seed=5, val_fraction=0.5, config=config)
    return root


@pytest.fixture(scope="session")
def fcos_checkpoint(tmp_path_factory, objects):
    """An untrained tiny fcos that reports every box scoring above 0 (so there are boxes to write)."""
    import torch

    import gigaseg
    from gigaseg.data.loader import load_dataset
    from gigaseg.io.normalize import Normalization
    from gigaseg.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = gigaseg.create_model(
        "fcos",
        encoder="test_resnet",
        num_classes=4,
        fpn_channels=16,
        head_convs=1,
        input_size=128,
        max_level=5,
        score_threshold=0.0,
        max_detections=20,
    )
    data = load_dataset(objects, "train")
    info = {
        "classes": data.classes,
        "category_ids": [11, 12, 13, 14],
        "palette": data.palette.tolist(),
        "ignore_index": 255,
        "exclude_from_miou": [],
        "normalization": Normalization.for_image(3, np.uint8).to_dict(),
    }
    return save_checkpoint(tmp_path_factory.mktemp("fcos") / "fcos.ckpt", model, info)
