"""Detector outputs: COCO results json, GeoJSON (pixel and map coordinates), overlays; predict and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import gigaseg
from gigaseg.cli import main
from gigaseg.data.loader import load_dataset
from gigaseg.geometry import Detections
from gigaseg.inference.contract import DetectionPredictor
from gigaseg.io.detections import (
    coco_results,
    detections_geojson,
    draw_detections,
    write_detections_geojson,
)
from gigaseg.io.sources import open_image

FOUND = Detections(
    np.array([[1, 2, 4, 8], [10, 0, 12.5, 3]], np.float32), np.array([0.9, 0.25], np.float32), np.array([1, 0])
)


def test_coco_results_are_xywh_with_the_models_category_ids():
    assert coco_results(FOUND, 7, [5, 9]) == [
        {"image_id": 7, "category_id": 9, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.9},
        {"image_id": 7, "category_id": 5, "bbox": [10.0, 0.0, 2.5, 3.0], "score": 0.25},
    ]


def signed_area(ring):
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def test_geojson_in_pixel_coordinates_says_so():
    collection = detections_geojson(FOUND, ["car", "digit"], category_ids=[5, 9], palette=[[255, 0, 0], [0, 0, 255]])
    assert "pixel coordinates" in collection["coordinates"] and "crs" not in collection
    first = collection["features"][0]
    ring = first["geometry"]["coordinates"][0]
    assert sorted(map(tuple, ring[:4])) == [(1, 2), (1, 8), (4, 2), (4, 8)] and ring[0] == ring[-1]
    assert signed_area(ring) == pytest.approx(18)  # counter-clockwise, 3 x 6
    assert first["properties"] == {
        "class_id": 1,
        "class_name": "digit",
        "category_id": 9,
        "score": 0.9,
        "color": "#0000ff",
        "pixel_box": [1.0, 2.0, 4.0, 8.0],
        "coordinates": "pixel",
    }


def test_geojson_of_a_geotiff_is_in_its_map_coordinates(tmp_path):
    import rasterio
    from rasterio.transform import Affine

    path = tmp_path / "scene.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=16,
        height=12,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=Affine(2, 0, 500000, 0, -2, 4000000),
    ) as dst:
        dst.write(np.zeros((3, 12, 16), np.uint8))
    with open_image(path) as source:
        written = write_detections_geojson(tmp_path / "out.geojson", FOUND, ["car", "digit"], source=source)
    collection = json.loads(written.read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    feature = collection["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    # x = 500000 + 2 * col, y = 4000000 - 2 * row: the box (1, 2, 4, 8) spans x 500002..500008, y 3999984..3999996
    assert sorted(map(tuple, ring[:4])) == [(500002, 3999984), (500002, 3999996), (500008, 3999984), (500008, 3999996)]
    assert signed_area(ring) > 0 and feature["properties"]["coordinates"] == "map"
    assert not list(tmp_path.glob(".*partial"))


def test_boxes_are_drawn_on_their_own_pixels_in_their_class_colours():
    picture = draw_detections(np.zeros((10, 14, 3), np.uint8), FOUND, [[255, 0, 0], [0, 0, 255]], width=1)
    blue, red = (0, 0, 255), (255, 0, 0)
    assert tuple(picture[2, 1]) == blue and tuple(picture[7, 3]) == blue  # corners of pixels 1..3 x 2..7
    assert picture[3:7, 2:3].max() == 0  # inside untouched
    assert tuple(picture[8, 3]) == (0, 0, 0)  # the row below the box untouched
    assert tuple(picture[0, 10]) == red and tuple(picture[2, 12]) == red  # 12.5 covers pixel 12
    half = draw_detections(np.zeros((5, 7, 3), np.uint8), FOUND, [[255, 0, 0], [0, 0, 255]], scale=0.5, width=1)
    assert tuple(half[1, 0]) == blue and tuple(half[3, 1]) == blue


# ------------------------------------------------------------------ predict and evaluate end to end


def test_predict_writes_the_detectors_boxes_as_json_geojson_and_overlay(tmp_path, objects, fcos_checkpoint, capsys):
    image = objects / "images" / "train" / "objects_000.tif"
    code = main(["predict", str(image), "--checkpoint", str(fcos_checkpoint), "--out", str(tmp_path), "--overlay"])
    out = capsys.readouterr().out
    assert code == 0 and "detections in" in out
    results = json.loads((tmp_path / "objects_000.json").read_text())
    expected = gigaseg.predict(fcos_checkpoint, image, None, progress=False).detections
    assert 0 < len(results) == len(expected) <= 20
    assert results == coco_results(expected, 1, [11, 12, 13, 14])
    collection = json.loads((tmp_path / "objects_000.geojson").read_text())
    assert len(collection["features"]) == len(results)
    assert [f["properties"]["category_id"] for f in collection["features"]] == [r["category_id"] for r in results]
    assert all(f["properties"]["coordinates"] == "pixel" for f in collection["features"])
    with Image.open(tmp_path / "objects_000_overlay.png") as overlay:
        assert overlay.size == (2048, 1707)  # the overview, enlarged to 2048 as segmentation overlays are
    # the API: a .json path names the outputs
    result = gigaseg.predict(fcos_checkpoint, image, tmp_path / "api" / "boxes.json", progress=False)
    assert result.json_path == tmp_path / "api" / "boxes.json" and result.geojson_path.name == "boxes.geojson"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--probabilities"], "is a detection method: it writes boxes"),
        (["--format", "ome-zarr"], "format ome-zarr do not apply"),
        (["--cluster", "local:2"], "--cluster and --scheduler are for segmentation"),
    ],
)
def test_segmentation_options_with_a_detector_end_in_one_line(
    tmp_path, objects, fcos_checkpoint, capsys, extra, message
):
    image = objects / "images" / "train" / "objects_000.tif"
    assert main(["predict", str(image), "--checkpoint", str(fcos_checkpoint), "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())


class Oracle(DetectionPredictor):
    """Answers every image of a dataset with its ground truth (score 1), by file."""

    def __init__(self, dataset):
        self.truth = {str(s.path): (s.boxes, s.labels) for s in dataset}

    def predict(self, source):
        boxes, labels = self.truth[str(source.path)]
        return Detections(boxes, np.ones(len(boxes), np.float32), labels)


def test_evaluate_scores_the_ground_truth_as_predictions_ap_one(
    tmp_path, objects, fcos_checkpoint, monkeypatch, capsys
):
    """COCO round trip: synth -> load -> evaluate with the ground truth as the detections = AP 1.0."""
    import gigaseg.methods.registry as registry

    val = load_dataset(objects, "val")
    monkeypatch.setattr(registry, "build_predictor", lambda *a, **k: Oracle(val))
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(fcos_checkpoint),
                "--data",
                str(objects),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "AP 1.0000 (COCO AP@[.50:.95]), AP75 1.0000 (AP at IoU .75, the paper's metric), AP50 1.0000" in printed
    summary = json.loads((tmp_path / "s.json").read_text())
    assert val.object_count() >= 5
    assert summary["task"] == "detection" and summary["objects"] == val.object_count() == summary["detections"]
    assert summary["AP_small"] == pytest.approx(1.0)
    assert all(row["AP"] in (1.0, None) for row in summary["per_class"].values())
    assert sum(row["objects"] for row in summary["per_class"].values()) == val.object_count()


def test_evaluate_refuses_a_detector_on_a_segmentation_dataset(tmp_path, fcos_checkpoint, capsys):
    main(["synth", "landcover", str(tmp_path / "seg"), "--count", "2", "--size", "64"])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(fcos_checkpoint), "--data", str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a segmentation dataset but fcos is a detection method" in err[0], err
