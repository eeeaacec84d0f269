"""``gigaseg predict`` over several images in this process: every input is attempted, a bad one fails alone.

(The same on a Dask cluster is tests/inference/test_distributed.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

import gigaseg
from gigaseg.cli import main
from gigaseg.errors import ImageReadError
from gigaseg.inference.distributed import CollectionResult


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture
def folder(tmp_path):
    """a.tif and b.png (images), c.tif (text, not an image), .hidden.tif (skipped), notes.txt (not an image)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(images / "a.tif", rng.integers(0, 255, (96, 80, 3), dtype=np.uint8), photometric="rgb")
    Image.fromarray(rng.integers(0, 255, (64, 72, 3), dtype=np.uint8)).save(images / "b.png")
    (images / "c.tif").write_text("not an image\n")
    (images / ".hidden.tif").write_text("skipped\n")
    (images / "notes.txt").write_text("skipped\n")
    return images


def test_a_folder_is_predicted_and_the_bad_image_fails_alone(capsys, folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "predict", folder, "--checkpoint", tiny_checkpoint, "--out", out)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        f"gigaseg predict: error: {folder / 'c.tif'}: not a TIFF file (its content does not start with a TIFF header)",
        f"gigaseg predict: 1 of 3 images failed: {folder / 'c.tif'}",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]
    assert f"{folder / 'a.tif'}: 96x80 -> {out / 'a.tif'}" in stdout and f"{folder / 'b.png'}: 64x72" in stdout
    assert tifffile.imread(out / "a.tif").shape == (96, 80)


def test_files_globs_and_folders_mix_and_the_first_bad_image_does_not_stop_the_rest(
    capsys, folder, tiny_checkpoint, tmp_path
):
    out = tmp_path / "out"
    missing = tmp_path / "missing.tif"
    code, _, err = run_cli(
        capsys, "predict", missing, folder / "*.tif", folder / "b.png", "--checkpoint", tiny_checkpoint, "--out", out
    )
    assert code == 2 and len(err.splitlines()) == 3, err
    assert err.splitlines()[-1] == f"gigaseg predict: 2 of 4 images failed: {missing}, {folder / 'c.tif'}"
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif"]


def test_one_bad_image_alone_is_still_one_line(capsys, folder, tiny_checkpoint, tmp_path):
    code, _, err = run_cli(capsys, "predict", folder / "c.tif", "--checkpoint", tiny_checkpoint, "--out", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "c.tif: not a TIFF file" in err, err


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (("--format", "png"), "unknown mask format 'png'"),
        (("--cluster", "remote:2"), "--cluster remote:2: expected local:N"),
        (("--cluster", "local:0"), "--cluster local:0: expected local:N"),
        (("--format", "ome-zarr", "--vector", "gpkg"), "--vector makes the polygons from the TIFF mask"),
    ],
)
def test_bad_distribution_and_format_options_are_one_line(capsys, folder, tiny_checkpoint, tmp_path, option, words):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "predict", folder / "a.tif", "--checkpoint", tiny_checkpoint, "--out", out, *option)
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_empty_folders_and_unmatched_patterns_are_refused_before_any_prediction(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "predict", tmp_path / "empty", "--checkpoint", tiny_checkpoint, "--out", tmp_path)
    assert code == 2 and "empty: a folder with no images" in err
    code, _, err = run_cli(capsys, "predict", tmp_path / "*.tif", "--checkpoint", tiny_checkpoint, "--out", tmp_path)
    assert code == 2 and "*.tif: no file matches this pattern" in err


def test_the_api_returns_results_and_failures_by_image(folder, tiny_checkpoint, tmp_path):
    outcome = gigaseg.predict(tiny_checkpoint, folder, tmp_path / "out", progress=False)
    assert isinstance(outcome, CollectionResult) and not outcome.ok
    assert list(outcome.results) == [str(folder / "a.tif"), str(folder / "b.png")]
    assert list(outcome.failures) == [str(folder / "c.tif")]
    assert isinstance(outcome.failures[str(folder / "c.tif")], ImageReadError)
    single = gigaseg.predict(tiny_checkpoint, folder / "a.tif", tmp_path / "single", progress=False)
    assert outcome.results[str(folder / "a.tif")].mask_path.read_bytes() == single.mask_path.read_bytes()
