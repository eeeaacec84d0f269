"""Detection datasets: COCO json and YOLO txt layouts read into pixel xyxy boxes, and every bad input named."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from gigaseg.data.detection import DetectionDataset, DetectionSample, yolo_label_path
from gigaseg.data.loader import dataset_task, load_dataset
from gigaseg.errors import DatasetError, SplitNotFound


def write_image(path, height, width, channels=3, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, channels) if channels > 1 else (height, width), value, np.uint8)
    if path.suffix == ".tif":
        tifffile.imwrite(path, pixels)
    else:
        Image.fromarray(pixels).save(path)


def coco_json(images, annotations, categories=((3, "car"), (7, "marker"))):
    return {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": list(b), "area": b[2] * b[-1], "iscrowd": crowd}
            for n, (i, c, b, crowd) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": n} for c, n in categories],
    }


def write_coco(root, train=None, val=None, yaml_extra=None):
    """A two-split COCO dataset: images/<split>/*.png + annotations/<split>.json + dataset.yaml."""
    train = train or coco_json(
        [(11, "a.png", 40, 30), (12, "b.png", 20, 10)],
        [(11, 3, (2, 3, 10, 5), 0), (11, 7, (20.5, 0, 19.5, 30), 1), (12, 7, (0, 0, 1, 1), 0)],
    )
    val = val or coco_json([(5, "c.png", 16, 16)], [(5, 3, (4, 4, 8, 8), 0)])
    for split, coco in (("train", train), ("val", val)):
        for image in coco["images"]:
            write_image(root / "images" / split / image["file_name"], image["height"], image["width"])
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    description = {
        "task": "detection",
        "splits": {s: {"images": f"images/{s}", "annotations": f"annotations/{s}.json"} for s in ("train", "val")},
        **(yaml_extra or {}),
    }
    (root / "dataset.yaml").write_text(yaml.safe_dump(description))
    return root


def test_coco_boxes_become_pixel_xyxy_with_contiguous_labels(tmp_path):
    root = write_coco(tmp_path / "ds")
    assert dataset_task(root) == "detection"
    data = load_dataset(root, "train")
    assert isinstance(data, DetectionDataset) and data.format == "coco" and len(data) == 2
    assert data.classes == ["car", "marker"] and data.category_ids == [3, 7]
    assert data.palette.shape == (2, 3)
    a, b = data[0], data[1]
    assert isinstance(a, DetectionSample) and (a.name, a.image_id, a.width, a.height) == ("a", 11, 40, 30)
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [20.5, 0, 40, 30]])
    np.testing.assert_array_equal(a.labels, [0, 1])
    np.testing.assert_array_equal(a.iscrowd, [False, True])
    np.testing.assert_array_equal(a.areas, [50, 585])
    np.testing.assert_array_equal(b.boxes, [[0, 0, 1, 1]])
    with a.open() as source:
        assert source.shape == (30, 40, 3)
    with a:  # the other samples' context-manager form
        assert a.image.width == 40
    assert a._image is None
    assert len(load_dataset(root, "val")) == 1
    with pytest.raises(SplitNotFound, match="no split 'test'"):
        load_dataset(root, "test")
    assert len(pickle.loads(pickle.dumps(data))) == 2


def test_coco_ground_truth_round_trips_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    data = load_dataset(write_coco(tmp_path / "ds"), "train")
    gt = data.coco_ground_truth()
    assert [i["id"] for i in gt["images"]] == [11, 12] and gt["images"][0]["file_name"] == "images/train/a.png"
    assert [a["bbox"] for a in gt["annotations"]] == [[2, 3, 10, 5], [20.5, 0, 19.5, 30], [0, 0, 1, 1]]
    assert [(a["category_id"], a["iscrowd"], a["area"]) for a in gt["annotations"]] == [
        (3, 0, 50),
        (7, 1, 585),
        (7, 0, 1),
    ]
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert coco.getCatIds() == [3, 7] and len(coco.getAnnIds(imgIds=[11])) == 2


def test_grey_images_among_colour_ones_are_read_with_the_channel_repeated(tmp_path):
    root = write_coco(tmp_path / "ds")
    write_image(root / "images" / "train" / "b.png", 10, 20, channels=1, value=9)
    data = load_dataset(root, "train")
    assert data.channels == 3
    with data[1].open() as source:
        assert source.channels == 3 and (source.read()[..., 2] == 9).all()


def test_zero_size_boxes_are_left_out_and_counted(tmp_path):
    train = coco_json([(1, "a.png", 8, 8)], [(1, 3, (1, 1, 0, 4), 0), (1, 3, (1, 1, 2, 2), 0)])
    data = load_dataset(write_coco(tmp_path / "ds", train=train), "train")
    assert data.degenerate == 1 and len(data[0].boxes) == 1


def test_a_box_a_fraction_of_a_pixel_outside_is_clipped(tmp_path):
    train = coco_json([(1, "a.png", 8, 8)], [(1, 3, (-0.5, 2, 8.9, 3), 0)])
    data = load_dataset(write_coco(tmp_path / "ds", train=train), "train")
    np.testing.assert_array_equal(data[0].boxes, [[0, 2, 8, 5]])


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (coco_json([(1, "a.png", 8, 8)], [(1, 3, (2, 2, 10, 3), 0)]), r"reaches outside its 8x8 \(WxH\) image"),
        (coco_json([(1, "a.png", 8, 8)], [(1, 3, (2, 2, -1, 3), 0)]), "negative size"),
        (coco_json([(1, "a.png", 8, 8)], [(1, 4, (2, 2, 1, 3), 0)]), "category_id 4, which is not in 'categories'"),
        (coco_json([(1, "a.png", 8, 8)], [(2, 3, (2, 2, 1, 3), 0)]), "image id 2, which is not in 'images'"),
        (coco_json([(1, "a.png", 8, 8)], [(1, 3, (2, 2, 1), 0)]), r"bbox must be 4 numbers"),
    ],
)
def test_bad_annotations_name_the_json_and_the_problem(tmp_path, train, message):
    root = write_coco(tmp_path / "ds", train=train)
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(root, "train")
    assert caught.value.path == str(root / "annotations" / "train.json")


def test_bad_json_missing_image_and_wrong_size_are_named(tmp_path):
    root = write_coco(tmp_path / "ds")
    (root / "annotations" / "train.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="train.json: is not valid JSON"):
        load_dataset(root, "train")
    root = write_coco(tmp_path / "ds2")
    (root / "images" / "train" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed are missing from .*: b.png"):
        load_dataset(root, "train")
    root = write_coco(tmp_path / "ds3")
    write_image(root / "images" / "train" / "b.png", 11, 20)
    with pytest.raises(DatasetError, match=r"b.png: is 11x20 \(HxW\) but .*train.json says 10x20") as caught:
        load_dataset(root, "train")
    assert caught.value.path == str(root / "images" / "train" / "b.png")
    assert len(load_dataset(root, "train", check=False)) == 2  # headers are read only by the check


def write_yolo(root, names=("car", "marker"), label_lines=None, data_yaml=True):
    """Ultralytics layout: images/<split>/*.jpg, labels/<split>/*.txt, data.yaml."""
    write_image(root / "images" / "train" / "p.jpg", 20, 40)
    write_image(root / "images" / "train" / "q.png", 10, 10)
    write_image(root / "images" / "val" / "r.png", 10, 10)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "p.txt").write_text(
        label_lines if label_lines is not None else "0 0.25 0.5 0.5 0.5\n\n1 0.5 0.5 0.1 0.2 0.2 0.1 0.3 0.3\n"
    )
    if data_yaml:
        (root / "data.yaml").write_text(
            yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names})
        )
    return root


def test_yolo_normalised_centres_become_pixel_boxes(tmp_path):
    root = write_yolo(tmp_path / "y")
    assert dataset_task(root) == "detection" and dataset_task(root / "data.yaml") == "detection"
    data = load_dataset(root, "train")
    assert data.format == "yolo" and data.classes == ["car", "marker"] and data.category_ids == [0, 1]
    p, q = data[0], data[1]
    assert (p.name, p.width, p.height, p.image_id, p.iscrowd) == ("p", 40, 20, 1, None)
    # cx 0.25 * 40 = 10, w 0.5 * 40 = 20 -> x 0..20; cy 0.5 * 20 = 10, h 10 -> y 5..15; the polygon's box
    np.testing.assert_allclose(p.boxes, [[0, 5, 20, 15], [4, 2, 20, 10]], atol=1e-5)
    np.testing.assert_array_equal(p.labels, [0, 1])
    assert q.boxes.shape == (0, 4) and q.labels.shape == (0,)  # no label file: no objects
    assert len(load_dataset(root / "data.yaml", "val")) == 1
    gt = data.coco_ground_truth()
    assert [a["category_id"] for a in gt["annotations"]] == [0, 1]


def test_yolo_names_as_a_mapping_and_a_list_file(tmp_path):
    root = write_yolo(tmp_path / "y", names={0: "car", 5: "marker"}, label_lines="5 0.5 0.5 0.5 0.5\n")
    (root / "train.txt").write_text("./images/train/p.jpg\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": {0: "car", 5: "marker"}}))
    data = load_dataset(root, "train")
    assert len(data) == 1 and data.category_ids == [0, 5] and data[0].labels.tolist() == [1]
    with pytest.raises(SplitNotFound, match="no split 'val'"):
        load_dataset(root, "val")


def test_yolo_names_yes_and_no_stay_names(tmp_path):
    root = write_yolo(tmp_path / "y", data_yaml=False)
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames:\n  0: yes\n  1: no\n")
    assert load_dataset(root, "train").classes == ["yes", "no"]


def test_yolo_in_a_gigaseg_dataset_yaml(tmp_path):
    root = write_yolo(tmp_path / "y", data_yaml=False)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"task": "detection", "format": "yolo", "classes": ["a", "b"]}))
    data = load_dataset(root, "train")
    assert data.classes == ["a", "b"] and len(data) == 2 and len(data[0].boxes) == 2


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("0 0.5 0.5 0.2\n", "line 1 has 4 fields"),
        ("0 0.5 0.5 0.2 0.2 0.9\n", "line 1 has 6 fields"),
        ("0 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n", "line 2: class 2 is not one of the dataset's 2 classes"),
        ("0 0.5 0.5 0.2 x\n", "line 1: '0 0.5 0.5 0.2 x' is not a class id followed by numbers"),
        ("0 0.5 0.5 -0.2 0.2\n", "line 1: negative box size"),
        ("0 0.9 0.5 0.4 0.2\n", r"line 1: box .* reaches outside its 40x20 \(WxH\) image"),
    ],
)
def test_bad_yolo_lines_name_the_label_file(tmp_path, lines, message):
    root = write_yolo(tmp_path / "y", label_lines=lines)
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(root, "train")
    assert caught.value.path == str(root / "labels" / "train" / "p.txt")


def test_yolo_label_path_replaces_the_last_images_folder(tmp_path):
    assert (
        yolo_label_path(tmp_path / "images" / "x" / "images" / "a.jpg")
        == tmp_path / "images" / "x" / "labels" / "a.txt"
    )


def test_a_missing_yolo_image_and_bad_names_are_named(tmp_path):
    root = write_yolo(tmp_path / "y")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "nowhere", "names": ["a"]}))
    with pytest.raises(DatasetError, match="nowhere is neither an images folder nor a list file"):
        load_dataset(root, "train")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": "a"}))
    with pytest.raises(DatasetError, match="'names' must be a list"):
        load_dataset(root, "train")
    (root / "train.txt").write_text("images/train/gone.jpg\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": ["a", "b"]}))
    with pytest.raises(DatasetError, match=r"train.txt: line 1: image 'images/train/gone.jpg' does not exist"):
        load_dataset(root, "train")


def test_coco_as_downloaded_needs_no_dataset_yaml(tmp_path):
    root = tmp_path / "coco"
    val = coco_json([(7, "000007.jpg", 24, 16)], [(7, 3, (1, 2, 3, 4), 0)])
    write_image(root / "val2017" / "000007.jpg", 16, 24)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    assert dataset_task(root) == "detection"
    data = load_dataset(root, "val")
    assert data.format == "coco" and data.category_ids == [3, 7] and data.annotations.name == "instances_val2017.json"
    np.testing.assert_array_equal(data[0].boxes, [[1, 2, 4, 6]])
    with pytest.raises(SplitNotFound, match=r"split 'train' matches none of the instances files \(val2017\)"):
        load_dataset(root, "train")
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(val))
    with pytest.raises(SplitNotFound, match="matches several"):
        load_dataset(root, "val")
    assert len(load_dataset(root, "val2017")) == 1
    with pytest.raises(DatasetError, match=r"instances_val2014.json has no images folder: neither val2014/"):
        load_dataset(root, "val2014")
