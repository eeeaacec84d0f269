"""MagNet with a full-resolution backbone (option output_stride): shapes, training, inference, memory, a 2-px line.

``output_stride=4`` is the paper's backbone (GLNet's FPN head at 1/4 of the patch, upsampled);
at 1 the backbone FPNSegmenter predicts through a ``FullResolutionHead`` at the patch's own
resolution, so the refinement module, which works at the input size anyway, refines
full-resolution backbone predictions at every scale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gigaseg.budget import inference_estimate
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window, crop_resize, resize
from gigaseg.inference.stream import predict_image
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.magnet.predictor import (
    REFINE_BAND,
    REFINE_HALO,
    block_cells,
    frame_around,
    inference_estimate_for,
    working_set_bytes,
)
from gigaseg.methods.magnet.recipe import backbone_step, refinement_step
from gigaseg.methods.registry import build_predictor, create_model
from gigaseg.training.recipe import StepContext

from ..base import ModelTester
from .test_model import TINY, area_resize, tensor_reader

NORM = Normalization.for_image(3, np.uint8)


class TestMagNetFullResolution(ModelTester):
    method = "magnet"
    options = {**TINY, "output_stride": 1}
    unused_parameters = ("refinement.",)  # the training-mode forward is the backbone alone


class TestMagNetHalfResolution(ModelTester):
    method = "magnet"
    options = {**TINY, "output_stride": 2}
    unused_parameters = ("refinement.",)


def tiny(output_stride=1, num_classes=3, **options):
    torch.manual_seed(0)
    return create_model(
        "magnet", encoder="test_resnet", num_classes=num_classes, **{**TINY, "output_stride": output_stride, **options}
    )


class _Fabric:
    """What a step needs of Lightning Fabric here: a plain backward."""

    def backward(self, loss):
        loss.backward()


def context(model, sub_batch=8) -> StepContext:
    return StepContext(fabric=_Fabric(), model=model, wrapped=model, sub_batch=sub_batch, stage=None, settings=None)


# --------------------------------------------------------------------------- configuration


def test_output_stride_4_is_the_papers_backbone_and_old_configs_load_as_it():
    paper = tiny(output_stride=4)
    torch.manual_seed(0)
    unset = create_model("magnet", encoder="test_resnet", num_classes=3, **TINY)
    assert unset.options["output_stride"] == 4 == unset.backbone.output_stride
    assert paper.state_dict().keys() == unset.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(paper.state_dict().values(), unset.state_dict().values()))
    assert paper.backbone.net.head is None and not any(".head." in key for key in paper.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(paper.predict(x), unset.predict(x), rtol=0, atol=0)
    # a checkpoint written before the option: completed as 4 (fpn) or 1 (smp, their only value)
    old = paper.config
    del old["options"]["output_stride"]
    assert paper.canonical_config(old) == paper.config
    smp = {**old, "options": {**old["options"], "decoder": "smp_unet"}}
    assert create_model(**smp).options["output_stride"] == 1
    full = tiny(output_stride=1)
    assert full.backbone.output_stride == 1 and full.backbone.net.fpn.classifier is None
    assert any(key.startswith("backbone.net.head.") for key in full.state_dict())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"output_stride": 3}, "^magnet: option output_stride=3 is not one of 1, 2, 4$"),
        ({"output_stride": 8}, "output_stride=8 is not one of 1, 2, 4"),
        ({"output_stride": True}, "output_stride must be an integer"),
        (
            {"decoder": "smp_unet", "output_stride": 4},
            "^magnet: decoder 'smp_unet' predicts at full resolution, so output_stride must be 1, got 4$",
        ),
        (
            {"decoder": "smp_unet", "coarse_logits": True},
            "^magnet: coarse_logits adds the FPN's classifier to its full-resolution head, so it needs decoder "
            "'fpn', got 'smp_unet'$",
        ),
        ({"coarse_logits": 1}, "coarse_logits must be true or false"),
    ],
)
def test_output_stride_values_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("magnet", encoder="test_resnet", num_classes=3, **{**TINY, **options})


def test_coarse_logits_reach_the_backbone_and_old_configs_load_without_them():
    model = tiny(output_stride=1, coarse_logits=True)
    head = model.backbone.net.head
    assert tuple(head.coarse.weight.shape) == (3, model.backbone.net.fpn.merged_channels, 3, 3)
    model.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    backbone_step(context(model, sub_batch=2), {"image": images, "label": labels})
    assert head.coarse.weight.grad is not None and head.coarse.weight.grad.abs().sum() > 0
    old = tiny(output_stride=1).config
    del old["options"]["coarse_logits"]
    assert create_model(**old).backbone.net.head.coarse is None
    with pytest.raises(ConfigError, match="'coarse_logits' cannot change after training"):
        model.with_inference_options(coarse_logits=False)


def test_output_stride_shapes_the_network_so_prediction_cannot_change_it():
    with pytest.raises(ConfigError, match="'output_stride' cannot change after training"):
        tiny(output_stride=4).with_inference_options(output_stride=1)


# --------------------------------------------------------------------------- training


def test_backbone_step_loss_is_at_the_patch_resolution_against_labels_not_downsampled():
    """The backbone stage's cross-entropy compares logits made at the input's size with its labels."""
    for stride in (1, 4):
        model = tiny(output_stride=stride).train()
        images = torch.randn(4, 3, 32, 32)
        labels = torch.randint(0, 3, (4, 32, 32))
        labels[0, :5] = 255  # ignored
        logged = backbone_step(context(model, sub_batch=4), {"image": images, "label": labels})
        logits = model.backbone.decode(images)
        assert tuple(logits.shape[-2:]) == ((32, 32) if stride == 1 else (8, 8))
        if stride == 4:  # the paper's: 1/4 logits upsampled to the labels
            logits = resize(logits, (32, 32))
        expected = F.cross_entropy(logits, labels, ignore_index=255)
        torch.testing.assert_close(logged["loss"], expected.detach(), rtol=1e-5, atol=1e-6)


def test_refinement_step_refines_full_resolution_backbone_predictions():
    model = tiny(output_stride=1).train()
    model.backbone.eval()  # frozen, as the refinement stage keeps it
    seen = []
    real = model.refinement.forward

    def spy(coarse, fine):
        seen.append((coarse.detach().clone(), fine.detach().clone()))
        return real(coarse, fine)

    model.refinement.forward = spy
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.75, 1.0]], dtype=torch.float64)
    batch = {
        "coarse": torch.randn(2, 3, 32, 32),
        "image": torch.randn(2, 3, 32, 32),
        "label": torch.randint(0, 3, (2, 32, 32)),
        "box": boxes,
    }
    refinement_step(context(model), batch)
    with torch.no_grad():
        fine = torch.softmax(model.backbone.decode(batch["image"]), 1)  # no upsampling anywhere
        coarse = crop_resize(torch.softmax(model.backbone.decode(batch["coarse"]), 1), boxes, (32, 32))
    assert tuple(fine.shape) == (2, 3, 32, 32)
    torch.testing.assert_close(seen[0][1], fine)
    torch.testing.assert_close(seen[0][0], coarse)


# --------------------------------------------------------------------------- inference


def test_every_scale_runs_the_backbone_at_full_resolution():
    model = tiny(output_stride=1, points=0.75).eval()
    shapes = []
    model.backbone.net.register_forward_hook(lambda m, i, o: shapes.append((tuple(i[0].shape), tuple(o.shape))))
    image = torch.randn(1, 3, 64, 64)
    trace = []
    with torch.inference_mode():
        out = model.infer_frame(tensor_reader(model, image), (64, 64), refine=True, sub_batch=64, trace=trace)
    # one pass per scale (sub_batch 64): the frame, its 4 patches, its 16 patches; logits at the input's size
    assert [(i[0], o[0]) for i, o in shapes] == [(1, 1), (4, 4), (16, 16)]
    assert all(i[-2:] == o[-2:] == (32, 32) and o[1] == 3 for i, o in shapes)
    assert [t["points"] for t in trace] == [0, 768, 3072]
    assert tuple(out.shape) == (1, 3, 64, 64)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 64, 64))
    # the coarsest scale: the backbone's softmax of the frame, area-resized to the 16-px canvas
    with torch.inference_mode():
        coarse = model.infer(image, refine=False)
        frame = torch.softmax(model.backbone.decode(area_resize(image, (32, 32))), 1)
    expected = F.interpolate(area_resize(frame, (16, 16)), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(coarse, expected)


def test_magnet_fast_at_full_resolution():
    model = tiny(output_stride=1, fast_patches=3, points=0.9).eval()
    model.mark_refinement_trained()
    trace = []
    with torch.inference_mode():
        image = torch.randn(1, 3, 64, 64)
        out = model.infer_frame(tensor_reader(model, image), (64, 64), sub_batch=2, trace=trace)
    assert [len(t["patches"]) for t in trace] == [1, 3, 3]
    assert [t["points"] for t in trace[1:]] == [int(0.9 * 3 * 256)] * 2
    assert tuple(out.shape) == (1, 3, 64, 64)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 64, 64))


def scene(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((16, 16, 1)))[:height, :width]
    return (big * 0.7 + rng.integers(0, 77, (height, width, 3))).astype(np.uint8)


def predictor_model(**options):
    torch.manual_seed(0)
    base = {"scales": [[24, 24], [48, 48], [96, 96]], "input_size": [32, 32], "median_kernel": 3}
    model = create_model("magnet", encoder="test_resnet", num_classes=3, output_stride=1, **{**base, **options})
    model.eval().mark_refinement_trained()
    return model


def test_predictor_whole_image_blocks_are_crops_of_one_prediction(tmp_path):
    import tifffile

    model = predictor_model()
    source = open_image(scene(110, 100))  # <= 1.25 x 96: one frame
    predictor = build_predictor(model, NORM)
    context_ = predictor.prepare(source)
    assert context_["mode"] == "whole" and tuple(context_["probs"].shape) == (3, 110, 100)
    whole = predictor.predict_block(source, context_, source.bounds)
    frame = predictor.predict_frame(source, source.bounds)[0].numpy()  # the frame in memory
    np.testing.assert_allclose(whole, frame, atol=1e-3)  # kept as float16
    block = Window(50, 30, 40, 60)
    np.testing.assert_array_equal(predictor.predict_block(source, context_, block), whole[(slice(None), *block.slices)])
    predict_image(predictor, source, tmp_path / "mask.tif", progress=False)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), whole.argmax(0))


def test_predictor_block_mode_cells_equal_their_frames_predictions(tmp_path):
    import tifffile

    model = predictor_model()
    source = open_image(scene(200, 170))  # > 1.25 x 96: block-wise
    predictor = build_predictor(model, NORM)
    context_ = predictor.prepare(source)
    assert context_ == {"mode": "blocks", "frame": (96, 96)}
    block = Window(0, 0, 200, 170)
    out = predictor.predict_block(source, context_, block)
    assert out.shape == (3, 200, 170)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    for cell in block_cells(block, (96, 96)):
        frame = frame_around(cell, (96, 96), 200, 170)
        alone = predictor.predict_frame(source, frame)[0].numpy()
        np.testing.assert_array_equal(
            out[(slice(None), *cell.slices)], alone[(slice(None), *cell.relative_to(frame).slices)]
        )
    result = predict_image(predictor, source, tmp_path / "mask.tif", progress=False)
    assert result.blocks_predicted == 1
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), out.argmax(0))


def test_memory_estimate_grows_with_the_backbone_and_nothing_else():
    """Only the backbone's per-patch activations change; MagNet's canvases were full-resolution already."""
    sample = (torch.zeros(1, 3, 128, 128),)
    estimates, backbones = {}, {}
    for stride in (4, 1):
        model = tiny(output_stride=stride, input_size=[128, 128], scales=[[128, 128], [256, 256]])
        estimates[stride] = inference_estimate_for(model, "cuda")  # no resident-memory figure in it
        backbones[stride] = inference_estimate(model.backbone, sample)
        band = (torch.zeros(1, 3, min(128, REFINE_BAND + 2 * REFINE_HALO), 128),) * 2  # 3 classes
        refinement = inference_estimate(model.refinement, band)
        assert estimates[stride].per_sample == max(backbones[stride].per_sample, refinement.per_sample)
        assert working_set_bytes(model, 256 * 256) == working_set_bytes(tiny(output_stride=4), 256 * 256)
    # the head's full-resolution maps: 16-channel stem and fuse maps and the 48-channel concatenation
    assert backbones[1].per_sample > backbones[4].per_sample + 16 * 128 * 128 * 4
    assert estimates[1].fixed > estimates[4].fixed  # the head's parameters (counted on an accelerator)


# --------------------------------------------------------------------------- a 2-px line


@pytest.fixture
def flush_denormals():
    """Adam's second moments of tiny gradients become denormal floats, which slow CPU maths many times over."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def line_scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised image ``(1, 3, size, size)`` holding a 2-px wavy line (a road) on a texture, and its mask.

    The same scene as ``tests/test_thin_structures.py``.
    """
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


def iou(probs: torch.Tensor, line: torch.Tensor) -> float:
    pred = probs.argmax(1)[0].bool()
    return round(((pred & line).sum() / (pred | line).sum()).item(), 3)


def settle_batchnorm(module: torch.nn.Module, run) -> None:
    """Set the BN statistics to those of ``run()``'s batch (MagNet's 0.01 momentum needs thousands of steps)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one pass gives its batch's statistics
    with torch.no_grad():
        run()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def overfit(output_stride: int, image: torch.Tensor, line: torch.Tensor, steps=(60, 30)) -> dict[str, float]:
    """Both stages through the recipe's own steps on one 64x64 image (two scales: the frame at 32, four 32-px patches).

    The batches are what the stages' views draw from this image: the frame at input size and
    the four native patches of the finest scale (the backbone), and the four (coarse frame,
    fine patch) pairs (the refinement). Adam, lr 1e-3 (the paper's FPN without BatchNorm
    diverges at 3e-3 at output stride 4).
    """
    torch.manual_seed(0)
    model = create_model(
        "magnet",
        encoder="test_resnet",
        num_classes=2,
        scales=[[32, 32], [64, 64]],
        input_size=[32, 32],
        median_kernel=3,
        output_stride=output_stride,
    )
    geometry = model.frame_geometry((64, 64))
    windows, boxes = geometry.windows(1), geometry.boxes[1]
    frame = area_resize(image, (32, 32))
    labels = line.long()
    patches = torch.cat([image[(slice(None), slice(None), *w.slices)] for w in windows])
    patch_labels = torch.stack([labels[w.slices] for w in windows])
    frame_labels = F.interpolate(labels[None, None].float(), size=(32, 32), mode="nearest")[0].long()
    backbone_batch = {"image": torch.cat([frame, patches]), "label": torch.cat([frame_labels, patch_labels])}
    pairs = {
        "coarse": frame.expand(4, -1, -1, -1),
        "image": patches,
        "label": patch_labels,
        "box": torch.tensor(boxes, dtype=torch.float64),
    }
    ctx = context(model)
    model.train()
    model.refinement.eval()
    optimizer = torch.optim.Adam(model.backbone.parameters(), lr=1e-3)
    for _ in range(steps[0]):
        optimizer.zero_grad()
        backbone_step(ctx, backbone_batch)
        optimizer.step()
    model.backbone.eval().requires_grad_(False)
    model.refinement.train()
    model.mark_refinement_trained()
    optimizer = torch.optim.Adam(model.refinement.parameters(), lr=1e-3)
    for _ in range(steps[1]):
        optimizer.zero_grad()
        refinement_step(ctx, pairs)
        optimizer.step()
    with torch.no_grad():
        coarse = crop_resize(torch.softmax(model.backbone(pairs["coarse"]), 1), pairs["box"], (32, 32))
    settle_batchnorm(model.refinement, lambda: model(patches, coarse))
    model.eval()
    held_out, held_out_line = image.transpose(-1, -2).flip(-1), line.T.flip(-1)  # the line turned vertical
    with torch.inference_mode():
        fine = torch.cat([model.backbone_probs(patches[i : i + 1]) for i in range(4)])
        fine = torch.cat([torch.cat([fine[0:1], fine[1:2]], 3), torch.cat([fine[2:3], fine[3:4]], 3)], 2)
        return {
            "backbone": iou(fine, line),  # the finest scale's backbone predictions, the refinement's input
            "magnet": iou(model.infer(image), line),
            "held_out": iou(model.infer(held_out), held_out_line),
        }


@pytest.mark.slow
def test_full_resolution_backbone_lets_magnet_draw_a_2px_line(flush_denormals):
    image, line = line_scene()
    full, paper = overfit(1, image, line), overfit(4, image, line)
    # output_stride=1: backbone 0.983, MagNet 0.983, held-out 0.957; =4: 0.433, 0.876, 0.071
    print(f"line IoU (finest backbone, MagNet, MagNet on the scene turned): stride 1 {full}, stride 4 {paper}")
    assert full["backbone"] > 0.9 and full["magnet"] > 0.9 and full["held_out"] > 0.9
    # the paper's backbone stays under the 0.665 a bilinearly upsampled 1/4 logit map reaches
    assert paper["backbone"] < 0.6
    # the refinement module (full-resolution convolutions on probabilities) learns this one image's line
    # from the blurred 1/4 predictions, but cannot place a line it has not memorised
    assert paper["magnet"] <= full["magnet"] and paper["held_out"] < 0.5


# --------------------------------------------------------------------------- end to end


def test_trains_both_stages_and_predicts_at_full_resolution(tmp_path):
    import tifffile

    from gigaseg.api import predict, train
    from gigaseg.training.checkpoint import load_checkpoint

    from .test_method import DG_SIZE, check_two_stage_run, deepglobe_fixture, settings

    data = deepglobe_fixture(tmp_path / "deepglobe")
    options = {"scales": [[64, 64], [128, 128], [256, 256]], "input_size": [64, 64], "output_stride": 1}
    train("magnet", data, tmp_path / "run", encoder="test_resnet", options=options, settings=settings())
    check_two_stage_run(tmp_path / "run", 7)
    payload = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert payload["model"]["config"]["options"]["output_stride"] == 1
    assert any(key.startswith("backbone.net.head.fuse1.") for key in payload["model"]["state_dict"])
    result = predict(tmp_path / "run", data / "valid" / "104113_sat.jpg", tmp_path / "pred", progress=False)
    mask = tifffile.imread(result.mask_path)
    assert mask.shape == (DG_SIZE, DG_SIZE) and mask.max() < 7
