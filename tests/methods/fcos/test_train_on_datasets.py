"""gigaseg train --method fcos on real dataset files: a synthetic COCO dataset and a YOLO one, end to end."""

from __future__ import annotations

import numpy as np
import yaml
from PIL import Image

from gigaseg.cli import main
from gigaseg.data.synth.objects import ObjectsConfig, write_objects_dataset
from gigaseg.training.checkpoint import load_checkpoint

TINY = ["--set", "fpn_channels=16", "--set", "head_convs=1", "--set", "max_level=5"]


def test_train_fcos_whole_images_on_a_coco_dataset(tmp_path, capsys):
    data = tmp_path / "objects"
    write_objects_dataset(data, count=3, height=128, width=160, seed=1, config=ObjectsConfig(density=500))
    argv = ["train", "--method", "fcos", "--data", str(data), "--out", str(tmp_path / "run"), "--encoder"]
    argv += ["test_resnet", "--epochs", "1", "--batch-size", "2", "--accelerator", "cpu", *TINY]
    assert main([*argv, "--set", "input_size=128"]) == 0, capsys.readouterr().err
    assert "last val AP" in capsys.readouterr().out
    payload = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert payload["data"]["classes"] == ["vehicle", "ring_marker", "cross_marker", "digit"]
    assert payload["data"]["category_ids"] == [1, 2, 3, 4]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "val_AP" in rows[0] and "val_AP75" in rows[0]


def test_train_fcos_on_crops_of_a_yolo_dataset(tmp_path, capsys):
    """Ultralytics layout (data.yaml, images/ + labels/), sliced mode: random crops around the boxes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        (tmp_path / "yolo" / "images" / split).mkdir(parents=True)
        (tmp_path / "yolo" / "labels" / split).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 40, (96, 128, 3)).astype(np.uint8)
            pixels[20:36, 30:46, 0] = 230  # a red square, class 0: 16 x 16 at (30, 20)
            Image.fromarray(pixels).save(tmp_path / "yolo" / "images" / split / f"{split}{i}.png")
            line = f"0 {38 / 128} {28 / 96} {16 / 128} {16 / 96}\n"
            (tmp_path / "yolo" / "labels" / split / f"{split}{i}.txt").write_text(line)
    (tmp_path / "yolo" / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": {0: "red", 1: "green"}})
    )
    argv = ["train", "--method", "fcos", "--data", str(tmp_path / "yolo"), "--out", str(tmp_path / "run")]
    argv += ["--encoder", "test_resnet", "--epochs", "1", "--batch-size", "4", "--accelerator", "cpu", *TINY]
    argv += ["--set", "mode=sliced", "--set", "crop_size=64", "--set", "crops_per_image=2"]
    assert main(argv) == 0, capsys.readouterr().err
    payload = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert payload["data"]["classes"] == ["red", "green"] and payload["data"]["category_ids"] == [0, 1]
