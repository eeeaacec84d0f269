"""Training that diverges stops with a one-line error and never saves non-finite weights."""

import csv

import pytest
import torch

from gigaseg.api import train
from gigaseg.cli import main
from gigaseg.errors import GigasegError, TrainingDiverged
from gigaseg.methods.baselines import recipe as baselines
from gigaseg.methods.registry import create_model
from gigaseg.training.checkpoint import save_checkpoint
from gigaseg.training.recipe import TrainSettings

OPTIONS = {"input_size": 64}


def settings(**kw):
    return TrainSettings(**{"epochs": 1, "batch_size": 2, "progress": False, "seed": 1, **kw})


def finite(path) -> bool:
    state = torch.load(path, weights_only=True)["model"]["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_diverging_training_stops_and_keeps_the_last_good_checkpoints_for_resume(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings(lr=1e-3))
    good = {name: (run / name).read_bytes() for name in ("last.ckpt", "best.ckpt", "best-global.ckpt")}

    # --lr 1e12 on resume: the rate is taken (not the saved one), and the weights blow up in epoch 2
    with pytest.raises(TrainingDiverged) as caught:
        train(
            "global",
            tiny_dataset,
            run,
            encoder="test_resnet",
            options=OPTIONS,
            settings=settings(epochs=2, lr=1e12),
            resume=True,
        )
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    for fragment in ("stage 'global'", "epoch 2/2", "step ", "learning rate", "--lr", "bad input values", "last.ckpt"):
        assert fragment in message, message
    assert "16-mixed" not in message  # fp16 overflow is suggested only under --precision 16-mixed
    # nothing was overwritten: the good epoch-1 checkpoints stay, and nothing was logged for epoch 2
    assert {name: (run / name).read_bytes() for name in good} == good
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [0]

    # ... so the run resumes from them with a sane rate
    result = train(
        "global",
        tiny_dataset,
        run,
        encoder="test_resnet",
        options=OPTIONS,
        settings=settings(epochs=2, lr=1e-3),
        resume=True,
    )
    assert [row["epoch"] for row in result["history"]][-1] == 1
    assert finite(run / "last.ckpt") and finite(run / "best.ckpt")


def test_diverging_training_from_scratch_writes_no_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged in stage 'global', epoch 1/1, step \d/2"):
        train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings(lr=1e12))
    assert not (run / "last.ckpt").exists() and not (run / "best.ckpt").exists()


def test_non_finite_gradients_stop_the_run_naming_stage_epoch_and_step(tiny_dataset, tmp_path, monkeypatch):
    real_step = baselines.supervised_step

    def nan_gradients(ctx, batch):
        logged = real_step(ctx, batch)
        next(p for p in ctx.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return logged  # the loss itself is finite

    monkeypatch.setattr(baselines, "supervised_step", nan_gradients)
    with pytest.raises(TrainingDiverged, match=r"stage 'global', epoch 1/1, step 1/2: the gradients are not finite"):
        train("global", tiny_dataset, tmp_path / "run", encoder="test_resnet", options=OPTIONS, settings=settings())
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_non_finite_loss_stops_the_run_naming_stage_epoch_and_step(tiny_dataset, tmp_path, monkeypatch):
    real_step = baselines.supervised_step
    calls = []

    def nan_loss_at_second_step(ctx, batch):
        logged = real_step(ctx, batch)
        calls.append(1)
        return {"loss": float("nan")} if len(calls) == 2 else logged

    monkeypatch.setattr(baselines, "supervised_step", nan_loss_at_second_step)
    with pytest.raises(TrainingDiverged, match=r"stage 'global', epoch 1/1, step 2/2: the loss 'loss' is nan"):
        train("global", tiny_dataset, tmp_path / "run", encoder="test_resnet", options=OPTIONS, settings=settings())


def test_fp16_overflow_is_named_as_a_likely_cause_under_16_mixed():
    from gigaseg.training.loop import divergence_message

    text = divergence_message("s", 0, 3, 4, 10, "the loss 'loss' is inf", 0.1, "16-mixed", "run")
    assert "fp16 overflow" in text and "--precision 16-mixed" in text
    assert "fp16" not in divergence_message("s", 0, 3, 4, 10, "the loss 'loss' is inf", 0.1, "32-true", "run")


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_file(tmp_path):
    model = create_model("global", encoder="test_resnet", num_classes=3, input_size=32)
    data = {"classes": ["a", "b", "c"], "palette": [[0, 0, 0]] * 3, "ignore_index": 255, "normalization": {}}
    path = save_checkpoint(tmp_path / "last.ckpt", model, data)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(GigasegError, match=r"last.ckpt: refusing to save non-finite weights"):
        save_checkpoint(path, model, data)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*"))


def test_cli_diverging_training_is_a_one_line_error_with_exit_code_2(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--method",
            "global",
            "--data",
            str(tiny_dataset),
            "--out",
            str(run),
            "--encoder",
            "test_resnet",
            "--set",
            "input_size=64",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--lr",
            "1e12",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("gigaseg train: error: training diverged in stage 'global'"), err
    assert "mIoU" not in captured.out  # no validation score of a NaN model is printed
    assert not (run / "last.ckpt").exists()
