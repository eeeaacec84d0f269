"""Bad input at the command line: one line on stderr, exit code 2, no partial output."""

import numpy as np
import pytest
import tifffile

from gigaseg.cli import main
from gigaseg.io.normalize import Normalization
from gigaseg.methods.registry import create_model
from gigaseg.training.checkpoint import save_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    model = create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=16)
    data = {
        "classes": ["a", "b", "c"],
        "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
        "ignore_index": 255,
        "exclude_from_miou": [],
        "normalization": Normalization.for_image(3, np.uint8).to_dict(),
    }
    return save_checkpoint(tmp_path / "model.ckpt", model, data)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_checkpoint(capsys, tmp_path):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8))
    code, err = run_cli(capsys, "predict", image, "--checkpoint", tmp_path / "nope.ckpt", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "nope.ckpt: checkpoint not found")
    assert not (tmp_path / "out").exists()


def test_corrupt_image_leaves_no_output(capsys, tmp_path, checkpoint):
    image = tmp_path / "broken.tif"
    image.write_bytes(b"II*\x00" + b"\x00" * 50)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--out", out)
    assert_one_line_error(code, err, "broken.tif")
    assert not (out / "broken.tif").exists()


def test_unknown_method(capsys, tmp_path, tiny_dataset):
    data = tiny_dataset
    code, err = run_cli(capsys, "train", "--method", "glnett", "--data", data, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "glnett")
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_budget_too_small(capsys, tmp_path, checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, np.zeros((256, 256, 3), np.uint8))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--out", out, "--max-memory", "1MB")
    assert_one_line_error(code, err, "too small", "the smallest that works is about")
    assert not (out / "scene.tif").exists()


def test_data_folder_without_masks(capsys, tmp_path, tiny_dataset):
    data = tiny_dataset
    for mask in (data / "masks").iterdir():
        mask.unlink()
    code, err = run_cli(
        capsys, "train", "--method", "global", "--data", data, "--out", tmp_path / "run", "--encoder", "test_resnet"
    )
    assert_one_line_error(code, err, "scene_000")


def test_bad_memory_size(capsys, tmp_path, checkpoint):
    code, err = run_cli(
        capsys,
        "predict",
        tmp_path / "x.tif",
        "--checkpoint",
        checkpoint,
        "--out",
        tmp_path / "out",
        "--max-memory",
        "lots",
    )
    assert_one_line_error(code, err, "cannot read memory size 'lots'")


def test_predict_set_changes_inference_options_only(capsys, tmp_path, checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--out", out, "--set", "patch_size=32")
    assert_one_line_error(code, err, "'patch_size' cannot change after training", "overlap, blend")
    assert not out.exists()
    code, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--out", out, "--set", "overlap=many")
    assert_one_line_error(code, err, "overlap")
    code, _ = run_cli(
        capsys,
        "predict",
        image,
        "--checkpoint",
        checkpoint,
        "--out",
        out,
        "--set",
        "overlap=32",
        "--set",
        "blend=uniform",
    )
    assert code == 0 and tifffile.imread(out / "scene.tif").shape == (96, 96)


def test_resuming_with_other_options_is_refused(capsys, tmp_path, checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, np.zeros((600, 96, 3), np.uint8))
    out = tmp_path / "out"
    # what a killed run leaves: the scratch area with one band, made with overlap=16 (the checkpoint's)
    from gigaseg.api import predict

    bands = []
    with pytest.raises(KeyboardInterrupt):

        def die(window, labels):
            bands.append(window)
            raise KeyboardInterrupt

        predict(checkpoint, image, out / "scene.tif", on_band=die, progress=False)
    assert bands and not (out / "scene.tif").exists() and (out / ".scene.tif.scratch").is_dir()
    code, err = run_cli(capsys, "predict", image, "--checkpoint", checkpoint, "--out", out, "--set", "overlap=8")
    assert_one_line_error(code, err, "scene.tif: cannot resume", "another model", "--restart")
    code, _ = run_cli(
        capsys, "predict", image, "--checkpoint", checkpoint, "--out", out, "--set", "overlap=8", "--restart"
    )
    assert code == 0 and (out / "scene.tif").exists() and not (out / ".scene.tif.scratch").exists()
