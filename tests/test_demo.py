"""``gigaseg demo`` end to end at a tiny size: data, training, a streamed scene, the report."""

from __future__ import annotations

import re
import subprocess
import sys

import tifffile

from gigaseg.commands.demo import demo_options


def test_the_patch_demo_trains_for_fine_structures():
    options, lr, batch_size = demo_options("patch")
    assert options["output_stride"] == 1 and options["crop_sampling"] == "balanced"
    assert options["loss"] == "weighted_ce" and options["sampling_temperature"] == 0.0
    assert (lr, batch_size) == (2e-3, 2)
    assert demo_options("magnet") == ({}, 1e-3, 8)


def test_demo_runs_end_to_end_and_reports_the_scene(tmp_path):
    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "gigaseg", "demo", "--out", str(out), "--encoder", "test_resnet"]
    argv += ["--train-scenes", "3", "--train-size", "256", "--scene-size", "640", "--epochs", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"scene mIoU against the generated ground truth: (\d\.\d{3})", done.stdout)
    assert match and 0.0 <= float(match.group(1)) <= 1.0, done.stdout[-2000:]
    for name in ("water", "road", "stream"):
        assert re.search(rf"^\s+{name}\s+IoU (n/a|\d\.\d{{3}})$", done.stdout, re.M), done.stdout[-2000:]
    mask = tifffile.imread(out / "predictions" / "landcover_000.tif", level=0)
    assert mask.shape[:2] == (640, 640) and mask.max() < 7
    assert (out / "predictions" / "landcover_000_overlay.png").exists()
    assert (out / "run" / "best.ckpt").exists()
