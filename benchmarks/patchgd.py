"""PatchGD with a global patch: training memory at 4096x4096 and accuracy against its baselines.

Every training and evaluation runs in a fresh child process through the CLI
(``gigaseg train`` / ``gigaseg evaluate``) under ``gigaseg.bench.measure_command``,
so each peak RSS is exactly that process's (next to a child that only imports torch).
No GPU is used: on CUDA the budget would count ``torch.cuda.max_memory_allocated``
(the trainer's ``peak_memory`` column), here every figure is CPU RSS.

Parts (``--parts``, default all; each updates its own entry of the results file):

``memory``
    Classification of 4096x4096 RGB synthetic images (UltraMNIST-style digits, turned to
    RGB) with 256-px patches and a ResNet-50 theta1 (latent 256, as the paper), trained
    with ``--max-memory 4GB``: the trainer picks k. Then the downsampled baseline (the
    same ResNet-50 on the whole image resized) is trained at decreasing input sizes, from
    the largest whose estimate fits twice the budget, until one fits 4 GB: the largest
    input the baseline can use at the same memory. Sizes whose estimate exceeds what this
    shared machine can hold are reported as estimates only, never run.

``ultramnist``
    ``gigaseg synth ultramnist`` at 512x512 (two digits: one large, 30-60% of the side, one
    small, 8-24 px; values 6 and 9, so the class (sum mod 10: 2, 5 or 8) needs both digits
    and 6 vs 9 needs detail a 4x downsample loses), then at one memory budget: PatchGD
    with the global patch, PatchGD without it, and the downsampled baseline at the largest
    input that fits the budget (measured). Same encoder, epochs, batch size and
    learning rate for all. With ``--pretrained FILE`` every run's theta1 starts from that
    weights file (the paper starts from ImageNet weights; ``benchmarks/pretrain_digits.py``
    makes a local stand-in) and the results go to the ``ultramnist_pretrained`` part.
    ``--ultramnist-size`` draws a larger canvas (part ``ultramnist_<side>[_pretrained]``) and
    ``--ultramnist-min-digit`` the small digit's size, e.g. 8-24 px digits on 1024 px, where
    the downsample that fits the budget shrinks them below what an encoder can read.
    ``--ultramnist-variants`` picks the framework runs (``ULTRAMNIST_VARIANTS``: also the
    global latent concatenated to Z instead of added, its own BatchNorm statistics, global
    dropout). ``--seeds`` (either accuracy part) trains the framework runs (``--seed-runs``:
    only these) again from other seeds.

``landcover``
    The fine-structure classes (road, stream) of ``gigaseg synth landcover`` as a binary
    task (``--landcover-task context``: vegetation far from water instead, a control whose
    label only context decides): ``patchgd_segmenter`` with and without the global patch against the ``global``
    baseline (smp U-Net on the downsampled image) at the same budget; F1, IoU, balanced
    accuracy and likelihood ratios of the positive class from ``gigaseg evaluate``.

    python benchmarks/patchgd.py [--parts memory,ultramnist,landcover] [--work DIR] [--keep]

``--quick`` runs the parts on less data for fewer epochs; ``--smoke`` runs every part's path
in seconds (``SMOKE``: 256-px images with 64-px patches and a test_resnet theta1, 128-px
accuracy sets; UltraMNIST with one framework run with the global patch, land cover with the run
without it), writing only to
``--work`` and ``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GB = 10**9
PYTHON = sys.executable

#: sizes of a full (or ``--quick``) run and of ``--smoke``; ``SIZES`` is the one in use
FULL = {
    "memory": {
        "side": 4096,
        "patch": 256,
        "encoder": "resnet50",
        "latent": 256,
        "sizes": [4096, 2048, 1536, 1024, 768, 512, 384, 256],
    },
    "ultramnist": {"side": 512, "count": None, "patch": 128, "latent": 64, "batch_size": 8, "variants": None},
    "landcover": {"size": None, "count": None, "patch": 128, "batch_size": 2, "variants": None},
    "probe_sizes": (1024, 768, 512, 384, 256, 192, 128),
}
SMOKE = {
    "memory": {"side": 256, "patch": 64, "encoder": "test_resnet", "latent": 16, "sizes": [256, 128]},
    "ultramnist": {
        "side": 128,
        "count": 10,
        "patch": 64,
        "latent": 16,
        "batch_size": 4,
        "variants": ["patchgd_global"],
    },
    "landcover": {"size": 128, "count": 4, "patch": 64, "batch_size": 2, "variants": []},
    "probe_sizes": (64,),
}
SIZES = FULL


def gigaseg(*args) -> list[str]:
    return [PYTHON, "-m", "gigaseg", *[str(a) for a in args]]


#: seconds a training child may run before it is killed (a guard against hangs, not a budget: the
#: UltraMNIST continuations take over an hour each when several share the 2 cores)
TRAIN_TIMEOUT = 12 * 3600
#: ``--resume-runs``: a failed or killed run continues from its last.ckpt instead of starting over
RESUME_RUNS = False


def run_measured(argv, what: str, timeout: float = 3600) -> dict:
    from gigaseg.bench import measure_command

    print(f"[patchgd bench] {what}: {' '.join(argv[2:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    report = measure_command(argv, timeout=timeout, capture_output=True, baseline=True, env=env)
    out = report.to_dict()
    if report.returncode != 0:
        out["stderr_tail"] = (report.stderr or "")[-2000:]
        print(f"[patchgd bench]   FAILED ({report.returncode}): {out['stderr_tail'][-600:]}", flush=True)
    else:
        print(f"[patchgd bench]   peak RSS {report.peak_rss / GB:.2f} GB, {report.wall_s:.0f} s", flush=True)
    return out


def history(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


#: the land-cover part's runs with the global patch: results key -> options over the part's common ones
LANDCOVER_VARIANTS = {
    # the paper's gradient graph, then theta1's gradient through the global patch balanced and detached
    "patchgd_global": {"global_patch": True, "global_gradient": "full"},
    "patchgd_global_balanced": {"global_patch": True, "global_gradient": "balanced"},
    "patchgd_global_none": {"global_patch": True, "global_gradient": "none"},
    # balanced with the global patch normalised as at inference (running statistics)
    "patchgd_global_balanced_running": {"global_patch": True, "global_gradient": "balanced", "global_norm": "running"},
    # balanced, half of the training forwards without the global features
    "patchgd_global_balanced_dropout": {"global_patch": True, "global_gradient": "balanced", "global_dropout": 0.5},
    # detached, the global patch with BatchNorm statistics of its own (the setting that helps on UltraMNIST)
    "patchgd_global_separate_none": {"global_patch": True, "global_gradient": "none", "global_norm": "separate"},
}
LANDCOVER_DEFAULT_VARIANTS = [
    "patchgd_global",
    "patchgd_global_balanced",
    "patchgd_global_none",
    "patchgd_global_balanced_running",
]

#: the UltraMNIST part's runs of the framework: results key -> options over the part's common ones
ULTRAMNIST_VARIANTS = {
    "patchgd_global": {"global_patch": True},
    "patchgd_no_global": {"global_patch": False},
    # the segmenter's default: theta1's gradient through the global patch scaled by k / patches
    "patchgd_global_balanced": {"global_patch": True, "global_gradient": "balanced"},
    # the global latent in channels of its own, so theta2 weighs it apart from the patch latents
    "patchgd_global_concat": {"global_patch": True, "fusion": "concat"},
    "patchgd_global_concat_balanced": {"global_patch": True, "fusion": "concat", "global_gradient": "balanced"},
    # the global patches keep BatchNorm running statistics of their own for inference
    "patchgd_global_separate": {"global_patch": True, "global_norm": "separate"},
    # ... and half of the training forwards without the global latent, so theta2 must read Z too
    "patchgd_global_dropout": {"global_patch": True, "global_norm": "separate", "global_dropout": 0.5},
    "patchgd_global_dropout_balanced": {
        "global_patch": True,
        "global_norm": "separate",
        "global_dropout": 0.5,
        "global_gradient": "balanced",
    },
    "patchgd_global_dropout75_balanced": {
        "global_patch": True,
        "global_norm": "separate",
        "global_dropout": 0.75,
        "global_gradient": "balanced",
    },
    # theta1 learns from the patches only: the global latent cannot be shaped to tell training images apart
    "patchgd_global_separate_none": {"global_patch": True, "global_norm": "separate", "global_gradient": "none"},
    "patchgd_global_dropout_none": {
        "global_patch": True,
        "global_norm": "separate",
        "global_dropout": 0.5,
        "global_gradient": "none",
    },
    "patchgd_global_concat_separate_none": {
        "global_patch": True,
        "fusion": "concat",
        "global_norm": "separate",
        "global_gradient": "none",
    },
}
ULTRAMNIST_DEFAULT_VARIANTS = ["patchgd_global", "patchgd_no_global", "patchgd_global_balanced"]

#: the framework's runs of an accuracy part, in table order
FRAMEWORK_RUNS = [
    ("patchgd_global", "PatchGD + global patch (the paper's gradient)"),
    ("patchgd_global_balanced", "PatchGD + global patch, balanced gradient"),
    ("patchgd_global_none", "PatchGD + global patch, no gradient through it"),
    ("patchgd_global_balanced_running", "PatchGD + global patch, balanced, running BatchNorm statistics"),
    ("patchgd_global_concat", "PatchGD + global patch concatenated to Z (the paper's gradient)"),
    ("patchgd_global_concat_balanced", "PatchGD + global patch concatenated to Z, balanced gradient"),
    ("patchgd_global_separate", "PatchGD + global patch with BatchNorm statistics of its own"),
    ("patchgd_global_dropout", "PatchGD + global patch, own statistics, global dropout 0.5"),
    (
        "patchgd_global_dropout_balanced",
        "PatchGD + global patch, own statistics, global dropout 0.5, balanced gradient",
    ),
    (
        "patchgd_global_dropout75_balanced",
        "PatchGD + global patch, own statistics, global dropout 0.75, balanced gradient",
    ),
    ("patchgd_global_balanced_dropout", "PatchGD + global patch, balanced gradient, global dropout 0.5"),
    ("patchgd_global_separate_none", "PatchGD + global patch, own statistics, no gradient through it"),
    (
        "patchgd_global_concat_separate_none",
        "PatchGD + global patch concatenated to Z, own statistics, no gradient through it",
    ),
    (
        "patchgd_global_dropout_none",
        "PatchGD + global patch, own statistics, global dropout 0.5, no gradient through it",
    ),
    ("patchgd_no_global", "PatchGD, no global patch"),
]

#: earlier results by run name (``--reuse``): a run with the same settings is not repeated
REUSE: dict[str, dict] = {}
#: settings that results from before they were recorded ran with
SETTING_DEFAULTS = {"init": None, "seed": 0, "pretrained": None}


def train_and_evaluate(
    name: str,
    method: str,
    data: Path,
    work: Path,
    *,
    encoder: str,
    options: dict,
    epochs: int,
    batch_size: int,
    lr: float,
    max_memory: str | None,
    seed: int = 0,
    init: Path | None = None,
    pretrained: str | None = None,
) -> dict:
    """Train run ``name`` (from ``init``'s weights when given, else theta1 from the ``pretrained``
    weights file when given) and score its best checkpoint on the val split."""
    earlier = REUSE.get(name)
    settings = {
        "method": method,
        "encoder": encoder,
        "options": options,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_memory": max_memory,
        "init": None if init is None else str(init),
        "seed": seed,
        "pretrained": pretrained,
    }
    if (
        earlier
        and earlier.get("train", {}).get("returncode") == 0
        and "scores" in earlier
        and all(earlier.get(k, SETTING_DEFAULTS.get(k)) == v for k, v in settings.items())
    ):
        print(f"[patchgd bench] {name}: reusing the earlier result (same settings)", flush=True)
        return earlier
    run = work / "runs" / name
    resume = RESUME_RUNS and (run / "last.ckpt").exists()
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
    argv = gigaseg(
        "train",
        "--method",
        method,
        "--data",
        data,
        "--out",
        run,
        "--encoder",
        encoder,
        "--epochs",
        epochs,
        "--batch-size",
        batch_size,
        "--lr",
        lr,
        "--seed",
        seed,
    )
    for key, value in options.items():
        argv += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    if max_memory:
        argv += ["--max-memory", max_memory]
    if resume:
        argv += ["--resume"]  # the peak and wall are then the resumed part's
    elif init is not None:
        argv += ["--init", str(init)]
    elif pretrained:
        argv += ["--pretrained", pretrained]
    result = {"name": name, **settings}
    result["train"] = run_measured(argv, f"train {name}", timeout=TRAIN_TIMEOUT)
    if resume:
        result["train"]["resumed"] = True
    if result["train"]["returncode"] != 0:
        return result
    result["history"] = history(run)
    evaluation = work / "runs" / f"{name}.eval.json"
    argv = gigaseg("evaluate", "--checkpoint", run, "--data", data, "--split", "val", "--json", evaluation)
    if max_memory:
        argv += ["--max-memory", max_memory]
    result["evaluate"] = run_measured(argv, f"evaluate {name}")
    if result["evaluate"]["returncode"] == 0:
        summary = json.loads(evaluation.read_text())
        summary.pop("matrix", None) if summary.get("num_classes", 0) > 20 else None
        result["scores"] = summary
    return result


def probe_dataset(data: Path, out: Path, batch_size: int) -> Path:
    """A copy of ``data`` (links) with one training batch and one validation image: one training
    step of it reaches the training peak of the full run at the same batch size."""
    import yaml

    config = yaml.safe_load((data / "dataset.yaml").read_text())
    train, val = config["splits"]["train"][:batch_size], config["splits"]["val"][:1]
    shutil.rmtree(out, ignore_errors=True)
    for folder in ("images", "masks"):
        if not (data / folder).is_dir():
            continue
        (out / folder).mkdir(parents=True)
        for path in (data / folder).iterdir():
            if path.stem in train + val:
                os.symlink(path.resolve(), out / folder / path.name)
    config["splits"] = {"train": train, "val": val}
    if "labels" in config:
        config["labels"] = {k: v for k, v in config["labels"].items() if k in train + val}
    (out / "dataset.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def largest_fitting(
    name: str, method: str, data: Path, work: Path, sizes, budget: str, options: dict, **common
) -> tuple[int | None, list[dict]]:
    """Probe training peaks (one step, fresh child) at ``sizes`` (descending); the first within ``budget``."""
    probe = probe_dataset(data, work / f"{name}_probe_data", common["batch_size"])
    probes = []
    for size in sizes:
        run = work / "runs" / f"{name}_probe_{size}"
        shutil.rmtree(run, ignore_errors=True)
        argv = gigaseg(
            "train",
            "--method",
            method,
            "--data",
            probe,
            "--out",
            run,
            "--encoder",
            common["encoder"],
            "--epochs",
            1,
            "--batch-size",
            common["batch_size"],
            "--lr",
            common["lr"],
        )
        for key, value in {**options, "input_size": size}.items():
            argv += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        report = run_measured(argv, f"probe {name} at {size}")
        probes.append({"input_size": size, **report})
        if report["returncode"] == 0 and report["peak_rss"] <= _bytes(budget):
            return size, probes
    return None, probes


# --------------------------------------------------------------------------- memory part


def rgb_ultramnist(out: Path, count: int, size: int, seed: int) -> Path:
    """An UltraMNIST-style set with the grey images replicated to RGB (tiled TIFF, 256-px tiles)."""
    import tifffile

    from gigaseg.bench import write_ultramnist_dataset

    write_ultramnist_dataset(out, count=count, size=size, seed=seed, val_fraction=1 / count)
    for path in sorted((out / "images").glob("*.tif")):
        grey = tifffile.imread(path)
        tifffile.imwrite(
            path, np.repeat(grey[:, :, None], 3, axis=2), tile=(256, 256), compression="zlib", photometric="rgb"
        )
    return out


def downsampled_estimate(size: int, encoder: str = "resnet50") -> int:
    """Estimated peak (bytes) of training the downsampled baseline at ``size`` with batch 1 (Adam)."""
    import torch

    from gigaseg import create_model
    from gigaseg.bench import CPU_RUNTIME_BYTES, training_estimate

    model = create_model("downsampled_classifier", encoder=encoder, num_classes=10, input_size=size)
    estimate = training_estimate(model, (torch.zeros(2, 3, size, size),), "adam", runtime=CPU_RUNTIME_BYTES)
    return int(estimate.fixed + estimate.per_sample / 2 + 3 * 3 * size * size * 4)


def part_memory(work: Path, quick: bool) -> dict:
    budget = "4GB"
    setup = SIZES["memory"]
    side, patch, encoder, latent = setup["side"], setup["patch"], setup["encoder"], setup["latent"]
    data = rgb_ultramnist(work / "memory_data", count=3, size=side, seed=7)
    out = {
        "budget": budget,
        "image": f"{side}x{side} RGB (synthetic UltraMNIST-style digits)",
        "side": side,
        "train_images": 2,
        "val_images": 1,
        "patch_size": patch,
        "encoder": encoder,
        "latent_dim": latent,
    }
    out["patchgd"] = train_and_evaluate(
        "memory_patchgd",
        "patchgd_classifier",
        data,
        work,
        encoder=encoder,
        options={"patch_size": patch, "latent_dim": latent, "inner_iterations": 2 if quick else 4},
        epochs=1,
        batch_size=1,
        lr=1e-4,
        max_memory=budget,
    )
    # what the whole-image forward with gradients (no PatchGD) would need: every patch with gradients
    from gigaseg import create_model
    from gigaseg.bench import plan_patches

    model = create_model("patchgd_classifier", encoder=encoder, num_classes=10, patch_size=patch)
    plan = plan_patches(model, (3, side, side), 1, 10**15, device="cuda")
    out["full_backprop_estimate_bytes"] = plan.fixed + plan.data + ((side // patch) ** 2 + 1) * plan.per_patch
    out["per_patch_estimate_bytes"] = plan.per_patch
    # the downsampled baseline: the largest input that fits the same budget
    sizes = setup["sizes"]
    estimates = {s: downsampled_estimate(s, encoder) for s in sizes}
    out["downsampled_estimates_bytes"] = estimates
    runs = []
    limit = 4 * GB
    for size in sizes:
        if estimates[size] > 2 * limit:
            continue  # not run: this machine is shared and the estimate is far past the budget
        run = train_and_evaluate(
            f"memory_downsampled_{size}",
            "downsampled_classifier",
            data,
            work,
            encoder=encoder,
            options={"input_size": size, "latent_dim": latent},
            epochs=1,
            batch_size=1,
            lr=1e-4,
            max_memory=None,
        )
        runs.append(run)
        if run["train"]["returncode"] == 0 and run["train"]["peak_rss"] <= limit:
            break
    out["downsampled"] = runs
    fitting = [r for r in runs if r["train"]["returncode"] == 0 and r["train"]["peak_rss"] <= limit]
    out["downsampled_largest_fitting_input"] = fitting[0]["options"]["input_size"] if fitting else None
    return out


def add_seed_runs(
    out: dict,
    seeds: list[int],
    jobs: int,
    tag: str,
    method: str,
    data: Path,
    work: Path,
    runs: list,
    budget: str,
    common: dict,
    only: list[str] | None = None,
) -> None:
    """``out["seeds"]``: the framework ``runs`` (those named in ``only`` when given) again from each of
    ``seeds`` (initial weights, sampled patches, batch order), next to seed 0's: how much of a
    difference between runs is the seed's."""
    if not seeds:
        return
    runs = [(key, options) for key, options in runs if only is None or key in only]
    out["seeds"] = {0: {key: out[key] for key, _ in runs}}
    for seed in seeds:
        out["seeds"][seed] = framework_runs(
            jobs, tag, method, data, work, runs, budget=budget, common=common, seed=seed
        )


# --------------------------------------------------------------------------- accuracy parts


def part_ultramnist(work: Path, quick: bool, args) -> dict:
    from gigaseg.bench import UltraMnistConfig, write_ultramnist_dataset

    setup = SIZES["ultramnist"]
    count = args.count or setup["count"] or (120 if quick else 1500)
    side = args.ultramnist_size or setup["side"]
    data = work / f"ultramnist_{side}"
    config = UltraMnistConfig(digits=(2, 2), values=(6, 9), min_digit=args.ultramnist_min_digit)
    manifest = data / "synth.json"
    if not manifest.exists() or json.loads(manifest.read_text())["count"] != count:
        write_ultramnist_dataset(data, count=count, size=side, seed=11, val_fraction=0.2, config=config)
    budget = args.budget or "1.4GB"
    common = dict(
        encoder=args.encoder, epochs=args.epochs or (1 if quick else 10), batch_size=setup["batch_size"], lr=1e-3
    )
    # with --pretrained every run's theta1 starts from the same weights file (runs um_pre_*)
    prefix = "um" if side == 512 else f"um{side}"
    if args.pretrained:
        common["pretrained"] = str(Path(args.pretrained).resolve())
        prefix += "_pre" + (f"_{args.pretrained_tag}" if args.pretrained_tag else "")
    patch_size = setup["patch"]
    patchgd = {
        "patch_size": patch_size,
        "latent_dim": setup["latent"],
        "sampling_fraction": 0.25,
        "inner_iterations": 2,
    }
    out = {
        "data": {
            "size": side,
            "count": count,
            "train": count - round(count * 0.2),
            "val": round(count * 0.2),
            "digits": 2,
            "values": [6, 9],
            "classes_used": ["2", "5", "8"],
            "seed": 11,
            "small_digit": list(config.small_digit_heights(side)),
        },
        "budget": budget,
        **common,
    }
    if args.pretrained:
        report = Path(args.pretrained).with_suffix(".json")
        out["pretraining"] = json.loads(report.read_text()) if report.exists() else None
    variants = next(
        v for v in (args.ultramnist_variants, setup["variants"], ULTRAMNIST_DEFAULT_VARIANTS) if v is not None
    )
    runs = [(key, {**patchgd, **ULTRAMNIST_VARIANTS[key]}) for key in variants]
    out.update(framework_runs(args.jobs, prefix, "patchgd_classifier", data, work, runs, budget=budget, common=common))
    add_seed_runs(
        out, args.seeds, args.jobs, prefix, "patchgd_classifier", data, work, runs, budget, common, args.seed_runs
    )
    size, probes = largest_fitting(
        f"{prefix}_downsampled",
        "downsampled_classifier",
        data,
        work,
        [s for s in SIZES["probe_sizes"] if s <= side],
        budget,
        {"latent_dim": setup["latent"]},
        **common,
    )
    out["downsampled_probes"] = probes
    # the largest input that fits, and the global patch's own size (the same view of the image that
    # the framework's global patch gets; also where this small encoder sees the large digit whole)
    # (--downsampled-extra: more sizes, for the accuracy each input buys at its measured peak)
    sizes = (
        []
        if size is None
        else sorted({size, patch_size, *[s for s in args.downsampled_extra if s <= side]}, reverse=True)
    )
    out["downsampled"] = in_parallel(
        args.jobs,
        [
            (
                lambda s=s: train_and_evaluate(
                    f"{prefix}_downsampled_{s}",
                    "downsampled_classifier",
                    data,
                    work,
                    options={"input_size": s, "latent_dim": setup["latent"]},
                    max_memory=None,
                    **common,
                )
            )
            for s in sizes
        ],
    )
    if args.continue_epochs:
        out["continued"] = continued_runs(
            args,
            prefix,
            data,
            work,
            [
                (key, "patchgd_classifier", out[key]["options"], budget)
                for key in ("patchgd_global_balanced", "patchgd_no_global")
            ]
            + [
                (f"downsampled_{run['options']['input_size']}", "downsampled_classifier", run["options"], None)
                for run in out["downsampled"]
            ],
            common,
        )
    return out


def continued_runs(
    args, prefix: str, data: Path, work: Path, runs: list[tuple[str, str, dict, str | None]], common: dict
) -> dict:
    """Each ``(results key, method, options, budget)`` of ``runs`` trained ``--continue-epochs``
    more epochs from its run's last checkpoint (weights only: a fresh schedule from the part's
    learning rate, so each continuation is a warm restart); ``jobs`` at a time."""
    epochs = args.continue_epochs
    calls = [
        (
            lambda key=key, method=method, options=options, budget=budget: train_and_evaluate(
                f"{prefix}_{key}_plus{epochs}",
                method,
                data,
                work,
                options=options,
                max_memory=budget,
                init=work / "runs" / f"{prefix}_{key}" / "last.ckpt",
                **{**common, "epochs": epochs},
            )
        )
        for key, method, options, budget in runs
    ]
    return dict(zip((key for key, *_ in runs), in_parallel(args.jobs, calls)))


def framework_runs(
    jobs: int,
    prefix: str,
    method: str,
    data: Path,
    work: Path,
    runs: list[tuple[str, dict]],
    *,
    budget: str,
    common: dict,
    seed: int = 0,
) -> dict:
    """Each ``(results key, options)`` of ``runs`` trained under ``budget`` and scored (run
    ``<prefix>_<key>``, with ``_seed<seed>`` but for seed 0), ``jobs`` at a time: the results by key."""
    suffix = f"_seed{seed}" if seed else ""
    scored = in_parallel(
        jobs,
        [
            (
                lambda key=key, options=options: train_and_evaluate(
                    f"{prefix}_{key}{suffix}",
                    method,
                    data,
                    work,
                    options=options,
                    max_memory=budget,
                    seed=seed,
                    **common,
                )
            )
            for key, options in runs
        ],
    )
    return dict(zip((key for key, _ in runs), scored))


def in_parallel(jobs: int, calls: list) -> list:
    """Results of ``calls`` (each starts its own child processes), ``jobs`` at a time, in order.
    Each child's peak RSS is its own; wall times include the contention of the others."""
    if jobs <= 1:
        return [call() for call in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda call: call(), calls))


#: the land-cover part's positive classes: the fine structure (the issue's task), and a control whose
#: label depends on context alone (vegetation farther than 700 px from water looks like the rest; at
#: 1024 px scenes both kinds are in every scene, at 512 px no vegetation is that far from water)
LANDCOVER_TASKS = {
    "fine": {
        "classes": ("road", "stream"),
        "name": "fine_structure",
        "positive": "road or stream (2-3 px wide)",
        "title": "fine structure (roads + streams)",
    },
    "context": {
        "classes": ("vegetation_far_from_water",),
        "name": "vegetation_far_from_water",
        "positive": "vegetation farther than 700 px from water (textured like the vegetation near "
        "water: only the distance to water tells them apart)",
        "title": "context control (vegetation far from water)",
    },
}


def binary_landcover(source: Path, out: Path, classes=("road", "stream"), name: str = "fine_structure") -> Path:
    """The land-cover set with masks reduced to ``classes`` (default: the fine structure, road or
    stream) vs everything else."""
    import tifffile
    import yaml

    config = yaml.safe_load((source / "dataset.yaml").read_text())
    ids = [config["classes"].index(c) for c in classes]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for image in sorted((source / "images").glob("*.tif")):
        target = out / "images" / image.name
        if not target.exists():
            os.link(image, target) if hasattr(os, "link") else shutil.copy(image, target)
        mask = tifffile.imread(source / "masks" / image.name)
        binary = np.where(mask == 255, 255, np.isin(mask, ids)).astype(np.uint8)
        tifffile.imwrite(out / "masks" / image.name, binary, tile=(256, 256), compression="zlib")
    (out / "dataset.yaml").write_text(
        yaml.safe_dump(
            {
                "name": f"landcover-{name}",
                "task": "segmentation",
                "classes": ["other", name],
                "palette": [[0, 0, 0], [255, 255, 255]],
                "ignore_index": 255,
                "splits": config["splits"],
            }
        )
    )
    return out


def part_landcover(work: Path, quick: bool, args) -> dict:
    from gigaseg.bench import write_landcover_dataset

    setup = SIZES["landcover"]
    count = args.count or setup["count"] or (8 if quick else 40)
    size = args.size or setup["size"] or (512 if quick else 1024)
    source = work / f"landcover_{size}"
    manifest = source / "synth.json"
    if (
        not manifest.exists()
        or json.loads(manifest.read_text()).get("count") != count
        or not json.loads(manifest.read_text()).get("complete")
    ):
        write_landcover_dataset(source, count=count, height=size, width=size, seed=3, val_fraction=0.25)
    task = LANDCOVER_TASKS[args.landcover_task]
    folder = f"landcover_fine_{size}" if args.landcover_task == "fine" else f"landcover_{args.landcover_task}_{size}"
    data = binary_landcover(source, work / folder, task["classes"], task["name"])
    budget = args.budget or "1.6GB"
    common = dict(
        encoder=args.encoder, epochs=args.epochs or (1 if quick else 12), batch_size=setup["batch_size"], lr=1e-3
    )
    # the same k (recomputed patches per inner iteration) with and without the global patch, so the
    # comparison isolates the global patch: at 1024 px under 2GB the trainer plans k=1 with it (k=2 without)
    patches = math.ceil(size / setup["patch"]) ** 2
    framework = {"patch_size": setup["patch"], "sampling_fraction": args.landcover_k / patches, "inner_iterations": 2}
    out = {
        "data": {
            "size": size,
            "count": count,
            "train": count - round(count * 0.25),
            "val": round(count * 0.25),
            "positive": task["positive"],
            "seed": 3,
        },
        "task": args.landcover_task,
        "budget": budget,
        **common,
    }
    tag = ("lc" if size == 1024 else f"lc{size}") + ("" if args.landcover_task == "fine" else f"_{args.landcover_task}")
    variants = next(
        v for v in (args.landcover_variants, setup["variants"], LANDCOVER_DEFAULT_VARIANTS) if v is not None
    )
    runs = [(key, {**framework, **LANDCOVER_VARIANTS[key]}) for key in variants]
    runs.append(("patchgd_no_global", {**framework, "global_patch": False}))
    out.update(framework_runs(args.jobs, tag, "patchgd_segmenter", data, work, runs, budget=budget, common=common))
    add_seed_runs(
        out, args.seeds, args.jobs, tag, "patchgd_segmenter", data, work, runs, budget, common, args.seed_runs
    )
    baseline = {"decoder": "smp_unet", "loss": "ce"}
    input_size, probes = largest_fitting(
        f"{tag}_global",
        "global",
        data,
        work,
        [s for s in SIZES["probe_sizes"] if s < size],
        budget,
        baseline,
        **common,
    )
    out["downsampled_probes"] = probes
    out["downsampled"] = (
        []
        if input_size is None
        else [
            train_and_evaluate(
                f"{tag}_global_{input_size}",
                "global",
                data,
                work,
                options={"input_size": input_size, **baseline},
                max_memory=None,
                **common,
            )
        ]
    )
    return out


def landcover_key(size: int, task: str = "fine") -> str:
    """The results entry of the land-cover part at scenes of ``size`` px (1024 px, fine structure:
    the original entry)."""
    key = "landcover" if size == 1024 else f"landcover_{size}"
    return key if task == "fine" else f"{key}_{task}"


def _bytes(text: str) -> int:
    from gigaseg.bench import parse_size

    return parse_size(text)


# --------------------------------------------------------------------------- results


def write_results(results: dict, results_dir: Path = RESULTS) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "patchgd.json").write_text(json.dumps(results, indent=2, default=_plain))
    (results_dir / "patchgd.md").write_text(markdown(results))


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / GB:.2f} GB"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _row(run: dict, label: str, score_keys: list[str]) -> str:
    train = run.get("train", {})
    if train.get("returncode"):
        return f"| {label} | `{json.dumps(run.get('options', {}))}` | failed: see the JSON's stderr_tail |"
    last = (run.get("history") or [{}])[-1]
    scores = run.get("scores", {})
    binary = scores.get("binary") or {}
    cells = [
        label,
        f"`{json.dumps(run.get('options', {}))}`",
        _gb(train.get("peak_rss")),
        f"{train.get('wall_s', 0):.0f} s",
        str(int(last["train_k"])) if "train_k" in last else "-",
    ]
    for key in score_keys:
        value = binary.get(key, scores.get(key))
        cells.append(value if isinstance(value, str) else ("n/a" if value is None else f"{value:.4f}"))
    return "| " + " | ".join(cells) + " |"


def _probes(part: dict) -> str:
    probes = part.get("downsampled_probes") or []
    listed = ", ".join(
        f"{p['input_size']} px: {_gb(p.get('peak_rss')) if p.get('returncode') == 0 else 'failed'}" for p in probes
    )
    return (
        f"Downsampled baseline input: the largest whose training peak (one step at batch {part['batch_size']}, "
        f"fresh child) fits {part['budget']}; probed {listed}.\n"
    )


def _comparison(part: dict, keys: list[str], headers: list[str], baseline: str) -> list[str]:
    """An accuracy part's table (PatchGD with the global patch, its variants, without it, then the
    downsampled baseline) and its probes line."""
    columns = ["method", "options", "peak RSS (train)", "wall", "k", *headers]
    variants = [(key, label) for key, label in FRAMEWORK_RUNS if key in part]
    return [
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *[_row(part[key], label, keys) for key, label in variants],
        *[_row(r, f"{baseline} {r['options']['input_size']}", keys) for r in part["downsampled"]],
        "",
        _probes(part),
    ]


def _equal_memory(part: dict, metric: str, label: str) -> list[str]:
    """For each framework run, the largest downsampled input whose measured training peak is within
    the framework run's own: the two at the same memory."""
    downsampled = [
        r for r in part.get("downsampled", []) if r.get("train", {}).get("returncode") == 0 and "scores" in r
    ]
    lines = []
    for key, name in FRAMEWORK_RUNS:
        run = part.get(key)
        if not run or "scores" not in run or not downsampled:
            continue
        peak = run["train"]["peak_rss"]
        within = [r for r in downsampled if r["train"]["peak_rss"] <= peak]
        if within:
            best = max(within, key=lambda r: r["options"]["input_size"])
            lines.append(
                f"- {name}: {label} {run['scores'][metric]:.4f} at {_gb(peak)}; the largest downsampled "
                f"input that trained within it: {best['options']['input_size']} px "
                f"({_gb(best['train']['peak_rss'])}), {label} {best['scores'][metric]:.4f}."
            )
        else:
            lines.append(
                f"- {name}: {label} {run['scores'][metric]:.4f} at {_gb(peak)}; no downsampled input "
                "that was trained fits within it."
            )
    if not lines:
        return []
    return [
        "At the same memory (each framework run against the downsampled runs whose measured training peak is "
        "at most its own):",
        "",
        *lines,
        "",
    ]


def _continued_table(part: dict, keys: list[str], headers: list[str]) -> list[str]:
    """The runs trained further from their last checkpoints (``--continue-epochs``)."""
    continued = part.get("continued")
    if not continued:
        return []
    labels = dict(FRAMEWORK_RUNS)
    extra = next(iter(continued.values()))["epochs"]
    columns = ["method", "options", "peak RSS (train)", "wall", "k", *headers]
    rows = [_row(run, labels.get(key, f"downsampled {key.rsplit('_', 1)[-1]}"), keys) for key, run in continued.items()]
    return [
        f"Then {extra} more epochs from each run's last checkpoint ({part['epochs'] + extra} in all; a warm "
        "restart: the weights only, a fresh schedule from the same learning rate), scored the same way:",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *rows,
        "",
    ]


def _seeds_table(part: dict, metric: str = "f1") -> list[str]:
    """``metric`` (``"f1"`` of the positive class, or ``"accuracy"``) of each framework run per
    training seed, with the mean and sample standard deviation."""
    seeds = part.get("seeds")
    if not seeds:
        return []
    order = sorted(seeds, key=int)
    name = {"f1": "F1", "accuracy": "Accuracy"}[metric]
    lines = [
        f"{name} by training seed (the same data, budget, k and schedule; the seed sets the initial weights, "
        "the sampled patches and the batch order):",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in order) + " | mean | sd |",
        "|---" * (len(order) + 3) + "|",
    ]
    for key, label in FRAMEWORK_RUNS:
        if key not in seeds[order[0]]:
            continue
        values = [_seed_score(seeds[s].get(key, {}), metric) for s in order]
        known = [v for v in values if v is not None]
        mean = f"{np.mean(known):.4f}" if known else "n/a"
        sd = f"{np.std(known, ddof=1):.4f}" if len(known) > 1 else "n/a"
        lines.append(
            f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + f" | {mean} | {sd} |"
        )
    return lines + [""]


def _seed_score(run: dict, metric: str) -> float | None:
    scores = run.get("scores", {})
    return (scores.get("binary") or {}).get("f1") if metric == "f1" else scores.get(metric)


def _pretraining(pre: dict, encoder: str) -> str:
    """How benchmarks/pretrain_digits.py made a weights file, from its report."""
    fonts = pre.get("train_fonts") or []
    source = "scikit-learn's handwritten digits" + (
        f" and, for half of the canvases, the digits of {len(fonts)} of matplotlib's bundled fonts (DejaVu Sans and "
        "Sans Mono, STIX, Computer Modern)"
        if fonts
        else ""
    )
    text = (
        f"benchmarks/pretrain_digits.py: a {encoder} classifier trained {pre['steps']} steps on {source} at "
        f"{pre['heights'][0]:.0f}-{pre['heights'][1]:.0f} px on 128-px canvases; accuracy on other writers' "
        f"digits {_pct(pre['val_accuracy'])}, by height "
        + ", ".join(f"{h} {_pct(v)}" for h, v in pre["val_accuracy_by_height"].items())
    )
    if "val_fonts_accuracy" in pre:
        text += (
            f"; on the fonts it never saw (DejaVu Serif) {_pct(pre['val_fonts_accuracy'])}; on the font the "
            f"generator draws with (Pillow's Aileron, never trained on) {_pct(pre['generator_font_accuracy'])}, "
            "by height " + ", ".join(f"{h} {_pct(v)}" for h, v in pre["generator_font_accuracy_by_height"].items())
        )
    return text + "; the same file for every run"


def markdown(results: dict) -> str:
    from gigaseg.bench import machine_header

    commands = results.get("commands", {})
    lines = [
        "# PatchGD with a global patch (issue 7)",
        "",
        machine_header(results["machine"]),
        *(
            [
                "Commands by part (the header names the latest run): "
                + "; ".join(f"{part}: `{command}`" for part, command in commands.items()),
                "",
            ]
            if commands
            else []
        ),
        "No GPU was lent to this task: every memory figure is the peak RSS of a fresh CPU process "
        "(`gigaseg.bench.measure_command`), including the Python/torch runtime; the same figure for "
        f"a process that only imports torch is {_gb(results.get('torch_baseline_rss'))}. On CUDA the "
        "trainer's `peak_memory` column (torch.cuda.max_memory_allocated) is the figure to read.",
        "",
    ]
    memory = results.get("memory")
    if memory:
        p = memory["patchgd"]
        last = (p.get("history") or [{}])[-1]
        side, patch = memory.get("side", 4096), memory["patch_size"]
        patches = (side // patch) ** 2
        lines += [
            f"## Memory: {side}x{side} classification with {patch}-px patches",
            "",
            f"{memory['image']}, {memory['train_images']} training + {memory['val_images']} validation "
            f"image(s), theta1 {memory['encoder']} (latent {memory['latent_dim']}), batch 1, "
            f"`--max-memory {memory['budget']}`.",
            "",
            "| run | input | peak RSS (train) | wall | k | peak RSS (evaluate) |",
            "|---|---|---|---|---|---|",
            f"| patchgd_classifier | {side}x{side}, {patches} patches of {patch} px | "
            f"{_gb(p['train'].get('peak_rss'))} | "
            f"{p['train'].get('wall_s', 0):.0f} s | {int(last.get('train_k', 0))} | "
            f"{_gb(p.get('evaluate', {}).get('peak_rss'))} |",
        ]
        for run in memory["downsampled"]:
            size = run["options"]["input_size"]
            lines.append(
                f"| downsampled_classifier | {size}x{size} | {_gb(run['train'].get('peak_rss'))} | "
                f"{run['train'].get('wall_s', 0):.0f} s | - | {_gb(run.get('evaluate', {}).get('peak_rss'))} |"
            )
        lines += [
            "",
            f"Largest downsampled input that trains within {memory['budget']}: "
            f"{memory['downsampled_largest_fitting_input']} px a side (the framework reads the full {side}).",
            "Estimates (not run): the downsampled baseline at "
            + ", ".join(f"{s} px {_gb(b)}" for s, b in memory["downsampled_estimates_bytes"].items())
            + f"; back-propagating through all {patches} patches at once: "
            f"{_gb(memory['full_backprop_estimate_bytes'])} "
            f"({_gb(memory['per_patch_estimate_bytes'])} of activations per patch).",
            "",
        ]
    for key in sorted(
        (k for k in results if k.startswith("ultramnist")),
        key=lambda k: (results[k]["data"]["size"], bool(results[k].get("pretrained")), k),
    ):
        um = results[key]
        side = um["data"]["size"]
        small = um["data"].get("small_digit", [8, 24])
        keys = ["accuracy", "balanced_accuracy"]
        origin, detail = "from random weights", ""
        if um.get("pretrained"):
            origin = f"from `{Path(um['pretrained']).name}`"
            pre = um.get("pretraining")
            detail = " (the same file for every run)" if not pre else f" ({_pretraining(pre, um['encoder'])})"
        lines += [
            f"## Synthetic UltraMNIST, {side}x{side}, theta1 {origin}",
            "",
            f"{um['data']['train']} training / {um['data']['val']} validation images; two digits (values "
            f"6 and 9; one 30-60% of the side, one {small[0]}-{small[1]} px) among distracting shapes; "
            "class = sum mod 10 "
            f"(2, 5 or 8; chance 33%). Encoder {um['encoder']}, starting {origin}{detail}; {um['epochs']} epochs, "
            f"batch {um['batch_size']}, lr {um['lr']}; memory budget {um['budget']} (peak RSS of training).",
            "",
            *_comparison(um, keys, ["accuracy", "balanced accuracy"], "downsampled"),
            *_equal_memory(um, "accuracy", "accuracy"),
            *_continued_table(um, keys, ["accuracy", "balanced accuracy"]),
            *_seeds_table(um, "accuracy"),
        ]
    for key in sorted((k for k in results if k.startswith("landcover")), key=lambda k: -results[k]["data"]["size"]):
        lc = results[key]
        keys = ["f1", "iou", "balanced_accuracy", "lr_positive", "lr_negative"]
        title = LANDCOVER_TASKS[lc.get("task", "fine")]["title"]
        lines += [
            f"## Land-cover {title} as a binary task, {lc['data']['size']} px scenes",
            "",
            f"{lc['data']['count']} synthetic land-cover scenes of {lc['data']['size']}x{lc['data']['size']} "
            f"({lc['data']['train']} train / {lc['data']['val']} val); positive class: {lc['data']['positive']}. "
            f"Encoder {lc['encoder']}, "
            f"{lc['epochs']} epochs, batch {lc['batch_size']}, lr {lc['lr']}; budget {lc['budget']}. "
            "Scores of the positive class on the validation split.",
            "",
            *_comparison(lc, keys, ["F1", "IoU", "balanced acc.", "LR+", "LR-"], "global (smp U-Net)"),
            *_seeds_table(lc),
        ]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def ultramnist_key(side: int, pretrained: bool, tag: str = "") -> str:
    """The results key of an UltraMNIST part: ``ultramnist[_<side> but for 512][_pretrained[_<tag>]]``."""
    key = "ultramnist" + ("" if side == 512 else f"_{side}")
    return key + ("_pretrained" + (f"_{tag}" if tag else "") if pretrained else "")


def variant_list(part: str, known: dict):
    """An argparse type: comma-separated run keys of ``known`` (a part's variants)."""

    def parse(text: str) -> list[str]:
        keys = [key.strip() for key in text.split(",") if key.strip()]
        unknown = [key for key in keys if key not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {part} run {', '.join(unknown)}; known: {', '.join(known)}")
        return keys

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="memory,ultramnist,landcover")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--quick", action="store_true", help="less data and fewer epochs")
    parser.add_argument(
        "--smoke", action="store_true", help="--quick at tiny sizes, temporary output: every part's path in seconds"
    )
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--encoder", default="test_resnet", help="theta1 encoder of the accuracy parts")
    parser.add_argument(
        "--pretrained",
        help="UltraMNIST: theta1's starting weights, a local weights file of "
        "--encoder (benchmarks/pretrain_digits.py makes one); results go "
        "to the ultramnist_pretrained part",
    )
    parser.add_argument(
        "--pretrained-tag",
        default="",
        help="UltraMNIST with --pretrained: a name for the weights file, so its results are a part of "
        "their own (ultramnist[_<side>]_pretrained_<tag>, runs um[<side>]_pre_<tag>_*) beside "
        "those of other files",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--budget")
    parser.add_argument("--size", type=int, help="side of the land-cover scenes (default 1024)")
    parser.add_argument(
        "--landcover-k",
        type=int,
        default=1,
        help="patches recomputed with gradients per inner iteration, every land-cover variant",
    )
    parser.add_argument(
        "--landcover-variants",
        type=variant_list("land-cover", LANDCOVER_VARIANTS),
        help="which global-patch runs of the land-cover part (comma-separated results keys; default: "
        f"{','.join(LANDCOVER_DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--ultramnist-size",
        type=int,
        help="UltraMNIST canvas side (default 512; --smoke 128); other than 512 the part is "
        "ultramnist_<side>[_pretrained]",
    )
    parser.add_argument(
        "--ultramnist-min-digit",
        type=int,
        default=0,
        help="UltraMNIST: the small digit's smallest ink height in px (it is drawn 1-3 times that; "
        "0: the generator's automatic max(8, side // 64))",
    )
    parser.add_argument(
        "--ultramnist-variants",
        type=variant_list("UltraMNIST", ULTRAMNIST_VARIANTS),
        help="which framework runs of the UltraMNIST part (comma-separated results keys: "
        f"{', '.join(ULTRAMNIST_VARIANTS)}; default: {','.join(ULTRAMNIST_DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--downsampled-extra",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[],
        help="UltraMNIST: also train the downsampled baseline at these input sizes (comma-separated), "
        "beside the largest that fits the budget and the patch size",
    )
    parser.add_argument(
        "--landcover-task",
        choices=sorted(LANDCOVER_TASKS),
        default="fine",
        help="the land-cover part's positive class: the fine structure, or the context control",
    )
    parser.add_argument(
        "--seeds",
        "--landcover-seeds",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[],
        help="also train the accuracy parts' framework runs from these seeds (comma-separated; 0 is the main run)",
    )
    parser.add_argument(
        "--seed-runs",
        type=variant_list("framework", dict(FRAMEWORK_RUNS)),
        default=None,
        help="only these framework runs get --seeds (comma-separated results keys; default: all)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="independent runs of a part trained at once (each its own process)"
    )
    parser.add_argument(
        "--continue-epochs",
        type=int,
        default=0,
        help="UltraMNIST: then train each run (but the paper's-gradient one) this many more epochs "
        "from its last checkpoint, a warm restart of the schedule",
    )
    parser.add_argument(
        "--resume-runs",
        action="store_true",
        help="runs that did not finish continue from their last checkpoint (with --reuse: only those are trained)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep earlier results (from the results file) of runs whose settings are unchanged",
    )
    args = parser.parse_args(argv)
    global RESUME_RUNS, SIZES
    RESUME_RUNS = args.resume_runs
    if args.smoke:
        SIZES, args.quick = SMOKE, True
        results_dir = args.results or Path(tempfile.mkdtemp(prefix="gigaseg-patchgd-smoke-results-"))
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
    else:
        results_dir = args.results or RESULTS
    sys.path.insert(0, str(ROOT / "src"))
    from gigaseg.bench import baseline_rss, describe_machine

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gigaseg-patchgd-"))
    work.mkdir(parents=True, exist_ok=True)
    path = results_dir / "patchgd.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.reuse:

        def collect(value):
            if isinstance(value, dict):
                if "name" in value and "train" in value:
                    REUSE[value["name"]] = value
                for item in value.values():
                    collect(item)
            elif isinstance(value, list):
                for item in value:
                    collect(item)

        collect({k: v for k, v in results.items() if k == "memory" or k.startswith(("ultramnist", "landcover"))})
    results["machine"] = describe_machine()
    results["torch_baseline_rss"] = baseline_rss(True)
    started = time.perf_counter()
    try:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            if part == "memory":
                results["memory"] = part_memory(work, args.quick)
            elif part == "ultramnist":
                side = args.ultramnist_size or SIZES["ultramnist"]["side"]
                part = ultramnist_key(side, bool(args.pretrained), args.pretrained_tag)
                results[part] = part_ultramnist(work, args.quick, args)
            elif part == "landcover":
                size = args.size or SIZES["landcover"]["size"] or (512 if args.quick else 1024)
                part = landcover_key(size, args.landcover_task)
                results[part] = part_landcover(work, args.quick, args)
            else:
                raise SystemExit(f"unknown part {part!r}")
            seconds = round(time.perf_counter() - started, 1)
            # merge into what is on disk now: another invocation may have written other parts meanwhile
            current = json.loads(path.read_text()) if path.exists() else {}
            current.update(
                {
                    "machine": results["machine"],
                    "torch_baseline_rss": results["torch_baseline_rss"],
                    part: results[part],
                }
            )
            current.setdefault("seconds", {})[part] = seconds
            current.setdefault("commands", {})[part] = results["machine"]["command"]
            results = current
            write_results(results, results_dir)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    print(f"results in {results_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
