"""The shared training loop: files it writes, exact resume, budgets, stage selection."""

import csv

import pytest
import torch

from gigaseg.api import train
from gigaseg.errors import BudgetError, ConfigError
from gigaseg.methods import baselines
from gigaseg.train.recipe import TrainSettings


def settings(**kw):
    base = dict(epochs=2, batch_size=2, progress=False, seed=1)
    base.update(kw)
    return TrainSettings(**base)


OPTIONS = {"input_size": 64}


def state(run):
    return torch.load(run / "last.ckpt", weights_only=True)["model"]["state_dict"]


def test_run_folder_contents_and_learning(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    result = train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS,
                   settings=settings(epochs=3, lr=1e-3))
    assert {p.name for p in run.iterdir()} >= {"last.ckpt", "best.ckpt", "best-global.ckpt", "metrics.csv", "config.yaml"}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= float(r["val_miou"]) <= 1.0 for r in rows)
    assert len(result["history"]) == 3
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["train"]["epoch"] == 2 and ckpt["data"]["classes"] == ["red", "green", "blue"]


def test_resume_continues_exactly(tiny_dataset, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train("global", tiny_dataset, straight, encoder="test_resnet", options=OPTIONS, settings=settings())

    interrupted = tmp_path / "interrupted"
    real_step = baselines.supervised_step
    seen = {"epochs": set()}

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


def test_budget_too_small_names_the_smallest_that_works(tiny_dataset, tmp_path):
    with pytest.raises(BudgetError, match=r"too small for training stage 'patch': the smallest that works is about"):
        train("patch", tiny_dataset, tmp_path / "run", encoder="test_resnet", options={"patch_size": 64, "overlap": 16},
              settings=settings(max_memory=10**6))


def test_unknown_stage_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="global has no stage 'local'; its stages are global"):
        train("global", tiny_dataset, tmp_path / "run", encoder="test_resnet", options=OPTIONS, stage="local",
              settings=settings())
