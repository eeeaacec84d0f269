"""``gigaseg bench`` with a detector: COCO's AP per method (AP75 labelled as the paper's), memory and speed."""

import json

import pytest

from gigaseg.cli import main
from gigaseg.data.synth.objects import CLASSES, ObjectsConfig, write_objects_dataset


@pytest.mark.slow  # about 25 s: bench trains and scores in fresh child processes (each imports torch) as it must
def test_bench_scores_a_detector_with_coco_ap(tmp_path, capsys):
    data = tmp_path / "objects"
    write_objects_dataset(data, count=3, height=128, width=160, seed=2, config=ObjectsConfig(density=500))
    out = tmp_path / "bench"
    argv = ["bench", "--methods", "fcos", "--data", str(data), "--out", str(out), "--encoder", "test_resnet"]
    argv += ["--epochs", "1", "--batch-size", "2", "--set", "fcos.input_size=128", "--set", "fcos.fpn_channels=16"]
    assert main([*argv, "--set", "fcos.head_convs=1", "--set", "fcos.max_level=5"]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    (row,) = results["methods"]
    assert row["task"] == "detection" and set(row["per_class_ap"]) == set(CLASSES)
    assert all(row[k] is None or 0.0 <= row[k] <= 1.0 for k in ("AP", "AP50", "AP75", "AP_small", "AR100"))
    assert row["train_peak_rss"] > 100 * 2**20 and row["megapixels_per_second"] > 0
    table = (out / "results.md").read_text()
    assert "| method | AP | AP50 | AP75 (paper) | AP small | AP medium | AP large | AR |" in table
    assert "| fcos |" in table and "AP per class" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
