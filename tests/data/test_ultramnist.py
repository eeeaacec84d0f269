"""The UltraMNIST-style generator and the classification dataset it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import yaml

from gigaseg.cli import main
from gigaseg.data.classification import ClassificationDataset
from gigaseg.data.folder import GigasegDataset
from gigaseg.data.loader import dataset_task, load_dataset
from gigaseg.data.synth import ultramnist
from gigaseg.data.synth.ultramnist import (
    UltraMnistConfig,
    generate_image,
    label_of,
    render_digit,
    scaled,
    write_ultramnist_dataset,
)
from gigaseg.errors import ConfigError, DatasetError


def digit_box(image, digit):
    return image.pixels[digit.top : digit.top + digit.height, digit.left : digit.left + digit.width]


@pytest.mark.parametrize("index", range(6))
def test_labels_match_the_digits_drawn(index):
    image = generate_image(256, seed=5, index=index)
    assert 3 <= len(image.digits) <= 5
    assert image.label == sum(d.value for d in image.digits) % 10
    for digit in image.digits:
        # a digit's box holds exactly its rendering: re-rendering the recorded digit reproduces it
        expected = scaled(render_digit(digit.value, digit.ink_height, digit.angle), digit.intensity)
        assert expected.shape == (digit.height, digit.width)
        np.testing.assert_array_equal(digit_box(image, digit), expected)
        # and it is not any other digit: every other value renders differently at that size
        others = [v for v in range(10) if v != digit.value]
        for value in others:
            other = scaled(render_digit(value, digit.ink_height, digit.angle), digit.intensity)
            assert other.shape != expected.shape or not np.array_equal(other, expected)


def test_digits_span_very_different_sizes_among_shapes():
    side = 512
    config = UltraMnistConfig()
    for index in range(8):
        image = generate_image(side, seed=0, index=index)
        inks = sorted(d.ink_height for d in image.digits)
        assert inks[0] <= 3 * config.smallest(side) and inks[-1] >= config.large[0] * side * 0.8
        assert image.shapes >= 1
        # shapes are drawn outside the digits' boxes: there is ink that no digit accounts for
        covered = np.zeros_like(image.pixels, dtype=bool)
        for d in image.digits:
            covered[d.top : d.top + d.height, d.left : d.left + d.width] = True
        assert (image.pixels[~covered] > 0).sum() > 0


def test_same_seed_same_pixels_and_other_seeds_differ():
    a, b = generate_image(128, seed=1, index=3), generate_image(128, seed=1, index=3)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.pixels, generate_image(128, seed=2, index=3).pixels)


def test_label_rule_and_value_subset():
    assert label_of([9, 8, 7]) == 4 and label_of([0, 0]) == 0
    config = UltraMnistConfig(digits=(2, 2), values=(3, 8))
    labels = set()
    for index in range(12):
        image = generate_image(128, seed=0, index=index, config=config)
        assert len(image.digits) == 2 and {d.value for d in image.digits} <= {3, 8}
        labels.add(image.label)
    assert labels <= {1, 6}  # 3+3=6, 3+8=11->1, 8+8=16->6
    with pytest.raises(ConfigError, match="at least 2"):
        UltraMnistConfig(digits=(1, 3))
    with pytest.raises(ConfigError, match="0..9"):
        UltraMnistConfig(values=(3, 12))


def test_digits_that_cannot_fit_give_up_with_a_clear_error(monkeypatch):
    # 40 digits of at least 8 px cannot fit on 32 x 32; the placement loop used to retry forever
    calls = [0]
    place = ultramnist._place

    def counted(*args, **kwargs):
        calls[0] += 1
        assert calls[0] < 5000, "the placement loop does not give up"
        return place(*args, **kwargs)

    monkeypatch.setattr(ultramnist, "_place", counted)
    with pytest.raises(ConfigError, match=r"cannot place 40 digits on a 32x32 canvas: .*use fewer digits \(got 40-40"):
        generate_image(32, config=UltraMnistConfig(digits=(40, 40)))


def test_written_dataset_loads_as_classification(tmp_path):
    manifest = write_ultramnist_dataset(tmp_path / "um", count=5, size=96, seed=4, val_fraction=0.4)
    root = tmp_path / "um"
    content = yaml.safe_load((root / "dataset.yaml").read_text())
    assert content["task"] == "classification" and content["classes"] == [str(d) for d in range(10)]
    assert content["splits"] == {"train": ["img_0000", "img_0001", "img_0002"], "val": ["img_0003", "img_0004"]}
    assert dataset_task(root) == "classification"
    train = load_dataset(root, "train")
    assert isinstance(train, ClassificationDataset) and len(train) == 3 and train.num_classes == 10
    on_disk = json.loads((root / "synth.json").read_text())
    assert on_disk["complete"] and on_disk == json.loads(json.dumps(manifest))
    for entry in on_disk["images"]:
        assert entry["label"] == content["labels"][entry["name"]] == sum(d["value"] for d in entry["digits"]) % 10
        pixels = tifffile.imread(root / "images" / f"{entry['name']}.tif")
        assert pixels.shape == (96, 96) and pixels.dtype == np.uint8
        regenerated = generate_image(96, seed=4, index=int(entry["name"].split("_")[1]))
        np.testing.assert_array_equal(pixels, regenerated.pixels)
    with train[1] as sample:
        assert sample.name == "img_0001" and sample.label == content["labels"]["img_0001"]
        assert sample.image.shape == (96, 96, 1) and sample.mask is None
    # rewriting into an earlier output is allowed; a foreign non-empty folder is not
    write_ultramnist_dataset(root, count=2, size=64, seed=0)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["img_0000.tif", "img_0001.tif"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="refusing"):
        write_ultramnist_dataset(tmp_path / "foreign", count=1, size=64)


def test_cli_synth_ultramnist(tmp_path, capsys):
    out = tmp_path / "d"
    code = main(
        [
            "synth",
            "ultramnist",
            str(out),
            "--count",
            "4",
            "--size",
            "128",
            "--seed",
            "2",
            "--digits",
            "2",
            "--values",
            "3,8",
            "--val-fraction",
            "0.25",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "wrote 4 image(s) of 128x128 (3 train, 1 val)" in captured.err
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["config"]["digits"] == [2, 2] and manifest["config"]["values"] == [3, 8]
    assert all(len(e["digits"]) == 2 for e in manifest["images"])
    assert main(["synth", "ultramnist", str(tmp_path / "e"), "--digits", "x-y"]) == 2
    assert "--digits must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the schema


def write_classification(root, labels, *, classes=("cat", "dog"), splits=None, images=("a", "b", "c"), **extra):
    (root / "images").mkdir(parents=True)
    for stem in images:
        tifffile.imwrite(root / "images" / f"{stem}.tif", np.full((16, 16, 3), 7, np.uint8))
    content = {"task": "classification", "classes": list(classes), "labels": labels, **extra}
    if splits is not None:
        content["splits"] = splits
    (root / "dataset.yaml").write_text(yaml.safe_dump(content))
    return root


def test_labels_by_id_or_name_and_unlabelled_images(tmp_path):
    root = write_classification(tmp_path / "d", {"a": 1, "b": "cat"})
    data = ClassificationDataset(root)
    assert data.names == ["a", "b", "c"] and data.labels == [1, 0, None]
    assert not data.labelled and data.class_counts().tolist() == [1, 1]
    with pytest.raises(DatasetError, match="1 have none in 'labels': c"):
        data.require_labels()
    assert ClassificationDataset(root, "all").names == ["a", "b", "c"]
    with pytest.raises(DatasetError, match="no splits are defined"):
        ClassificationDataset(root, "val")


def test_schema_errors_name_the_file(tmp_path):
    bad = write_classification(tmp_path / "bad", {"a": 2, "b": "bird", "c": True})
    with pytest.raises(DatasetError, match=r"dataset.yaml: 3 label\(s\) are neither a class id 0..1 nor a class name"):
        ClassificationDataset(bad)
    missing = write_classification(tmp_path / "missing", {"a": 0, "zz": 1})
    with pytest.raises(DatasetError, match="labelled stem.*have no image.*zz"):
        ClassificationDataset(missing)
    split = write_classification(tmp_path / "split", {"a": 0}, splits={"train": ["a", "q"]})
    with pytest.raises(DatasetError, match="split 'train' lists 1 stem"):
        ClassificationDataset(split)
    with pytest.raises(DatasetError, match="no split 'val'"):
        ClassificationDataset(split, "val")
    no_labels = write_classification(tmp_path / "nolabels", {})
    with pytest.raises(DatasetError, match="missing 'labels'"):
        ClassificationDataset(no_labels)


def test_segmentation_loader_still_refuses_classification_yaml(tmp_path):
    root = write_classification(tmp_path / "d", {"a": 0})
    with pytest.raises(DatasetError, match="only segmentation datasets"):
        GigasegDataset(root)
