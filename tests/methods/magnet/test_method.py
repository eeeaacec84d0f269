"""MagNet on the engine: training views, both stages end to end, and the whole-image predictor."""

from __future__ import annotations

import csv
import json

import numpy as np
import tifffile
import torch
from PIL import Image

from gigaseg.api import evaluate, predict, train
from gigaseg.cli import main
from gigaseg.data.loader import load_dataset
from gigaseg.geometry import Window
from gigaseg.inference.stream import predict_image
from gigaseg.io.base import read_resized
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.magnet.predictor import MagNetPredictor, block_cells, frame_around
from gigaseg.methods.magnet.recipe import BackboneCrops, RefinementPairs, magnet_stages
from gigaseg.methods.registry import build_predictor, create_model
from gigaseg.training.recipe import TrainSettings

NORM = Normalization.for_image(3, np.uint8)


def tiny_model(num_classes=3, **options):
    torch.manual_seed(0)
    base = {"scales": [[24, 24], [48, 48], [96, 96]], "input_size": [32, 32], "median_kernel": 3, "crops_per_image": 2}
    return create_model("magnet", encoder="test_resnet", num_classes=num_classes, **{**base, **options})


def scene(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((16, 16, 1)))[:height, :width]
    return (big * 0.7 + rng.integers(0, 77, (height, width, 3))).astype(np.uint8)


# --------------------------------------------------------------------------- training views


def test_backbone_crops_any_scale_resized_to_input(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    model = tiny_model()
    views = BackboneCrops(dataset, NORM, model, crops_per_image=4, augment=False, seed=3)
    assert len(views) == 4 * len(dataset)
    sizes = {0: (96, 96), 1: (48, 48), 2: (24, 24)}  # the patch of each scale in 96-px image pixels
    seen = set()
    for index in range(len(views)):
        item = views[index]
        top, left, h, w = item["window"].tolist()
        assert (h, w) == sizes[item["scale"]]
        assert 0 <= top <= 96 - h and 0 <= left <= 96 - w
        assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
        sample = dataset[index // 4]
        window = Window(top, left, h, w)
        expected = NORM.apply(read_resized(sample.image, window, (32, 32)))
        np.testing.assert_array_equal(item["image"].numpy(), expected)
        label = sample.mask.read(window, out_size=(32, 32), resample="nearest")[..., 0]
        np.testing.assert_array_equal(item["label"].numpy(), label)
        seen.add(item["scale"])
    assert seen == {0, 1, 2}
    views = BackboneCrops(dataset, NORM, model, crops_per_image=4, augment=True, seed=3)
    epoch0 = [views[i] for i in range(len(views))]
    assert all(torch.equal(a["image"], views[i]["image"]) for i, a in enumerate(epoch0))  # deterministic
    views.set_epoch(1)
    assert any(not torch.equal(a["window"], views[i]["window"]) for i, a in enumerate(epoch0))


def test_refinement_pairs_coarse_frame_fine_crop_and_box(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    model = tiny_model()
    plain = RefinementPairs(dataset, NORM, model, crops_per_image=4, augment=False, seed=1)
    augmented = RefinementPairs(dataset, NORM, model, crops_per_image=4, augment=True, seed=1)
    flips = set()
    for index in range(len(plain)):
        item = plain[index]
        assert item["scale"] in (1, 2)
        frame = Window(*item["frame"].tolist())
        crop = Window(*item["window"].tolist())
        assert frame == Window(0, 0, 96, 96)  # a 96-px image is its own frame
        assert crop.shape == {1: (48, 48), 2: (24, 24)}[item["scale"]] and frame.contains(crop)
        expected_box = [crop.top / 96, crop.left / 96, crop.bottom / 96, crop.right / 96]
        np.testing.assert_allclose(item["box"].numpy(), expected_box)
        sample = dataset[index // 4]
        np.testing.assert_array_equal(item["coarse"].numpy(), NORM.apply(read_resized(sample.image, frame, (32, 32))))
        np.testing.assert_array_equal(item["image"].numpy(), NORM.apply(read_resized(sample.image, crop, (32, 32))))
        # augmentation flips the whole pair and mirrors the box with it
        other = augmented[index]
        y0, x0, y1, x1 = expected_box
        box = other["box"].numpy()
        hflip, vflip = not np.isclose(box[1], x0), not np.isclose(box[0], y0)
        flips.add((hflip, vflip))
        np.testing.assert_allclose(
            box, [1 - y1 if vflip else y0, 1 - x1 if hflip else x0, 1 - y0 if vflip else y1, 1 - x0 if hflip else x1]
        )
        dims = [d for d, flip in ((-2, vflip), (-1, hflip)) if flip]
        for key in ("coarse", "image", "label"):
            want = item[key].flip(dims) if dims else item[key]
            assert torch.equal(other[key], want), key
    assert len(flips) >= 3


def test_large_images_train_on_finest_scale_frames(tmp_path, make_tiny_dataset):
    root = make_tiny_dataset(tmp_path / "big", count=2, size=200)
    dataset = load_dataset(root, "train")
    model = tiny_model()  # finest scale 96: a 200-px image is cut into 96-px frames
    pairs = RefinementPairs(dataset, NORM, model, crops_per_image=8, augment=False, seed=0)
    frames = {tuple(pairs[i]["frame"].tolist()) for i in range(len(pairs))}
    assert all(f[2:] == (96, 96) and f[0] + 96 <= 200 and f[1] + 96 <= 200 for f in frames)
    assert len(frames) > 1
    crops = BackboneCrops(dataset, NORM, model, crops_per_image=8, augment=False, seed=0)
    assert {tuple(crops[i]["window"][2:].tolist()) for i in range(len(crops))} <= {(96, 96), (48, 48), (24, 24)}


def test_stages_follow_the_paper():
    model = tiny_model()
    backbone, refinement = magnet_stages(model)
    assert (backbone.name, backbone.optimizer, backbone.lr, backbone.batch_size, backbone.epochs) == (
        "backbone",
        "sgd",
        1e-3,
        12,
        484,
    )
    assert (
        refinement.name,
        refinement.optimizer,
        refinement.lr,
        refinement.momentum,
        refinement.weight_decay,
        refinement.epochs,
        refinement.batch_size,
        refinement.schedule,
        refinement.milestones,
    ) == ("refinement", "sgd", 1e-3, 0.9, 5e-4, 50, 8, "step", (10, 20, 30, 40, 45))
    assert refinement.trainable(model) == [model.refinement] and refinement.frozen_eval(model) == [model.backbone]
    assert backbone.trainable(model) == [model.backbone]
    assert [s.name for s in magnet_stages(tiny_model(scales=[[96, 96]]))] == ["backbone"]


# --------------------------------------------------------------------------- predictor


def test_cells_and_frames():
    cells = block_cells(Window(0, 512, 300, 250), (96, 96))
    assert len(cells) == 4 * 3 and all(c.height <= 96 and c.width <= 96 for c in cells)
    covered = np.zeros((300, 250), int)
    for cell in cells:
        covered[cell.relative_to(Window(0, 512, 300, 250)).slices] += 1
    assert (covered == 1).all()
    assert block_cells(Window(0, 0, 2048, 2048), (2448, 2448)) == [Window(0, 0, 2048, 2048)]
    # a 2048 block gets a 200-px margin on each side inside a 2448 frame
    assert frame_around(Window(2048, 2048, 2048, 2048), (2448, 2448), 6749, 6749) == Window(1848, 1848, 2448, 2448)
    # shifted inside the image at its borders
    assert frame_around(Window(0, 6144, 605, 605), (2448, 2448), 4499, 6749) == Window(0, 4301, 2448, 2448)


def test_whole_image_mode_blocks_are_crops_of_one_prediction(tmp_path):
    model = tiny_model(scales=[[128, 128], [256, 256], [512, 512]]).eval()
    model.mark_refinement_trained()
    source = open_image(scene(600, 560))  # <= 1.25 x 512: one frame
    predictor = build_predictor(model, NORM)
    context = predictor.prepare(source)
    assert context["mode"] == "whole" and context["probs"].dtype == torch.float16
    assert tuple(context["probs"].shape) == (3, 600, 560)
    whole = predictor.predict_block(source, context, source.bounds)
    result = predict_image(predictor, source, tmp_path / "mask.tif", block_size=512, progress=False)
    assert result.blocks_predicted == 4
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), whole.argmax(0))


def test_block_mode_predicts_cells_from_finest_scale_frames(tmp_path):
    model = tiny_model().eval()
    model.mark_refinement_trained()
    source = open_image(scene(200, 170))  # > 1.25 x 96: block-wise
    predictor = build_predictor(model, NORM)
    assert isinstance(predictor, MagNetPredictor) and predictor.refine and predictor.sub_batch == 1
    predictor.keep_trace = True
    context = predictor.prepare(source)
    assert context == {"mode": "blocks", "frame": (96, 96)}
    block = Window(0, 0, 200, 170)
    out = predictor.predict_block(source, context, block)
    assert out.shape == (3, 200, 170) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    assert len(predictor.frames) == 3 * 2
    for record in predictor.frames:
        frame = record["frame"]
        assert frame.shape == (96, 96) and Window(0, 0, 200, 170).contains(frame)
        assert [t["patches"] for t in record["trace"]] == [[0], list(range(4)), list(range(16))]
    cell = block_cells(block, (96, 96))[3]
    frame = frame_around(cell, (96, 96), 200, 170)
    alone = predictor.predict_frame(source, frame)[0].numpy()
    np.testing.assert_array_equal(
        out[(slice(None), *cell.slices)], alone[(slice(None), *cell.relative_to(frame).slices)]
    )
    # a block within one frame is one cell: a view of that frame's prediction
    small = Window(10, 120, 50, 40)
    view = predictor.predict_block(source, context, small)
    frame = frame_around(small, (96, 96), 200, 170)
    assert frame == Window(0, 74, 96, 96)
    alone = predictor.predict_frame(source, frame)[0].numpy()
    np.testing.assert_array_equal(view, alone[(slice(None), *small.relative_to(frame).slices)])
    result = predict_image(predictor, source, tmp_path / "mask.tif", progress=False)
    mask = tifffile.imread(tmp_path / "mask.tif")
    assert result.blocks_predicted == 1 and mask.shape == (200, 170)
    np.testing.assert_array_equal(mask, out.argmax(0))


def test_fast_predictor_refines_fewer_patches():
    model = tiny_model(fast_patches=2, points=0.9).eval()
    model.mark_refinement_trained()
    predictor = build_predictor(model, NORM)
    predictor.keep_trace = True
    source = open_image(scene(96, 96))
    predictor.prepare(source)
    trace = predictor.frames[0]["trace"]
    assert [len(t["patches"]) for t in trace] == [1, 2, 2]
    assert [t["points"] for t in trace[1:]] == [int(0.9 * 2 * 24 * 24)] * 2


def test_backbone_only_until_refinement_trained():
    model = tiny_model().eval()
    predictor = build_predictor(model, NORM)
    predictor.keep_trace = True
    predictor.prepare(open_image(scene(96, 96)))
    assert not predictor.refine and [t["scale"] for t in predictor.frames[0]["trace"]] == [0]
    assert build_predictor(model, NORM, refine=True).refine


# --------------------------------------------------------------------------- end to end


CITY_H, CITY_W = 128, 256
CITY_FRAMES = {
    "train": [("aachen", "000000", "000019"), ("aachen", "000001", "000019"), ("bochum", "000000", "000313")],
    "val": [("frankfurt", "000000", "000294")],
}


def cityscapes_fixture(root):
    """Cityscapes' published layout: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine labelIds."""
    rng = np.random.default_rng(0)
    for split, frames in CITY_FRAMES.items():
        for city, seq, frame in frames:
            base = f"{city}_{seq}_{frame}"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            ids = np.full((CITY_H, CITY_W), 23, np.uint8)  # sky
            ids[CITY_H // 2 :] = 7  # road
            top, left = int(rng.integers(40, 70)), int(rng.integers(0, 180))
            ids[top : top + 30, left : left + 60] = 26  # car
            ids[0, :4] = 0  # unlabeled: ignored
            colours = {23: (70, 130, 180), 7: (128, 64, 128), 26: (0, 0, 142), 0: (0, 0, 0)}
            image = np.zeros((CITY_H, CITY_W, 3), np.int32)
            for label_id, colour in colours.items():
                image[ids == label_id] = colour
            image = (image + rng.integers(-20, 20, image.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")
    return root


DG_SIZE = 256


def deepglobe_fixture(root):
    """DeepGlobe's Kaggle layout: train/ and valid/ with <id>_sat.jpg and <id>_mask.png colour masks."""
    rng = np.random.default_rng(1)
    palette = {1: (0, 255, 255), 2: (255, 255, 0), 4: (0, 255, 0), 5: (0, 0, 255)}
    for split, ids in (("train", ("100694", "102122", "10452")), ("valid", ("104113",))):
        (root / split).mkdir(parents=True)
        for image_id in ids:
            classes = np.full((DG_SIZE, DG_SIZE), 2, np.uint8)
            cy, cx = rng.integers(60, 200, 2)
            yy, xx = np.mgrid[:DG_SIZE, :DG_SIZE]
            classes[(yy - cy) ** 2 + (xx - cx) ** 2 < 50**2] = 5
            classes[:, int(rng.integers(0, 240)) :][:, :12] = 1
            classes[:40, :40] = 4
            mask = np.zeros((DG_SIZE, DG_SIZE, 3), np.uint8)
            for cls, colour in palette.items():
                mask[classes == cls] = colour
            image = (mask.astype(np.int32) // 2 + rng.integers(0, 60, mask.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"{image_id}_sat.jpg", quality=95)
            Image.fromarray(mask).save(root / split / f"{image_id}_mask.png")
    return root


def settings(**kw):
    return TrainSettings(**{"epochs": 1, "batch_size": 2, "progress": False, "seed": 0, "lr": 1e-2, **kw})


def state(path):
    return torch.load(path, weights_only=True)["model"]["state_dict"]


def check_two_stage_run(run, num_classes):
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["backbone", "refinement"]
    assert all(0.0 <= float(r["val_miou"]) <= 1.0 for r in rows)
    after_backbone, after_refinement = state(run / "best-backbone.ckpt"), state(run / "last.ckpt")
    assert int(after_backbone["refinement_trained"]) == 0 and int(after_refinement["refinement_trained"]) == 1
    for key, value in after_backbone.items():
        if key.startswith("backbone."):  # frozen, BN statistics included
            assert torch.equal(value, after_refinement[key]), key
    changed = [
        k
        for k in after_backbone
        if k.startswith("refinement.")
        and k.endswith("weight")
        and not torch.equal(after_backbone[k], after_refinement[k])
    ]
    assert changed, "the refinement stage trained nothing"
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert len(ckpt["data"]["classes"]) == num_classes


CITY_OPTIONS = {
    "preset": "cityscapes",
    "scales": [[32, 64], [64, 128], [128, 256]],
    "input_size": [32, 64],
    "crops_per_image": 2,
}


def test_cityscapes_layout_train_and_predict(tmp_path):
    data = cityscapes_fixture(tmp_path / "cityscapes")
    run = tmp_path / "run"
    train("magnet", data, run, encoder="test_resnet", options=CITY_OPTIONS, settings=settings())
    check_two_stage_run(run, 19)
    image = data / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    result = predict(run / "last.ckpt", image, tmp_path / "pred", progress=False)
    mask = tifffile.imread(result.mask_path)
    assert mask.shape == (CITY_H, CITY_W) and mask.max() < 19


def test_cityscapes_layout_through_the_cli(tmp_path, capsys):
    data = cityscapes_fixture(tmp_path / "cityscapes")
    common = [
        "--method",
        "magnet",
        "--data",
        str(data),
        "--encoder",
        "test_resnet",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "0.01",
        "--set",
        "preset=cityscapes_fast",
        "--set",
        "scales=[[32,64],[64,128],[128,256]]",
        "--set",
        "input_size=[32,64]",
    ]
    assert main(["train", *common, "--out", str(tmp_path / "bb"), "--stage", "backbone"]) == 0
    assert (
        main(["train", *common, "--out", str(tmp_path / "rf"), "--stage", "refinement", "--init", str(tmp_path / "bb")])
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "rf" / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["refinement"]
    before, after = state(tmp_path / "bb" / "last.ckpt"), state(tmp_path / "rf" / "last.ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    image = data / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "rf"), "--out", str(tmp_path / "out")]) == 0
    mask = tifffile.imread(tmp_path / "out" / "aachen_000000_000019_leftImg8bit.tif")
    assert mask.shape == (CITY_H, CITY_W)
    # the same weights as MagNet-Fast, chosen at prediction time
    assert (
        main(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(tmp_path / "rf"),
                "--out",
                str(tmp_path / "fast"),
                "--set",
                "fast_patches=1",
                "--set",
                "points=0.9",
            ]
        )
        == 0
    )
    assert tifffile.imread(tmp_path / "fast" / "aachen_000000_000019_leftImg8bit.tif").shape == (CITY_H, CITY_W)
    # MagNet's own baseline from the same checkpoint: the backbone alone at the coarsest scale
    scores = {}
    for mode in ("never", "always"):
        out = tmp_path / f"{mode}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--checkpoint",
                    str(tmp_path / "rf"),
                    "--data",
                    str(data),
                    "--split",
                    "val",
                    "--set",
                    f"refine={mode}",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        scores[mode] = json.loads(out.read_text())
    expected = evaluate(tmp_path / "rf", data, split="val", options={"refine": "never"}, progress=False)
    assert scores["never"]["per_class"] == json.loads(json.dumps(expected["per_class"]))
    assert scores["never"]["per_class"] != scores["always"]["per_class"]
    capsys.readouterr()


def test_deepglobe_layout_train_and_predict_small_and_large(tmp_path):
    data = deepglobe_fixture(tmp_path / "deepglobe")
    run = tmp_path / "run"
    options = {
        "scales": [[64, 64], [128, 128], [256, 256]],
        "input_size": [56, 56],
        "median_kernel": 5,
        "crops_per_image": 2,
    }
    train("magnet", data, run, encoder="test_resnet", options=options, settings=settings())
    check_two_stage_run(run, 7)
    result = predict(run / "best.ckpt", data / "valid" / "104113_sat.jpg", tmp_path / "pred", progress=False)
    mask = tifffile.imread(result.mask_path)
    assert mask.shape == (DG_SIZE, DG_SIZE) and mask.max() < 7
    # an image much larger than the finest scale goes block-wise through 256-px frames
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, scene(400, 330), tile=(128, 128))
    result = predict(run / "best.ckpt", big, tmp_path / "pred", progress=False)
    mask = tifffile.imread(result.mask_path)
    assert mask.shape == (400, 330) and mask.max() < 7
