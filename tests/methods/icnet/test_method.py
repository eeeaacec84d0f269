"""ICNet's recipe on the engine: cascade label guidance loss, views, predictor, end-to-end training."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from gigaseg.api import predict, train
from gigaseg.cli import main as cli_main
from gigaseg.data.cityscapes import LABEL_IDS
from gigaseg.data.loader import load_dataset
from gigaseg.geometry import Window
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.icnet.model import CascadeOutputs
from gigaseg.methods.icnet.predictor import tile_predictor
from gigaseg.methods.icnet.recipe import (
    ScaledCrops,
    cascade_label_guidance_loss,
    downsample_labels,
    icnet_stages,
    pspnet_stages,
)
from gigaseg.methods.registry import create_model
from gigaseg.training.recipe import TrainSettings

TINY = {"width": 0.25, "crop_size": 64, "tile_size": [64, 128], "tile_overlap": 16}


# ----------------------------------------------------------------------------- loss


def test_nearest_downsampling_copies_labels():
    labels = torch.randint(0, 4, (2, 64, 128))
    labels[:, 10:30, 50:90] = 255
    for s in (4, 8, 16):
        torch.testing.assert_close(downsample_labels(labels, (64 // s, 128 // s)), labels[:, ::s, ::s])
    # non-integer factors follow F.interpolate's nearest rule, and stay integer labels
    odd = downsample_labels(labels, (13, 29))
    want = F.interpolate(labels[:, None].float(), size=(13, 29), mode="nearest")[:, 0].long()
    torch.testing.assert_close(odd, want)
    assert set(odd.unique().tolist()) <= set(labels.unique().tolist())


def test_nearest_is_not_bilinear_at_an_ignore_border():
    labels = torch.ones(1, 8, 8, dtype=torch.long)
    labels[:, :, 1::2] = 255  # alternating class 1 / ignore columns
    down = downsample_labels(labels, (4, 4))
    assert set(down.unique().tolist()) == {1}  # every second column: class 1
    bilinear = F.interpolate(labels[:, None].float(), size=(4, 4), mode="bilinear", align_corners=False)
    assert not set(bilinear.unique().tolist()) <= {1.0, 255.0}  # what the faulty ports feed the loss: 128


def test_cascade_loss_weights_and_levels():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 64, 128))
    labels[0, :8] = 255
    out = CascadeOutputs(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 16, 32))
    loss, parts = cascade_label_guidance_loss(out, labels)
    ce = [F.cross_entropy(o, labels[:, ::s, ::s], ignore_index=255) for o, s in zip(out, (16, 8, 4))]
    torch.testing.assert_close(loss, 0.16 * ce[0] + 0.4 * ce[1] + 1.0 * ce[2])
    for name, value in zip(("loss_16", "loss_8", "loss_4"), ce):
        torch.testing.assert_close(parts[name], value)
    weighted, _ = cascade_label_guidance_loss(out, labels, weights=(0.0, 0.0, 1.0))
    torch.testing.assert_close(weighted, ce[2])
    assert create_model("icnet", encoder="icnet_resnet50_half", num_classes=3).options["loss_weights"] == [
        0.16,
        0.4,
        1.0,
    ]


def test_ignored_pixels_do_not_count():
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 7  # a custom ignore index
    out = [torch.randn(1, 3, 32 // s, 32 // s, requires_grad=True) for s in (16, 8, 4)]
    loss, _ = cascade_label_guidance_loss(out, labels, ignore_index=7)
    changed = [o.detach().clone() for o in out]
    for o in changed:
        o[..., o.shape[-1] // 2 :] += 100.0  # only where the labels are ignored
    loss2, _ = cascade_label_guidance_loss(changed, labels, ignore_index=7)
    torch.testing.assert_close(loss, loss2)
    everything_ignored, _ = cascade_label_guidance_loss(out, torch.full((1, 32, 32), 7), ignore_index=7)
    everything_ignored.backward()
    assert float(everything_ignored.detach()) == 0.0 and all(torch.isfinite(o.grad).all() for o in out)


# ----------------------------------------------------------------------------- recipe and views


def test_recipe_follows_the_paper():
    model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=3, **TINY)
    (stage,) = icnet_stages(model)
    assert (stage.name, stage.optimizer, stage.lr, stage.momentum, stage.weight_decay) == (
        "icnet",
        "sgd",
        0.01,
        0.9,
        1e-4,
    )
    assert (stage.schedule, stage.poly_power, stage.batch_size) == ("poly", 0.9, 16)
    assert tuple(stage.sample_inputs(model)[0].shape) == (1, 3, 64, 64)
    (psp,) = pspnet_stages(create_model("pspnet", encoder="pspnet_resnet50", num_classes=3, width=0.125))
    assert (psp.optimizer, psp.lr) == ("sgd", 0.01)


def test_scaled_crops(tiny_dataset):
    data = load_dataset(tiny_dataset, "train")
    norm = Normalization.for_image(3, np.uint8)
    views = ScaledCrops(data, norm, crop=128, scale_range=(0.5, 2.0), crops_per_image=4, seed=3)
    assert len(views) == 4 * len(data)
    scales, padded = [], 0
    for i in range(len(views)):
        item = views[i]
        assert tuple(item["image"].shape) == (3, 128, 128) and tuple(item["label"].shape) == (128, 128)
        values = set(item["label"].unique().tolist())
        assert values <= {0, 1, 2, 255}
        scales.append(item["scale"])
        if item["scale"] * 96 < 127:  # the scaled 96-px image is smaller than the crop: padded with ignore
            assert (item["label"][-1] == 255).all() and (item["image"][:, -1] == 0).all()
            padded += 1
    assert all(0.5 <= s <= 2.0 for s in scales) and padded > 0
    again = ScaledCrops(data, norm, crop=128, crops_per_image=4, seed=3)
    assert torch.equal(again[5]["image"], views[5]["image"])  # deterministic per (seed, epoch, index)
    again.set_epoch(1)
    assert not torch.equal(again[5]["image"], views[5]["image"])


# ----------------------------------------------------------------------------- predictor


def test_predictor_tiles_large_images_and_runs_frames_whole():
    model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=3, **TINY)
    predictor = tile_predictor(model, Normalization.for_image(3, np.uint8))
    frame = predictor.grid(60, 100)
    assert len(frame) == 1 and frame.patch == (60, 100)  # a frame smaller than the tile: one pass at its size
    big = predictor.grid(300, 500)
    assert big.patch == (64, 128) and big.shape == (6, 5)
    assert big.row_starts[1] - big.row_starts[0] == 48 and big.col_starts[-1] == 500 - 128  # overlap 16, flush
    assert predictor.net.folded_batchnorms == 63
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.net.modules())


def test_folded_predictor_matches_model_and_blocks_have_no_seams():
    torch.manual_seed(0)
    model = create_model("icnet", encoder="icnet_resnet50_half", num_classes=3, **TINY)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    image = np.random.default_rng(0).integers(0, 255, (150, 260, 3), dtype=np.uint8)
    source = open_image(image)
    norm = Normalization.for_image(3, np.uint8)
    predictor = tile_predictor(model, norm)
    x = predictor.to_tensor(image[:64, :128])
    torch.testing.assert_close(predictor.logits(x), model.predict(x), rtol=1e-4, atol=1e-4)
    grid = predictor.prepare(source)
    whole = predictor.predict_block(source, grid, Window(0, 0, 150, 260))
    left = predictor.predict_block(source, grid, Window(0, 0, 150, 100))
    right = predictor.predict_block(source, grid, Window(0, 100, 150, 160))
    np.testing.assert_allclose(np.concatenate([left, right], axis=2), whole, atol=1e-5)
    np.testing.assert_allclose(whole.sum(axis=0), 1.0, atol=1e-4)
    bf16 = tile_predictor(model, norm, precision="bf16-mixed")
    assert (
        np.mean(bf16.predict_block(source, grid, Window(0, 0, 64, 128)).argmax(0) == whole[:, :64, :128].argmax(0))
        > 0.9
    )


# ----------------------------------------------------------------------------- end to end


def write_cityscapes(root, size=(64, 128), cities=("aachen", "bremen"), per_city=2, seed=0):
    """A tiny dataset in Cityscapes' layout: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine labelIds."""
    rng = np.random.default_rng(seed)
    h, w = size
    colours = {7: (128, 64, 128), 11: (70, 70, 70), 21: (107, 142, 35), 26: (0, 0, 142)}
    for split, split_cities in (("train", cities), ("val", cities[:1])):
        for city in split_cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            for i in range(per_city if split == "train" else 1):
                ids = np.full((h, w), 7, np.uint8)  # road
                ids[: h // 3] = 11  # building
                ids[: h // 3, int(rng.integers(w // 2)) :][:, : w // 4] = 21  # vegetation
                top, left = int(rng.integers(h // 3, h - 12)), int(rng.integers(0, w - 24))
                ids[top : top + 10, left : left + 20] = 26  # a car
                ids[-2:] = 0  # unlabeled (void): ignored
                image = np.zeros((h, w, 3), np.uint8)
                for label, colour in colours.items():
                    image[ids == label] = colour
                image = (image + rng.integers(-20, 20, image.shape)).clip(0, 255).astype(np.uint8)
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def test_tiny_end_to_end_train_on_cityscapes_layout(tmp_path):
    data = write_cityscapes(tmp_path / "cityscapes")
    dataset = load_dataset(data, "train")
    assert type(dataset).__name__ == "Cityscapes" and len(dataset) == 4 and len(dataset.classes) == 19
    assert LABEL_IDS[0] == 7 and dataset.ignore_index == 255
    run = tmp_path / "run"
    settings = TrainSettings(epochs=2, batch_size=2, lr=0.01, progress=False, seed=0)
    result = train("icnet", data, run, encoder="icnet_resnet50_half", options=TINY, settings=settings)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and len(result["history"]) == 2
    for row in rows:
        assert all(np.isfinite(float(row[k])) for k in ("train_loss", "train_loss_16", "train_loss_8", "train_loss_4"))
        assert 0.0 <= float(row["val_miou"]) <= 1.0
        total = 0.16 * float(row["train_loss_16"]) + 0.4 * float(row["train_loss_8"]) + float(row["train_loss_4"])
        assert float(row["train_loss"]) == pytest.approx(total, rel=1e-4)
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["model"]["config"]["method"] == "icnet" and ckpt["data"]["classes"][0] == "road"
    assert not any(k.endswith("running_mean") and "aux" in k for k in ckpt["model"]["state_dict"])

    # a frame, then an ultra-high-resolution image tile by tile
    frame = next((data / "leftImg8bit" / "val").rglob("*.png"))
    mask = tifffile.imread(predict(run, frame, tmp_path / "pred", progress=False).mask_path)
    assert mask.shape == (64, 128) and mask.max() < 19
    big = np.tile(np.asarray(Image.open(frame)), (5, 4, 1))  # 320 x 512: a 7 x 5 grid of 64 x 128 tiles
    tifffile.imwrite(tmp_path / "big.tif", big, tile=(64, 64))
    result = predict(run, tmp_path / "big.tif", tmp_path / "pred", progress=False)
    assert tifffile.imread(result.mask_path).shape == (320, 512)


def test_cli_train_and_predict(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli_main(
        [
            "train",
            "--method",
            "icnet",
            "--encoder",
            "icnet_resnet50_half",
            "--data",
            str(tiny_dataset),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--set",
            "width=0.25",
            "--set",
            "crop_size=64",
            "--set",
            "tile_size=64",
            "--set",
            "tile_overlap=16",
            "--set",
            "crops_per_image=2",
        ]
    )
    assert code == 0 and (run / "best.ckpt").exists()
    assert "trained icnet: 1 epochs" in capsys.readouterr().out
    image = next((tiny_dataset / "images").glob("*.tif"))
    code = cli_main(["predict", str(image), "--checkpoint", str(run), "--out", str(tmp_path / "pred")])
    assert code == 0
    mask = tifffile.imread(tmp_path / "pred" / f"{image.stem}.tif")
    assert mask.shape == (96, 96) and mask.max() <= 2
