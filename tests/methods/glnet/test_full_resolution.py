"""GLNet with full-resolution heads (option output_stride): shapes, streaming, training, memory, a 2-px line.

``output_stride=4`` is the paper's network (unchanged); at 1 the global branch, the local branch
and the ensemble each predict through a ``FullResolutionHead`` at their input's resolution and
the losses compare those logits with labels that are not downsampled.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from gigaseg.budget import peak_live_bytes
from gigaseg.data.loader import load_dataset
from gigaseg.errors import BudgetError, ConfigError
from gigaseg.geometry import PatchGrid, Window
from gigaseg.io.crop import CroppedSource
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.glnet import memory
from gigaseg.methods.glnet import predictor as glnet_predictor
from gigaseg.methods.glnet import recipe as method
from gigaseg.methods.glnet.model import LocalToGlobal, head_logits
from gigaseg.methods.glnet.predictor import GLNetPredictor, GLNetTilePredictor
from gigaseg.methods.registry import build_predictor, create_model, training_stages
from gigaseg.nn.decoders import FullResolutionHead
from gigaseg.nn.losses import FocalLoss
from gigaseg.training.recipe import StepContext, TrainSettings

from ..base import ModelTester

TINY = {"size_g": 64, "size_p": 32, "min_overlap": 8}
FLOAT = Normalization.for_image(3, np.float32)
UINT8 = Normalization.for_image(3, np.uint8)


class TestGLNetFullResolution(ModelTester):
    method = "glnet"
    options = {**TINY, "output_stride": 1}
    unused_parameters = ("local_branch", "global_ext", "ensemble", "global_fixed")


def tiny(stage=1, output_stride=1, num_classes=3, encoder="test_resnet", **options):
    torch.manual_seed(0)
    model = create_model(
        "glnet",
        encoder=encoder,
        num_classes=num_classes,
        **{**TINY, "output_stride": output_stride, **options},
    )
    model.set_stage(stage)
    return model


def scene(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.random((height // 16 + 1, width // 16 + 1, 3))
    image = np.kron(small, np.ones((16, 16, 1)))[:height, :width] * 0.7 + rng.random((height, width, 3)) * 0.3
    return image.astype(np.float32)


# --------------------------------------------------------------------------- the network


def test_output_stride_4_is_the_papers_network_and_old_configs_load_as_it():
    paper = tiny(stage=0, output_stride=4)
    torch.manual_seed(0)
    unset = create_model("glnet", encoder="test_resnet", num_classes=3, **TINY)  # a config from before the option
    assert unset.options["output_stride"] == 4
    assert paper.state_dict().keys() == unset.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(paper.state_dict().values(), unset.state_dict().values()))
    assert paper.global_branch.head is None and paper.local_branch.head is None
    assert isinstance(paper.ensemble, nn.Conv2d) and paper.global_ext.classifier is None
    old = {k: v for k, v in paper.config.items() if k != "method"}
    del old["options"]["output_stride"]
    assert paper.canonical_config({"method": "glnet", **old}) == paper.config
    # a full-resolution model is another architecture: its weights do not load into the paper's
    with pytest.raises(RuntimeError, match="head"):
        paper.load_state_dict(tiny(output_stride=1).state_dict())
    with pytest.raises(ConfigError, match="output_stride=3 is not one of"):
        tiny(output_stride=3)
    with pytest.raises(ConfigError, match="cannot change after training"):
        paper.with_inference_options(output_stride=1)


def test_full_resolution_heads_replace_every_head():
    model = tiny(output_stride=1)
    merged = model.global_branch.fpn.merged_channels
    for head, channels in ((model.global_branch.head, merged), (model.local_branch.head, merged)):
        assert isinstance(head, FullResolutionHead) and head.reduce[0].in_channels == channels
    assert isinstance(model.ensemble, FullResolutionHead) and model.ensemble.reduce[0].in_channels == 2 * merged
    assert model.ensemble.uses_encoder_skip  # the local encoder's stride-2 map
    for fpn in (model.global_branch.fpn, model.local_branch.fpn, model.global_ext):
        assert fpn.classifier is None
    assert model.fixed_is_tied and model.global_fixed.head.reduce[0].weight is model.global_branch.head.reduce[0].weight
    parts = model.parameter_breakdown()
    paper = tiny(output_stride=4).parameter_breakdown()
    assert parts["ensemble"] == sum(p.numel() for p in model.ensemble.parameters()) != paper["ensemble"]
    assert parts["global_ext"] == paper["global_ext"]  # its layers are the same; neither has a classifier


@pytest.mark.parametrize("output_stride, side", [(1, 1), (2, 2)])
def test_each_stage_gives_logits_at_the_heads_resolution(output_stride, side):
    model = tiny(output_stride=output_stride).eval()
    view, patches = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 32, 32)
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.25, 1.0, 0.75)]
    with torch.no_grad():
        context = model.global_features(view)
        assert tuple(context.logits.shape) == (1, 3, 64 // side, 64 // side)
        out = model.patch_forward(patches, boxes, context, keep={"ps3", "logits", "skip"})
        assert tuple(out.local.logits.shape) == tuple(out.ensemble.shape) == (2, 3, 32 // side, 32 // side)
        assert out.global_ps3.shape == out.local.ps3.shape == (2, 64 * 8, 8, 8)  # fmreg's maps stay at 1/4
        assert tuple(out.skip.shape[-2:]) == (16, 16)
        merger = LocalToGlobal.like(context)
        merger.add(model.local_features(patches, boxes, context), boxes)
        glob = model.global_features(view, merger.result())  # the _ext pass shares the global head
        assert tuple(glob.logits.shape) == (1, 3, 64 // side, 64 // side)
        assert not torch.allclose(glob.logits, context.logits)
    x = torch.randn(2, 3, 80, 72)
    for stage in (1, 2, 3):
        model.set_stage(stage)
        with torch.no_grad():
            assert tuple(model(x).shape) == (2, 3, 80, 72)
            assert tuple(model.segment(x[:1]).shape) == (1, 3, 80, 72)


@pytest.mark.parametrize("encoder", ["test_convnext", "test_efficientnet"])
def test_encoders_with_and_without_a_stride2_level(encoder):
    model = tiny(stage=3, encoder=encoder).eval()
    has_level = model.local_branch.encoder.stride2_channels is not None
    assert model.ensemble.uses_encoder_skip == model.global_branch.head.uses_encoder_skip == has_level
    assert has_level == (encoder == "test_efficientnet")  # ConvNeXt has no stride-2 map: the heads' own stems
    x = torch.randn(1, 3, 80, 72)
    with torch.no_grad():
        lowmem = model(x)
    with torch.enable_grad():
        torch.testing.assert_close(model(x), lowmem, rtol=1e-4, atol=1e-5)
    assert tuple(lowmem.shape) == (1, 3, 80, 72)


def test_the_ensemble_head_reads_the_crop_the_patch_stride2_map_and_pixels():
    model = tiny(stage=2).eval()
    view, patches = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 32, 32)
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.25, 1.0, 0.75)]
    with torch.no_grad():
        context = model.global_features(view)
        out = model.patch_forward(patches, boxes, context, keep={"ps3", "skip"})
        skip, _ = model.local_branch.encoder.forward_with_stride2(patches)
        torch.testing.assert_close(out.skip, skip)
        expected = model.ensemble(torch.cat([out.local.ps3, out.global_ps3], 1), patches, skip)
        torch.testing.assert_close(out.ensemble, expected, rtol=1e-4, atol=1e-6)
        again, _ = model.ensemble_logits(out.local.ps3, context.ps3, boxes, image=patches, skip=skip)
        torch.testing.assert_close(again, out.ensemble)
        for changed in (patches + 1, None):  # the pixels matter, and are required
            if changed is None:
                with pytest.raises(ValueError, match="needs the patches' pixels"):
                    model.ensemble_logits(out.local.ps3, context.ps3, boxes, skip=skip)
            else:
                other, _ = model.ensemble_logits(out.local.ps3, context.ps3, boxes, image=changed, skip=skip)
                assert not torch.allclose(other, out.ensemble)


def test_coarse_logits_adds_the_papers_ensemble_classifier():
    """coarse_logits: the paper's 3x3 ensemble conv on concat(ps3_local, crop) at 1/4, added upsampled."""
    plain, coarse = tiny(stage=2), tiny(stage=2, coarse_logits=True)
    assert plain.ensemble.coarse is None
    merged = plain.local_branch.fpn.merged_channels
    assert tuple(coarse.ensemble.coarse.weight.shape) == (3, 2 * merged, 3, 3)
    extra = sum(p.numel() for p in coarse.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 9 * 2 * merged * 3 + 3
    assert isinstance(tiny(output_stride=4, coarse_logits=True).ensemble, nn.Conv2d)  # the paper's conv already
    with pytest.raises(ConfigError, match="coarse_logits"):
        tiny(coarse_logits=1)
    config = dict(coarse.config)
    del config["options"]["coarse_logits"]  # a checkpoint from before the option: the head alone
    assert plain.canonical_config(config)["options"]["coarse_logits"] is False


def test_branch_coarse_logits_add_each_branchs_classifier_on_its_ps3():
    """branch_coarse_logits: both branches' heads (and the frozen copy) keep a 3x3 conv on ps3, added upsampled."""
    plain, coarse = tiny(stage=3), tiny(stage=3, branch_coarse_logits=True)
    merged = plain.global_branch.fpn.merged_channels
    for name in ("global_branch", "local_branch", "global_fixed"):
        assert getattr(plain, name).head.coarse is None
        assert tuple(getattr(coarse, name).head.coarse.weight.shape) == (3, merged, 3, 3)
    assert coarse.ensemble.coarse is None  # the ensemble's is coarse_logits'
    trainable = {n: p.numel() for n, p in coarse.named_parameters() if not n.startswith("global_fixed.")}
    reference = {n: p.numel() for n, p in plain.named_parameters() if not n.startswith("global_fixed.")}
    assert sum(trainable.values()) - sum(reference.values()) == 2 * (9 * merged * 3 + 3)
    # the global logits: the plain head's (same weights) + the upsampled 3x3 conv on the global ps3
    coarse.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = coarse.global_features(x)
        head = coarse.global_branch.head
        skip, _ = coarse.global_branch.encoder.forward_with_stride2(x)
        saved, head.coarse = head.coarse, None
        without = head(features.ps3, x, skip)
        head.coarse = saved
        upsampled = nn.functional.interpolate(saved(features.ps3), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features.logits, without + upsampled, rtol=1e-4, atol=1e-5)
    assert isinstance(tiny(output_stride=4, branch_coarse_logits=True).global_branch.fpn.classifier, nn.Conv2d)
    assert tiny(output_stride=4, branch_coarse_logits=True).global_branch.head is None
    with pytest.raises(ConfigError, match="branch_coarse_logits"):
        tiny(branch_coarse_logits="yes")
    config = dict(coarse.config)
    del config["options"]["branch_coarse_logits"]  # a checkpoint from before the option: the heads alone
    assert plain.canonical_config(config)["options"]["branch_coarse_logits"] is False


@pytest.mark.parametrize("coarse_logits", [False, True])
@pytest.mark.parametrize("parts", [1, 2])
def test_the_head_without_autograd_builds_no_concatenation(parts, coarse_logits):
    model = tiny(coarse_logits=coarse_logits)
    head = model.ensemble if parts == 2 else model.local_branch.head
    head.eval()
    features = [torch.randn(2, head.reduce[0].in_channels // parts, 16, 16) for _ in range(parts)]
    image, skip = torch.randn(2, 3, 64, 64), torch.randn(2, head.fuse2[0].in_channels - 32, 32, 32)
    with torch.no_grad():
        plain = head(torch.cat(features, 1), image, skip)
        lowmem = head_logits(head, list(features), image, skip)
    torch.testing.assert_close(lowmem, plain, rtol=1e-4, atol=1e-6)
    with torch.enable_grad():
        torch.testing.assert_close(head_logits(head, list(features), image, skip), plain, rtol=1e-4, atol=1e-6)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, image, skip, *features):
            return self.head(torch.cat(features, 1), image, skip)

    class LowMemory(Plain):
        def forward(self, image, skip, *features):
            return head_logits(self.head, list(features), image, skip)

    inputs = (image, skip, *features)
    assert peak_live_bytes(LowMemory(), inputs) < peak_live_bytes(Plain(), inputs)


# --------------------------------------------------------------------------- streaming prediction


@pytest.mark.parametrize(("stage", "coarse_logits"), [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_blocks_equal_the_whole_image_and_the_in_memory_model(stage, coarse_logits):
    model = tiny(stage, size_g=48, coarse_logits=coarse_logits).eval()
    image = scene(96, 96)  # 2x the global view: area resampling is exact, as in model.segment
    source = open_image(image)
    predictor = GLNetPredictor(model, FLOAT, sub_batch=5)
    whole = predictor.predict_block(source, predictor.prepare(source), source.bounds)
    context = predictor.prepare(source)
    blocks = [Window(0, 0, 40, 50), Window(0, 50, 40, 46), Window(40, 0, 56, 96)]
    stitched = np.zeros_like(whole)
    for block in blocks:  # row-major: the patches shared along a row are cached at full resolution
        stitched[(slice(None), *block.slices)] = predictor.predict_block(source, context, block)
        if stage > 1:
            assert all(tuple(v.shape) == (3, 32, 32) for v in context.cache.values())
    np.testing.assert_allclose(stitched, whole, atol=1e-5)
    with torch.no_grad():
        reference = torch.softmax(model(torch.from_numpy(FLOAT.apply(image))[None]), dim=1)[0].numpy()
    np.testing.assert_allclose(whole, reference, atol=2e-4)
    assert whole.shape == (3, 96, 96) and np.allclose(whole.sum(0), 1, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_tile_policy_predicts_each_core_with_its_tile(stage):
    torch.manual_seed(0)
    model = create_model(
        "glnet",
        encoder="test_resnet",
        num_classes=3,
        size_g=64,
        size_p=128,
        min_overlap=16,
        fpn_channels=16,
        output_stride=1,
        global_context="tile",
        context_tile=700,
    )
    model.set_stage(stage)
    model.eval()
    source = open_image(scene(1100, 640, seed=1))
    predictor = build_predictor(model, FLOAT)
    assert isinstance(predictor, GLNetTilePredictor) and predictor.block_size == 512
    state = predictor.prepare(source)
    plain = GLNetPredictor(model, FLOAT, sub_batch=4)
    for tile in state.tiles[:2]:
        got = predictor.predict_block(source, state, tile.core).copy()
        crop = CroppedSource(source, tile.tile)
        expected = plain.predict_block(crop, plain.prepare(crop), tile.core.relative_to(tile.tile))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert got.shape == (3, *tile.core.shape) and np.allclose(got.sum(0), 1, atol=1e-5)


# --------------------------------------------------------------------------- training


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
    """Three 64 x 64 images: 9 patches of 32 px each."""
    return make_tiny_dataset(tmp_path / "small", count=3, size=64)


def batch_of(dataset_dir, stage, count=1):
    data = stage.make_data(load_dataset(dataset_dir, "train"), UINT8, TrainSettings())
    return default_collate([data[i] for i in range(count)])


@pytest.fixture
def focal_calls(monkeypatch):
    """Every (logits shape, target) the steps' focal losses see."""
    calls = []
    real = method._loss

    def recording(ctx):
        focal = real(ctx)

        def call(logits, target):
            calls.append((tuple(logits.shape), target.clone()))
            return focal(logits, target)

        return call

    monkeypatch.setattr(method, "_loss", recording)
    return calls


@pytest.mark.parametrize(
    "stage_name, heads",
    [
        ("global", ("global_branch.head.",)),
        ("global2local", ("local_branch.head.", "ensemble.")),
        ("local2global", ("global_branch.head.", "ensemble.", "global_ext.")),
    ],
)
def test_each_stage_trains_on_full_resolution_labels(small_dataset, focal_calls, stage_name, heads):
    number = method.STAGES.index(stage_name) + 1
    model = tiny(stage=number - 1)
    ctx, stage = prepared(model, stage_name, sub_batch=6)  # 9 patches per image: 6 + 3
    batch = batch_of(small_dataset, stage, count=2)
    losses = stage.step(ctx, batch)
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in losses.values())
    if stage_name == "global":  # the global views' labels at size_g, as the data gives them
        assert [(shape, tuple(t.shape)) for shape, t in focal_calls] == [((2, 3, 64, 64), (2, 64, 64))]
        assert torch.equal(focal_calls[0][1], batch["label"].long())
    else:
        patches = [batch["patch_labels"][i, part].long() for i in range(2) for part in method._chunks(9, 6)]
        targets = [t for _, t in focal_calls]
        if stage_name == "global2local":  # local and ensemble losses per sub-batch, on the patch labels
            assert len(targets) == 2 * len(patches)
            expected = [p for p in patches for _ in range(2)]
        else:  # per image: the global loss on the size_g label, then the ensembles'
            globals_ = [batch["global_label"][i : i + 1].long() for i in range(2)]
            expected = [globals_[0], *patches[:2], globals_[1], *patches[2:]]
        assert len(targets) == len(expected)
        for target, want in zip(targets, expected):
            assert torch.equal(target, want)
        assert {shape[-2:] for shape, _ in focal_calls} <= {(32, 32), (64, 64)}
    assert float(losses.get("loss_fmreg", torch.tensor(1.0))) > 0
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for prefix in heads:
        assert any(n.startswith(prefix) and g.abs().sum() > 0 for n, g in got.items()), prefix
    assert set(got) <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage3_gradient_equals_backpropagating_every_loss_through_the_global_graph(small_dataset):
    model = tiny(stage=2)
    ctx, stage = prepared(model, "local2global", sub_batch=4)
    batch = batch_of(small_dataset, stage)
    stage.step(ctx, batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)  # reference: one graph, every loss, retain_graph
    focal = FocalLoss(gamma=3)
    view, boxes = batch["global"], batch["boxes"][0]
    patches = method._normalise(batch["patches"][0], batch["norm"][0])
    with torch.no_grad():
        fixed = model.global_features(view, fixed=True)
        local = model.patch_forward(patches, boxes, fixed, ensemble=False, keep={"c", "p", "ps1", "ps2", "ps3", "skip"})
        merger = LocalToGlobal.like(fixed)
        merger.add(local.local, boxes)
    glob = model.global_features(view, merger.result())
    assert glob.logits.shape[-2:] == batch["global_label"].shape[-2:]
    total = focal(glob.logits, batch["global_label"].long())
    # the ensemble head's BatchNorms see the step's sub-batches (the stage plans 6 without a budget)
    for part in method._chunks(9, method._sub_batch(ctx)):
        logits, _ = model.ensemble_logits(
            local.local.ps3[part], glob.ps3, boxes[part], image=patches[part], skip=local.skip[part]
        )
        total = total + focal(logits, batch["patch_labels"][0, part].long()) * (logits.shape[0] / 6)
    total.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(k.startswith("global_branch.head") for k in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- memory


def test_the_heads_terms_are_zero_at_output_stride_4_and_added_at_1():
    # 64-px patches: the encoder's training estimate runs batch-1 BatchNorms, which need c5 larger than 1 x 1
    paper, full = tiny(output_stride=4, size_p=64), tiny(output_stride=1, size_p=64)
    for head in ("ensemble", "local"):
        assert memory.head_bytes(paper, head, False) == memory.head_bytes(paper, head, True) == 0
    assert memory.skip_bytes(paper) == 0
    assert memory.skip_bytes(full) == 4 * full.local_branch.encoder.stride2_channels * 32 * 32  # 1/2 of 64 px
    inference = memory.head_bytes(full, "ensemble", False)
    local, ensemble = memory.head_bytes(full, "local", True), memory.head_bytes(full, "ensemble", True)
    assert inference > memory.skip_bytes(full) and local > 0 and ensemble > local  # the ensemble reads 2x ps3
    # the graph holds at least the full-resolution fusion's input (32 + 16 channels) and the loss's maps
    assert local > 4 * (48 + 2 * 3) * 64 * 64
    assert memory.patch_bytes(full, False) == memory.patch_bytes(paper, False) + inference
    assert memory.patch_bytes(full, True) == memory.patch_bytes(paper, True) + local + ensemble
    with pytest.raises(ValueError, match="'ensemble' or 'local'"):
        memory.head_bytes(full, "global", True)


def test_training_estimates_grow_with_the_heads(small_dataset):
    # 64-px patches: the encoder's training estimate runs batch-1 BatchNorms, which need c5 larger than 1 x 1
    views = method.GLNetViews(load_dataset(small_dataset, "train"), UINT8, 64, 64, 8)
    models = {stride: tiny(output_stride=stride, size_p=64) for stride in (4, 1)}
    estimates = {
        stride: {name: method.training_estimate(model, name, views, 1) for name in method.STAGES[1:]}
        for stride, model in models.items()
    }
    full = models[1]
    heads2 = memory.head_bytes(full, "local", True) + memory.head_bytes(full, "ensemble", True)
    assert estimates[1]["global2local"].per_sample == estimates[4]["global2local"].per_sample + heads2
    heads3 = (
        memory.head_bytes(full, "ensemble", False) + memory.head_bytes(full, "ensemble", True) + memory.skip_bytes(full)
    )
    assert estimates[1]["local2global"].per_sample == estimates[4]["local2global"].per_sample + heads3


def test_a_prediction_budget_that_fits_at_stride_4_shrinks_or_refuses_at_1(monkeypatch):
    monkeypatch.setattr(glnet_predictor, "runtime_bytes", lambda device: 1_200_000_000)  # as a loaded process
    models = {}
    for stride in (4, 1):
        models[stride] = create_model("glnet", encoder="resnet18", num_classes=7, fpn_channels=64, output_stride=stride)
        models[stride].set_stage(2)
    paper, full = (glnet_predictor.inference_estimate(models[s], "cpu", 1024) for s in (4, 1))
    assert full.per_sample > 2 * paper.per_sample and full.fixed > paper.fixed  # the head; logits cached at 1/1
    budget = 2 * 10**9
    four = glnet_predictor.inference_plan(models[4], "cpu", budget)
    one = glnet_predictor.inference_plan(models[1], "cpu", budget)
    assert 1 <= one.sub_batch < four.sub_batch
    tight = paper.total(1) + (full.total(1) - paper.total(1)) // 2
    assert glnet_predictor.inference_plan(models[4], "cpu", tight).sub_batch >= 1
    with pytest.raises(BudgetError, match="too small for glnet prediction with 508-px patches"):
        glnet_predictor.inference_plan(models[1], "cpu", tight)
    block = glnet_predictor.glnet_block_bytes
    assert block(2048, 508, 7, 458, 1) - block(2048, 508, 7, 458) == 6 * 4 * 7 * (509**2 - 128**2)


# --------------------------------------------------------------------------- a 2-px line


@pytest.fixture
def flush_denormals():
    """Adam's second moments of tiny gradients become denormal floats, which slow CPU maths many times over."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def line_scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised image ``(1, 3, size, size)`` holding a 2-px wavy line (a road) on a texture, and its mask."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    t = torch.linspace(-2, size + 2, 64 * size)
    curve_y = size / 2 + 0.2 * size * torch.sin(2 * math.pi * t / (size / 2))
    distance = ((xx[..., None] - t) ** 2 + (yy[..., None] - curve_y) ** 2).min(-1).values.sqrt()
    line = distance < 1.0
    generator = torch.Generator().manual_seed(0)
    texture = 0.45 + 0.12 * torch.sin(xx * 0.7 + yy * 0.3) * torch.cos(yy * 0.5)
    texture = texture + 0.12 * torch.rand(3, size, size, generator=generator)
    road = torch.tensor([0.85, 0.35, 0.3]).view(3, 1, 1) + 0.05 * torch.rand(3, size, size, generator=generator)
    return ((torch.where(line, road, texture) - 0.45) / 0.25)[None], line


def line_iou(model, image, line) -> float:
    with torch.no_grad():
        pred = model.eval()(image).argmax(1)[0].bool()
    return ((pred & line).sum() / (pred | line).sum()).item()


def overfit(output_stride: int, image: torch.Tensor, line: torch.Tensor, steps: int = 40) -> dict[str, float]:
    """Line IoU after ``steps`` steps of stage 1, then of stage 2, through the recipe's own steps (Adam, lr 3e-3)."""
    torch.manual_seed(0)
    model = create_model(
        "glnet", encoder="test_resnet", num_classes=2, **TINY, fpn_channels=16, output_stride=output_stride
    )
    grid = PatchGrid.glnet(64, 64, 32, 8)  # 3 x 3 patches; the global view is the image itself
    labels = line.long()
    batch = {
        "image": image,
        "label": labels[None],
        "global": image,
        "global_label": labels[None],
        "patches": torch.cat([image[(slice(None), slice(None), *w.slices)] for w in grid.windows])[None],
        "patch_labels": torch.stack([labels[w.slices] for w in grid.windows])[None],
        "boxes": torch.tensor(grid.normalized_boxes(), dtype=torch.float32)[None],
        "norm": torch.tensor([[1.0] * 3, [0.0] * 3])[None],  # the patches are normalised already
    }
    scores = {}
    for name in ("global", "global2local"):
        ctx, stage = prepared(model, name, sub_batch=9)
        optimizer = torch.optim.Adam([p for m in stage.trainable(model) for p in m.parameters()], lr=3e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            stage.step(ctx, batch)
            optimizer.step()
        scores[name] = line_iou(model, image, line)
    return scores


def test_full_resolution_glnet_draws_a_2px_line_that_the_papers_heads_cannot(flush_denormals):
    image, line = line_scene()
    assert int(line.sum()) > 3 * 64  # a 2-px line across the image
    full, paper = overfit(1, image, line), overfit(4, image, line)
    # about 1.00 / 0.99 at output stride 1 and 0.05 / 0.04 at 4 (stage 1 / stage 2)
    print(f"line IoU after stage 1 / stage 2: output_stride=1 {full}, output_stride=4 {paper}")
    assert full["global"] > 0.9 and full["global2local"] > 0.9
    assert paper["global"] < 0.5 and paper["global2local"] < 0.5


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_trains_all_stages_and_predicts_at_full_resolution(tmp_path):
    import tifffile

    from gigaseg.cli import main as cli
    from gigaseg.training.checkpoint import load_checkpoint

    from .test_method import deepglobe_fixture, train_cli

    data = deepglobe_fixture(tmp_path / "deepglobe")
    assert train_cli(data, tmp_path / "run", "--stage", "all", "--set", "output_stride=1") == 0
    payload = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert payload["model"]["config"]["options"]["output_stride"] == 1
    assert int(payload["model"]["state_dict"]["trained_stage"]) == 3
    assert any(key.startswith("ensemble.fuse1.") for key in payload["model"]["state_dict"])
    image = data / "val" / "Sat" / "201_sat.jpg"
    args = ["predict", str(image), "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "pred")]
    assert cli([*args, "--max-memory", "64GB"]) == 0
    mask = tifffile.imread(tmp_path / "pred" / "201_sat.tif")
    assert mask.shape == (96, 96) and mask.max() < 7
