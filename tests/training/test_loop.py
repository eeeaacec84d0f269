"""The shared training loop: files it writes, exact resume, budgets, stage selection."""

import csv

import numpy as np
import pytest
import torch

from gigaseg.api import train
from gigaseg.errors import BudgetError, ConfigError
from gigaseg.methods.baselines import recipe as baselines
from gigaseg.training.recipe import TrainSettings


def settings(**kw):
    base = dict(epochs=2, batch_size=2, progress=False, seed=1)
    base.update(kw)
    return TrainSettings(**base)


OPTIONS = {"input_size": 64}


def state(run):
    return torch.load(run / "last.ckpt", weights_only=True)["model"]["state_dict"]


def test_run_folder_contents_and_learning(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    result = train(
        "global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings(epochs=3, lr=1e-3)
    )
    assert {p.name for p in run.iterdir()} >= {
        "last.ckpt",
        "best.ckpt",
        "best-global.ckpt",
        "metrics.csv",
        "config.yaml",
    }
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= float(r["val_miou"]) <= 1.0 for r in rows)
    for r in rows:  # the per-class columns: their mean over the scored classes is the mIoU
        per_class = [float(r[f"val_iou_{name}"]) for name in ("red", "green", "blue")]
        assert float(r["val_miou"]) == pytest.approx(np.nanmean(per_class))
    assert len(result["history"]) == 3
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["train"]["epoch"] == 2 and ckpt["data"]["classes"] == ["red", "green", "blue"]


def test_resume_continues_exactly(tiny_dataset, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train("global", tiny_dataset, straight, encoder="test_resnet", options=OPTIONS, settings=settings())

    interrupted = tmp_path / "interrupted"
    real_step = baselines.supervised_step

    def step_then_die(ctx, batch):
        # dies at the first batch of the second epoch, after epoch 0 was checkpointed
        if (interrupted / "last.ckpt").exists():
            raise KeyboardInterrupt
        return real_step(ctx, batch)

    monkeypatch.setattr(baselines, "supervised_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train("global", tiny_dataset, interrupted, encoder="test_resnet", options=OPTIONS, settings=settings())
    monkeypatch.setattr(baselines, "supervised_step", real_step)
    assert torch.load(interrupted / "last.ckpt", weights_only=True)["train"]["epoch"] == 0

    train("global", tiny_dataset, interrupted, encoder="test_resnet", options=OPTIONS, settings=settings(), resume=True)
    a, b = state(straight), state(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    rows = list(csv.DictReader(open(interrupted / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]


def _drop_saved_option(checkpoint, name):
    payload = torch.load(checkpoint, weights_only=True)
    del payload["model"]["config"]["options"][name]
    torch.save(payload, checkpoint)


def test_resume_accepts_a_checkpoint_from_before_an_option_existed(tiny_dataset, tmp_path):
    # a run started by an older gigaseg lacks options added since; left at their defaults they match
    run = tmp_path / "run"
    train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings(epochs=1))
    _drop_saved_option(run / "last.ckpt", "loss")
    train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings(), resume=True)
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [0, 1]


def test_resume_with_another_value_of_an_option_is_a_clear_error(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings(epochs=1))
    _drop_saved_option(run / "last.ckpt", "loss")  # the saved run used the default loss, focal
    with pytest.raises(ConfigError, match=r"last.ckpt: was trained with .*'loss': 'focal'.*not .*'loss': 'ce'"):
        train(
            "global",
            tiny_dataset,
            run,
            encoder="test_resnet",
            options={**OPTIONS, "loss": "ce"},
            settings=settings(),
            resume=True,
        )


def test_budget_too_small_names_the_smallest_that_works(tiny_dataset, tmp_path):
    with pytest.raises(BudgetError, match=r"too small for training stage 'patch': the smallest that works is about"):
        train(
            "patch",
            tiny_dataset,
            tmp_path / "run",
            encoder="test_resnet",
            options={"patch_size": 64, "overlap": 16},
            settings=settings(max_memory=10**6),
        )


def test_unknown_stage_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="global has no stage 'local'; its stages are global"):
        train(
            "global",
            tiny_dataset,
            tmp_path / "run",
            encoder="test_resnet",
            options=OPTIONS,
            stage="local",
            settings=settings(),
        )


def test_sub_batches_sum_to_the_whole_batch_gradient():
    from types import SimpleNamespace

    from gigaseg.methods.registry import create_model

    torch.manual_seed(0)
    model = create_model("global", encoder="test_resnet", num_classes=3, input_size=32, loss="ce").eval()
    batch = {"image": torch.rand(5, 3, 32, 32), "label": torch.randint(0, 3, (5, 32, 32))}
    calls = []

    def run(sub_batch):
        model.zero_grad()
        calls.clear()
        ctx = SimpleNamespace(
            model=model,
            wrapped=model,
            sub_batch=sub_batch,
            stage=SimpleNamespace(options={}),
            backward=lambda loss: (calls.append(1), loss.backward()),
        )
        logged = baselines.supervised_step(ctx, batch)["loss"]
        return logged, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole_loss, whole = run(5)
    assert len(calls) == 1
    split_loss, split = run(2)
    assert len(calls) == 3  # 2 + 2 + 1 samples
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_init_needs_the_same_architecture_but_not_the_same_inference_options(tiny_dataset, tmp_path):
    patch = {"patch_size": 64, "overlap": 16}
    train("patch", tiny_dataset, tmp_path / "first", encoder="test_resnet", options=patch, settings=settings(epochs=1))
    # overlap and blend only change how the trained network predicts: the weights start this run
    train(
        "patch",
        tiny_dataset,
        tmp_path / "second",
        encoder="test_resnet",
        options={**patch, "overlap": 32},
        settings=settings(epochs=1),
        init=tmp_path / "first" / "last.ckpt",
    )
    saved = torch.load(tmp_path / "second" / "last.ckpt", weights_only=True)["model"]["config"]["options"]
    assert saved["overlap"] == 32
    with pytest.raises(
        ConfigError,
        match=r"first.last\.ckpt: was trained as .*'patch_size': 64.*differs from "
        r"this run's .*'patch_size': 32",
    ):
        train(
            "patch",
            tiny_dataset,
            tmp_path / "third",
            encoder="test_resnet",
            options={"patch_size": 32, "overlap": 8},
            settings=settings(epochs=1),
            init=tmp_path / "first" / "last.ckpt",
        )


def test_a_stage_with_an_unknown_schedule_is_refused():
    from gigaseg.errors import ConfigError
    from gigaseg.training.loop import _schedule
    from gigaseg.training.recipe import Stage

    stage = Stage(name="s", epochs=1, lr=1.0, batch_size=1, make_data=None, step=None, schedule="polly")
    with pytest.raises(ConfigError, match="unknown schedule 'polly'; use poly, step or constant"):
        _schedule(stage, total_steps=10, steps_per_epoch=5)
    assert (
        _schedule(
            Stage(name="s", epochs=1, lr=1.0, batch_size=1, make_data=None, step=None, schedule="constant"), 10, 5
        )(7)
        == 1.0
    )
