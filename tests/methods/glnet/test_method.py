"""GLNet's recipe and predictor: paired views, the three stages' steps, streaming prediction, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import default_collate

from gigaseg.cli import main as cli
from gigaseg.data.deepglobe import PALETTE
from gigaseg.data.loader import load_dataset
from gigaseg.errors import BudgetError
from gigaseg.geometry import Window
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.glnet import recipe as method
from gigaseg.methods.glnet.model import LocalToGlobal
from gigaseg.methods.glnet.predictor import GLNetPredictor, inference_plan
from gigaseg.methods.glnet.recipe import GLNetViews
from gigaseg.methods.registry import build_predictor, create_model, training_stages
from gigaseg.nn.losses import FocalLoss
from gigaseg.training.checkpoint import load_checkpoint
from gigaseg.training.recipe import StepContext, TrainSettings

TINY = {"size_g": 64, "size_p": 32, "min_overlap": 8}
UINT8 = Normalization.for_image(3, np.uint8)


def tiny(stage, num_classes=3, **options):
    torch.manual_seed(0)
    model = create_model("glnet", encoder="test_resnet", num_classes=num_classes, **{**TINY, **options})
    model.set_stage(stage)
    return model


# --------------------------------------------------------------------------- views


def test_views_augment_global_and_local_alike(tiny_dataset):
    dataset = load_dataset(tiny_dataset, "train")
    views = GLNetViews(dataset, UINT8, size_g=48, size_p=32, min_overlap=8, seed=3)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    seen_rotations = set()
    for epoch in range(4):
        views.set_epoch(epoch)
        item = views[0]
        assert item["patches"].dtype == torch.uint8 and tuple(item["patches"].shape) == (16, 3, 32, 32)
        assert tuple(item["patch_labels"].shape) == (16, 32, 32) and tuple(item["boxes"].shape) == (16, 4)
        assert tuple(item["global"].shape) == (3, 48, 48) and tuple(item["global_label"].shape) == (48, 48)
        # every patch pixel's colour tells its label (the image is colour + noise): same augmentation
        pixels = item["patches"].permute(0, 2, 3, 1).numpy().astype(int)
        nearest = np.abs(pixels[..., None, :] - colours).sum(-1).argmin(-1)
        assert (nearest == item["patch_labels"].numpy()).mean() > 0.99
        # the patches tile the augmented image: reassemble it and compare with the global view
        full = np.zeros((96, 96, 3))
        for box, patch in zip(item["boxes"].numpy(), pixels):
            top, left = round(box[0] * 96), round(box[1] * 96)
            full[top : top + 32, left : left + 32] = patch
        small = full.reshape(48, 2, 48, 2, 3).mean((1, 3))
        global_pixels = UINT8.invert(item["global"].numpy())
        assert np.abs(small - global_pixels).mean() < 1.0
        # and the global label is the augmented mask
        labels = np.zeros((96, 96), int)
        for box, lab in zip(item["boxes"].numpy(), item["patch_labels"].numpy()):
            labels[round(box[0] * 96) : round(box[0] * 96) + 32, round(box[1] * 96) : round(box[1] * 96) + 32] = lab
        assert (labels[::2, ::2] == item["global_label"].numpy()).mean() > 0.95
        seen_rotations.add(tuple(labels[0, :3]) + tuple(labels[-1, -3:]))
    assert len(seen_rotations) > 1  # the epochs drew different augmentations
    views.set_epoch(0)
    assert torch.equal(views[0]["patches"], GLNetViews(dataset, UINT8, 48, 32, 8, seed=3)[0]["patches"])


def test_small_images_are_padded_with_the_mean_and_ignored_labels(tmp_path, make_tiny_dataset):
    dataset = load_dataset(make_tiny_dataset(tmp_path / "small", count=2, size=24), "train")
    item = GLNetViews(dataset, UINT8, size_g=16, size_p=32, min_overlap=8, augment=False)[0]
    assert tuple(item["patches"].shape) == (1, 3, 32, 32)
    assert (item["patch_labels"][0, 24:] == 255).all() and (item["patch_labels"][0, :24, :24] != 255).all()
    padded = item["patches"][0, :, 30, 30].float() * item["norm"][0] - item["norm"][1]
    assert padded.abs().max() < 0.02  # the mean colour normalises to about 0, as the predictor pads


# --------------------------------------------------------------------------- steps


class Fabric:
    def backward(self, loss):
        loss.backward()


def prepared(model, stage_name, sub_batch=6):
    """What the training loop does before a stage: before_stage, freezing, train/eval modes."""
    stage = {s.name: s for s in training_stages(model)}[stage_name]
    stage.before_stage(model)
    model.requires_grad_(False)
    for module in stage.trainable(model):
        module.requires_grad_(True)
    model.train()
    for module in stage.frozen_eval(model):
        module.eval()
    return StepContext(Fabric(), model, model, sub_batch, stage, TrainSettings()), stage


@pytest.fixture
def small_dataset(tmp_path, make_tiny_dataset):
    """Three 64 x 64 images: 9 patches of 32 px each (the FPN's fixed widths make patches the cost)."""
    return make_tiny_dataset(tmp_path / "small", count=3, size=64)


def batch_of(dataset_dir, stage, model, count=1):
    dataset = load_dataset(dataset_dir, "train")
    data = stage.make_data(dataset, UINT8, TrainSettings())
    return default_collate([data[i] for i in range(count)])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "stage_name, trained, untouched",
    [
        ("global", ("global_branch.",), ("local_branch.", "ensemble.", "global_ext.", "global_fixed.")),
        ("global2local", ("local_branch.", "ensemble."), ("global_branch.", "global_ext.", "global_fixed.")),
        (
            "local2global",
            ("global_branch.encoder", "global_ext.", "ensemble.", "global_branch.fpn.classifier"),
            ("local_branch.", "global_fixed."),
        ),
    ],
)
def test_each_stage_steps_forward_and_backward(small_dataset, stage_name, trained, untouched):
    model = tiny(stage=0)
    number = method.STAGES.index(stage_name) + 1
    model.set_stage(number - 1)
    ctx, stage = prepared(model, stage_name, sub_batch=6)  # 9 patches per image: 6 + 3
    assert model.stage == number and model.fixed_is_tied == (number < 3)
    losses = stage.step(ctx, batch_of(small_dataset, stage, model, count=2))
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in losses.values())
    got = grads(model)
    for prefix in trained:
        assert any(n.startswith(prefix) and got[n].abs().sum() > 0 for n in got), prefix
    assert not [n for n in got if n.startswith(untouched)]
    assert set(got) <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage2_loss_and_gradient_do_not_depend_on_the_sub_batch(small_dataset):
    """Sub-batch losses weighted by patches / 6: the paper's gradient (sub-batches of 6) whatever fits."""
    results = []
    for sub_batch in (9, 4):  # 9 patches: one sub-batch, or 4 + 4 + 1
        model = tiny(stage=1)
        ctx, stage = prepared(model, "global2local", sub_batch=sub_batch)
        model.local_branch.eval()  # BatchNorm statistics would otherwise depend on the sub-batch
        losses = stage.step(ctx, batch_of(small_dataset, stage, model))
        results.append((losses, grads(model)))
    (l9, g9), (l4, g4) = results
    for key in l9:
        assert float(l9[key]) == pytest.approx(float(l4[key]), rel=1e-4), key
    assert g9.keys() == g4.keys() and any(k.startswith("local_branch.encoder") for k in g9)
    for name in g9:
        torch.testing.assert_close(g9[name], g4[name], rtol=1e-3, atol=1e-7, msg=name)


def test_stage3_gradient_equals_backpropagating_every_loss_through_the_global_graph(small_dataset):
    model = tiny(stage=2)
    ctx, stage = prepared(model, "local2global", sub_batch=4)
    batch = batch_of(small_dataset, stage, model)
    stage.step(ctx, batch)
    got = grads(model)

    model.zero_grad(set_to_none=True)  # reference: one graph, every loss, retain_graph
    focal = FocalLoss(gamma=3)
    view, boxes = batch["global"], batch["boxes"][0]
    patches = method._normalise(batch["patches"][0], batch["norm"][0])
    with torch.no_grad():
        fixed = model.global_features(view, fixed=True)
        local = model.local_features(patches, boxes, fixed)
        merger = LocalToGlobal.like(fixed)
        merger.add(local, boxes)
    glob = model.global_features(view, merger.result())
    total = focal(glob.logits, method._labels_like(batch["global_label"], glob.logits))
    for part in method._chunks(9, 4):
        logits, _ = model.ensemble_logits(local.ps3[part], glob.ps3, boxes[part])
        total = total + focal(logits, method._labels_like(batch["patch_labels"][0, part], logits)) * (
            logits.shape[0] / 6
        )
    total.backward()
    want = grads(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-8, msg=name)


def test_before_stage_hands_over_as_the_paper():
    from gigaseg.errors import ConfigError

    model = tiny(stage=0)
    stages = {s.name: s for s in training_stages(model)}
    assert [(s.name, s.epochs, s.lr, s.batch_size, s.sub_batch) for s in training_stages(model)] == [
        ("global", 120, 5e-5, 6, 6),
        ("global2local", 50, 2e-5, 6, 6),
        ("local2global", 120, 5e-5, 6, 6),
    ]
    with pytest.raises(ConfigError, match="stage 'global2local' continues a 'global' run.*--init"):
        stages["global2local"].before_stage(model)
    model.set_stage(2)
    next(model.global_branch.parameters()).data.add_(1.0)  # the stage-1 weights, as trained
    stages["local2global"].before_stage(model)
    assert model.stage == 3
    assert torch.equal(next(model.global_fixed.parameters()), next(model.global_branch.parameters()))
    # a stage-3 run continued for more epochs keeps the stage-1 copy it had
    next(model.global_branch.parameters()).data.add_(1.0)
    stages["local2global"].before_stage(model)
    assert not torch.equal(next(model.global_fixed.parameters()), next(model.global_branch.parameters()))


# --------------------------------------------------------------------------- prediction


def scene(height, width, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    small = rng.random((height // 16 + 1, width // 16 + 1, 3))
    image = np.kron(small, np.ones((16, 16, 1)))[:height, :width] * 0.7 + rng.random((height, width, 3)) * 0.3
    return image.astype(np.float32) if dtype == np.float32 else (image * 255).astype(np.uint8)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_blocks_equal_the_whole_image_and_the_in_memory_model(stage):
    model = tiny(stage, size_g=48).eval()
    image = scene(96, 96)  # 2x the global view: area resampling is exact, as in model.segment
    source = open_image(image)
    predictor = GLNetPredictor(model, Normalization.for_image(3, np.float32), sub_batch=5)
    whole = predictor.predict_block(source, predictor.prepare(source), source.bounds)
    context = predictor.prepare(source)
    blocks = [Window(0, 0, 40, 50), Window(0, 50, 40, 46), Window(40, 0, 56, 96)]
    stitched = np.zeros_like(whole)
    for block in blocks:  # row-major, as the driver visits them (patches shared along a row are cached)
        stitched[(slice(None), *block.slices)] = predictor.predict_block(source, context, block)
    np.testing.assert_allclose(stitched, whole, atol=1e-5)
    with torch.no_grad():
        x = torch.from_numpy(Normalization.for_image(3, np.float32).apply(image))[None]
        reference = torch.softmax(model(x), dim=1)[0].numpy()
    np.testing.assert_allclose(whole, reference, atol=2e-4)
    assert whole.shape == (3, 96, 96) and np.allclose(whole.sum(0), 1, atol=1e-5)


@pytest.mark.parametrize("stage, sizes", [(2, [(96, 96), (1000, 900)]), (3, [(64, 64), (130, 100)])])
def test_prepared_context_has_global_resolution_whatever_the_image_size(stage, sizes):
    model = tiny(stage).eval()
    predictor = GLNetPredictor(model, Normalization.for_image(3, np.float32), sub_batch=8)
    small, large = (predictor.prepare(open_image(scene(*size))) for size in sizes)
    assert len(large.grid) > 2 * len(small.grid)
    assert large.nbytes() == small.nbytes() > 0


def test_prediction_budget_sets_the_sub_batch_and_refuses_too_small_budgets():
    model = create_model("glnet", encoder="resnet50", num_classes=7)
    model.set_stage(2)
    assert inference_plan(model, "cpu", None).sub_batch == 2
    small = inference_plan(model, "cpu", 3 * 10**9).sub_batch
    large = inference_plan(model, "cpu", 8 * 10**9).sub_batch
    assert 1 <= small < large
    with pytest.raises(BudgetError, match="too small for glnet prediction with 508-px patches"):
        inference_plan(model, "cpu", 5 * 10**8)


def test_tight_budgets_use_smaller_blocks_and_stage3_counts_its_merged_maps(monkeypatch):
    import gigaseg.methods.glnet.predictor as glnet_methods
    from gigaseg.inference.planner import InferencePlan

    monkeypatch.setattr(glnet_methods, "runtime_bytes", lambda device: 1_200_000_000)  # as a loaded process
    model = create_model("glnet", encoder="resnet50", num_classes=7)
    model.set_stage(2)
    stage2 = glnet_methods.inference_estimate(model)
    assert glnet_methods.inference_plan(model, "cpu", None) == InferencePlan(2, None)
    assert glnet_methods.inference_plan(model, "cpu", 2 * 10**9).block_size == 1024  # room for few patches
    plan = glnet_methods.inference_plan(model, "cpu", 16 * 10**9)
    assert plan.block_size == 4096 and plan.sub_batch > 2
    model.set_stage(3)
    stage3 = glnet_methods.inference_estimate(model)
    merged = glnet_methods.context_bytes(model)  # size_p == size_g: one patch's shared maps
    assert stage3.per_sample == stage2.per_sample + merged
    predictor = build_predictor(model, Normalization.for_image(3, np.uint8), max_memory=2 * 10**9)
    assert InferencePlan(predictor.sub_batch, predictor.block_size) == glnet_methods.inference_plan(
        model, "cpu", 2 * 10**9
    )


# --------------------------------------------------------------------------- end to end


def deepglobe_fixture(root, size=96):
    """GLNet's DeepGlobe layout: <split>/Sat/<id>_sat.jpg + <split>/Label/<id>_mask.png (colour code)."""
    rng = np.random.default_rng(0)
    for split, ids in (("train", ("101", "102")), ("val", ("201",))):
        for image_id in ids:
            labels = np.full((size, size), 2, np.uint8)  # agriculture
            labels[:, : size // 3] = 5  # water
            labels[size // 2 :, size // 2 :] = 1  # urban
            labels = np.rot90(labels, int(rng.integers(4))).copy()
            colours = np.array(PALETTE, np.uint8)
            image = (colours[labels] * 0.6 + rng.integers(0, 80, (size, size, 3))).astype(np.uint8)
            (root / split / "Sat").mkdir(parents=True, exist_ok=True)
            (root / split / "Label").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / "Sat" / f"{image_id}_sat.jpg", quality=95)
            Image.fromarray(colours[labels]).save(root / split / "Label" / f"{image_id}_mask.png")
    return root


SETS = ["--set", "size_g=48", "--set", "size_p=32", "--set", "min_overlap=8"]


def train_cli(data, out, *extra):
    return cli(
        [
            "train",
            "--method",
            "glnet",
            "--data",
            str(data),
            "--out",
            str(out),
            "--encoder",
            "test_resnet",
            *SETS,
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            *extra,
        ]
    )


@pytest.mark.slow
def test_cli_trains_all_stages_and_predicts_on_deepglobe(tmp_path, capsys):
    data = deepglobe_fixture(tmp_path / "deepglobe")
    assert train_cli(data, tmp_path / "run", "--stage", "all") == 0
    payload = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert int(payload["model"]["state_dict"]["trained_stage"]) == 3
    assert int(payload["model"]["state_dict"]["scene_side"]) == 96  # the "tile" policy's default tile
    assert payload["data"]["classes"][0] == "unknown" and len(payload["data"]["classes"]) == 7
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["global", "global2local", "local2global"]
    image = data / "val" / "Sat" / "201_sat.jpg"
    # a CPU budget covers the whole process, and this one is a long-lived pytest process
    # that already holds well over 2 GB: give the CLI path room, budgets are tested elsewhere
    assert (
        cli(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "pred"),
                "--max-memory",
                "64GB",
            ]
        )
        == 0
    )
    mask = tifffile.imread(tmp_path / "pred" / "201_sat.tif")
    assert mask.shape == (96, 96) and mask.max() < 7
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(data), "--split", "val"]) == 0


@pytest.mark.slow
def test_cli_stages_hand_over_with_init(tmp_path, capsys):
    data = deepglobe_fixture(tmp_path / "deepglobe")
    assert train_cli(data, tmp_path / "s1", "--stage", "global") == 0
    assert train_cli(data, tmp_path / "s2x", "--stage", "global2local") == 2  # no --init: a clear error
    assert "continues a 'global' run" in capsys.readouterr().err
    assert (
        train_cli(data, tmp_path / "s2", "--stage", "global2local", "--init", str(tmp_path / "s1" / "last.ckpt")) == 0
    )
    assert (
        train_cli(data, tmp_path / "s3", "--stage", "local2global", "--init", str(tmp_path / "s2" / "last.ckpt")) == 0
    )
    s1, s2, s3 = (load_checkpoint(tmp_path / f"s{i}" / "last.ckpt")["model"]["state_dict"] for i in (1, 2, 3))
    assert [int(s["trained_stage"]) for s in (s1, s2, s3)] == [1, 2, 3]
    for key in s1:
        if key.startswith("global_branch."):
            assert torch.equal(s2[key], s1[key]), key  # frozen in stage 2
            fixed = key.replace("global_branch.", "global_fixed.")
            assert torch.equal(s3[fixed], s1[key]), key  # stage 3's local branch still sees stage 1's global
        if key.startswith("local_branch."):
            assert torch.equal(s3[key], s2[key]), key  # frozen in stage 3
    changed = [
        k
        for k in s1
        if k.startswith("global_branch.encoder") and k.endswith("weight") and not torch.equal(s3[k], s1[k])
    ]
    assert changed  # stage 3 retrained the global branch


def test_the_recorded_scene_side_is_the_median_longer_side_and_closes_every_sample():
    class Sample:
        closed = 0

        def __init__(self, height, width):
            self.image = type("Image", (), {"height": height, "width": width})()

        def close(self):
            Sample.closed += 1

    sizes = [(1536, 1024), (2448, 2448), (900, 3000), (1024, 1024), (2000, 100)]
    dataset = [Sample(h, w) for h, w in sizes]
    # longer sides 1536, 2448, 3000, 1024, 2000: the median is 2000
    assert method.median_longer_side(method.image_sizes(dataset)) == 2000 and Sample.closed == 5
    assert method.median_longer_side([]) == 0


def test_batches_of_whole_images_need_one_size_naming_the_first_that_differs():
    from gigaseg.errors import ConfigError

    sizes = [(96, 96, "a.tif"), (96, 96, "b.tif"), (64, 96, "c.tif")]
    method._same_sized(sizes, 1)  # one image per batch: any sizes
    with pytest.raises(ConfigError, match=r"a\.tif is 96x96 but c\.tif is 64x96; train with --batch-size 1"):
        method._same_sized(sizes, 2)
