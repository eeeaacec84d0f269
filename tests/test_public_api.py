"""The top-level API: names that stay what they are, and a dataset loader for every task."""

from __future__ import annotations

import subprocess
import sys

import gigaseg
import gigaseg.training  # the training package must not replace the function gigaseg.train
from gigaseg.data.classification import ClassificationDataset
from gigaseg.data.folder import GigasegDataset
from gigaseg.data.synth.ultramnist import write_ultramnist_dataset


def test_importing_the_training_package_leaves_train_the_function():
    assert callable(gigaseg.train) and gigaseg.train.__module__ == "gigaseg.api"
    assert gigaseg.training.TrainSettings is gigaseg.TrainSettings


def test_importing_gigaseg_does_not_import_torch():
    code = "import gigaseg, sys; gigaseg.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_load_dataset_loads_segmentation_and_classification_datasets(tiny_dataset, tmp_path):
    segmentation = gigaseg.load_dataset(tiny_dataset, split="train")
    assert isinstance(segmentation, GigasegDataset) and len(segmentation) == 3
    write_ultramnist_dataset(tmp_path / "um", count=4, size=64, seed=0, val_fraction=0.5)
    classification = gigaseg.load_dataset(tmp_path / "um", split="val")
    assert isinstance(classification, ClassificationDataset) and len(classification) == 2
    assert classification.classes == [str(d) for d in range(10)]


def test_every_export_resolves():
    for name in gigaseg.__all__:
        assert getattr(gigaseg, name) is not None, name
