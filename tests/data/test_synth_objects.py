"""gigaseg synth objects and coco-mosaic: deterministic scenes, boxes that hold their objects, COCO datasets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigaseg.cli import main
from gigaseg.data.loader import load_dataset
from gigaseg.data.synth.mosaic import write_coco_mosaic
from gigaseg.data.synth.objects import CLASSES, ObjectsConfig, ObjectsScene, render_sprite, write_objects_dataset
from gigaseg.detection_metrics import DetectionEvaluator
from gigaseg.errors import ConfigError, DatasetError
from gigaseg.geometry import Detections, Window


def test_a_scene_is_the_same_whatever_the_window_and_follows_its_seed():
    scene = ObjectsScene(700, 900, seed=3, index=1)
    whole = scene.render_image(Window(0, 0, 700, 900))
    assert np.array_equal(scene.render_image(Window(130, 250, 300, 410)), whole[130:430, 250:660])
    again = ObjectsScene(700, 900, seed=3, index=1)
    assert np.array_equal(again.boxes()[0], scene.boxes()[0])
    assert np.array_equal(again.render_image(Window(0, 0, 700, 900)), whole)
    other = ObjectsScene(700, 900, seed=4, index=1)
    assert not np.array_equal(other.boxes()[0], scene.boxes()[0])


def test_every_box_holds_its_drawn_object_and_nothing_else():
    config = ObjectsConfig(density=120, distractors=1.0)
    scene = ObjectsScene(512, 768, seed=0, config=config)
    boxes, labels = scene.boxes()
    assert len(boxes) > 30 and set(labels.tolist()) == set(range(len(CLASSES)))
    assert sum(o.label is None for o in scene.objects) > 15  # distractors drawn, not annotated
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sizes.min() >= 3 and sizes.max() <= 1.5 * 60
    image = scene.render_image(Window(0, 0, 512, 768)).astype(np.int32)
    background = np.clip(scene._background(Window(0, 0, 512, 768)) + 0.5, 0, 255).astype(np.int32)
    changed = np.abs(image - background).max(-1) > 0
    # no two objects (annotated or not) closer than the margin: boxes do not overlap
    all_boxes = np.array([o.box for o in scene.objects])
    for i, (x0, y0, x1, y1) in enumerate(all_boxes):
        others = np.delete(all_boxes, i, 0)
        assert not ((others[:, 0] < x1) & (others[:, 2] > x0) & (others[:, 1] < y1) & (others[:, 3] > y0)).any()
    for o in scene.objects:
        colours, coverage = render_sprite(o.kind, o.size, o.angle, o.colour, o.glyph)
        x0, y0, x1, y1 = o.box
        # the box is the tight box of the pixels covered at least a quarter, in scene pixels
        covered = np.zeros(image.shape[:2], bool)
        h, w = coverage.shape
        covered[o.top : o.top + h, o.left : o.left + w] = coverage >= 0.25
        rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
        assert (x0, y0, x1, y1) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert changed[y0:y1, x0:x1].mean() > 0.3, o.kind


def test_objects_are_placed_across_tile_borders():
    scene = ObjectsScene(1024, 1024, seed=1, config=ObjectsConfig(density=60, cross_share=0.5))
    boxes, _ = scene.boxes()
    across = ((boxes[:, 0] < 512) & (boxes[:, 2] > 512)) | ((boxes[:, 1] < 512) & (boxes[:, 3] > 512))
    assert across.sum() == scene.describe()["across_borders"]
    assert across.mean() > 0.3  # half are asked to cross; random placement alone gives about 10%


def test_synth_objects_writes_a_coco_dataset_whose_ground_truth_scores_ap_one(tmp_path, capsys):
    out = tmp_path / "objects"
    code = main(["synth", "objects", str(out), "--count", "3", "--size", "300x420", "--seed", "2", "--density", "150"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["complete"] and manifest["splits"] == {
        "train": ["objects_000", "objects_001"],
        "val": ["objects_002"],
    }
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in coco["annotations"])
    train = load_dataset(out, "train")
    assert train.classes == list(CLASSES) and len(train) == 2
    scene = ObjectsScene(300, 420, seed=2, index=1, config=ObjectsConfig(density=150))
    np.testing.assert_array_equal(train[1].boxes, scene.boxes()[0])
    with tifffile.TiffFile(out / "images" / "train" / "objects_001.tif") as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].shape == (300, 420, 3)
        np.testing.assert_array_equal(tif.asarray(), scene.render_image(Window(0, 0, 300, 420)))
    evaluator = DetectionEvaluator(train.classes, max_detections=1000)
    for sample in load_dataset(out, "val"):
        perfect = Detections(sample.boxes, np.ones(len(sample.boxes), np.float32), sample.labels)
        evaluator.add(sample.name, sample.width, sample.height, sample.boxes, sample.labels, perfect, sample.iscrowd)
    scores = evaluator.compute()
    assert scores["AP"] == pytest.approx(1.0) and scores["AP75"] == pytest.approx(1.0)
    # a rerun over an earlier output is allowed; other folders are refused
    assert main(["synth", "objects", str(out), "--count", "1", "--size", "64"]) == 0
    assert not (out / "images" / "val").exists() or not any((out / "images" / "val").iterdir())


def test_wide_scenes_are_rendered_in_bounded_column_chunks(tmp_path, monkeypatch):
    seen = []
    original = ObjectsScene.render_image

    def spy(self, window):
        seen.append((window.height, window.width))
        return original(self, window)

    monkeypatch.setattr(ObjectsScene, "render_image", spy)
    write_objects_dataset(tmp_path / "w", count=1, height=40, width=4200, val_fraction=0, tile=256)
    assert max(w for _, w in seen) == 2048 and sum(h * w for h, w in seen) == 40 * 4200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "8"], "scene size must be at least 16x16, got 8x8"),
        (["--count", "0"], "--count must be at least 1, got 0"),
        (["--min-size", "2"], "sizes must be 3 <= min <= max <= 256 pixels, got (2, 60)"),
        (["--density", "0"], "density must be positive, got 0.0"),
        (["--tile", "100"], "--tile must be a positive multiple of 16, got 100"),
    ],
)
def test_bad_synth_objects_arguments_end_in_one_line(tmp_path, capsys, argv, message):
    assert main(["synth", "objects", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(message), err
    assert not (tmp_path / "x" / "synth.json").exists()


def fake_coco(root, sizes=((30, 40), (20, 20), (100, 80), (50, 64), (12, 16))):
    """A tiny COCO dataset: each image a flat colour with one bright square, its box annotated."""
    images, annotations = [], []
    (root / "images").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        pixels = np.full((h, w, 3), 10 * (i + 1), np.uint8)
        x0, y0, side = w // 4, h // 4, min(h, w) // 2
        pixels[y0 : y0 + side, x0 : x0 + side] = 250
        Image.fromarray(pixels).save(root / "images" / f"im{i}.png")
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": w, "height": h})
        annotations.append(
            {"id": i + 1, "image_id": 100 + i, "category_id": 5 + i % 2, "bbox": [x0, y0, side, side], "iscrowd": 0}
        )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 5, "name": "a"}, {"id": 6, "name": "b"}],
    }
    (root / "train.json").write_text(json.dumps(coco))
    (root / "dataset.yaml").write_text("task: detection\nsplits:\n  train: {images: images, annotations: train.json}\n")
    return root


def test_coco_mosaic_pastes_images_in_a_grid_with_their_boxes(tmp_path):
    source = fake_coco(tmp_path / "coco")
    manifest = write_coco_mosaic(source, tmp_path / "mosaic", per_canvas=4, canvas=128, seed=1)
    assert manifest["splits"] == {"train": ["mosaic_0000", "mosaic_0001"]}  # 5 images, 4 a canvas
    data = load_dataset(tmp_path / "mosaic", "train")
    assert data.category_ids == [5, 6] and data.classes == ["a", "b"]
    assert [len(s.boxes) for s in data] == [4, 1] and all((s.width, s.height) == (128, 128) for s in data)
    placed = [p for canvas in manifest["canvases"] for p in canvas["images"]]
    shrunk = [p for p in placed if p["scale"] < 1]
    assert len(shrunk) == 1 and shrunk[0]["scale"] == pytest.approx(64 / 100)  # the 100x80 image, into a 64 cell
    for sample in data:
        with sample.open() as source_image:
            pixels = source_image.read()
        for x0, y0, x1, y1 in sample.boxes:
            inside = pixels[math.ceil(y0) : math.floor(y1), math.ceil(x0) : math.floor(x1)]
            assert inside.size and inside.min() >= 240  # the bright square moved with its box
        # everything outside the pasted images is the blank canvas
        blank = np.ones((128, 128), bool)
        for p in manifest["canvases"][data.names.index(sample.name)]["images"]:
            with Image.open(p["image"]) as im:
                w, h = round(im.width * p["scale"]), round(im.height * p["scale"])
            blank[p["top"] : p["top"] + h, p["left"] : p["left"] + w] = False
            assert p["top"] // 64 * 64 <= p["top"] and p["top"] + h <= (p["top"] // 64 + 1) * 64  # inside its cell
        assert (pixels[blank] == 0).all()
    gt = data.coco_ground_truth()
    assert sorted(a["category_id"] for a in gt["annotations"]) == [5, 5, 5, 6, 6]


def test_coco_mosaic_needs_a_detection_dataset_and_sane_arguments(tmp_path, capsys):
    source = fake_coco(tmp_path / "coco")
    with pytest.raises(ConfigError, match="--per-canvas"):
        write_coco_mosaic(source, tmp_path / "m", per_canvas=0)
    with pytest.raises(DatasetError, match="has none of the splits val"):
        write_coco_mosaic(source, tmp_path / "m", splits=["val"])
    assert main(["synth", "coco-mosaic", str(tmp_path / "nowhere"), str(tmp_path / "m")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["synth", "coco-mosaic", str(source), str(tmp_path / "m"), "--per-canvas", "9", "--canvas", "96"]) == 0
    assert len(load_dataset(tmp_path / "m", "train")) == 1
