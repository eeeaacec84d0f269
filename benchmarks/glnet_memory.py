"""GLNet memory on CPU with ResNet-50 branches: 30-Mpx prediction and stage-2 training.

Writes benchmarks/results/glnet_memory.{json,md}. Every figure is the peak RSS of a fresh
child process (``gigaseg.bench.memory.measure``) next to a child that only imports torch.

1. **Prediction** of a 6749 x 4499 (30 Mpx) synthetic land-cover scene (tiled BigTIFF from
   ``gigaseg.data.synth.landcover``) with a stage-2 and a stage-3 checkpoint (7 classes,
   random weights: values do not change memory), through ``gigaseg.api.predict`` exactly as
   ``gigaseg predict --max-memory 2GB`` runs it (checkpoint load, streaming driver, tiled mask
   writer). A full run computes ~190 patches of 508 px through ResNet-50 + GLNet's FPN twice
   per patch (local branch, ensemble) at ~10 s per patch on 2 shared cores, so by default
   only ``--blocks`` of the blocks (the side the predictor planned: 1024 or 2048 px) are computed (the middle row band, from
   the left); the others return uniform probabilities at no cost. ``prepare`` (global
   features; for stage 3 the local branch over ALL 150 patches and the local -> global merge)
   always runs in full. The peak does not depend on how many blocks run: a block allocates
   its buffers, evaluates its patches in sub-batches and releases everything but the cached
   logits of one column of patches; the per-block RSS log in the results shows the peak
   reached in the first computed block and not growing after.
2. **Stage-2 training** on 2448 x 2448 scenes (GLNet's DeepGlobe size; 36 patches each) via
   ``gigaseg.api.train(stage="global2local", init=<stage-1 checkpoint>)`` with
   ``--max-memory 4GB`` and the paper's batch of 6 images, two optimiser steps (7 scenes:
   batches of 6 and 1, so Adam's state exists for the second). Each image's step is cut to
   its first two sub-batches of patches (``--patches``), while the whole batch (all 36
   patches of every image) stays loaded: each sub-batch's graph is freed by its backward,
   gradients and Adam state have fixed sizes, so the peak over two sub-batches is the peak
   over 36 (again shown by the per-step log).

    python benchmarks/glnet_memory.py [--work DIR] [--parts predict2,predict3,train2] [--blocks 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the measured children import this file as the module glnet_memory

SCENE = (4499, 6749)  # 30.4 Mpx
TRAIN = (2448, 2448)  # DeepGlobe's size
PREDICT_BUDGET = "2GB"
TRAIN_BUDGET = "4GB"


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- data


def write_data(work: Path) -> dict:
    from gigaseg.data.synth.landcover import write_landcover_dataset

    out = {}
    for name, (height, width), count, seed in (("scene", SCENE, 1, 0), ("train", TRAIN, 7, 1)):
        folder = work / name
        if not (folder / "dataset.yaml").exists():
            start = time.perf_counter()
            write_landcover_dataset(folder, count=count, height=height, width=width, seed=seed, val_fraction=0.0)
            print(f"wrote {name}: {count} x {height}x{width} in {time.perf_counter() - start:.0f} s", flush=True)
        out[name] = folder
    out["image"] = sorted((work / "scene" / "images").glob("*.tif"))[0]
    return out


def make_checkpoints(work: Path, data: Path) -> dict:
    import torch

    from gigaseg.data.loader import load_dataset
    from gigaseg.io.normalize import Normalization
    from gigaseg.methods.registry import create_model
    from gigaseg.training.checkpoint import data_info, save_checkpoint

    dataset = load_dataset(data, "train")
    paths = {stage: work / f"glnet_resnet50_stage{stage}.ckpt" for stage in (1, 2, 3)}
    if all(p.exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = create_model("glnet", encoder="resnet50", num_classes=len(dataset.classes))
    info = data_info(dataset, Normalization.for_image(3, np.uint8))
    for stage, path in paths.items():
        if stage == 3:  # stage 3 retrains the global branch: the stage-1 copy becomes separate weights
            model.copy_global_to_fixed()
            with torch.no_grad():
                for param in model.global_branch.parameters():
                    param.add_(torch.randn_like(param) * 1e-3)
        model.set_stage(stage)
        save_checkpoint(path, model, info)
    return paths


# --------------------------------------------------------------------------- children


class SubsetPredictor:
    """Wraps a predictor: real work for the chosen blocks, uniform probabilities elsewhere; logs RSS."""

    def __init__(self, inner, compute: int, log: list):
        self.inner, self.compute, self.log = inner, compute, log
        self.num_classes = inner.num_classes
        self.halo = inner.halo
        self.block_size = inner.block_size
        self.done = 0

    def prepare(self, source):
        start = time.perf_counter()
        context = self.inner.prepare(source)
        self.log.append(
            {
                "what": "prepare",
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss": _rss(),
                "context_bytes": context.nbytes(),
                "sub_batch": self.inner.sub_batch,
                "block_size": self.inner.block_size,
            }
        )
        self.band = None
        return context

    def predict_block(self, source, context, window):
        middle_band = window.top > 0 and window.bottom < source.height
        if not middle_band or self.done >= self.compute:
            # uniform probabilities, in one reused buffer as the real predictor returns them (a fresh array
            # per skipped block would add a block of memory the real run does not have)
            import torch

            needed = self.num_classes * window.height * window.width
            if getattr(context, "output", None) is None or context.output.numel() < needed:
                context.output = None
                context.output = torch.empty(needed)
            fake = context.output[:needed].view(self.num_classes, window.height, window.width)
            return fake.fill_(1.0 / self.num_classes).numpy()
        start = time.perf_counter()
        probs = self.inner.predict_block(source, context, window)
        self.done += 1
        self.log.append(
            {
                "what": f"block {window.top},{window.left} {window.height}x{window.width}",
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss": _rss(),
            }
        )
        return probs


def child_predict(checkpoint: str, image: str, out: str, max_memory: str, blocks: int) -> dict:
    import gigaseg.methods.glnet.model as glnet

    log: list = []
    original = glnet.GLNet.whole_image_predictor

    def subset(self, *args, **kwargs):
        return SubsetPredictor(original(self, *args, **kwargs), blocks, log)

    glnet.GLNet.whole_image_predictor = subset
    from gigaseg.api import predict

    result = predict(checkpoint, image, out, max_memory=max_memory, progress=False, resume=False)
    return {"log": log, "seconds": round(result.seconds, 1), "blocks": result.blocks_predicted}


def child_train(data: str, init: str, out: str, max_memory: str, batch_size: int, sub_batches: int) -> dict:
    import gigaseg.methods.glnet.recipe as method

    log: list = []
    real = method.global2local_step

    def truncated(ctx, batch):
        keep = sub_batches * method._sub_batch(ctx)
        part = {
            **batch,
            "patches": batch["patches"][:, :keep],
            "patch_labels": batch["patch_labels"][:, :keep],
            "boxes": batch["boxes"][:, :keep],
        }
        start = time.perf_counter()
        losses = real(ctx, part)
        log.append(
            {
                "images": int(batch["patches"].shape[0]),
                "patches_loaded": int(batch["patches"].shape[1]),
                "patches_run": keep,
                "sub_batch": method._sub_batch(ctx),
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss": _rss(),
            }
        )
        return losses

    method.global2local_step = truncated
    from gigaseg.api import train
    from gigaseg.memory import parse_size
    from gigaseg.training.recipe import TrainSettings

    settings = TrainSettings(epochs=1, batch_size=batch_size, max_memory=parse_size(max_memory), progress=False)
    train("glnet", data, out, encoder="resnet50", stage="global2local", init=init, settings=settings)
    return {"log": log}


def child_imports() -> dict:
    import timm  # noqa: F401

    import gigaseg.api  # noqa: F401
    import gigaseg.methods.glnet.model  # noqa: F401

    return {}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/glnet_memory", help="folder for the scenes and checkpoints")
    parser.add_argument("--parts", default="predict2,predict3,train2")
    parser.add_argument("--blocks", type=int, default=2, help="prediction blocks computed (of 12)")
    parser.add_argument("--sub-batches", type=int, default=2, help="training sub-batches run per image")
    args = parser.parse_args()
    import glnet_memory as bench  # this file as an importable module, for the children
    from gigaseg.bench.machine import describe
    from gigaseg.bench.memory import baseline_rss, measure

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work)
    ckpts = make_checkpoints(work, data["train"])
    parts = args.parts.split(",")
    previous = RESULTS / "glnet_memory.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    results.update(
        {
            "machine": describe(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "torch_import_rss": baseline_rss(),
            "gpu": "none lent in this task: no CUDA figures",
        }
    )
    results["gigaseg_import_rss"] = measure(bench.child_imports).peak_rss
    print(
        f"baselines: torch {results['torch_import_rss'] / 1e6:.0f} MB, "
        f"gigaseg+timm {results['gigaseg_import_rss'] / 1e6:.0f} MB",
        flush=True,
    )
    for part in parts:
        print(f"running {part} ...", flush=True)
        if part in ("predict2", "predict3"):
            stage = int(part[-1])
            report = measure(
                bench.child_predict,
                str(ckpts[stage]),
                str(data["image"]),
                str(work / f"pred{stage}" / "scene.tif"),
                PREDICT_BUDGET,
                args.blocks,
            )
            results[part] = {
                "stage": stage,
                "image": list(SCENE),
                "budget": PREDICT_BUDGET,
                "blocks_computed": args.blocks,
                "peak_rss": report.peak_rss,
                "wall_s": report.wall_s,
                **report.value,
            }
        elif part == "train2":
            report = measure(
                bench.child_train,
                str(data["train"]),
                str(ckpts[1]),
                str(work / "train_run"),
                TRAIN_BUDGET,
                6,
                args.sub_batches,
            )
            results[part] = {
                "scene": list(TRAIN),
                "budget": TRAIN_BUDGET,
                "batch_size": 6,
                "peak_rss": report.peak_rss,
                "wall_s": report.wall_s,
                **report.value,
            }
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(
            f"{part}: peak RSS {results[part]['peak_rss'] / 1e9:.2f} GB in {results[part]['wall_s']:.0f} s", flush=True
        )
        write(results)


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "glnet_memory.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    from gigaseg.bench.machine import markdown_header

    gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
    lines = [
        "# GLNet memory (ResNet-50 branches, 7 classes, fp32, CPU)",
        "",
        markdown_header(results["machine"]),
        "",
        f"GPU: {results['gpu']}.",
        "",
        f"Baselines (fresh children): import torch only {gb(results['torch_import_rss'])}; "
        f"import gigaseg + timm (torchvision comes with timm) {gb(results['gigaseg_import_rss'])}.",
        "",
        "| job | bound | peak RSS (whole process) | above torch import | wall time |",
        "|---|---|---|---|---|",
    ]
    for part, label, bound in (
        ("predict2", "predict 6749x4499, stage-2 checkpoint, --max-memory 2GB", 2e9),
        ("predict3", "predict 6749x4499, stage-3 checkpoint, --max-memory 2GB", 2e9),
        ("train2", "stage-2 training, 2448 px scenes, batch 6, --max-memory 4GB", 4e9),
    ):
        if part in results:
            r = results[part]
            ok = "ok" if r["peak_rss"] <= bound else "OVER"
            lines.append(
                f"| {label} | {gb(bound)} {ok} | {gb(r['peak_rss'])} | "
                f"{gb(r['peak_rss'] - results['torch_import_rss'])} | {r['wall_s']:.0f} s |"
            )
    for part in ("predict2", "predict3", "train2"):
        if part in results:
            lines += ["", f"{part} log (peak RSS so far after each step):", ""]
            for entry in results[part]["log"]:
                lines.append(
                    "- "
                    + ", ".join(
                        f"{k} {gb(v) if k == 'peak_rss' or k == 'context_bytes' else v}" for k, v in entry.items()
                    )
                )
    notes = RESULTS / "glnet_memory.notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (RESULTS / "glnet_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
