"""Two-process DDP training on CPU (gloo), launched the way users launch it: torchrun."""

import os
import subprocess
import sys

import torch

from gigaseg.training.checkpoint import load_checkpoint


def test_two_process_ddp_run_writes_the_same_checkpoint_format(tiny_dataset, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "gigaseg",
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
        "2",
        "--batch-size",
        "1",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = load_checkpoint(run / "last.ckpt")
    assert payload["train"]["epoch"] == 1 and payload["train"]["settings"]["devices"] == 2
    assert payload["model"]["config"]["method"] == "global"
    # the checkpoint of a DDP run loads into a plain model: no "module." prefixes
    assert not any(k.startswith("module.") for k in payload["model"]["state_dict"])
    raw = torch.load(run / "best.ckpt", weights_only=True)
    assert set(raw) >= {"format", "version", "model", "data", "train", "metrics"}
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + one row per epoch, from rank 0 only
