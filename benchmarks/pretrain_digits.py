"""Pretrain theta1 on handwritten digits: the UltraMNIST benchmark's stand-in for ImageNet weights.

The paper's theta1 starts from ImageNet weights; none can be downloaded here, and from
random weights test_resnet does not learn to read the small digit within a CPU budget
(benchmarks/results/patchgd.md). This script makes a local weights file instead, the way a
user without network access would: a timm classifier trained on another digit source, saved
as a plain timm classification state dict that ``--pretrained FILE`` loads like ImageNet
weights (``gigaseg.models.encoders.load_weights_file``).

The digits are scikit-learn's bundled handwritten ones (1797 8x8 images by 43 writers), a
different hand from the Pillow font ``gigaseg synth ultramnist`` draws with, scaled to
6-110 px (log-uniform), rotated up to 15 degrees and put on black 128-px canvases among
distracting strokes, lines and boxes. The first 1440 images train, the last 357 (other
writers) score. Every method of the benchmark then starts from the same file, so the
comparison between them stays fair.

    python benchmarks/pretrain_digits.py OUT.pth [--encoder test_resnet] [--steps 3000]

writes OUT.pth and OUT.json (settings, loss, validation accuracy by digit height).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits
from torch import nn

CANVAS = 128
HEIGHTS = (6.0, 110.0)
TRAIN_IMAGES = 1440


def glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 images (8x8, ink white) and their labels."""
    digits = load_digits()
    ink = np.where(digits.images >= 2, digits.images, 0)  # the faintest level would draw the glyph's box
    return (ink * (255 / 16)).astype(np.uint8), digits.target.astype(np.int64)


def canvas(rng: np.random.Generator, glyph: np.ndarray) -> tuple[np.ndarray, int]:
    """One 128x128 uint8 canvas (``glyph`` scaled, rotated and placed whole, plus distractors)
    and the digit's height."""
    height = int(round(math.exp(rng.uniform(*np.log(HEIGHTS)))))
    width = max(3, int(round(height * rng.uniform(0.6, 0.9))))
    digit = Image.fromarray(glyph).resize((width, height), Image.BILINEAR)
    digit = digit.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=True)
    digit = Image.fromarray((np.asarray(digit) * rng.uniform(0.4, 1.0)).astype(np.uint8))
    image = Image.new("L", (CANVAS, CANVAS), 0)
    top = int(rng.integers(0, max(1, CANVAS - digit.height + 1)))
    left = int(rng.integers(0, max(1, CANVAS - digit.width + 1)))
    box = (left, top, left + digit.width, top + digit.height)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 5))):  # distractors kept off the digit's box
        size = float(np.exp(rng.uniform(np.log(4), np.log(100))))
        x, y = rng.uniform(-size / 2, CANVAS - size / 2, size=2)
        shape = (x, y, x + size * rng.uniform(0.3, 1.0), y + size * rng.uniform(0.3, 1.0))
        if shape[0] < box[2] and shape[2] > box[0] and shape[1] < box[3] and shape[3] > box[1]:
            continue
        fill = int(rng.integers(60, 256))
        kind = rng.integers(3)
        if kind == 0:
            draw.line(shape, fill=fill, width=int(rng.integers(1, 4)))
        elif kind == 1:
            draw.ellipse(shape, outline=fill, width=int(rng.integers(1, 3)))
        else:
            draw.rectangle(shape, outline=fill, width=int(rng.integers(1, 3)))
    image.paste(digit, (left, top), digit)
    return np.asarray(image), height


def network_input(canvases, mean: float, std: float) -> torch.Tensor:
    """uint8 canvases ``(N, H, W)`` normalised by the canvases' mean and std (as gigaseg normalises
    a dataset by its statistics), grey repeated to the 3 channels of an ImageNet-style state dict."""
    pixels = np.stack(canvases).astype(np.float32) / 255
    return torch.from_numpy((pixels - mean) / std)[:, None].expand(-1, 3, -1, -1).contiguous()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="weights file to write (.pth)")
    parser.add_argument("--encoder", default="test_resnet")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, labels = glyphs()
    train, val = np.arange(TRAIN_IMAGES), np.arange(TRAIN_IMAGES, len(images))
    sample = np.stack([canvas(rng, images[i])[0] for i in rng.choice(train, 2000)]).astype(np.float32) / 255
    mean, std = float(sample.mean()), float(sample.std())

    model = timm.create_model(args.encoder, pretrained=False, num_classes=10, in_chans=3)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps)
    loss_fn = nn.CrossEntropyLoss()
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(1, args.steps + 1):
        picks = rng.choice(train, size=args.batch_size)
        x = network_input([canvas(rng, images[i])[0] for i in picks], mean, std)
        loss = loss_fn(model(x), torch.from_numpy(labels[picks]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0:
            print(f"step {step}/{args.steps}: loss {np.mean(losses[-200:]):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    # validation: other writers' digits, 20 canvases each, accuracy by digit height
    model.eval()
    val_rng = np.random.default_rng(12345)
    bins = [6, 12, 24, 48, 111]
    hits, counts = np.zeros(len(bins) - 1), np.zeros(len(bins) - 1)
    with torch.no_grad():
        for _ in range(20):
            pixels, heights = zip(*(canvas(val_rng, images[i]) for i in val))
            right = model(network_input(pixels, mean, std)).argmax(1).numpy() == labels[val]
            where = np.digitize(heights, bins) - 1
            np.add.at(hits, where, right)
            np.add.at(counts, where, 1)
    accuracy = float(hits.sum() / counts.sum())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    report = {"encoder": args.encoder, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "seed": args.seed, "canvas": CANVAS, "heights": HEIGHTS, "train_images": TRAIN_IMAGES,
              "val_images": int(len(val)), "final_loss": float(np.mean(losses[-200:])),
              "val_accuracy": accuracy,
              "val_accuracy_by_height": {f"{lo}-{hi - 1} px": float(h / c) if c else None
                                         for lo, hi, h, c in zip(bins, bins[1:], hits, counts)},
              "wall_s": time.perf_counter() - start}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
