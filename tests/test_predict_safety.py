"""Prediction never destroys, mixes or fakes results: one test per defect of the data-safety issue."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
import tifffile
import torch

import gigaseg
from gigaseg.cli import main
from gigaseg.errors import ConfigError, GigasegError, GigasegNotice
from gigaseg.io.lock import output_lock
from gigaseg.training.checkpoint import load_checkpoint


def scene(seed=0, size=(160, 144)):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    pixels[: size[0] // 2] //= 4  # some structure, so the mask is not one class
    return pixels


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def predict(checkpoint, image, out, **kwargs):
    return gigaseg.predict(checkpoint, image, out, progress=False, **kwargs)


# --------------------------------------------------------------------------- inputs and outputs


def test_predict_into_the_input_folder_never_overwrites_the_input(capsys, tmp_path, tiny_checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, scene())
    before = image.read_bytes()
    code, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "is the input image" in err, err
    assert image.read_bytes() == before
    with pytest.raises(ConfigError, match="is the input image itself"):
        predict(tiny_checkpoint, image, image)
    link = tmp_path / "link.tif"
    link.symlink_to(image)
    with pytest.raises(ConfigError, match="is the input image itself"):
        predict(tiny_checkpoint, image, link)
    assert image.read_bytes() == before


def test_inputs_sharing_the_part_before_the_first_dot_get_their_own_masks(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    for version, seed in (("v1", 1), ("v2", 2)):
        tifffile.imwrite(tmp_path / "in" / f"scene.{version}.tif", scene(seed))
    images = [tmp_path / "in" / "scene.v1.tif", tmp_path / "in" / "scene.v2.tif"]
    code, err = run_cli(capsys, "predict", *images, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "out")
    assert code == 0, err
    one, two = (tifffile.imread(tmp_path / "out" / f"scene.{v}.tif") for v in ("v1", "v2"))
    assert not np.array_equal(one, two)


def test_two_inputs_mapping_to_one_output_are_refused_before_any_output(capsys, tmp_path, tiny_checkpoint):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "scene.tif", scene())
    code, err = run_cli(
        capsys,
        "predict",
        tmp_path / "a" / "scene.tif",
        tmp_path / "b" / "scene.tif",
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        tmp_path / "out",
    )
    assert code == 2 and "would both be written to" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_a_one_line_error(capsys, tmp_path, tiny_checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, scene())
    (tmp_path / "notes.txt").write_text("not a folder")
    code, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "notes.txt")
    assert code == 2 and "must be a folder" in err and len(err.splitlines()) == 1, err
    code, err = run_cli(
        capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "notes.txt" / "x"
    )
    assert code == 2 and "Traceback" not in err and "notes.txt" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


# --------------------------------------------------------------------------- resume identity and locking


def interrupted_prediction(checkpoint, image, out):
    """What a killed run leaves: the scratch area with its first band."""

    def die(window, labels):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict(checkpoint, image, out, on_band=die)
    assert (out.parent / f".{out.name}.scratch").is_dir() and not out.exists()


def test_resume_with_another_image_of_the_same_size_is_refused(tmp_path, tiny_checkpoint):
    image, out = tmp_path / "scene.tif", tmp_path / "out" / "scene.tif"
    tifffile.imwrite(image, scene(1, size=(1100, 64)))
    interrupted_prediction(tiny_checkpoint, image, out)
    tifffile.imwrite(image, scene(2, size=(1100, 64)))  # replaced by another image of the same size
    with pytest.raises(GigasegError, match="made from another input image"):
        predict(tiny_checkpoint, image, out)
    fresh = predict(tiny_checkpoint, image, out, resume=False)
    reference = predict(tiny_checkpoint, image, tmp_path / "reference" / "scene.tif")
    assert fresh.blocks_resumed == 0
    np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(reference.mask_path))


def test_resume_with_the_same_image_continues(tmp_path, tiny_checkpoint):
    image, out = tmp_path / "scene.tif", tmp_path / "out" / "scene.tif"
    tifffile.imwrite(image, scene(1, size=(1100, 64)))
    interrupted_prediction(tiny_checkpoint, image, out)
    assert predict(tiny_checkpoint, image, out).blocks_resumed > 0


def test_a_second_prediction_to_the_same_output_is_refused(capsys, tmp_path, tiny_checkpoint):
    image, out = tmp_path / "scene.tif", tmp_path / "out" / "scene.tif"
    tifffile.imwrite(image, scene())
    holding, release = threading.Event(), threading.Event()

    def hold():
        with output_lock(out):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        with pytest.raises(ConfigError, match="another gigaseg process is writing this output"):
            predict(tiny_checkpoint, image, out)
        code, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", out.parent)
        assert code == 2 and "another gigaseg process" in err and len(err.splitlines()) == 1, err
    finally:
        release.set()
        holder.join()
    assert not out.exists()
    assert predict(tiny_checkpoint, image, out).mask_path == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["scene.tif"]  # no lock or scratch left behind


# --------------------------------------------------------------------------- dtypes and channels


def test_uint16_copy_of_a_scene_gives_the_uint8_mask(tmp_path, tiny_checkpoint):
    pixels = scene(3)
    eight = predict(tiny_checkpoint, pixels, tmp_path / "eight.tif")
    sixteen = predict(tiny_checkpoint, pixels.astype(np.uint16) * 257, tmp_path / "sixteen.tif")
    np.testing.assert_array_equal(tifffile.imread(eight.mask_path), tifffile.imread(sixteen.mask_path))


def test_float_image_in_0_1_gives_the_uint8_mask_and_0_255_is_refused(tmp_path, tiny_checkpoint):
    pixels = scene(4)
    eight = tifffile.imread(predict(tiny_checkpoint, pixels, tmp_path / "eight.tif").mask_path)
    unit = tifffile.imread(predict(tiny_checkpoint, pixels.astype(np.float32) / 255, tmp_path / "unit.tif").mask_path)
    assert (unit == eight).mean() > 0.999  # float rounding may move a tie
    with pytest.raises(ConfigError, match=r"float image with values in \[0, 25[0-9]\].*\[0, 1\]"):
        predict(tiny_checkpoint, pixels.astype(np.float32), tmp_path / "wide.tif")
    assert not (tmp_path / "wide.tif").exists()


def test_grey_image_with_an_rgb_model_is_repeated_with_a_notice(capsys, tmp_path, tiny_checkpoint):
    grey = scene(5)[..., 0]
    image = tmp_path / "grey.tif"
    tifffile.imwrite(image, grey)
    code, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "out")
    assert code == 0 and err.count("note:") == 1 and "grey image" in err, err
    repeated = predict(tiny_checkpoint, np.repeat(grey[..., None], 3, axis=2), tmp_path / "rgb.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "grey.tif"), tifffile.imread(repeated.mask_path))
    with pytest.warns(GigasegNotice, match="grey image"):
        predict(tiny_checkpoint, grey, tmp_path / "api.tif")
    with pytest.raises(ConfigError, match="has 2 channels, the model expects 3"):
        predict(tiny_checkpoint, np.zeros((64, 64, 2), np.uint8), tmp_path / "two.tif")


# --------------------------------------------------------------------------- checkpoints and OS errors


def test_a_checkpoint_config_asking_for_pretrained_weights_loads_offline(tmp_path, tiny_checkpoint):
    payload = load_checkpoint(tiny_checkpoint)
    payload["model"]["config"]["pretrained"] = True  # would make timm reach for the hub
    model, info = gigaseg.load_model(payload)
    assert model.method_name == "patch" and info["classes"] == ["a", "b", "c"]


def test_disk_full_mid_write_is_one_line_keeps_the_scratch_and_the_rerun_resumes(
    capsys, tmp_path, tiny_checkpoint, monkeypatch
):
    from gigaseg.io import writers

    image, out = tmp_path / "scene.tif", tmp_path / "out"
    tifffile.imwrite(image, scene(6, size=(1100, 64)))
    real = writers.MaskWriter.write_band
    calls = []

    def full_disk(self, top, labels):
        calls.append(top)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.scratch_dir / "labels.raw"))
        return real(self, top, labels)

    monkeypatch.setattr(writers.MaskWriter, "write_band", full_disk)
    code, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", out)
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err and "labels.raw" in err, err
    assert not (out / "scene.tif").exists() and (out / ".scene.tif.scratch").is_dir()
    monkeypatch.setattr(writers.MaskWriter, "write_band", real)
    code, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", out)
    assert code == 0, err
    reference = predict(tiny_checkpoint, image, tmp_path / "reference" / "scene.tif")
    np.testing.assert_array_equal(tifffile.imread(out / "scene.tif"), tifffile.imread(reference.mask_path))


def test_a_checkpoint_with_non_finite_weights_is_refused_instead_of_painting_class_0(tmp_path, tiny_checkpoint):
    payload = load_checkpoint(tiny_checkpoint)
    key = next(k for k, v in payload["model"]["state_dict"].items() if v.is_floating_point())
    payload["model"]["state_dict"][key] = torch.full_like(payload["model"]["state_dict"][key], float("nan"))
    torch.save(payload | {"path": None}, tmp_path / "diverged.ckpt")
    with pytest.raises(ConfigError, match=f"weight '{key}' holds NaN or infinite values"):
        gigaseg.load_model(tmp_path / "diverged.ckpt")
    with pytest.raises(ConfigError, match="diverged"):
        predict(tmp_path / "diverged.ckpt", scene(), tmp_path / "mask.tif")
    assert not (tmp_path / "mask.tif").exists()


def test_a_broken_validation_split_is_an_error_not_training_without_validation(tmp_path, tiny_dataset):
    import yaml

    from gigaseg.errors import DatasetError

    config = yaml.safe_load((tiny_dataset / "dataset.yaml").read_text())
    config["splits"]["val"] = ["scene_003", "no_such_scene"]  # lists an image that does not exist
    (tiny_dataset / "dataset.yaml").write_text(yaml.safe_dump(config))
    settings = gigaseg.TrainSettings(epochs=1, batch_size=2, progress=False)
    with pytest.raises(DatasetError, match="split 'val' lists 1 stem"):
        gigaseg.train(
            "global",
            tiny_dataset,
            tmp_path / "run",
            encoder="test_resnet",
            options={"input_size": 64},
            settings=settings,
        )
    del config["splits"]["val"]  # no validation split at all: training runs without validation
    (tiny_dataset / "dataset.yaml").write_text(yaml.safe_dump(config))
    result = gigaseg.train(
        "global", tiny_dataset, tmp_path / "run2", encoder="test_resnet", options={"input_size": 64}, settings=settings
    )
    assert "val_miou" not in result["history"][0]


def test_evaluate_repeats_a_grey_dataset_for_an_rgb_model_with_one_notice(tmp_path, tiny_checkpoint):
    import yaml

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(root / "images" / f"{name}.tif", scene(7)[..., 0])
        tifffile.imwrite(root / "masks" / f"{name}.tif", np.arange(160 * 144).reshape(160, 144).astype(np.uint8) % 3)
    (root / "dataset.yaml").write_text(yaml.safe_dump({"task": "segmentation", "classes": ["a", "b", "c"]}))
    with pytest.warns(GigasegNotice) as notices:
        summary = gigaseg.evaluate(tiny_checkpoint, root, split="train", progress=False)
    assert len([n for n in notices if issubclass(n.category, GigasegNotice)]) == 1
    assert summary["counted"] == 2 * 160 * 144
