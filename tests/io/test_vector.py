"""Polygons of masks, streamed band by band (gigaseg.io.vector, ``gigaseg vectorize``, ``predict --vector``).

Every output is read back with pyogrio; areas and counts are checked against the mask's pixels and
against connected components counted independently (scipy.ndimage.label on the whole mask).
"""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import tifffile
from pyogrio.raw import read
from scipy import ndimage

from gigaseg.cli import main
from gigaseg.errors import ConfigError, ImageReadError
from gigaseg.io import vector
from gigaseg.io.vector import vectorize_mask
from gigaseg.io.writers import MaskWriter

GEO_TAGS = [
    (33550, 12, 3, (0.5, 0.5, 0.0)),  # 0.5 m pixels
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4200000.0, 0.0)),  # top-left corner at (500000, 4200000)
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)),  # EPSG:32633
    (34737, 2, 0, "WGS 84 / UTM zone 33N|"),
]
CLASSES = ["background", "building", "water", "road", "speck"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 0, 200], [90, 90, 90], [255, 255, 0]]


def write_mask(path, labels, tile=16, **kw):
    height, width = labels.shape
    with MaskWriter(path, height, width, tile=tile, palette=PALETTE, class_names=CLASSES, **kw) as writer:
        for top in writer.band_tops:
            writer.write_band(top, labels[top : top + tile])
    return path


def polygons(path):
    """(class ids, class names, pixels, areas, shapely polygons, info) of a vector file."""
    _, _, geometry, fields = read(str(path))
    info = pyogrio.read_info(str(path))
    return fields[0], fields[1], fields[2], fields[3], shapely.from_wkb(geometry), info


def components(labels, class_id):
    """4-connected regions of one class in the whole mask, counted independently."""
    return ndimage.label(labels == class_id)[1]


def ring_mask():
    """A square ring of class 1 (rows 10-49, cols 8-55, 10 px thick) around a class-2 core, in 0."""
    labels = np.zeros((64, 64), np.uint8)
    labels[10:50, 8:56] = 1
    labels[20:40, 18:46] = 2
    return labels


def test_a_ring_across_band_borders_is_one_polygon_with_its_hole(tmp_path):
    labels = ring_mask()  # the ring's rows 10..49 cross the borders at rows 16, 32 and 48 (bands of 16)
    mask = write_mask(tmp_path / "ring.tif", labels)
    result = vectorize_mask(mask, band_rows=16)

    ids, names, pixels, areas, geoms, info = polygons(result.path)
    assert result.bands == 4 and info["features"] == 3 and info["crs"] is None
    ring = geoms[ids == 1]
    assert len(ring) == 1 and ring[0].geom_type == "Polygon"
    assert ring[0].area == 40 * 48 - 20 * 28 == 1360 and pixels[ids == 1][0] == 1360
    assert ring[0].bounds == (8.0, 10.0, 56.0, 50.0)  # pixel coordinates: x = column, y = row
    assert len(ring[0].interiors) == 1 and shapely.Polygon(ring[0].interiors[0]).area == 560
    assert shapely.Polygon(ring[0].interiors[0]).bounds == (18.0, 20.0, 46.0, 40.0)
    core = geoms[ids == 2][0]
    assert core.area == 560 and len(core.interiors) == 0
    background = geoms[ids == 0][0]
    assert background.area == 64 * 64 - 1920 and len(background.interiors) == 1
    assert list(names[ids == 1]) == ["building"]
    assert len(ring[0].exterior.coords) == 5  # the merge left no vertices on the band borders


def test_two_classes_touching_share_their_border_exactly(tmp_path):
    labels = np.zeros((40, 30), np.uint8)
    labels[5:35, 4:15] = 1  # 30 x 11 = 330 px
    labels[5:35, 15:26] = 3  # 30 x 11 = 330 px, touching class 1 along x = 15
    mask = write_mask(tmp_path / "touch.tif", labels)
    ids, _, _, _, geoms, _ = polygons(vectorize_mask(mask, band_rows=8).path)

    left, right = geoms[ids == 1], geoms[ids == 3]
    assert len(left) == len(right) == 1
    assert left[0].area == right[0].area == 330
    shared = left[0].intersection(right[0])
    assert shared.length == 30 and shared.area == 0  # one 30-px edge, no overlap
    assert shapely.union_all(geoms).area == 40 * 30  # the polygons tile the mask


def speck_mask():
    labels = np.zeros((48, 48), np.uint8)
    labels[20, 30:32] = 4
    labels[21, 31] = 4  # an L of 3 px
    labels[5:15, 5:15] = 1  # a 100-px square
    return labels


def test_min_area_drops_a_3px_speck_and_fills_its_hole(tmp_path):
    mask = write_mask(tmp_path / "speck.tif", speck_mask())
    ids, _, pixels, _, geoms, _ = polygons(vectorize_mask(mask, tmp_path / "all.gpkg", band_rows=16).path)
    assert sorted(pixels.tolist()) == [3, 100, 48 * 48 - 103]
    assert len(geoms[ids == 0][0].interiors) == 2

    result = vectorize_mask(mask, tmp_path / "sieved.gpkg", band_rows=16, min_area=4)
    ids, _, pixels, _, geoms, _ = polygons(result.path)
    assert result.dropped == 1 and 4 not in ids
    assert sorted(pixels.tolist()) == [100, 48 * 48 - 100]
    assert len(geoms[ids == 0][0].interiors) == 1  # the speck's hole is filled, the square's kept


def test_simplify_smooths_staircase_outlines_and_keeps_the_area(tmp_path):
    rows, cols = np.mgrid[:128, :128]
    labels = (np.hypot(rows - 60.5, cols - 70.5) < 40).astype(np.uint8)  # a disk of ~5000 px
    mask = write_mask(tmp_path / "disk.tif", labels, tile=32)
    exact = polygons(vectorize_mask(mask, tmp_path / "exact.gpkg", band_rows=32).path)
    smooth = polygons(vectorize_mask(mask, tmp_path / "smooth.gpkg", band_rows=32, simplify=1.0).path)

    disk_exact, disk_smooth = exact[4][exact[0] == 1][0], smooth[4][smooth[0] == 1][0]
    assert disk_exact.area == labels.sum()
    assert len(disk_smooth.exterior.coords) < len(disk_exact.exterior.coords) / 3
    assert abs(disk_smooth.area - labels.sum()) < 0.01 * labels.sum()
    assert smooth[2][smooth[0] == 1][0] == labels.sum()  # ``pixels`` counts the mask's pixels, before simplifying
    assert disk_smooth.is_valid


def blocky_mask(seed=0):
    """512 x 512: 32-px blocks of 4 classes, 1-px diagonal roads (4-connectivity splits them) and specks."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, 3, (16, 16)), np.ones((32, 32), np.int64)).astype(np.uint8)
    for start in (40, 200, 330):
        for k in range(400):
            labels[min(511, start // 3 + k), (start + k) % 512] = 3
    labels[rng.integers(0, 512, 200), rng.integers(0, 512, 200)] = 4
    return labels


@pytest.mark.parametrize("fmt", ["gpkg", "geojson"])
def test_georeferenced_mask_area_per_class_count_and_crs(tmp_path, fmt):
    labels = blocky_mask()
    mask = write_mask(tmp_path / "scene.tif", labels, tile=64, geo_tags=GEO_TAGS)
    result = vectorize_mask(mask, format=fmt, band_rows=48)  # 11 bands, borders that cut the blocks

    assert result.path == tmp_path / f"scene.{fmt}"
    ids, _, pixels, areas, geoms, info = polygons(result.path)
    with rasterio.open(mask) as src:
        assert info["crs"] == src.crs.to_string() == "EPSG:32633" == result.crs
    for class_id in range(5):
        count = int((labels == class_id).sum())
        mine = ids == class_id
        area_m2 = sum(g.area for g in geoms[mine])
        assert abs(area_m2 - count * 0.25) <= 0.01 * count * 0.25  # 0.5 m pixels
        assert pixels[mine].sum() == count
        np.testing.assert_allclose(areas[mine], pixels[mine] * 0.25)
        assert mine.sum() == components(labels, class_id)  # no region split at a band border, none merged
    xmin, ymin, xmax, ymax = shapely.union_all(geoms).bounds
    assert (xmin, ymax, xmax, ymin) == (500000.0, 4200000.0, 500000.0 + 256, 4200000.0 - 256)


def test_band_height_does_not_change_the_polygons(tmp_path, monkeypatch):
    labels = blocky_mask(seed=1)
    mask = write_mask(tmp_path / "scene.tif", labels, tile=64)
    whole = polygons(vectorize_mask(mask, tmp_path / "whole.gpkg", band_rows=512).path)  # one band: no merging

    def overlay(*args, **kwargs):
        raise AssertionError("pieces were merged by a general union, not by the coverage union")

    monkeypatch.setattr(shapely, "union_all", overlay)  # the lean merge handles every region
    banded = polygons(vectorize_mask(mask, tmp_path / "banded.gpkg", band_rows=7).path)  # 74 bands

    def shapes(found):
        ids, geoms = found[0], found[4]
        return sorted((int(i), shapely.normalize(g).wkt) for i, g in zip(ids, geoms, strict=True))

    assert len(whole[4]) > 100
    assert shapes(banded) == shapes(whole)


def test_skip_classes_by_name_or_id(tmp_path):
    labels = ring_mask()
    mask = write_mask(tmp_path / "ring.tif", labels)
    result = vectorize_mask(mask, band_rows=16, skip_classes=["background", 2])
    ids, _, _, _, geoms, _ = polygons(result.path)
    assert ids.tolist() == [1] and result.per_class == {"building": {"polygons": 1, "pixels": 1360}}
    with pytest.raises(ConfigError, match="no class 'forest'.*background, building"):
        vectorize_mask(mask, tmp_path / "x.gpkg", skip_classes=["forest"])
    assert not (tmp_path / "x.gpkg").exists()


def test_a_mask_without_names_gets_class_ids(tmp_path):
    mask = tmp_path / "plain.tif"
    tifffile.imwrite(mask, ring_mask(), tile=(16, 16))  # another program's mask: no names, no colour map
    ids, names, *_ = polygons(vectorize_mask(mask, band_rows=16).path)
    assert sorted(set(zip(ids.tolist(), names.tolist()))) == [(0, "class_0"), (1, "class_1"), (2, "class_2")]


# --------------------------------------------------------------------------- bad input, atomic output


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_one_line_error(code, err, *fragments):
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_vectorize_writes_and_reports(capsys, tmp_path):
    mask = write_mask(tmp_path / "ring.tif", ring_mask())
    code, out, _ = run_cli(capsys, "vectorize", mask, "--format", "geojson", "--band-rows", "16", "--min-area", "4")
    assert code == 0 and "3 polygons" in out and "building: 1 polygon, 1360 pixels" in out, out
    assert pyogrio.read_info(str(tmp_path / "ring.geojson"))["features"] == 3


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated", "rgb", "folder"])
def test_bad_mask_is_one_line_exit_2_and_no_output(capsys, tmp_path, problem):
    mask = tmp_path / "mask.tif"
    if problem == "corrupt":
        mask.write_bytes(b"II*\x00" + b"\x00" * 50)
    elif problem == "truncated":
        write_mask(mask, blocky_mask(), tile=64)
        mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 3])
    elif problem == "rgb":
        tifffile.imwrite(mask, np.zeros((32, 32, 3), np.uint8))
    elif problem == "folder":
        mask.mkdir()
    code, _, err = run_cli(capsys, "vectorize", mask, "--out", tmp_path / "out.gpkg")
    assert_one_line_error(code, err, str(mask))
    assert sorted(os.listdir(tmp_path)) == (["mask.tif"] if problem != "missing" else [])


def test_bad_options_and_outputs_are_refused_before_anything_is_written(tmp_path):
    mask = write_mask(tmp_path / "ring.tif", ring_mask())
    with pytest.raises(ConfigError, match="the mask itself"):
        vectorize_mask(mask, mask)
    with pytest.raises(ConfigError, match="extension says geojson"):
        vectorize_mask(mask, tmp_path / "x.geojson", format="gpkg")
    with pytest.raises(ConfigError, match="--simplify"):
        vectorize_mask(mask, simplify=-1)
    with pytest.raises(ConfigError, match="--min-area"):
        vectorize_mask(mask, min_area=float("nan"))
    assert sorted(os.listdir(tmp_path)) == ["ring.tif"]


def test_a_failure_midway_leaves_no_output_and_the_mask_untouched(tmp_path, monkeypatch):
    labels = blocky_mask()
    mask = write_mask(tmp_path / "scene.tif", labels, tile=64)
    before = hashlib.sha256(mask.read_bytes()).hexdigest()
    monkeypatch.setattr(vector, "BATCH", 10)  # batches reach the temporary file before the failure
    calls = []
    original = vector._Polygonizer.add_band

    def failing(self, classes, top, last):
        calls.append(top)
        if len(calls) == 4:
            raise OSError(28, "No space left on device", str(tmp_path / "scene.gpkg"))
        return original(self, classes, top, last)

    monkeypatch.setattr(vector._Polygonizer, "add_band", failing)
    with pytest.raises(OSError, match="No space"):
        vectorize_mask(mask, band_rows=64)
    assert sorted(os.listdir(tmp_path)) == ["scene.tif"]  # neither the output nor its temporary file
    assert hashlib.sha256(mask.read_bytes()).hexdigest() == before


def test_missing_mask_through_the_api_names_it(tmp_path):
    with pytest.raises(ImageReadError, match="nope.tif"):
        vectorize_mask(tmp_path / "nope.tif")


# --------------------------------------------------------------------------- predict --vector


def test_predict_vector_writes_polygons_matching_the_mask_in_the_inputs_crs(capsys, tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(3)
    scene = tmp_path / "scene.tif"
    image = np.kron(rng.integers(0, 255, (8, 9, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 512 x 576
    tifffile.imwrite(scene, image, tile=(128, 128), extratags=[(*tag, True) for tag in GEO_TAGS])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run_cli(
            capsys, "predict", scene, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "out", "--vector", "gpkg"
        )
    assert code == 0, err
    polygons_path = tmp_path / "out" / "scene.gpkg"
    assert f"polygons: {polygons_path}" in out
    with rasterio.open(tmp_path / "out" / "scene.tif") as src:
        labels = src.read(1)
        crs = src.crs.to_string()
    ids, names, pixels, _, geoms, info = polygons(polygons_path)
    assert info["crs"] == crs == "EPSG:32633"
    assert set(names.tolist()) <= {"a", "b", "c"} and len(set(ids.tolist())) >= 2
    for class_id in range(3):
        assert pixels[ids == class_id].sum() == (labels == class_id).sum()
        assert (ids == class_id).sum() == components(labels, class_id)


def test_predict_refuses_a_bad_vector_setting_before_predicting(tmp_path, tiny_checkpoint):
    import gigaseg

    scene = tmp_path / "scene.tif"
    tifffile.imwrite(scene, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ConfigError, match="--min-area"):
        gigaseg.predict(
            tiny_checkpoint, scene, out=tmp_path / "out", vector="gpkg", vector_options={"min_area": -3}, progress=False
        )
    with pytest.raises(ConfigError, match="unknown vector format 'shp'"):
        gigaseg.predict(tiny_checkpoint, scene, out=tmp_path / "out", vector="shp", progress=False)
    assert not (tmp_path / "out" / "scene.tif").exists()
