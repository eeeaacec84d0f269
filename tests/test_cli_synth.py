"""``gigaseg synth landcover`` end to end, through ``gigaseg.cli.main``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import yaml

from gigaseg.cli import main
from gigaseg.commands.synth import parse_image_size
from gigaseg.errors import ConfigError


def test_landcover_end_to_end_with_report(tmp_path, capsys):
    out = tmp_path / "d"
    code = main(
        [
            "synth",
            "landcover",
            str(out),
            "--count",
            "2",
            "--size",
            "1024x1100",
            "--seed",
            "3",
            "--tile",
            "256",
            "--val-fraction",
            "0.5",
            "--report",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["landcover_000", "landcover_001", "overall"]
    for line in lines:
        assert "fine IoU after 4x down/up" in line and "context" in line
        assert "FAIL" not in line and line.count(" ok") == 2
    assert "wrote 2 scene(s) of 1024x1100" in captured.err

    content = yaml.safe_load((out / "dataset.yaml").read_text())
    assert content["splits"] == {"train": ["landcover_000"], "val": ["landcover_001"]}
    for stem in ("landcover_000", "landcover_001"):
        image = tifffile.imread(out / "images" / f"{stem}.tif")
        mask = tifffile.imread(out / "masks" / f"{stem}.tif")
        assert image.shape == (1024, 1100, 3) and mask.shape == (1024, 1100)
        assert mask.max() < len(content["classes"])
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["complete"] and manifest["seed"] == 3 and manifest["size"] == [1024, 1100]
    overall = manifest["checks_overall"]
    assert overall["fine_iou"]["all"] <= 0.5 and overall["context_fraction"] >= 0.3

    # running again into its own output is allowed and gives the same pixels
    first = tifffile.imread(out / "images" / "landcover_001.tif")
    assert (
        main(
            [
                "synth",
                "landcover",
                str(out),
                "--count",
                "2",
                "--size",
                "1024x1100",
                "--seed",
                "3",
                "--tile",
                "256",
                "--val-fraction",
                "0.5",
            ]
        )
        == 0
    )
    assert np.array_equal(tifffile.imread(out / "images" / "landcover_001.tif"), first)


def test_small_scene_reports_the_context_check_as_undefined(tmp_path, capsys):
    code = main(["synth", "landcover", str(tmp_path / "s"), "--count", "1", "--size", "400", "--report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "context n/a" in captured.out and "shorter than the 508-px patch" in captured.out
    assert tifffile.imread(tmp_path / "s" / "images" / "landcover_000.tif").shape == (400, 400, 3)


@pytest.mark.parametrize("size", ["abc", "0x5", "12x", "-3", "1.5x2", "10x10x3"])
def test_bad_size_is_a_one_line_error(tmp_path, capsys, size):
    code = main(["synth", "landcover", str(tmp_path / "x"), "--size", size])
    captured = capsys.readouterr()
    assert code == 2
    assert "--size" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option, value", [("--tile", "0"), ("--tile", "24"), ("--seed", "-1")])
def test_landcover_bad_tile_or_seed_is_a_one_line_error(tmp_path, capsys, option, value):
    code = main(["synth", "landcover", str(tmp_path / "x"), "--size", "64", option, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and option in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_foreign_non_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    code = main(["synth", "landcover", str(tmp_path), "--count", "1", "--size", "256"])
    captured = capsys.readouterr()
    assert code == 2
    assert "not empty" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_bad_count_and_tile(tmp_path, capsys):
    assert main(["synth", "landcover", str(tmp_path / "a"), "--count", "0"]) == 2
    assert main(["synth", "landcover", str(tmp_path / "b"), "--size", "64", "--tile", "100"]) == 2
    err = capsys.readouterr().err
    assert "--count" in err and "--tile" in err


def test_parse_image_size():
    assert parse_image_size("2448x2448") == (2448, 2448)
    assert parse_image_size("1000X2000") == (1000, 2000)
    assert parse_image_size(" 1024 ") == (1024, 1024)
    with pytest.raises(ConfigError):
        parse_image_size("0")


def test_synth_needs_a_kind(capsys):
    with pytest.raises(SystemExit):
        main(["synth"])
    assert "landcover" in capsys.readouterr().err


# --------------------------------------------------------------------------- vessels


def test_vessels_end_to_end_with_report(tmp_path, capsys):
    out = tmp_path / "v"
    argv = ["synth", "vessels", str(out), "--count", "2", "--size", "1024x1100", "--seed", "3", "--tile", "256"]
    code = main([*argv, "--val-fraction", "0.5", "--report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["vessels_000", "vessels_001", "overall"]
    for line in lines:
        assert "vessel share" in line and "thin (<= 2 px)" in line and "constant over 4x4 cells" in line
        assert "FAIL" not in line and line.count(" ok") == 3
    assert "wrote 2 scene(s) of 1024x1100" in captured.err

    content = yaml.safe_load((out / "dataset.yaml").read_text())
    assert content["classes"] == ["background", "vessel"]
    assert content["splits"] == {"train": ["vessels_000"], "val": ["vessels_001"]}
    for stem in ("vessels_000", "vessels_001"):
        image = tifffile.imread(out / "images" / f"{stem}.tif")
        mask = tifffile.imread(out / "masks" / f"{stem}.tif")
        assert image.shape == (1024, 1100, 3) and image.dtype == np.uint8
        assert mask.shape == (1024, 1100) and set(np.unique(mask).tolist()) == {0, 1}
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["generator"] == "gigaseg synth vessels" and manifest["complete"]
    overall = manifest["checks_overall"]
    assert 0.02 <= overall["vessel_share"] <= 0.15 and overall["thin_share"] >= 0.4
    assert overall["ceiling_f1_thin"] <= 0.6 and overall["full_resolution_f1"] == 1.0 and overall["passed"]

    # running again into its own output is allowed and gives the same pixels
    first = tifffile.imread(out / "images" / "vessels_001.tif")
    assert main([*argv, "--val-fraction", "0.5"]) == 0
    assert np.array_equal(tifffile.imread(out / "images" / "vessels_001.tif"), first)


def test_vessels_small_scene_leaves_the_share_bounds_out(tmp_path, capsys):
    code = main(["synth", "vessels", str(tmp_path / "s"), "--count", "1", "--size", "256", "--report"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "share bounds n/a below 1024x1024" in captured.out and "FAIL" not in captured.out
    assert tifffile.imread(tmp_path / "s" / "masks" / "vessels_000.tif").shape == (256, 256)


@pytest.mark.parametrize("size", ["abc", "0x5", "12x", "-3", "1.5x2", "10x10x3"])
def test_vessels_bad_size_is_a_one_line_error(tmp_path, capsys, size):
    code = main(["synth", "vessels", str(tmp_path / "x"), "--size", size])
    captured = capsys.readouterr()
    assert code == 2
    assert "--size" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_vessels_bad_count_tile_val_fraction_and_seed(tmp_path, capsys):
    assert main(["synth", "vessels", str(tmp_path / "a"), "--count", "0"]) == 2
    assert main(["synth", "vessels", str(tmp_path / "b"), "--size", "64", "--tile", "100"]) == 2
    assert main(["synth", "vessels", str(tmp_path / "c"), "--size", "64", "--tile", "0"]) == 2
    assert main(["synth", "vessels", str(tmp_path / "d"), "--size", "64", "--val-fraction", "1"]) == 2
    assert main(["synth", "vessels", str(tmp_path / "e"), "--size", "64", "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--count" in err and "--tile" in err and "--val-fraction" in err and "--seed" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 5
    assert not any(tmp_path.iterdir())


def test_synth_lists_the_vessels_kind(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "vessels" in capsys.readouterr().out
