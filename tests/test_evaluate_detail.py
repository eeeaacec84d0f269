"""gigaseg evaluate scores detail next to IoU: boundary F1 and thin-structure recall."""

from __future__ import annotations

import numpy as np
import pytest

import gigaseg
from gigaseg.cli import main


def test_evaluate_reports_boundary_f1_and_thin_recall_per_class(tiny_dataset, tiny_checkpoint):
    summary = gigaseg.evaluate(tiny_checkpoint, tiny_dataset, split="val", progress=False)
    detail = summary["detail"]
    assert detail["tolerance"] == 2 and set(detail["per_class"]) == {"red", "green", "blue"}
    for row in detail["per_class"].values():
        assert row["boundary_f1"] is None or 0.0 <= row["boundary_f1"] <= 1.0
    assert 0.0 <= detail["mean_boundary_f1"] <= 1.0
    assert "detail" not in gigaseg.evaluate(tiny_checkpoint, tiny_dataset, split="val", progress=False, detail=False)


def test_a_perfect_prediction_scores_boundary_f1_1(tmp_path, monkeypatch, tiny_dataset, tiny_checkpoint):
    """A model that returns the ground truth itself scores 1.0 everywhere (the metrics see the same bands)."""
    dataset = gigaseg.load_dataset(tiny_dataset, split="val")
    with dataset[0] as sample:
        truth = sample.mask.read()[..., 0]
    from gigaseg.inference import stream

    real = stream.predict_image

    def oracle(predictor, source, out, *, on_band=None, **kwargs):
        def band(window, labels):
            on_band(window, truth[window.slices])

        return real(predictor, source, out, on_band=band, **kwargs)

    monkeypatch.setattr(stream, "predict_image", oracle)
    summary = gigaseg.evaluate(tiny_checkpoint, dataset, progress=False)
    assert summary["miou"] == pytest.approx(1.0)
    assert summary["detail"]["mean_boundary_f1"] == pytest.approx(1.0)
    assert summary["detail"]["mean_thin_recall"] in (None, pytest.approx(1.0))


def test_cli_evaluate_prints_the_detail_columns(capsys, tiny_dataset, tiny_checkpoint, tmp_path):
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--data",
            str(tiny_dataset),
            "--json",
            str(tmp_path / "scores.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "boundary F1" in out and "thin recall" in out and "mean boundary F1" in out
    import json

    assert np.isfinite(json.loads((tmp_path / "scores.json").read_text())["detail"]["mean_boundary_f1"])
