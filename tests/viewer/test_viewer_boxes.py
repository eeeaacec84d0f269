"""Detection boxes in ``gigaseg view``: the files read, the tiles drawn, the server and the command line."""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigaseg.cli import main
from gigaseg.geometry import Detections
from gigaseg.io.detections import coco_results, write_detections_geojson
from gigaseg.io.sources import open_image
from gigaseg.viewer import ViewerServer
from gigaseg.viewer.boxes import BoxFileError, BoxLayer, BoxSet, read_boxes

H, W = 600, 1000
FOUND = Detections(
    np.array([[10, 20, 50, 60], [300.5, 100, 420, 180], [900, 550, 1000, 600]], np.float32),
    np.array([0.9, 0.4, 0.75], np.float32),
    np.array([0, 1, 0], np.int64),
)
CLASSES = ["car", "ship"]
PALETTE = [(255, 0, 0), (0, 0, 255)]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, np.full((H, W, 3), 40, np.uint8), tile=(128, 128), photometric="rgb")
    return path


def geotiff(path, transform):
    import rasterio

    with rasterio.open(
        path, "w", driver="GTiff", width=W, height=H, count=3, dtype="uint8", crs="EPSG:32633", transform=transform
    ) as dst:
        dst.write(np.zeros((3, H, W), np.uint8))
    return path


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.mode == "RGBA"
        return np.asarray(picture)


# --------------------------------------------------------------------------- the files


def test_predicts_geojson_is_read_back_with_its_classes_scores_and_colours(tmp_path, image):
    path = write_detections_geojson(tmp_path / "scene.geojson", FOUND, CLASSES, palette=PALETTE)
    with open_image(image) as source:
        found = read_boxes(path, source)
    np.testing.assert_allclose(found.boxes, FOUND.boxes)
    np.testing.assert_allclose(found.scores, FOUND.scores, atol=1e-5)
    assert found.classes == ["car", "ship"] and found.colors == ["#ff0000", "#0000ff"]
    assert found.labels.tolist() == [0, 1, 0]


def test_a_foreign_geojson_in_map_coordinates_lands_on_the_georeferenced_pixels(tmp_path):
    from rasterio.transform import Affine

    scene = geotiff(tmp_path / "geo.tif", Affine(0.5, 0, 500000, 0, -0.5, 4200000))
    with open_image(scene) as source:
        collection = json.loads(
            write_detections_geojson(tmp_path / "ours.geojson", FOUND, CLASSES, source=source).read_text()
        )
    for feature in collection["features"]:  # as another tool writes it: geometry and a class name only
        feature["properties"] = {"name": feature["properties"]["class_name"]}
    foreign = tmp_path / "foreign.geojson"
    foreign.write_text(json.dumps(collection))
    with open_image(scene) as source:
        found = read_boxes(foreign, source)
    np.testing.assert_allclose(found.boxes, FOUND.boxes, atol=1e-6)
    assert found.scores.tolist() == [1.0, 1.0, 1.0] and found.classes == ["car", "ship"]
    # the same collection over an image without georeferencing: the coordinates are taken as pixels
    with open_image(tmp_path / "geo.tif") as source, open_image(np.zeros((H, W, 3), np.uint8)) as plain:
        assert read_boxes(foreign, plain).boxes[0, 0] == pytest.approx(500005.0)
        assert source.geo_tags


def test_coco_results_and_a_coco_dataset(tmp_path, image):
    results = tmp_path / "scene.json"
    results.write_text(json.dumps(coco_results(FOUND, 7, [11, 12])))
    with open_image(image) as source:
        found = read_boxes(results, source)
        np.testing.assert_allclose(found.boxes, FOUND.boxes, atol=1e-4)
        assert found.classes == ["category 11", "category 12"] and found.labels.tolist() == [0, 1, 0]
        dataset = {
            "images": [{"id": 1, "file_name": "other.tif"}, {"id": 2, "file_name": "train/scene.tif"}],
            "categories": [{"id": 5, "name": "plane"}, {"id": 6, "name": "boat"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5]},
                {"id": 2, "image_id": 2, "category_id": 6, "bbox": [10, 20, 40, 40]},
                {"id": 3, "image_id": 2, "category_id": 5, "bbox": [100, 100, 1, 2]},
            ],
        }
        truth = tmp_path / "instances.json"
        truth.write_text(json.dumps(dataset))
        found = read_boxes(truth, source)
        assert found.boxes.tolist() == [[10, 20, 50, 60], [100, 100, 101, 102]]
        assert (
            found.classes == ["plane", "boat"] and found.labels.tolist() == [1, 0] and found.scores.tolist() == [1, 1]
        )
        dataset["images"][1]["file_name"] = "elsewhere.tif"
        truth.write_text(json.dumps(dataset))
        with pytest.raises(BoxFileError, match="has 2 images and none named 'scene.tif'"):
            read_boxes(truth, source)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "is not json"),
        (json.dumps({"type": "Feature"}), "is neither a GeoJSON FeatureCollection, COCO results"),
        (
            json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1]}, {"image_id": 2, "bbox": [0, 0, 1, 1]}]),
            "boxes of 2 images",
        ),
        (json.dumps([{"image_id": 1, "bbox": [0, 0, 1]}]), "result 0: a COCO bbox is four numbers"),
        (json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}]), "result 0: the score 'high'"),
        (json.dumps({"type": "FeatureCollection", "features": [{"geometry": None}]}), "feature 0 has no readable"),
        (
            json.dumps([{"image_id": 1, "category_id": i, "bbox": [0, 0, 1, 1]} for i in range(4097)]),
            "names 4097 classes; the viewer shows at most 4096",
        ),
        (
            json.dumps({"type": "FeatureCollection", "features": [{"properties": {"pixel_box": [0, 0, 1, "nan"]}}]}),
            "feature 0: the box",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_file(tmp_path, image, content, message):
    path = tmp_path / "boxes.json"
    if content is not None:
        path.write_text(content)
    with open_image(image) as source, pytest.raises(BoxFileError) as error:
        read_boxes(path, source)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


# --------------------------------------------------------------------------- the tiles


def layer(min_score=0.0, tile_size=256):
    boxes = BoxSet(
        FOUND.boxes.astype(np.float64), FOUND.scores.astype(np.float64), FOUND.labels, CLASSES, ["#ff0000", "#0000ff"]
    )
    return BoxLayer(boxes, height=H, width=W, tile_size=tile_size, min_score=min_score, name="scene.geojson")


def test_full_resolution_tiles_outline_each_box_on_its_own_pixels():
    boxes = layer()
    level = boxes.geometry.max_level  # 10: 1024 >= 1000
    tile = decode(boxes.tile(level, 0, 0))  # pixels 0..255
    assert tile.shape == (256, 256, 4)
    red = (255, 0, 0, 255)
    # the box (10, 20)-(50, 60) covers pixels x 10..49, y 20..59; the outline is 2 px wide
    assert tuple(tile[20, 10]) == red and tuple(tile[59, 49]) == red and tuple(tile[21, 30]) == red
    assert tuple(tile[58, 30]) == red and tuple(tile[40, 48]) == red
    assert tile[22, 30, 3] == 0 and tile[40, 30, 3] == 0  # inside: transparent
    assert tile[19, 30, 3] == 0 and tile[60, 30, 3] == 0 and tile[40, 9, 3] == 0 and tile[40, 50, 3] == 0
    assert int((tile[..., 3] > 0).sum()) == 2 * 2 * 40 + 2 * 2 * 36  # the whole outline, nothing else
    # the ship box (300.5, 100)-(420, 180) spans tiles 1 (x 256..511): its left edge covers pixel 300
    other = decode(boxes.tile(level, 1, 0))
    assert tuple(other[100, 300 - 256]) == (0, 0, 255, 255) and other[100, 299 - 256, 3] == 0
    # a tile no box touches is wholly transparent
    assert decode(boxes.tile(level, 2, 1))[..., 3].max() == 0


def test_far_out_tiles_draw_small_boxes_as_dots_and_min_score_hides_boxes():
    boxes = layer()
    level = boxes.geometry.max_level - 4  # 1/16: the car box (10..50, 20..60) is 2.5 px there
    tile = decode(boxes.tile(level, 0, 0))
    assert tile.shape == (38, 63, 4)  # ceil(600/16), ceil(1000/16)
    assert tuple(tile[1, 0]) == (255, 0, 0, 255) and tuple(tile[2, 2]) == (255, 0, 0, 255)  # filled
    assert tile[5, 5, 3] == 0
    assert tuple(tile[7, 20]) == (0, 0, 255, 255)  # the ship box's corner (300.5 / 16, 100 / 16)
    high = layer(min_score=0.5)
    assert len(high) == 2 and high.class_counts() == [2, 0]
    assert decode(high.tile(level, 0, 0))[7, 20, 3] == 0


def test_higher_scores_are_drawn_on_top_and_listed_first():
    boxes = BoxSet(
        np.array([[0, 0, 20, 20], [0, 0, 20, 20]], np.float64),
        np.array([0.9, 0.3]),
        np.array([0, 1]),
        CLASSES,
        ["#ff0000", "#0000ff"],
    )
    shown = BoxLayer(boxes, height=32, width=32, tile_size=32)
    assert tuple(decode(shown.tile(shown.geometry.max_level, 0, 0))[0, 0]) == (255, 0, 0, 255)
    at = shown.boxes_at(5, 5)
    assert [b["name"] for b in at] == ["car", "ship"] and at[0]["score"] == 0.9 and at[0]["box"] == [0, 0, 20, 20]
    assert shown.boxes_at(20, 5) == []  # x 20 is outside (edges 0..20 cover pixels 0..19)


# --------------------------------------------------------------------------- the server and the command line


def test_the_server_serves_box_tiles_and_the_boxes_under_a_pixel(tmp_path, image):
    path = write_detections_geojson(tmp_path / "scene.geojson", FOUND, CLASSES, palette=PALETTE)
    with ViewerServer(image, [], detections=[path], min_score=0.5, tile_size=256) as server:
        server.start()
        with urllib.request.urlopen(server.url + "api/info", timeout=30) as response:
            info = json.load(response)
        (entry,) = info["detections"]
        assert entry["name"] == "scene.geojson" and entry["count"] == 2 and entry["id"] == "d0"
        assert [(c["name"], c["color"], c["count"]) for c in entry["classes"]] == [
            ("car", "#ff0000", 2),
            ("ship", "#0000ff", 0),
        ]
        with urllib.request.urlopen(server.url.rstrip("/") + entry["dzi"], timeout=30) as response:
            assert b'TileSize="256"' in response.read()
        tile_url = server.url.rstrip("/") + entry["dzi"].replace(".dzi", "_files/10/0_0.png")
        with urllib.request.urlopen(tile_url, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/png"
            assert tuple(decode(response.read())[20, 10]) == (255, 0, 0, 255)
        with urllib.request.urlopen(server.url + "api/pixel?x=12&y=30", timeout=30) as response:
            answer = json.load(response)
        assert [(b["name"], b["score"]) for b in answer["boxes"]["d0"]] == [("car", 0.9)]
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(tile_url.replace("/d0_files/", "/d1_files/"), timeout=30)


def test_gigaseg_view_refuses_a_bad_detections_file_in_one_line(capsys, tmp_path, image):
    bad = tmp_path / "boxes.json"
    bad.write_text("[1, 2]")
    assert main(["view", str(image), "--detections", str(bad), "--no-browser"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"gigaseg view: error: {bad}: is neither")
    assert main(["view", str(image), "--detections", str(bad), "--min-score", "2", "--no-browser"]) == 2
    assert "the minimum score lies in 0..1" in capsys.readouterr().err


def test_predict_view_of_a_detector_shows_its_boxes(capsys, tmp_path, served_info, objects, fcos_checkpoint):
    seen = served_info
    checkpoint = fcos_checkpoint
    image = objects / "images" / "train" / "objects_000.tif"
    argv = ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pred"), "--view"]
    assert main(argv) == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "pred" / "objects_000.geojson").read_text())
    (info,) = seen
    assert info["masks"] == [] and info["detections"][0]["name"] == "objects_000.geojson"
    assert info["detections"][0]["count"] == len(written["features"]) > 0
    out = capsys.readouterr().out
    assert "boxes of objects_000.geojson: http://127.0.0.1:" in out and out.rstrip().endswith("gigaseg view: stopped")


def test_far_out_boxes_on_the_same_pixels_are_drawn_once_in_the_best_ones_colour():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 8, (5000, 2))  # 5000 small boxes near the origin: one dot at 1/64
    boxes = np.concatenate([corners, corners + 4], axis=1)
    scores = rng.uniform(0, 0.5, 5000)
    scores[1234] = 0.99  # the best one is a car, every other one a ship
    labels = np.ones(5000, np.int64)
    labels[1234] = 0
    shown = BoxLayer(BoxSet(boxes, scores, labels, CLASSES, ["#ff0000", "#0000ff"]), height=H, width=W, tile_size=256)
    tile = decode(shown.tile(shown.geometry.max_level - 6, 0, 0))
    assert tuple(tile[0, 0]) == (255, 0, 0, 255) and tuple(tile[1, 1]) == (255, 0, 0, 255)
    assert int((tile[..., 3] > 0).sum()) == 4
    full = decode(shown.tile(shown.geometry.max_level, 0, 0))  # at full resolution the ships show around the car
    assert {tuple(c) for c in full[:14, :14].reshape(-1, 4) if c[3]} == {(255, 0, 0, 255), (0, 0, 255, 255)}
