"""patchgd_detector: fused pyramid shapes and placement, parameter counts, the inner loop's k patches with
gradients, training both fusions on bright squares, the memory plan and the whole/sliced predictor."""

import contextlib

import numpy as np
import pytest
import torch

from gigaseg.errors import BudgetError, ConfigError
from gigaseg.inference.sliced import tile_starts
from gigaseg.io.array import ArraySource
from gigaseg.io.normalize import Normalization
from gigaseg.methods.patchgd.detector import PatchGDDetector
from gigaseg.methods.patchgd.recipe import detector_stages, detector_step, plan_patches
from gigaseg.methods.registry import build_predictor, create_model
from gigaseg.nn.fcos import FCOSHeads
from gigaseg.training.recipe import StepContext, TrainSettings

from ..fcos.squares import Squares

NORM = Normalization.for_image(3, np.uint8)
# canvases of 128 px in 2 x 2 patches of 64 px; levels P3..P6 (patch maps 8, 4, 2, 1 wide)
TINY = {"patch_size": 64, "canvas_size": 128, "latent_dim": 16, "head_convs": 1, "max_level": 6}


def tiny(**options) -> PatchGDDetector:
    torch.manual_seed(0)
    return create_model("patchgd_detector", encoder="test_resnet", num_classes=2, **{**TINY, **options})


def batch_of(data: Squares) -> dict:
    return {
        "image": torch.stack([torch.from_numpy(NORM.apply(s.pixels)) for s in data.samples]),
        "targets": [{"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels)} for s in data.samples],
    }


class Fabric:
    def backward(self, loss):
        loss.backward()

    def no_backward_sync(self, module, enabled=True):
        return contextlib.nullcontext()


def context(model, **settings) -> StepContext:
    run = TrainSettings(
        **{"epochs": 1, "batch_size": 2, "lr": 1e-3, "progress": False, "accelerator": "cpu", **settings}
    )
    return StepContext(Fabric(), model, model, 4, detector_stages(model)[0], run)


@pytest.mark.parametrize(
    ("options", "sides", "strides"),
    [
        ({"fusion": "grid"}, [16, 8, 4, 2], (8, 16, 32, 64)),
        ({"fusion": "paper"}, [8, 4, 2, 1], (16, 32, 64, 128)),  # one patch's map for the canvas, stride 2**l * m
        ({"fusion": "paper", "paper_reduce": "max"}, [8, 4, 2, 1], (16, 32, 64, 128)),
        ({"fusion": "grid", "global_merge": "concat"}, [16, 8, 4, 2], (8, 16, 32, 64)),
    ],
)
def test_fill_and_fused_maps_have_the_fusions_shapes(options, sides, strides):
    model = tiny(**options)
    x = torch.randn(2, 3, 128, 128)
    z = model.fill(x)
    assert [tuple(level.shape) for level in z] == [(2, 4, 16, s, s) for s in (8, 4, 2, 1)]
    fused = model.fused_features(x, latents=z)
    assert [tuple(f.shape) for f in fused] == [(2, 16, s, s) for s in sides]
    assert model.strides == strides == model.heads.strides
    out = model.eval()(x)  # raw heads' outputs, Z filled without gradients
    points = sum(s * s for s in sides)
    assert out["cls_logits"].shape == (2, points, 2) and out["bbox_regression"].shape == (2, points, 4)


def test_theta2_parameter_counts():
    d, maps = 16, 2 * 2 + 1  # mn patch maps + the global one
    theta1 = sum(p.numel() for p in tiny().theta1.parameters())
    heads = sum(p.numel() for p in FCOSHeads(d, 2, num_convs=1, strides=(8, 16, 32, 64)).parameters())
    expected = {
        ("paper", "conv", "add", True): 4 * (d * maps * d + d),
        ("paper", "max", "add", True): 4 * (d * d + d),
        ("paper", "conv", "add", False): 4 * (d * (maps - 1) * d + d),
        ("grid", "conv", "add", True): 0,
        ("grid", "conv", "concat", True): 4 * (2 * d * d + d),
    }
    for (fusion, reduce, merge, use_global), theta2 in expected.items():
        model = tiny(fusion=fusion, paper_reduce=reduce, global_merge=merge, global_patch=use_global)
        assert sum(p.numel() for p in model.theta2.parameters()) == theta2
        assert sum(p.numel() for p in model.parameters()) == theta1 + theta2 + heads


def test_grid_fusion_puts_each_patch_where_it_lies_in_the_canvas():
    model = tiny(global_patch=False)
    z = [torch.zeros(1, 4, 16, s, s) for s in (8, 4, 2, 1)]
    for level in z:
        level[0, 1] = 1.0  # patch 1: top row, right column
    fused = model.fuse(z, None, 2, 2)
    for level, s in zip(fused, (8, 4, 2, 1)):
        expected = torch.zeros(1, 16, 2 * s, 2 * s)
        expected[..., :s, s:] = 1.0
        assert torch.equal(level, expected)


def test_paper_fusion_sends_every_patch_to_the_same_positions():
    """The paper's layout: a patch's map at (h, w) lands at (h, w) of the fused map, whichever patch it is."""
    model = tiny(fusion="paper", global_patch=False)
    z = [torch.zeros(1, 4, 16, s, s) for s in (8, 4, 2, 1)]
    moved = [level.clone() for level in z]
    z[0][0, 0, :, 2, 3] = 1.0  # patch 0 (top left) at position (2, 3)
    moved[0][0, 3, :, 2, 3] = 1.0  # patch 3 (bottom right) at the same position
    bias = model.theta2[0].bias[None, :, None, None]  # what a zero input gives
    changed_a = (model.fuse(z, None, 2, 2)[0] != bias).any(1)[0]
    changed_b = (model.fuse(moved, None, 2, 2)[0] != bias).any(1)[0]
    assert changed_a.nonzero().tolist() == changed_b.nonzero().tolist() == [[2, 3]]


@pytest.mark.parametrize("fusion", ["grid", "paper"])
def test_recomputed_patches_equal_the_filled_ones(fusion):
    """In eval mode, Z filled without gradients + k patches re-encoded gives the full forward's losses."""
    model = tiny(fusion=fusion).eval()
    data = Squares(count=2, size=128, seed=3)
    batch = batch_of(data)
    x, targets = batch["image"], batch["targets"]
    full = model(x, targets)
    z = model.fill(x, sub_batch=3)
    inner = model(x, targets, latents=z, indices=torch.tensor([[0, 3], [2, 1]]))
    for name in full:
        torch.testing.assert_close(inner[name], full[name], rtol=1e-4, atol=1e-5)


def test_inner_loop_recomputes_exactly_k_patches_with_gradients_and_theta1_learns():
    model = tiny(inner_iterations=3, sampling_fraction=0.5)  # k = 2 of 4 patches
    batch = batch_of(Squares(count=2, size=128, seed=0))
    calls = []
    model.theta1.register_forward_hook(lambda m, args, out: calls.append((args[0].shape[0], torch.is_grad_enabled())))
    logged = detector_step(context(model), batch)
    assert logged["k"] == 2 and np.isfinite(float(logged["loss"]))
    with_grad = [n for n, grad in calls if grad]
    # per inner iteration: B * k patches, then the B global patches
    assert with_grad == [2 * 2, 2] * 3
    assert sum(n for n, grad in calls if not grad) == 2 * 4  # the fill: every patch once, without gradients
    assert all(p.grad is not None for p in model.theta1.parameters() if p.requires_grad)
    assert sum(float(p.grad.abs().sum()) for p in model.theta1.encoder.parameters()) > 0
    assert sum(float(p.grad.abs().sum()) for p in model.heads.parameters()) > 0


@pytest.mark.parametrize("fusion", ["grid", "paper"])
def test_both_fusions_train_and_the_loss_decreases(fusion):
    model = tiny(fusion=fusion, inner_iterations=2, sampling_fraction=0.5)
    batch = batch_of(Squares(count=2, size=128, side=(16, 30), seed=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ctx = context(model)
    losses = []
    torch.manual_seed(0)
    for _ in range(12):
        optimizer.zero_grad()
        losses.append(float(detector_step(ctx, batch)["loss"]))
        optimizer.step()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_options_and_grids_are_checked():
    with pytest.raises(ConfigError, match="patch_size must be a multiple of 64"):
        tiny(patch_size=96)
    with pytest.raises(ConfigError, match="canvas_size must be a multiple of patch_size 64"):
        tiny(canvas_size=160)
    with pytest.raises(ConfigError, match="fusion"):
        tiny(fusion="stack")
    paper = tiny(fusion="paper")
    assert paper.fill(torch.zeros(1, 3, 192, 128))[0].shape[1] == 6  # Z fills any grid; the fusion needs 2 x 2
    with pytest.raises(ValueError, match="fusion 'paper' needs 128-px canvases"):
        paper(torch.zeros(1, 3, 192, 128))


def test_memory_plan_counts_the_pyramids_and_refuses_a_tiny_budget():
    model = tiny()
    roomy = plan_patches(model, (3, 128, 128), 2, 8 << 30)
    assert roomy.k == 1  # sampling_fraction 0.25 of 4 patches
    assert roomy.data >= model.map_bytes(2, 128, 128) > 0
    big = tiny(canvas_size=1024)  # 256 patches: Z and the heads' maps grow with the canvas
    assert big.map_bytes(1, 1024, 1024) == pytest.approx(64 * model.map_bytes(1, 128, 128), rel=1e-6)
    with pytest.raises(BudgetError, match="too small to train patchgd_detector"):
        plan_patches(model, (3, 128, 128), 2, 64 << 20)


def test_predictor_runs_whole_canvases_and_tiles_larger_images():
    model = tiny().eval()
    shapes = []
    detect = model.detect
    model.detect = lambda images, **kw: shapes.append(tuple(images.shape)) or detect(images, **kw)
    predictor = build_predictor(model, NORM)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (100, 128, 3), dtype=np.uint8)
    found = predictor.predict(ArraySource(small))
    assert shapes == [(1, 3, 128, 128)]
    assert found.boxes.shape[1] == 4 and len(found) == len(found.scores) == len(found.labels)
    assert (found.boxes[:, 3] <= 100 + 1e-3).all()  # clipped to the image, not to the padded canvas
    shapes.clear()
    large = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    found = predictor.predict(ArraySource(large))
    overlap = int(0.2 * 128 + 0.5)
    tiles = len(tile_starts(300, 128, overlap)) * len(tile_starts(200, 128, overlap))
    assert shapes == [(1, 3, 128, 128)] * tiles  # canvas-sized tiles, one per pass
    assert (found.boxes[:, 2] <= 200 + 1e-3).all() and (found.boxes[:, 3] <= 300 + 1e-3).all()
    assert found.boxes[:, 3].max() > 128  # boxes shifted into the whole image
    shapes.clear()
    forced = build_predictor(model.with_inference_options(mode="whole"), NORM)
    forced.model.detect = model.detect
    forced.predict(ArraySource(large))
    assert shapes == [(1, 3, 128, 128)]
