"""The synthetic land-cover generator: determinism, streaming, on-disk layout, self-checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage

from gigaseg.data.synth import checks
from gigaseg.data.synth.landcover import (
    CLASSES,
    CONTEXT_CLASSES,
    CUE_CLASSES,
    PALETTE,
    ROAD,
    STREAM,
    VEG_FAR,
    VEG_NEAR,
    WATER,
    LandcoverConfig,
    LandcoverScene,
    check_mask,
    check_scene,
    prepare_output_dir,
    split_names,
    write_landcover_dataset,
)
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window


@pytest.fixture(scope="module")
def scene() -> LandcoverScene:
    return LandcoverScene.generate(1200, 1400, seed=3)


# --------------------------------------------------------------------------- rendering


def test_render_is_deterministic_and_independent_of_the_window(scene):
    full = Window(0, 0, scene.height, scene.width)
    image, mask = scene.render_image(full), scene.render_mask(full)
    assert image.shape == (1200, 1400, 3) and image.dtype == np.uint8
    assert mask.shape == (1200, 1400) and mask.dtype == np.uint8
    again = LandcoverScene.generate(1200, 1400, seed=3)
    assert np.array_equal(again.render_image(full), image)
    assert np.array_equal(again.render_mask(full), mask)
    for window in (Window(0, 0, 37, 1400), Window(511, 300, 600, 333), Window(1100, 1390, 100, 10)):
        assert np.array_equal(scene.render_image(window), image[window.slices])
        assert np.array_equal(scene.render_mask(window), mask[window.slices])
    # the band cache the writer uses serves the same pixels
    render = scene.mask_renderer(rows=256)
    for top in range(0, 1200, 128):
        window = Window(top, 0, min(128, 1200 - top), 1400)
        assert np.array_equal(render(window), mask[window.slices])


def test_different_seeds_give_different_scenes(scene):
    other = LandcoverScene.generate(1200, 1400, seed=4)
    window = Window(0, 0, 256, 256)
    assert not np.array_equal(other.render_image(window), scene.render_image(window))


def test_near_water_is_the_euclidean_distance_to_water_over_the_whole_scene():
    # a short radius so the blocks' grown windows are clipped differently from the scene
    scene = LandcoverScene.build(900, 1300, seed=5, index=0, attempt=0, config=LandcoverConfig(context_radius=260))
    mask = scene.render_mask(Window(0, 0, 900, 1300))
    water = mask == WATER
    assert water.any()
    distance = ndimage.distance_transform_edt(~water)
    vegetation = (mask == VEG_NEAR) | (mask == VEG_FAR)
    assert np.array_equal(mask[vegetation] == VEG_NEAR, distance[vegetation] <= 260)
    assert (mask == VEG_FAR).any() and (mask == VEG_NEAR).any()


def test_every_class_occurs_and_only_known_ids(scene):
    mask = scene.render_mask(Window(0, 0, scene.height, scene.width))
    present = set(np.unique(mask).tolist())
    assert present <= set(range(len(CLASSES)))
    assert {WATER, VEG_NEAR, VEG_FAR, ROAD, STREAM} <= present


def test_fine_structures_are_a_few_pixels_wide(scene):
    mask = scene.render_mask(Window(0, 0, scene.height, scene.width))
    for cls in (ROAD, STREAM):
        member = mask == cls
        # opening with a 5x5 square removes lines up to 4 px wide: nothing wide survives
        # except where lines cross or touch
        assert ndimage.binary_opening(member, np.ones((5, 5), bool)).sum() < 0.02 * member.sum()


def test_context_classes_look_the_same():
    near, far = [], []
    for seed in range(4):
        scene = LandcoverScene.generate(1024, 1024, seed=seed)
        full = Window(0, 0, 1024, 1024)
        image = scene.render_image(full).astype(np.float64)
        mask = scene.render_mask(full)
        near.append(image[mask == VEG_NEAR])
        far.append(image[mask == VEG_FAR])
    near, far = np.concatenate(near), np.concatenate(far)
    assert len(near) > 1e5 and len(far) > 1e5
    # same colour distribution: means and spreads agree within a few grey levels,
    # small against the classes' own spread (~20-35 levels)
    assert np.abs(near.mean(0) - far.mean(0)).max() < 5, (near.mean(0), far.mean(0))
    assert np.abs(near.std(0) - far.std(0)).max() < 3, (near.std(0), far.std(0))
    # and different from the classes a colour threshold could pick out
    assert np.abs(near.mean(0) - np.array([38, 66, 92])).max() > 20  # water


# --------------------------------------------------------------------------- checks


def test_context_check_uses_glnets_patch_grid():
    rows, cols = checks.patch_grid(2448, 1600)
    assert rows == [0, 388, 776, 1164, 1552, 1940] and len(cols) == 4
    assert checks.patch_grid(507, 2448) is None  # undefined below one patch


def test_generator_does_not_import_torch():
    """Streaming a gigapixel scene in 1.5 GB leaves no room for torch's ~0.7 GB."""
    import subprocess
    import sys

    code = (
        "import sys, gigaseg.data.synth.landcover, gigaseg.data.synth.checks, gigaseg.commands.synth; "
        "print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_fine_check_counts_a_thin_line_and_keeps_a_wide_band():
    mask = np.zeros((64, 64), np.uint8)
    mask[10:12, :] = 1  # 2 rows, rows 10 and 11 -> sampled row 10 (4*2+2): kept, block rows 8..11
    mask[:, 40:60] = 2  # 20 columns, aligned to no block: mostly kept
    check = checks.FineStructureCheck(64, 64, {"line": 1, "band": 2})
    for top in range(0, 64, 16):  # band-wise equals one-shot
        check.update(mask[top : top + 16], top)
    result = check.result()
    # line: truth rows 10-11 outside the band columns; coarse rows 8-11 outside cols 40-59
    assert result["line"] == pytest.approx((2 * 44) / (4 * 44))
    assert result["band"] > 0.8
    whole = checks.FineStructureCheck(64, 64, {"line": 1, "band": 2})
    whole.update(mask, 0)
    assert whole.result() == result
    with pytest.raises(ValueError):
        whole.update(mask[2:10], 2)  # not aligned to 4x4 blocks


def test_context_check_agrees_with_a_per_pixel_brute_force():
    rng = np.random.default_rng(0)
    height, width, patch = 150, 230, 64
    mask = np.where(rng.random((height, width)) < 0.5, 1, 2).astype(np.uint8)
    mask[:20, :30] = 0  # cue in one corner
    mask[100:104, 200:203] = 0  # and a speck
    check = checks.ContextCheck(height, width, {"near": 1, "far": 2}, [0], patch=patch)
    for top in range(0, height, 40):
        check.update(mask[top : top + 40], top)
    rows, cols = checks.patch_grid(height, width, patch)
    covered_by_cue = np.zeros((height, width), int)
    covered_free = np.zeros((height, width), int)
    for r in rows:
        for c in cols:
            has_cue = (mask[r : r + patch, c : c + patch] == 0).any()
            (covered_by_cue if has_cue else covered_free)[r : r + patch, c : c + patch] += 1
    near = mask == 1
    result = check.result()["near"]
    assert result["pixels"] == near.sum()
    assert result["fraction"] == pytest.approx((near & (covered_by_cue == 0)).sum() / near.sum())
    assert result["fraction_any"] == pytest.approx((near & (covered_free > 0)).sum() / near.sum())
    assert 0 < result["fraction"] < result["fraction_any"] < 1


def test_context_check_is_undefined_below_the_patch_size():
    check = checks.ContextCheck(400, 900, CONTEXT_CLASSES, CUE_CLASSES)
    check.update(np.full((400, 900), VEG_NEAR, np.uint8), 0)
    result = check.result()["vegetation_near_water"]
    assert not check.defined and result["fraction"] is None and result["pixels"] == 400 * 900


@pytest.mark.parametrize("seed", [0, 1, 2, 7, 11])
def test_both_checks_hold_for_several_seeds(seed):
    scene = LandcoverScene.generate(1600, 1600, seed=seed, index=seed % 3)
    assert checks.patch_grid(1600, 1600) is not None and len(checks.patch_grid(1600, 1600)[0]) == 4
    report = check_scene(scene)
    assert report.fine["road"] is not None and report.fine["stream"] is not None
    for name, iou in report.fine.items():
        assert iou <= checks.FINE_MAX_IOU, (name, iou)
    assert report.context_fraction >= checks.CONTEXT_MIN_FRACTION
    assert report.passed
    far = report.context["vegetation_far_from_water"]["pixels"]
    assert far >= 0.03 * 1600 * 1600


def test_large_scenes_are_judged_by_a_preview_that_predicts_the_check():
    scene = LandcoverScene.build(4200, 4300, seed=1, index=0, attempt=0, config=LandcoverConfig())
    assessment = scene.assess()
    assert assessment["method"].startswith("preview")
    exact = check_scene(scene)
    assert abs(assessment["context_fraction"] - exact.context_fraction) < 0.06
    assert exact.passed


# --------------------------------------------------------------------------- on disk


def _read(path):
    """Pixels, the first page's tags of interest, and the pyramid's level shapes."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tags = dict(
            tiled=page.is_tiled,
            tilewidth=page.tilewidth,
            photometric=page.photometric,
            colormap=page.colormap,
            description=page.description,
        )
        return page.asarray(), tags, [level.shape for level in tif.series[0].levels]


def test_write_dataset_layout_yaml_and_determinism(tmp_path):
    kwargs = dict(count=2, height=640, width=1100, seed=5, tile=256, report=True)
    manifest = write_landcover_dataset(tmp_path / "a", **kwargs)
    out = tmp_path / "a"
    names = ["landcover_000", "landcover_001"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{n}.tif" for n in names]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{n}.tif" for n in names]

    content = yaml.safe_load((out / "dataset.yaml").read_text())
    assert content["task"] == "segmentation" and content["mask_encoding"] == "index"
    assert content["images"] == "images" and content["masks"] == "masks"
    assert content["classes"] == list(CLASSES) and len(content["palette"]) == len(CLASSES)
    assert content["palette"] == PALETTE.tolist()
    assert content["ignore_index"] == 255 and content["exclude_from_miou"] == []
    assert content["splits"] == {"train": names[:1], "val": names[1:]}

    image, tags, levels = _read(out / "images" / "landcover_000.tif")
    assert image.shape == (640, 1100, 3) and image.dtype == np.uint8
    assert tags["tiled"] and tags["tilewidth"] == 256 and tags["photometric"] == tifffile.PHOTOMETRIC.RGB
    assert levels[1] == (320, 550, 3)
    mask, tags, levels = _read(out / "masks" / "landcover_000.tif")
    assert mask.shape == (640, 1100) and mask.dtype == np.uint8 and tags["tiled"]
    assert tags["photometric"] == tifffile.PHOTOMETRIC.PALETTE
    assert np.array_equal(tags["colormap"][:, : len(CLASSES)].T // 257, PALETTE)
    assert set(np.unique(mask).tolist()) <= set(range(len(CLASSES)))
    assert json.loads(tags["description"])["classes"] == list(CLASSES)

    # the file holds what the scene renders, and --report checked that file
    scene = LandcoverScene.generate(640, 1100, seed=5, index=0)
    assert np.array_equal(mask, scene.render_mask(Window(0, 0, 640, 1100)))
    assert np.array_equal(image, scene.render_image(Window(0, 0, 640, 1100)))
    assert manifest["scenes"][0]["checks"] == check_mask(out / "masks" / "landcover_000.tif").as_dict()
    assert json.loads((out / "synth.json").read_text())["complete"] is True

    write_landcover_dataset(tmp_path / "b", **{**kwargs, "report": False})
    for name in names:
        for folder in ("images", "masks"):
            assert np.array_equal(
                _read(out / folder / f"{name}.tif")[0], _read(tmp_path / "b" / folder / f"{name}.tif")[0]
            )


def test_a_foreign_folder_is_refused_and_an_earlier_output_replaced(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_output_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_output_dir(tmp_path / "file")

    out = tmp_path / "synth"
    small = dict(height=480, width=500, seed=1, config=LandcoverConfig(context_radius=200))
    write_landcover_dataset(out, count=3, **small)
    (out / "images" / "user_extra.tif").write_bytes(b"kept")
    write_landcover_dataset(out, count=1, **small)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["landcover_000.tif", "user_extra.tif"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["landcover_000.tif"]
    assert yaml.safe_load((out / "dataset.yaml").read_text())["splits"] == {"train": ["landcover_000"], "val": []}


def test_split_names():
    names = [f"s{i}" for i in range(10)]
    assert split_names(names, 0.25) == {"train": names[:8], "val": names[8:]}
    assert split_names(names[:2], 0.1) == {"train": names[:1], "val": names[1:2]}
    assert split_names(names[:1], 0.5) == {"train": names[:1], "val": []}
    assert split_names(names, 0.0)["val"] == []
    with pytest.raises(ConfigError):
        split_names(names, 1.0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_config_rejects_max_attempts_below_one(bad):
    # 0 (or fewer) attempts would draw no scene at all: generate() would return None
    with pytest.raises(ConfigError, match=rf"max_attempts must be an integer >= 1 .*got {bad!r}"):
        LandcoverConfig(max_attempts=bad)
    assert LandcoverConfig(max_attempts=1).max_attempts == 1


def test_config_rejects_a_radius_that_is_not_positive():
    with pytest.raises(ConfigError, match="context radius must be positive, got 0"):
        LandcoverConfig(context_radius=0)
