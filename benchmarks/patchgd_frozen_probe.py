"""What a frozen theta1 carries on UltraMNIST: the patch grid, the global patch, a downsample.

A diagnostic for issue 7's comparison of PatchGD with and without the global patch. A full
PatchGD training at 1024 px takes half an hour per CPU epoch here; this asks the cheaper
question underneath it: given theta1's pretrained encoder frozen, which view of the image
holds the information the label needs? For each image it encodes

- ``grid``: every ``P x P`` patch (the latent grid Z, one pooled feature vector per patch),
- ``global``: the whole image resized to ``P x P`` (the paper's global patch),
- ``downsampled``: the whole image resized to ``--downsampled`` px (the downsampled baseline's
  input at the benchmark's memory budget),

then trains a small head (theta2's :class:`gigaseg.bench.GridHead`) on each view,
and on the grid with the global patch concatenated to every cell, to predict the large
digit, the small digit and the label (their sum mod 10). A view whose head cannot learn a
target does not carry it to theta2; a global patch that adds nothing to the grid's score
brings theta2 nothing that the frozen features lack (end-to-end training of theta1 can still
change that: benchmarks/patchgd.py measures it).

Features are cached per patch size under ``--work``; the images are written with
``gigaseg.bench.write_ultramnist_dataset`` and normalised as gigaseg normalises a grey image.

    python benchmarks/patchgd_frozen_probe.py --pretrained digits_fonts.pth [--patch-sizes 128,64]

writes benchmarks/results/patchgd_frozen_probe.json and .md (``--results`` elsewhere). ``--smoke``
runs the same path in seconds (20 images of 128 px, 64- and 32-px patches, 2 epochs; without
``--pretrained``, a randomly initialised weights file of ``--encoder``), writing only to
``--work`` and ``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("large", "small", "label")
VIEWS = ("grid", "grid+global", "global", "downsampled")
VIEW_TEXT = {
    "grid": "patch grid Z (no global patch)",
    "grid+global": "Z with the global patch concatenated to every cell",
    "global": "global patch alone",
    "downsampled": "downsampled image alone",
}
TARGET_TEXT = {"large": "large digit (6 or 9)", "small": "small digit (6 or 9)", "label": "label (sum mod 10)"}
#: ``--smoke``: settings that replace the defaults
SMOKE = {"count": 20, "size": 128, "patch_sizes": "64,32", "downsampled": 64, "epochs": 2}


def write_data(data: Path, count: int, size: int, seed: int, min_digit: int) -> dict:
    from gigaseg.bench import UltraMnistConfig, write_ultramnist_dataset

    if not (data / "synth.json").exists():
        write_ultramnist_dataset(
            data,
            count=count,
            size=size,
            seed=seed,
            val_fraction=0.2,
            config=UltraMnistConfig(digits=(2, 2), values=(6, 9), min_digit=min_digit),
        )
    return json.loads((data / "synth.json").read_text())


def targets_of(manifest: dict) -> dict[str, np.ndarray]:
    """Per image: the large digit is 9, the small digit is 9, the label's class index (2, 5, 8 -> 0, 1, 2)."""
    images = manifest["images"]
    classes = {label: i for i, label in enumerate(sorted({m["label"] for m in images}))}
    by_size = [sorted(m["digits"], key=lambda d: -d["ink_height"]) for m in images]
    return {
        "large": np.array([int(d[0]["value"] == 9) for d in by_size]),
        "small": np.array([int(d[-1]["value"] == 9) for d in by_size]),
        "label": np.array([classes[m["label"]] for m in images]),
    }


def encode_views(data: Path, manifest: dict, weights: str, encoder_name: str, patch: int, downsampled: int) -> dict:
    """Pooled deepest features of theta1's encoder for the grid, the global patch and the downsample."""
    import tifffile

    from gigaseg import Normalization, create_model
    from gigaseg.bench import gather_patches, global_view_of

    model = create_model(
        "patchgd_classifier", encoder=encoder_name, num_classes=3, in_channels=1, pretrained=weights, patch_size=patch
    ).eval()
    encoder = model.theta1.encoder
    grey = Normalization.for_image(1, np.uint8)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return encoder(x)[-1].mean(dim=(-2, -1))

    grids, globals_, downs = [], [], []
    start = time.time()
    with torch.no_grad():
        for i, m in enumerate(manifest["images"]):
            pixels = tifffile.imread(data / "images" / f"{m['name']}.tif")
            x = torch.from_numpy(grey.apply(pixels))[None]  # (1, 1, H, W)
            side = x.shape[-1] // patch  # the framework's own patches and global patch, row-major
            patches = gather_patches(x, torch.arange(side * side)[None], side, patch)
            grids.append(pooled(patches).view(side, side, -1).permute(2, 0, 1))
            globals_.append(pooled(global_view_of(x, patch))[0])
            downs.append(pooled(global_view_of(x, downsampled))[0])
            if i % 500 == 0:
                print(f"[frozen probe] patch {patch}: encoded {i} images in {time.time() - start:.0f} s", flush=True)
    return {
        "grid": torch.stack(grids),
        "global": torch.stack(globals_),
        "downsampled": torch.stack(downs),
        "seconds": time.time() - start,
    }


def head_input(features: dict, view: str, index: torch.Tensor) -> torch.Tensor:
    grid = features["grid"][index]
    if view == "grid":
        return grid
    if view == "grid+global":
        g = features["global"][index][:, :, None, None].expand(-1, -1, *grid.shape[-2:])
        return torch.cat([grid, g], 1)
    # a single vector as a 2x2 grid of copies, so the same head reads it
    return features[view][index][:, :, None, None].expand(-1, -1, 2, 2)


def train_head(
    features: dict, view: str, target: np.ndarray, train: torch.Tensor, val: torch.Tensor, epochs: int, seed: int
) -> dict:
    from gigaseg.bench import GridHead

    torch.manual_seed(seed)
    y = torch.from_numpy(target)
    head = GridHead(head_input(features, view, train[:1]).shape[1], 64, int(y.max()) + 1, 2, 0.2)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * -(-len(train) // 32)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(epochs):
        head.train()
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 32):
            batch = order[i : i + 32]
            loss = F.cross_entropy(head(head_input(features, view, batch)), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    head.eval()
    with torch.no_grad():

        def accuracy(index):
            return float((head(head_input(features, view, index)).argmax(1) == y[index]).float().mean())

        return {"train_accuracy": accuracy(train), "val_accuracy": accuracy(val)}


def markdown(results: dict) -> str:
    from gigaseg.bench import machine_header

    s = results["settings"]
    lines = [
        "# What a frozen theta1 carries on UltraMNIST (issue 7 diagnostic)",
        "",
        machine_header(results["machine"]),
        "",
        f"{s['count']} images of {s['size']}x{s['size']} ({s['train']} train / {s['val']} validation; "
        f"`gigaseg synth ultramnist` settings: digits 6 and 9, one 30-60% of the side, one from "
        f"{s['min_digit']} px), encoder {s['encoder']} frozen from `{s['pretrained']}`; a GridHead "
        f"(theta2's head) trained {s['epochs']} epochs on each view's pooled deepest features "
        f"(Adam 1e-3, cosine, batch 32, seed 0; data seed {s['seed']}). Validation accuracy (train accuracy "
        "in brackets). Chance: 0.5 for a digit, the majority share for the label "
        f"({results['label_majority']:.3f}). A view whose head cannot learn a target does not carry it "
        "to theta2; where the grid alone scores at least as well as the grid with the global patch, the "
        "global patch brings theta2 nothing theta1's features lack (training theta1 end to end can still "
        "change that, which the full benchmark, benchmarks/patchgd.py, measures).",
        "",
    ]
    for patch, part in results["patch_sizes"].items():
        side = s["size"] // int(patch)
        lines += [
            f"## {patch}-px patches ({side}x{side} grid; global patch {patch} px, downsample "
            f"{s['downsampled']} px; encoding took {part['encode_seconds']:.0f} s)",
            "",
            "| view | " + " | ".join(TARGET_TEXT[t] for t in TARGETS) + " |",
            "|---|" + "---|" * len(TARGETS),
        ]
        for view in VIEWS:
            cells = [f"{part[view][t]['val_accuracy']:.3f} ({part[view][t]['train_accuracy']:.3f})" for t in TARGETS]
            lines.append(f"| {VIEW_TEXT[view]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def random_weights(path: Path, encoder: str) -> str:
    """``--smoke`` without ``--pretrained``: a randomly initialised timm classifier of ``encoder``
    saved as a weights file, so the same loading path runs.

    Args:
        path: the file to write.
        encoder: a timm model name.

    Returns:
        ``path`` as a string.
    """
    import timm

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model(encoder, pretrained=False, num_classes=10).state_dict(), path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pretrained", help="theta1 weights file (benchmarks/pretrain_digits.py; required but with --smoke)"
    )
    parser.add_argument("--encoder", default="test_resnet")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--min-digit", type=int, default=8)
    parser.add_argument("--patch-sizes", default="128,64")
    parser.add_argument("--downsampled", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=11, help="the data's seed (the heads use 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="data and feature caches (default: /tmp/patchgd_frozen_probe)")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, temporary output (a smoke run)")
    args = parser.parse_args(argv)
    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-frozen-probe-smoke-"))
        args.work, args.results = args.work or scratch / "work", args.results or scratch / "results"
        if args.results.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.pretrained = args.pretrained or random_weights(args.work / f"random_{args.encoder}.pth", args.encoder)
    elif not args.pretrained:
        parser.error("--pretrained is required (but with --smoke)")
    args.work = args.work or Path("/tmp/patchgd_frozen_probe")
    args.results = args.results or RESULTS
    sys.path.insert(0, str(ROOT / "src"))
    from gigaseg.bench import describe_machine

    torch.set_num_threads(args.threads)
    data = args.work / f"ultramnist_{args.size}"
    manifest = write_data(data, args.count, args.size, args.seed, args.min_digit)
    targets = targets_of(manifest)
    n_val = len(manifest["splits"]["val"])  # the generator puts the val split last
    train, val = torch.arange(args.count - n_val), torch.arange(args.count - n_val, args.count)
    results = {
        "machine": describe_machine(),
        "settings": {
            "count": args.count,
            "size": args.size,
            "min_digit": args.min_digit,
            "train": len(train),
            "val": len(val),
            "encoder": args.encoder,
            "pretrained": Path(args.pretrained).name,
            "epochs": args.epochs,
            "downsampled": args.downsampled,
            "seed": args.seed,
        },
        "label_majority": float(np.bincount(targets["label"][val.numpy()]).max() / len(val)),
        "patch_sizes": {},
    }
    for patch in (int(p) for p in args.patch_sizes.split(",")):
        if args.size % patch:
            parser.error(f"--patch-sizes: {patch} does not divide --size {args.size}")
        cache = args.work / f"features_{args.size}_{patch}.pt"
        if cache.exists():
            features = torch.load(cache, weights_only=True)
        else:
            features = encode_views(data, manifest, args.pretrained, args.encoder, patch, args.downsampled)
            torch.save(features, cache)
        part = {"encode_seconds": float(features["seconds"])}
        for view in VIEWS:
            part[view] = {t: train_head(features, view, targets[t], train, val, args.epochs, 0) for t in TARGETS}
            print(
                f"[frozen probe] patch {patch}, {view}: "
                + ", ".join(f"{t} {part[view][t]['val_accuracy']:.3f}" for t in TARGETS),
                flush=True,
            )
        results["patch_sizes"][str(patch)] = part
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "patchgd_frozen_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / "patchgd_frozen_probe.md").write_text(markdown(results) + "\n")
    print(f"results in {args.results}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
