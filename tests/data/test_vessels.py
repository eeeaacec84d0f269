"""The synthetic vessel generator: mask rule, determinism across bands, shares, self-check, files, memory."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage

import gigaseg
from gigaseg.data.synth import vessels
from gigaseg.data.synth.vessels import (
    CELL,
    CLASSES,
    PALETTE,
    Centrelines,
    VesselCheck,
    VesselConfig,
    VesselScene,
    best_cell_f1,
    check_mask,
    check_scene,
    combine_reports,
    format_report,
    write_vessels_dataset,
)
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window


@pytest.fixture(scope="module")
def tall() -> VesselScene:
    """Two rows of cells (2048 + 152 rows): trees of both rows reach the rows around the cell border."""
    return VesselScene.generate(CELL + 152, 700, seed=3)


def _bands(render, height: int, width: int, rows: int) -> np.ndarray:
    return np.concatenate([render(Window(top, 0, min(rows, height - top), width)) for top in range(0, height, rows)])


# --------------------------------------------------------------------------- rendering


def test_render_shapes_dtypes_and_classes(tall):
    window = Window(1900, 0, 300, 700)
    image, mask, widths = tall.render_image(window), tall.render_mask(window), tall.render_widths(window)
    assert image.shape == (300, 700, 3) and image.dtype == np.uint8
    assert mask.shape == (300, 700) and mask.dtype == np.uint8
    assert widths.shape == (300, 700) and widths.dtype == np.float32
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert np.array_equal(mask == 1, widths > 0)
    assert widths[mask == 1].min() >= 1.0 and widths.max() <= tall.config.root_width[1]


def test_render_is_the_same_whatever_the_bands(tall):
    """Band heights, column chunks and a fresh scene object give the same pixels."""
    height, width = tall.height, tall.width
    full = Window(0, 0, height, width)
    mask, widths = tall.render_mask(full), tall.render_widths(full)
    image = tall.render_image(Window(1536, 0, height - 1536, width))  # across the cell border at 2048
    for rows in (37, 300, 512):
        assert np.array_equal(_bands(tall.render_mask, height, width, rows), mask), rows
        assert np.array_equal(_bands(tall.render_widths, height, width, rows), widths), rows
    for rows in (37, 256):
        banded = np.concatenate(
            [tall.render_image(Window(top, 0, min(rows, height - top), width)) for top in range(1536, height, rows)]
        )
        assert np.array_equal(banded, image), rows
    for window in (Window(2040, 333, 17, 101), Window(1536, 650, height - 1536, 50), Window(1600, 0, 1, 700)):
        assert np.array_equal(tall.render_mask(window), mask[window.slices])
        inner = Window(window.top - 1536, window.left, window.height, window.width)
        assert np.array_equal(tall.render_image(window), image[inner.slices])
    again = VesselScene.generate(height, width, seed=3)
    assert np.array_equal(again.render_mask(full), mask)
    assert np.array_equal(again.render_image(Window(1536, 0, height - 1536, width)), image)
    other = VesselScene.generate(height, width, seed=4)
    assert not np.array_equal(other.render_mask(full), mask)


def test_vessels_are_continuous_across_band_borders(tall):
    height, width = tall.height, tall.width
    single = tall.render_mask(Window(0, 0, height, width))
    rows = 37
    stitched = _bands(tall.render_mask, height, width, rows)
    assert np.array_equal(stitched, single)
    # vessels do cross the borders: many borders have vessel pixels on both sides, touching
    crossing = 0
    for top in range(rows, height, rows):
        above, below = stitched[top - 1].astype(bool), stitched[top].astype(bool)
        touching = above & (below | np.r_[below[1:], False] | np.r_[False, below[:-1]])
        crossing += bool(touching.any())
    assert crossing > 0.8 * (height // rows)
    # and no band border splits a vessel: the 8-connected pieces are those of the single rendering
    eight = np.ones((3, 3), bool)
    assert ndimage.label(stitched, eight)[1] == ndimage.label(single, eight)[1]


def test_a_one_pixel_vessel_is_one_gapless_piece_in_any_bands():
    t = np.linspace(0, 1, 200)
    points = np.stack([10 + 90 * t + 12 * np.sin(7 * t), 5 + 300 * t], axis=1)  # shallow, curving, in 2-px steps
    points = np.concatenate([[points[0]], points[0] + np.cumsum(_unit_steps(points), axis=0)])
    line = Centrelines.from_branches([(points, np.ones(len(points) - 1, np.float32))])
    window = Window(0, 0, 180, 420)
    assert points[:, 0].max() < 175 and points[:, 1].max() < 415
    whole = line.rasterise(window, "mask")
    banded = np.concatenate(
        [line.rasterise(Window(top, 0, min(7, 180 - top), 420), "mask") for top in range(0, 180, 7)]
    )
    assert np.array_equal(banded, whole)
    assert ndimage.label(whole, np.ones((3, 3), bool))[1] == 1
    columns = np.flatnonzero(whole.any(axis=0))
    assert np.array_equal(columns, np.arange(columns[0], columns[-1] + 1))  # no column skipped
    # about one pixel per column: the mask's area is its length times its width
    length = vessels.STEP * (len(points) - 1)
    assert abs(whole.sum() - length) < 0.05 * length


def _unit_steps(points: np.ndarray) -> np.ndarray:
    steps = np.diff(points, axis=0)
    return vessels.STEP * steps / np.linalg.norm(steps, axis=1, keepdims=True)


def test_the_mask_rule_by_brute_force(tall):
    """A pixel is a vessel iff its centre lies within half the width of some centreline step."""
    window = Window(2000, 100, 60, 90)
    segments = [v for v in tall.vessels_near(window)]
    y0 = np.concatenate([v.y0 for v in segments]).astype(np.float64)
    x0 = np.concatenate([v.x0 for v in segments]).astype(np.float64)
    y1 = np.concatenate([v.y1 for v in segments]).astype(np.float64)
    x1 = np.concatenate([v.x1 for v in segments]).astype(np.float64)
    w = np.concatenate([v.width for v in segments]).astype(np.float64)
    near = (np.minimum(y0, y1) < window.bottom + 4) & (np.maximum(y0, y1) > window.top - 4)
    near &= (np.minimum(x0, x1) < window.right + 4) & (np.maximum(x0, x1) > window.left - 4)
    y0, x0, y1, x1, w = y0[near], x0[near], y1[near], x1[near], w[near]
    assert len(w) > 20
    rows, cols = np.mgrid[window.top : window.bottom, window.left : window.right]
    py, px = rows[..., None].astype(np.float64), cols[..., None].astype(np.float64)
    ey, ex = y1 - y0, x1 - x0
    t = np.clip(((py - y0) * ey + (px - x0) * ex) / (ey * ey + ex * ex), 0, 1)
    d2 = (py - y0 - t * ey) ** 2 + (px - x0 - t * ex) ** 2
    inside = d2 < (w / 2) ** 2
    expected = inside.any(axis=-1)
    assert expected.any() and not expected.all()
    assert np.array_equal(tall.render_mask(window).astype(bool), expected)
    assert np.array_equal(tall.render_widths(window), np.where(inside, w, 0).max(axis=-1).astype(np.float32))


def test_contrast_falls_with_width_and_thin_vessels_stay_visible():
    scene = VesselScene.generate(1024, 1024, seed=2)
    full = Window(0, 0, 1024, 1024)
    green = scene.render_image(full)[..., 1].astype(np.float64)
    widths = scene.render_widths(full)
    background = widths == 0
    far = ~ndimage.binary_dilation(~background, iterations=3)  # off the vessels' anti-aliased fringe
    thin = (widths > 0) & (widths <= 1.25)
    thick = widths >= 3.5
    assert thin.sum() > 1000 and thick.sum() > 1000
    drop_thin = green[far].mean() - green[thin].mean()
    drop_thick = green[far].mean() - green[thick].mean()
    # thin vessels are there but faint: a few grey levels, within the background's own spread, so a
    # threshold on a pixel's colour does not find them; thick ones are clear
    assert 5 < drop_thin < 2 * green[far].std(), (drop_thin, green[far].std())
    assert np.mean(green[far] <= np.median(green[thin])) > 0.05
    assert drop_thick > drop_thin + 10, (drop_thick, drop_thin)


# --------------------------------------------------------------------------- shares and widths


def test_vessel_share_and_width_distribution_on_small_scenes():
    """512 x 512 (under a cell, so a tree's trunks weigh more): shares within these bounds for every seed."""
    reports, thin_widths = [], []
    for seed in range(6):
        scene = VesselScene.generate(512, 512, seed=seed)
        report = check_scene(scene, rows=128)
        reports.append(report)
        widths = scene.render_widths(Window(0, 0, 512, 512))
        vessel = widths[widths > 0]
        assert vessel.min() >= 1.0 and vessel.max() <= 5.5
        assert 0.02 <= report.vessel_share <= 0.15, (seed, report.vessel_share)
        assert report.thin_share >= 0.2, (seed, report.thin_share)
        assert report.ceiling_f1_thin <= vessels.THIN_MAX_CEILING_F1, (seed, report.ceiling_f1_thin)
        assert not report.shares_checked and report.passed  # share bounds are n/a below 1024 x 1024
        thin_widths.append(np.mean(vessel <= 1.25))
    pooled = combine_reports(reports)
    assert pooled.thin_share >= 0.3
    assert np.mean(thin_widths) > 0.1  # 1-px vessels are common, not just possible


def test_a_2048_scene_passes_its_self_check():
    scene = VesselScene.generate(2048, 2048, seed=0)
    report = check_scene(scene)
    assert report.shares_checked and report.passed, format_report("scene", report)
    low, high = vessels.VESSEL_SHARE_BOUNDS
    assert low <= report.vessel_share <= high
    assert report.thin_share >= vessels.THIN_MIN_SHARE
    assert report.ceiling_f1_thin <= vessels.THIN_MAX_CEILING_F1 < 1.0
    assert report.ceiling_f1_thin < report.ceiling_f1_all  # the thin vessels are what a coarse mask loses
    assert scene.describe()["trees"] >= 2


# --------------------------------------------------------------------------- the self-check


def _brute_force_f1(target: np.ndarray, scored: np.ndarray, factor: int) -> float:
    rows, cols = -(-target.shape[0] // factor), -(-target.shape[1] // factor)
    best = 0.0
    for choice in itertools.product((False, True), repeat=rows * cols):
        cells = np.array(choice).reshape(rows, cols)
        pred = np.kron(cells, np.ones((factor, factor), bool))[: target.shape[0], : target.shape[1]]
        tp = np.sum(pred & target & scored)
        fp = np.sum(pred & ~target & scored)
        fn = np.sum(~pred & target & scored)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def test_best_cell_f1_is_the_best_over_every_cell_constant_mask():
    rng = np.random.default_rng(0)
    for trial in range(4):
        height, width = (10, 11) if trial % 2 else (12, 8)  # ragged edge cells too
        target = rng.random((height, width)) < 0.25
        scored = rng.random((height, width)) > 0.1  # a few unscored pixels (thick vessels)
        target &= scored
        side = 17
        t = vessels._cell_sums(target, 4).ravel()
        n = vessels._cell_sums(scored, 4).ravel()
        hist = np.bincount(t * side + n, minlength=side * side).reshape(side, side)
        assert best_cell_f1(hist) == pytest.approx(_brute_force_f1(target, scored, 4))
    assert best_cell_f1(np.zeros((17, 17), np.int64)) is None


def test_vessel_check_by_bands_equals_one_shot_and_reads_thin_vessels():
    mask = np.zeros((40, 48), np.uint8)
    widths = np.zeros((40, 48), np.float32)
    mask[10, :] = 1  # a 1-px vessel along a row
    widths[10, :] = 1.0
    mask[:, 20:25] = 1  # a 5-px vessel across it
    widths[:, 20:25] = 5.0
    one = VesselCheck(40, 48)
    one.update(mask, widths, 0)
    banded = VesselCheck(40, 48)
    for top in range(0, 40, 12):
        banded.update(mask[top : top + 12], widths[top : top + 12], top)
    a, b = one.result(), banded.result()
    assert a.as_dict() == b.as_dict()
    assert a.vessel_pixels == 48 - 5 + 40 * 5 and a.thin_pixels == 43
    # a 1-px row in 4-px cells: the best coarse mask marks its cells, 1/4 of them vessel
    assert a.ceiling_f1_thin == pytest.approx(2 * 43 / (43 * 4 + 43))
    with pytest.raises(ValueError, match="align"):
        banded.update(mask[2:10], widths[2:10], 2)
    with pytest.raises(ValueError, match="differs"):
        VesselCheck(40, 48).update(mask, np.zeros_like(widths), 0)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="share"):
        VesselConfig(share=(0.2, 0.1))
    with pytest.raises(ConfigError, match="min_width"):
        VesselConfig(min_width=0)
    with pytest.raises(ConfigError, match="root_width"):
        VesselConfig(root_width=(0.8, 5.0))
    with pytest.raises(ConfigError, match="size"):
        VesselScene.generate(0, 10)


def test_generator_does_not_import_torch():
    """Synth runs in processes that must not pay torch's memory."""
    code = "import sys, gigaseg.data.synth.vessels, gigaseg.commands.synth; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# --------------------------------------------------------------------------- on disk


def test_write_dataset_layout_loads_and_matches_the_renderer(tmp_path):
    out = tmp_path / "v"
    manifest = write_vessels_dataset(out, count=2, height=600, width=700, seed=5, tile=256, report=True)
    names = ["vessels_000", "vessels_001"]
    for folder in ("images", "masks"):
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"{n}.tif" for n in names]
    content = yaml.safe_load((out / "dataset.yaml").read_text())
    assert content["classes"] == ["background", "vessel"] == list(CLASSES)
    assert content["palette"] == PALETTE.tolist() and content["mask_encoding"] == "index"
    assert content["splits"] == {"train": names[:1], "val": names[1:]}

    train, val = gigaseg.load_dataset(out, split="train"), gigaseg.load_dataset(out, split="val")
    assert train.num_classes == 2 and train.classes == ["background", "vessel"]
    assert train.names == names[:1] and val.names == names[1:]
    train.validate(full=True)
    with val[0] as sample:
        image, mask = sample.image.read(), sample.mask.read()[..., 0]
    assert image.shape == (600, 700, 3) and image.dtype == np.uint8
    assert mask.shape == (600, 700) and set(np.unique(mask).tolist()) == {0, 1}

    scene = VesselScene.generate(600, 700, seed=5, index=1)
    full = Window(0, 0, 600, 700)
    assert np.array_equal(mask, scene.render_mask(full))
    assert np.array_equal(image, scene.render_image(full))
    with tifffile.TiffFile(out / "masks" / "vessels_001.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert np.array_equal(page.colormap[:, :2].T // 257, PALETTE)
    assert manifest["scenes"][1]["checks"] == check_mask(out / "masks" / "vessels_001.tif", scene).as_dict()
    assert manifest["complete"] and json.loads((out / "synth.json").read_text())["complete"]
    assert manifest["scenes"][0]["trees"] >= 1 and "checks_overall" in manifest


def test_check_mask_refuses_a_mask_that_is_not_the_scenes(tmp_path):
    out = tmp_path / "v"
    write_vessels_dataset(out, count=1, height=256, width=256, seed=1, tile=128)
    other = VesselScene.generate(256, 256, seed=2)
    with pytest.raises(ValueError, match="differs"):
        check_mask(out / "masks" / "vessels_000.tif", other)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs resource and os.wait4")
def test_peak_memory_of_a_4096_scene_is_bounded(tmp_path):
    """A 4096 x 4096 scene (with --report) in a child stays under 300 MB, and barely above a 1024-row one."""
    from gigaseg.bench.memory import measure_command

    def run(size: str):
        argv = [sys.executable, "-m", "gigaseg", "synth", "vessels", str(tmp_path / size), "--count", "1"]
        return measure_command([*argv, "--size", size, "--report"], capture_output=True, timeout=600, check=True)

    big, short = run("4096x4096"), run("1024x4096")
    assert "vessels_000: vessel share" in big.stdout and "FAIL" not in big.stdout
    assert big.peak_rss < 300e6, f"{big.peak_rss / 1e6:.0f} MB"
    # memory grows with the width, not the area: 4x the rows cost little more
    assert big.peak_rss - short.peak_rss < 80e6, f"{big.peak_rss / 1e6:.0f} MB vs {short.peak_rss / 1e6:.0f} MB"
    assert tifffile.imread(tmp_path / "4096x4096" / "masks" / "vessels_000.tif").shape == (4096, 4096)
