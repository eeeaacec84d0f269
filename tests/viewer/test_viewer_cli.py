"""``gigaseg view`` and ``gigaseg predict --view`` on the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tifffile

from gigaseg.cli import main
from gigaseg.io.writers import MaskWriter
from gigaseg.viewer import ViewerServer


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), tile=(64, 64), photometric="rgb")
    mask = tmp_path / "mask.tif"
    with MaskWriter(mask, 200, 300, palette=[(255, 0, 0), (0, 255, 0)], class_names=["a", "b"], tile=64) as writer:
        for top in writer.band_tops:
            writer.write_band(top, np.ones(writer.band_window(top).shape, np.uint8))
    return image, mask, tmp_path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing image", "{tmp}/nothing.tif: file not found"),
        ("missing mask", "{tmp}/nothing.tif: file not found"),
        ("mask of another size", "{tmp}/small.tif: mask is 100x300, the image {tmp}/scene.tif is 200x300; "),
        ("corrupt image", "{tmp}/corrupt.tif: "),
        ("rgb mask", "{tmp}/scene.tif: has 3 channels; a label mask has one"),
        ("bad cache size", "cannot read memory size 'lots'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, files, case, message):
    image, mask, tmp = files
    (tmp / "corrupt.tif").write_bytes(b"II*\x00garbage, not a TIFF at all")
    with MaskWriter(tmp / "small.tif", 100, 300, tile=64) as writer:
        for top in writer.band_tops:
            writer.write_band(top, np.zeros(writer.band_window(top).shape, np.uint8))
    argv = {
        "missing image": [tmp / "nothing.tif", mask],
        "missing mask": [image, tmp / "nothing.tif"],
        "mask of another size": [image, mask, tmp / "small.tif"],
        "corrupt image": [tmp / "corrupt.tif"],
        "rgb mask": [image, image],
        "bad cache size": [image, "--cache-size", "lots"],
    }[case]
    code, out, err = run_cli(capsys, "view", *argv, "--no-browser")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gigaseg view: error: ")
    assert message.format(tmp=tmp) in err
    assert "Traceback" not in err and out == ""


def test_gigaseg_view_serves_until_interrupted(files):
    image, mask, _ = files
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DISPLAY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "gigaseg", "view", str(image), str(mask), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a shell's background job (``pytest &``) ignores SIGINT, and a child inherits that; Ctrl-C acts as in a
        # terminal's foreground whatever the suite was started from
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"gigaseg view: {image} with mask.tif: http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            assert json.load(response)["image"]["width"] == 300
        assert process.stdout.readline() == "gigaseg view: press Ctrl-C to stop\n"
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out == "gigaseg view: stopped\n" and err == ""


def test_predict_view_serves_each_image_with_its_mask(capsys, files, tiny_checkpoint, served_info):
    image, _, tmp = files
    seen = served_info
    code, out, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", tmp / "pred", "--view")
    assert code == 0, err
    assert (tmp / "pred" / "scene.tif").exists()
    assert len(seen) == 1
    assert seen[0]["image"]["name"] == "scene.tif" and [m["name"] for m in seen[0]["masks"]] == ["scene.tif"]
    assert [c["name"] for c in seen[0]["masks"][0]["classes"]] == ["a", "b", "c"]
    assert f"gigaseg view: {image} with scene.tif: http://127.0.0.1:" in out
    assert out.rstrip().endswith("gigaseg view: stopped")


def test_predict_without_view_serves_nothing(capsys, files, tiny_checkpoint, monkeypatch):
    image, _, tmp = files
    monkeypatch.setattr(ViewerServer, "__init__", lambda *a, **k: pytest.fail("a viewer was started"))
    code, out, err = run_cli(capsys, "predict", image, "--checkpoint", tiny_checkpoint, "--out", tmp / "pred")
    assert code == 0, err
    assert "gigaseg view" not in out
