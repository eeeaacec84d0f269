"""``gigaseg bench``: methods trained and scored side by side, results as JSON, Markdown and a plot."""

import json

import pytest

from gigaseg.cli import main


def test_bench_trains_scores_and_reports_each_method(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--methods",
            "global,patch",
            "--data",
            str(tiny_dataset),
            "--out",
            str(out),
            "--encoder",
            "test_resnet",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--set",
            "global.input_size=64",
            "--set",
            "patch.patch_size=64",
            "--set",
            "patch.overlap=16",
            "--set",
            "patch.crops_per_image=2",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["global", "patch"]
    for method in results["methods"]:
        assert 0.0 <= method["miou"] <= 1.0
        assert set(method["per_class_iou"]) == {"red", "green", "blue"}
        assert method["epochs_run"] == 1 and method["spec"]["epochs"] == 1
        spread = method["epoch_spread"]  # one validation epoch: its mIoU, no spread
        assert spread["epochs"] == 1 and spread["miou"]["sd"] == 0.0
        assert spread["miou"]["mean"] == spread["miou"]["min"] == spread["miou"]["max"]
        assert method["train_peak_rss"] > 100 * 2**20 and method["megapixels_per_second"] > 0
    assert results["methods"][1]["spec"]["options"] == {"patch_size": 64, "overlap": 16, "crops_per_image": 2}
    table = (out / "results.md").read_text()
    assert "| global |" in table and "| patch |" in table and "epochs per stage" in table
    assert "| method | mIoU | boundary F1 | thin recall | train peak RSS |" in table  # no class groups: no empty column
    assert '- patch: `{"patch_size": 64, "overlap": 16, "crops_per_image": 2}`' in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_are_scored_from_the_same_weights(tmp_path, tiny_dataset):
    from gigaseg.bench.compare import MethodSpec, compare, score_variants

    spec = MethodSpec(
        method="patch",
        options={"patch_size": 64, "overlap": 16, "crops_per_image": 2},
        epochs=1,
        batch_size=2,
        lr=1e-3,
        variants={"uniform blend": {"blend": "uniform"}},
    )
    out = tmp_path / "bench"
    results = compare([spec], tiny_dataset, out, encoder="test_resnet")
    trained, variant = results["methods"]
    assert variant["name"] == "patch (uniform blend)" and variant["variant_of"] == "patch"
    assert variant["inference_options"] == {"blend": "uniform"} and "inference_options" not in trained
    assert variant["train_peak_rss"] == trained["train_peak_rss"] and variant["epochs_run"] == 1
    assert 0.0 <= variant["miou"] <= 1.0
    table = (out / "results.md").read_text()
    assert '- patch (uniform blend): the weights of patch, predicted with `{"blend": "uniform"}`' in table
    # scoring again replaces the row instead of adding one, and keeps the trained row's budget
    # whatever spec the later invocation was given
    later = MethodSpec(method="patch", options=spec.options, epochs=4, variants=spec.variants)
    score_variants(later, results, out, tiny_dataset)
    assert [m["name"] for m in results["methods"]] == ["patch", "patch (uniform blend)"]
    assert results["methods"][1]["spec"]["epochs"] == 1 and results["methods"][1]["spec"]["batch_size"] == 2
    assert json.loads((out / "results.json").read_text())["methods"][1]["miou"] == results["methods"][1]["miou"]


def test_rows_from_separate_runs_name_their_own_run():
    from gigaseg.bench.compare import markdown

    def row(name, commit):
        return {
            "name": name,
            "spec": {"epochs": 2, "options": {}, "batch_size": 2, "lr": 1e-3},
            "miou": 0.5,
            "group_iou": {},
            "per_class_iou": {"a": 0.5},
            "train_peak_rss": 2**30,
            "predict_peak_rss": 2**30,
            "megapixels_per_second": 1.0,
            "train_seconds": 10.0,
            "measured": {"commit": commit, "date": "2026-12-03", "command": f"compare --methods {name}"},
        }

    results = {
        "machine": {
            "cpu": "test",
            "cores": 2,
            "gpu": None,
            "torch": "2",
            "commit": "bbb",
            "command": "compare --methods b",
            "date": "2026-12-03",
        },
        "data": "d",
        "split": "val",
        "encoder": "e",
        "seed": 0,
        "class_groups": {},
        "methods": [row("a", "aaa"), row("b", "bbb")],
        "notes": ["A note written by hand."],
    }
    text = markdown(results)
    assert "- a: commit aaa, 2026-12-03, `compare --methods a`" in text
    assert "- b: commit bbb, 2026-12-03, `compare --methods b`" in text
    assert text.index("Measured (rows from separate runs") < text.index("A note written by hand.")


def test_epoch_spread_of_the_last_stage_per_class_group():
    from gigaseg.bench import comparison_markdown, epoch_spread

    def row(stage, miou, a, b, c):
        return {"stage": stage, "val_miou": str(miou), "val_iou_a": str(a), "val_iou_b": b, "val_iou_c": c}

    history = [
        row("one", 0.9, 0.9, 0.9, 0.9),  # an earlier stage: left out
        row("two", 0.2, 0.1, 0.3, 0.5),
        row("two", 0.4, 0.3, 0.5, 0.5),
        row("two", 0.6, 0.2, float("nan"), 0.6),  # a group's mean skips a NaN class
        {"stage": "two", "val_miou": "", "train_loss": 1.0},  # no validation that epoch
    ]
    spread = epoch_spread(history, {"ab": ["a", "b"], "c": ["c"]})
    assert spread["stage"] == "two" and spread["epochs"] == 3
    assert spread["miou"] == {"mean": pytest.approx(0.4), "sd": pytest.approx(0.2), "min": 0.2, "max": 0.6}
    # ab per epoch: 0.2, 0.4, 0.2 -> mean 0.8 / 3, sd sqrt(((0.2 - m)^2 * 2 + (0.4 - m)^2) / 2)
    m = 0.8 / 3
    assert spread["ab"]["mean"] == pytest.approx(m)
    assert spread["ab"]["sd"] == pytest.approx((((0.2 - m) ** 2 * 2 + (0.4 - m) ** 2) / 2) ** 0.5)
    assert spread["c"] == {
        "mean": pytest.approx(1.6 / 3),
        "sd": pytest.approx(0.0577350, abs=1e-6),
        "min": 0.5,
        "max": 0.6,
    }
    assert epoch_spread(history, {"d": ["d"]}) is None  # no per-class column for d (an older history)
    assert epoch_spread([{"stage": "x", "train_loss": 1.0}], {}) is None  # trained without validation
    results = {
        "machine": {"cpu": "t", "cores": 2, "gpu": None, "torch": "2", "commit": "c", "command": "x", "date": "d"},
        "data": "d",
        "split": "val",
        "encoder": "e",
        "seed": 0,
        "class_groups": {"ab": ["a", "b"], "c": ["c"]},
        "methods": [
            {
                "name": "m",
                "spec": {"epochs": 2, "options": {}, "batch_size": 2, "lr": 1e-3},
                "miou": 0.6,
                "group_iou": {"ab": 0.2, "c": 0.6},
                "per_class_iou": {"a": 0.2, "b": 0.2, "c": 0.6},
                "train_peak_rss": 2**30,
                "predict_peak_rss": 2**30,
                "megapixels_per_second": 1.0,
                "train_seconds": 10.0,
                "epoch_spread": spread,
            }
        ],
    }
    text = comparison_markdown(results)
    assert "| method | stage | epochs | mIoU | ab IoU | c IoU |" in text
    assert (
        "| m | two | 3 | 0.400 ± 0.200 (0.200-0.600) | 0.267 ± 0.115 (0.200-0.400) | 0.533 ± 0.058 (0.500-0.600) |"
        in text
    )
