"""GLNet memory on CPU with ResNet-50 branches: 30-Mpx prediction and stage-2 training.

Writes benchmarks/results/glnet_memory.{json,md}. Every figure is the peak RSS of a fresh
child process (``gigaseg.bench.measure``) next to a child that only imports torch.

1. **Prediction** of a 6749 x 4499 (30 Mpx) synthetic land-cover scene (tiled BigTIFF from
   ``gigaseg.bench.write_landcover_dataset``) with a stage-2 and a stage-3 checkpoint (7 classes,
   random weights: values do not change memory), through the steps of ``gigaseg.predict``
   as ``gigaseg predict --max-memory 2GB`` runs them (checkpoint load,
   ``gigaseg.build_predictor`` under the budget, ``gigaseg.predict_image`` with the budget's
   block side, tiled mask writer), the predictor wrapped (``SubsetPredictor``) to compute
   only some blocks. A full run computes ~190 patches of 508 px through ResNet-50 + GLNet's
   FPN twice per patch (local branch, ensemble) at ~10 s per patch on 2 shared cores, so by
   default only ``--blocks`` of the blocks (the side the predictor planned: 1024 or 2048 px)
   are computed (the middle row band, from the left); the others return uniform
   probabilities at no cost. ``prepare`` (global
   features; for stage 3 the local branch over ALL 150 patches and the local -> global merge)
   always runs in full. The peak does not depend on how many blocks run: a block allocates
   its buffers, evaluates its patches in sub-batches and releases everything but the cached
   logits of one column of patches; the per-block RSS log in the results shows the peak
   reached in the first computed block and not growing after.
2. **Stage-2 training** on 2448 x 2448 scenes (GLNet's DeepGlobe size; 36 patches each) via
   ``gigaseg.train(stage="global2local", init=<stage-1 checkpoint>)`` with
   ``--max-memory 4GB`` and the paper's batch of 6 images, two optimiser steps (7 scenes:
   batches of 6 and 1, so Adam's state exists for the second). Each image's step is cut to
   its first two sub-batches of patches (``--sub-batches``), while the whole batch (all 36
   patches of every image) stays loaded: each sub-batch's graph is freed by its backward,
   gradients and Adam state have fixed sizes, so the peak over two sub-batches is the peak
   over 36 (again shown by the per-step log). The measured child re-registers ``glnet``
   (``gigaseg.register``, same network and predictor) with a recipe whose stage-2 step is
   the real one on the truncated batch.

    python benchmarks/glnet_memory.py [--work DIR] [--parts predict2,predict3,train2] [--blocks 2]

``--smoke`` runs the same children on tiny work (a 2304x256 scene, 128-px training scenes, a
test_resnet GLNet with 64-px views, one computed block and one sub-batch), writing only to
``--work`` and ``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the measured children import this file as the module glnet_memory

#: the full run and ``--smoke``: scene (h, w), training scenes (h, w) and count, budgets, the network
FULL = {
    "scene": (4499, 6749),  # 30.4 Mpx
    "train": (2448, 2448),  # DeepGlobe's size
    "train_count": 7,  # batches of 6 and 1: Adam's state exists for the second step
    "batch_size": 6,
    "predict_budget": "2GB",
    "train_budget": "4GB",
    "encoder": "resnet50",
    "options": {},
}
SMOKE = {
    "scene": (2304, 256),  # three rows of 1024-px blocks: the middle one is computed
    "train": (128, 128),
    "train_count": 3,
    "batch_size": 2,
    "predict_budget": "1.5GB",  # 1024-px blocks
    "train_budget": "4GB",
    "encoder": "test_resnet",
    "options": {"size_g": 64, "size_p": 64, "min_overlap": 16, "fpn_channels": 16},
}


ENCODER_NAMES = {"resnet50": "ResNet-50"}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- data


def write_data(work: Path, setup: dict) -> dict:
    from gigaseg.bench import write_landcover_dataset

    out = {}
    for name, (height, width), count, seed in (
        ("scene", setup["scene"], 1, 0),
        ("train", setup["train"], setup["train_count"], 1),
    ):
        folder = work / name
        if not (folder / "dataset.yaml").exists():
            start = time.perf_counter()
            write_landcover_dataset(folder, count=count, height=height, width=width, seed=seed, val_fraction=0.0)
            print(f"wrote {name}: {count} x {height}x{width} in {time.perf_counter() - start:.0f} s", flush=True)
        out[name] = folder
    out["image"] = sorted((work / "scene" / "images").glob("*.tif"))[0]
    return out


def make_checkpoints(work: Path, data: Path, setup: dict) -> dict:
    import torch

    import gigaseg

    dataset = gigaseg.load_dataset(data, "train")
    tag = f"{setup['encoder']}_{setup['options'].get('size_p', 'paper')}"
    paths = {stage: work / f"glnet_{tag}_stage{stage}.ckpt" for stage in (1, 2, 3)}
    if all(p.exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = gigaseg.create_model(
        "glnet", encoder=setup["encoder"], num_classes=len(dataset.classes), **setup["options"]
    )
    info = gigaseg.data_info(dataset, gigaseg.Normalization.for_image(3, np.uint8))
    for stage, path in paths.items():
        if stage == 3:  # stage 3 retrains the global branch: the stage-1 copy becomes separate weights
            model.copy_global_to_fixed()
            with torch.no_grad():
                for param in model.global_branch.parameters():
                    param.add_(torch.randn_like(param) * 1e-3)
        model.set_stage(stage)
        gigaseg.save_checkpoint(path, model, info)
    return paths


# --------------------------------------------------------------------------- children


class SubsetPredictor:
    """Wraps a predictor: real work for the chosen blocks, uniform probabilities elsewhere; logs RSS.

    Args:
        inner: the method's predictor (``gigaseg.build_predictor``'s).
        compute: how many blocks of the middle row bands run the real predictor.
        log: a list that gets one entry per ``prepare`` and per computed block.
    """

    def __init__(self, inner, compute: int, log: list):
        self.inner, self.compute, self.log = inner, compute, log
        self.num_classes = inner.num_classes
        self.halo = inner.halo
        self.block_size = inner.block_size
        self.done = 0

    def prepare(self, source):
        """The inner predictor's context, timed and logged with the peak RSS after it."""
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
        """The inner predictor's probabilities for the first blocks of the middle bands, uniform ones elsewhere."""
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
    """What ``gigaseg.predict(checkpoint, image, out, max_memory=...)`` does, with the predictor wrapped
    in :class:`SubsetPredictor` (``blocks`` computed blocks)."""
    import gigaseg
    from gigaseg.bench import block_size_for, parse_size

    budget = parse_size(max_memory)
    model, info = gigaseg.load_model(checkpoint)
    source = gigaseg.open_image(image, max_memory=budget)
    normalization = gigaseg.Normalization.from_dict(info["normalization"])
    log: list = []
    predictor = SubsetPredictor(gigaseg.build_predictor(model, normalization, max_memory=budget), blocks, log)
    result = gigaseg.predict_image(
        predictor,
        source,
        out,
        block_size=block_size_for(budget),
        palette=np.asarray(info["palette"], dtype=np.uint8),
        class_names=info["classes"],
        resume=False,
        progress=False,
    )
    return {"log": log, "seconds": round(result.seconds, 1), "blocks": result.blocks_predicted}


def truncated_step(step, sub_batches: int, log: list):
    """GLNet's stage-2 ``step`` run on each batch's first ``sub_batches`` sub-batches of patches
    (the whole batch stays loaded), logging each step's peak RSS."""

    def run(ctx, batch):
        sub_batch = int(ctx.stage.options.get("sub_batch") or ctx.sub_batch)  # the recipe's planned sub-batch
        keep = sub_batches * sub_batch
        part = {
            **batch,
            "patches": batch["patches"][:, :keep],
            "patch_labels": batch["patch_labels"][:, :keep],
            "boxes": batch["boxes"][:, :keep],
        }
        start = time.perf_counter()
        losses = step(ctx, part)
        log.append(
            {
                "images": int(batch["patches"].shape[0]),
                "patches_loaded": int(batch["patches"].shape[1]),
                "patches_run": keep,
                "sub_batch": sub_batch,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss": _rss(),
            }
        )
        return losses

    return run


def child_train(
    data: str,
    init: str,
    out: str,
    max_memory: str,
    batch_size: int,
    sub_batches: int,
    encoder: str = "resnet50",
    options: dict | None = None,
) -> dict:
    """Stage-2 training from ``init`` with GLNet re-registered: its recipe's stage-2 step truncated."""
    import gigaseg
    from gigaseg.bench import parse_size

    log: list = []
    glnet = gigaseg.method_spec("glnet")

    def recipe(model):
        stages = glnet.recipe(model)
        for stage in stages:
            if stage.name == "global2local":
                stage.step = truncated_step(stage.step, sub_batches, log)
        return stages

    gigaseg.register("glnet", model=glnet.model, recipe=recipe, predictor=glnet.predictor)
    settings = gigaseg.TrainSettings(epochs=1, batch_size=batch_size, max_memory=parse_size(max_memory), progress=False)
    gigaseg.train(
        "glnet",
        data,
        out,
        encoder=encoder,
        options=options,
        stage="global2local",
        init=init,
        settings=settings,
        force=True,
    )
    return {"log": log}


def child_imports() -> dict:
    """Import gigaseg with its methods (and timm), nothing else."""
    import timm  # noqa: F401

    import gigaseg

    gigaseg.create_model  # noqa: B018 (resolving it imports every method)
    gigaseg.predict  # noqa: B018
    return {}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the scenes and checkpoints (default: /tmp/glnet_memory)")
    parser.add_argument("--parts", default="predict2,predict3,train2")
    parser.add_argument("--blocks", type=int, help="prediction blocks computed (default 2 of 12; --smoke: 1)")
    parser.add_argument("--sub-batches", type=int, help="training sub-batches run per image (default 2; --smoke: 1)")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and network, temporary output (a smoke run)")
    args = parser.parse_args(argv)
    import glnet_memory as bench  # this file as an importable module, for the children
    from gigaseg.bench import baseline_rss, describe_machine, measure

    setup = SMOKE if args.smoke else FULL
    blocks = args.blocks or (1 if args.smoke else 2)
    sub_batches = args.sub_batches or (1 if args.smoke else 2)
    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-glnet-memory-smoke-"))
        work, results_dir = args.work or scratch / "work", args.results or scratch / "results"
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
    else:
        work, results_dir = args.work or Path("/tmp/glnet_memory"), args.results or RESULTS
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work, setup)
    ckpts = make_checkpoints(work, data["train"], setup)
    parts = args.parts.split(",")
    previous = results_dir / "glnet_memory.json"
    results = json.loads(previous.read_text()) if previous.exists() else {}
    results.update(
        {
            "machine": describe_machine(),
            "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "torch_import_rss": baseline_rss(),
            "gpu": "none lent in this task: no CUDA figures",
            "encoder": setup["encoder"],
            "options": setup["options"],
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
                setup["predict_budget"],
                blocks,
            )
            results[part] = {
                "stage": stage,
                "image": list(setup["scene"]),
                "budget": setup["predict_budget"],
                "blocks_computed": blocks,
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
                setup["train_budget"],
                setup["batch_size"],
                sub_batches,
                setup["encoder"],
                setup["options"],
            )
            results[part] = {
                "scene": list(setup["train"]),
                "budget": setup["train_budget"],
                "batch_size": setup["batch_size"],
                "peak_rss": report.peak_rss,
                "wall_s": report.wall_s,
                **report.value,
            }
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(
            f"{part}: peak RSS {results[part]['peak_rss'] / 1e9:.2f} GB in {results[part]['wall_s']:.0f} s", flush=True
        )
        write(results, results_dir)
    print(f"results in {results_dir}", flush=True)


def write(results: dict, results_dir: Path = RESULTS) -> None:
    from gigaseg.bench import machine_header, parse_size

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "glnet_memory.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
    encoder = results.get("encoder", "resnet50")
    lines = [
        f"# GLNet memory ({ENCODER_NAMES.get(encoder, encoder)} branches, 7 classes, fp32, CPU)",
        "",
        machine_header(results["machine"]),
        "",
        f"GPU: {results['gpu']}.",
        "",
        f"Baselines (fresh children): import torch only {gb(results['torch_import_rss'])}; "
        f"import gigaseg + timm (torchvision comes with timm) {gb(results['gigaseg_import_rss'])}.",
        "",
        "| job | bound | peak RSS (whole process) | above torch import | wall time |",
        "|---|---|---|---|---|",
    ]
    for part in ("predict2", "predict3", "train2"):
        if part not in results:
            continue
        r = results[part]
        if part == "train2":
            height, width = r["scene"]
            side = f"{height} px" if height == width else f"{width}x{height}"
            label = f"stage-2 training, {side} scenes, batch {r['batch_size']}, --max-memory {r['budget']}"
        else:
            label = (
                f"predict {r['image'][1]}x{r['image'][0]}, stage-{r['stage']} checkpoint, --max-memory {r['budget']}"
            )
        bound = parse_size(r["budget"])
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
    notes = results_dir / "glnet_memory.notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    (results_dir / "glnet_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
