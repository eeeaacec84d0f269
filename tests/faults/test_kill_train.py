"""``gigaseg train`` killed (SIGKILL) at chosen points, or out of disk space mid-save, then resumed.

The kills are real ``python -m gigaseg train`` children stopped at fault points (hook/sitecustomize.py):
inside an epoch, inside a checkpoint's save (written under its temporary name, not yet renamed) and
between the saves of one epoch's checkpoints. ``--resume`` must end with the checkpoints and the metrics
of an uninterrupted run of the same command: the same weights, bit for bit, in ``last.ckpt``,
``best.ckpt`` and ``best-global.ckpt``, and one metrics row per epoch.

The runs have no validation split, so ``best.ckpt`` is saved every epoch: an interrupted run whose
``best.ckpt`` lags behind its ``last.ckpt`` shows at the end.
"""

from __future__ import annotations

import csv
import errno
import os

import pytest
import torch

from gigaseg.cli import main

from .helpers import Child, one_line_error, run_child

EPOCHS = 3
CHECKPOINTS = ("last.ckpt", "best.ckpt", "best-global.ckpt")


def command(data, out, *more) -> list[str]:
    return [
        "train",
        "--method",
        "global",
        "--encoder",
        "test_resnet",
        "--set",
        "input_size=64",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "2",
        "--seed",
        "1",
        "--data",
        str(data),
        "--out",
        str(out),
        *more,
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, make_tiny_dataset):
    """Three training images (two steps per epoch) and no validation split."""
    return make_tiny_dataset(tmp_path_factory.mktemp("train") / "data", count=3, val=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    """The run folder of the same command run without interruption (in this process)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(command(dataset, run)) == 0
    return run


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]["state_dict"]


def epoch(path) -> int:
    return torch.load(path, weights_only=True)["train"]["epoch"]


def metrics_epochs(run) -> list[int]:
    with open(run / "metrics.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def assert_same_run(run, reference) -> None:
    for name in CHECKPOINTS:
        ours, theirs = weights(run / name), weights(reference / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs from the uninterrupted run"
    assert metrics_epochs(run) == metrics_epochs(reference) == list(range(EPOCHS))


def test_dataset_has_no_validation_split_and_trains_two_steps_an_epoch(dataset, uninterrupted):
    assert metrics_epochs(uninterrupted) == list(range(EPOCHS))
    with open(uninterrupted / "metrics.csv", newline="") as handle:
        assert not any(key.startswith("val_") for key in next(csv.DictReader(handle)))


def test_train_killed_at_three_points_resumes_to_the_uninterrupted_weights(tmp_path, dataset, uninterrupted):
    run, logs = tmp_path / "run", tmp_path / "logs"

    # 1. killed at the first step of epoch 2 (steps 1 and 2 were epoch 1, saved as last.ckpt)
    child = Child(logs, *command(dataset, run), stop="step:3")
    child.wait_stopped()
    child.kill()
    assert epoch(run / "last.ckpt") == 0

    # 2. killed while epoch 2's last.ckpt is written under its temporary name: the old one stays whole
    child = Child(logs, *command(dataset, run, "--resume"), stop="saving=last.ckpt:1")
    child.wait_stopped()
    child.kill()
    assert (run / ".last.ckpt.partial").exists() and epoch(run / "last.ckpt") == 0

    # 3. killed after the last epoch's last.ckpt is in place, before or after its best.ckpt (the order is
    #    gigaseg's): whatever was saved must agree with what a resume does
    child = Child(logs, *command(dataset, run, "--resume"), stop="saved=last.ckpt:2")
    child.wait_stopped()
    child.kill()
    assert epoch(run / "last.ckpt") == EPOCHS - 1

    # 4. the same command with --resume finishes the run
    child = run_child(logs, *command(dataset, run, "--resume"))
    assert child.code == 0, child.stderr
    assert_same_run(run, uninterrupted)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporary files were left behind"


def test_disk_full_while_saving_a_checkpoint_is_one_line_keeps_last_ckpt_and_resumes(
    tmp_path, dataset, uninterrupted, capsys, monkeypatch
):
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if os.fspath(f).endswith(".last.ckpt.partial"):
            saves.append(f)
            if len(saves) == 2:  # epoch 2's last.ckpt: some bytes reach the disk, then it is full
                with open(f, "wb") as handle:
                    handle.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(command(dataset, run)) == 2
    one_line_error(capsys.readouterr().err, "train", "No space left on device", str(run / ".last.ckpt.partial"))
    assert epoch(run / "last.ckpt") == 0  # the previous checkpoint, whole and loadable
    assert not (run / ".last.ckpt.partial").exists()

    monkeypatch.setattr(torch, "save", real_save)
    assert main(command(dataset, run)) == 2  # the same command without --resume: refused, pointing at it
    one_line_error(capsys.readouterr().err, "train", str(run), "--resume")
    assert main(command(dataset, run, "--resume")) == 0
    assert_same_run(run, uninterrupted)
