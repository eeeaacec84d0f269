"""MagNet / MagNet-Fast: the refinement module, scores, point and patch selection, geometry, inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gigaseg.methods.magnet.model as magnet_module
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window, box_on_grid, crop_resize, resize
from gigaseg.methods.magnet.model import (
    PRESETS,
    RefinementModule,
    certainty,
    error_score,
    median_blur,
    num_points,
    patch_boxes,
    select_patches,
    select_points,
    uncertainty,
)
from gigaseg.methods.registry import create_model

from ..base import ModelTester, conv_parameters, count_parameters


def area_resize(x, size):
    """MagNet's resizing rule: area averaging when shrinking both sides, bilinear otherwise."""
    return resize(x, size, area_when_shrinking=True)


#: DeepGlobe-like shape (three scales, 1/4/16 patches), tiny sizes
TINY = {"scales": [[16, 16], [32, 32], [64, 64]], "input_size": [32, 32], "median_kernel": 3}


class TestMagNet(ModelTester):
    method = "magnet"
    options = TINY
    unused_parameters = ("refinement.",)  # the training-mode forward is the backbone alone


class TestMagNetCityscapesLike(ModelTester):
    method = "magnet"
    options = {"preset": "cityscapes_fast", "scales": [[16, 32], [32, 64], [64, 128]], "input_size": [32, 64]}
    input_size = (64, 128)
    num_classes = 5
    unused_parameters = ("refinement.",)


def tiny(num_classes=3, **options):
    torch.manual_seed(0)
    return create_model("magnet", encoder="test_resnet", num_classes=num_classes, **{**TINY, **options}).eval()


def tensor_reader(model, x):
    def read(windows):
        return torch.cat([area_resize(x[:, :, w.top : w.bottom, w.left : w.right], model.input_size) for w in windows])

    return read


# --------------------------------------------------------------------------- refinement module


def bn(channels):
    return 2 * channels


def refinement_count_by_hand(c):
    conv = conv_parameters
    stem = bn(2 * c) + conv(2 * c, 64, 3, bias=False) + bn(64) + conv(64, 64, 3, bias=False) + bn(64)
    block1 = (
        conv(64, 32, 1, bias=False)
        + bn(32)
        + conv(32, 32, 3, bias=False)
        + bn(32)
        + conv(32, 128, 1, bias=False)
        + bn(128)
        + conv(64, 128, 1, bias=False)
        + bn(128)
    )
    block2 = (
        conv(128, 32, 1, bias=False)
        + bn(32)
        + conv(32, 32, 3, bias=False)
        + bn(32)
        + conv(32, 128, 1, bias=False)
        + bn(128)
    )
    return stem + block1 + block2 + conv(128, c, 1, bias=False)


@pytest.mark.parametrize("classes, expected", [(7, 88092), (19, 103500)])
def test_refinement_parameter_count(classes, expected):
    assert refinement_count_by_hand(classes) == expected == 1284 * classes + 79104
    assert count_parameters(RefinementModule(classes)) == expected
    model = create_model("magnet", encoder="test_resnet", num_classes=classes, **TINY)
    assert count_parameters(model.refinement) == expected


def test_refinement_structure():
    module = RefinementModule(7)
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(conv.bias is None for conv in convs)
    assert norms and all(norm.momentum == 0.01 for norm in norms)
    assert module.bn0.num_features == 14 and module.conv1.in_channels == 14
    assert [type(b).__name__ for b in module.blocks] == ["Bottleneck", "Bottleneck"]
    assert module.blocks[0].downsample is not None and module.blocks[1].downsample is None
    assert module(torch.rand(2, 7, 20, 24), torch.rand(2, 7, 20, 24)).shape == (2, 7, 20, 24)


def test_refinement_input_order_is_coarse_then_fine():
    torch.manual_seed(0)
    module = RefinementModule(3).eval()
    with torch.no_grad():
        module.conv1.weight[:, 3:] = 0  # the second half of the input (fine) no longer matters
    coarse, fine_a, fine_b = torch.rand(3, 1, 3, 16, 16).unbind(0)
    assert torch.equal(module(coarse, fine_a), module(coarse, fine_b))
    assert not torch.equal(module(fine_a, coarse), module(fine_b, coarse))


def test_training_and_inference_pass_coarse_first():
    model = tiny(points=1.0)
    calls = []
    real = model.refinement.forward

    def spy(coarse, fine):
        calls.append((coarse.clone(), fine.clone()))
        return real(coarse, fine)

    model.refinement.forward = spy
    # training path: forward(fine image, coarse probabilities)
    x = torch.randn(2, 3, 32, 32)
    coarse = torch.softmax(torch.randn(2, 3, 32, 32), 1)
    model.train()
    model.backbone.eval()  # as in the refinement stage: the frozen backbone keeps its BN statistics
    model(x, coarse)
    assert torch.equal(calls[0][0], coarse)
    with torch.no_grad():
        expected_fine = torch.softmax(model.backbone(x), 1)
    torch.testing.assert_close(calls[0][1], expected_fine)
    # inference path: refine(coarse crop of the current prediction, the patch's own backbone prediction)
    model.eval()
    calls.clear()
    image = torch.randn(1, 3, 64, 64)
    read = tensor_reader(model, image)
    with torch.inference_mode():
        model.infer_frame(read, (64, 64), refine=True, sub_batch=64)
        geometry = model.frame_geometry((64, 64))
        fine = model.backbone_probs(read(geometry.windows(1)))
        current = area_resize(model.backbone_probs(read(geometry.windows(0))), geometry.canvases[0])
        coarse = crop_resize(current, geometry.boxes[1], model.input_size)
    torch.testing.assert_close(calls[0][1], fine)
    torch.testing.assert_close(calls[0][0], coarse)


def test_banded_refinement_equals_one_pass():
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():  # non-trivial BN statistics
        for norm in model.refinement.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)
    coarse, fine = torch.softmax(torch.randn(2, 2, 3, 300, 40), 2).unbind(0)
    assert 300 > magnet_module.REFINE_BAND + 2 * magnet_module.REFINE_HALO
    with torch.inference_mode():
        banded = model.refine_probs(coarse, fine)
        whole = torch.softmax(model.refinement(coarse, fine), 1)
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- scores


def test_certainty_and_uncertainty():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    torch.testing.assert_close(certainty(probs).flatten(), torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(uncertainty(probs).flatten(), torch.tensor([0.5, 1.0, 0.0]))
    current_u = torch.tensor([0.2, 0.9, 0.5]).reshape(1, 1, 1, 3)
    torch.testing.assert_close(error_score(probs, current_u).flatten(), torch.tensor([0.1, 0.0, 0.5]))


def test_median_blur_equals_kornia():
    from kornia.filters import median_blur as kornia_median

    torch.manual_seed(0)
    for shape, kernel in (((1, 1, 61, 47), 11), ((2, 1, 20, 33), 5), ((1, 1, 8, 9), 3)):
        x = torch.rand(shape)
        assert torch.equal(median_blur(x, kernel, band_bytes=4096), kornia_median(x, (kernel, kernel)))
    x = torch.rand(1, 1, 5, 5)
    assert median_blur(x, 1) is x


@pytest.mark.parametrize(
    "points, area, expected",
    [
        (32768, 100_000, 32768),
        (32768.0, 1000, 1000),
        (0.75, 1000, 750),
        (0.9, 1001, 900),
        (1.0, 37, 37),
        (0.5, 1, 0),
    ],
)
def test_num_points_count_and_fraction(points, area, expected):
    assert num_points(points, area) == expected


@pytest.mark.parametrize("n", [0, 1, 123, 999, 1000, 1900, 2000])
def test_select_points_picks_exactly_the_highest(n):
    torch.manual_seed(n)
    error = torch.rand(1, 1, 50, 40)
    mask = select_points(error, n)
    assert mask.shape == (50, 40) and mask.dtype == torch.bool
    assert int(mask.sum()) == n
    values = error[0, 0]
    if 0 < n < 2000:
        assert values[mask].min() > values[~mask].max()


@pytest.mark.parametrize("n", [1, 300, 600])
def test_select_points_stays_inside_candidates(n):
    torch.manual_seed(1)
    error = torch.rand(40, 30)
    candidates = torch.zeros(40, 30, dtype=torch.bool)
    candidates[:20] = True  # 600 candidates; the others have higher error
    error[20:] += 1.0
    mask = select_points(error, n, candidates)
    assert int(mask.sum()) == n and not (mask & ~candidates).any()
    if n < 600:
        assert error[mask].min() > error[candidates & ~mask].max()
    with pytest.raises(ValueError, match="cannot select 601 points among 600"):
        select_points(error, 601, candidates)


def test_select_points_exact_count_with_ties():
    mask = select_points(torch.zeros(30, 30), 450)
    assert int(mask.sum()) == 450


def test_select_patches_keeps_the_most_uncertain():
    u = torch.zeros(1, 1, 8, 8)
    u[..., :4, :4], u[..., :4, 4:], u[..., 4:, :4], u[..., 4:, 4:] = 0.1, 0.9, 0.5, 0.7
    boxes = patch_boxes([[4, 4], [8, 8]])[1]
    assert boxes == [(0.0, 0.0, 0.5, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.0, 1.0, 0.5), (0.5, 0.5, 1.0, 1.0)]
    assert select_patches(u, boxes, 1) == [1]
    assert select_patches(u, boxes, 2) == [1, 3]
    assert select_patches(u, boxes, 3) == [1, 2, 3]
    assert select_patches(u, boxes, 9) == [0, 1, 2, 3]
    # the mean decides, not the maximum
    u[..., 0, 0] = 50.0
    assert select_patches(u, boxes, 1) == [0]


# --------------------------------------------------------------------------- configuration


def test_presets_fill_unspecified_options():
    model = create_model("magnet", encoder="test_resnet", num_classes=19, preset="cityscapes")
    assert model.scales == [(128, 256), (256, 512), (512, 1024), (1024, 2048)]
    assert model.input_size == (128, 256)
    assert model.options["points"] == 32768 and model.options["median_kernel"] == 5
    assert model.options["fast_patches"] is None
    fast = create_model("magnet", encoder="test_resnet", num_classes=19, preset="cityscapes_fast")
    assert fast.options["points"] == 0.9 and fast.options["fast_patches"] == 4
    default = create_model("magnet", encoder="test_resnet", num_classes=7)
    assert default.options["preset"] == "deepglobe"
    assert default.scales == [(612, 612), (1224, 1224), (2448, 2448)] and default.input_size == (508, 508)
    assert default.options["points"] == 0.75 and default.options["median_kernel"] == 11
    dg_fast = create_model("magnet", encoder="test_resnet", num_classes=7, preset="deepglobe_fast")
    options = dg_fast.options
    assert (options["points"], options["fast_patches"], options["median_kernel"]) == (0.9, 3, 11)
    # explicit options win over the preset, and the config rebuilds the same model
    mixed = create_model(
        "magnet", encoder="test_resnet", num_classes=7, preset="deepglobe_fast", fast_patches=5, input_size=256
    )
    assert mixed.options["fast_patches"] == 5 and mixed.input_size == (256, 256)
    assert create_model(**mixed.config).config == mixed.config
    assert set(PRESETS) == {"deepglobe", "deepglobe_fast", "cityscapes", "cityscapes_fast"}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"preset": "gleason"}, "preset='gleason' is not one of"),
        ({"scales": [[32, 32], [16, 16]]}, "scales must grow from coarse to fine"),
        ({"scales": []}, "scales must be a non-empty list"),
        ({"scales": [[16, 0]]}, "each scale must be a positive integer"),
        ({"input_size": [0, 5]}, "input_size must be a positive integer"),
        ({"median_kernel": 4}, "median_kernel must be a positive odd integer"),
        ({"fast_patches": 0}, "fast_patches must be null"),
        ({"fast_patches": True}, "fast_patches must be null"),
        ({"points": 0}, "points must be > 0"),
        ({"decoder": "deeplab"}, "decoder='deeplab' is not one of"),
    ],
)
def test_option_values_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        create_model("magnet", encoder="test_resnet", num_classes=3, **options)


def test_needs_two_classes():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        create_model("magnet", encoder="test_resnet", num_classes=1, **TINY)


def test_variant_shares_weights():
    model = tiny()
    fast = model.variant(fast_patches=2, points=0.9)
    assert fast.options["fast_patches"] == 2 and model.options["fast_patches"] is None
    for (name, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- geometry


def tiles_exactly(windows, frame):
    covered = torch.zeros(frame, dtype=torch.int32)
    for w in windows:
        covered[w.slices] += 1
    return bool((covered == 1).all())


def test_deepglobe_geometry():
    model = create_model("magnet", encoder="test_resnet", num_classes=7)
    geometry = model.frame_geometry((2448, 2448))
    assert geometry.canvases == ((612, 612), (1224, 1224), (2448, 2448))
    assert [len(geometry.windows(i)) for i in range(3)] == [1, 4, 16]
    assert {w.shape for i in range(3) for w in geometry.windows(i)} == {(2448, 2448), (1224, 1224), (612, 612)}
    assert all(tiles_exactly(geometry.windows(i), (2448, 2448)) for i in range(3))
    # patches have the coarsest scale's size in each scale's own pixels: 612 px on every canvas
    for i, canvas in enumerate(geometry.canvases):
        assert {box_on_grid(b, *canvas).shape for b in geometry.boxes[i]} == {(612, 612)}


def test_cityscapes_geometry():
    model = create_model("magnet", encoder="test_resnet", num_classes=19, preset="cityscapes")
    geometry = model.frame_geometry((1024, 2048))
    assert geometry.canvases == ((128, 256), (256, 512), (512, 1024), (1024, 2048))
    assert [len(geometry.windows(i)) for i in range(4)] == [1, 4, 16, 64]
    assert [geometry.windows(i)[0].shape for i in range(4)] == [(1024, 2048), (512, 1024), (256, 512), (128, 256)]
    assert all(tiles_exactly(geometry.windows(i), (1024, 2048)) for i in range(4))


def test_scales_are_relative_to_other_frame_sizes():
    model = create_model("magnet", encoder="test_resnet", num_classes=7)
    geometry = model.frame_geometry((2000, 1001))
    assert geometry.canvases == ((500, 250), (1000, 501), (2000, 1001))
    assert [len(geometry.windows(i)) for i in range(3)] == [1, 4, 16]
    assert all(tiles_exactly(geometry.windows(i), (2000, 1001)) for i in range(3))


def test_frame_size_whole_image_or_blocks():
    model = create_model("magnet", encoder="test_resnet", num_classes=7)
    assert model.frame_size(2448, 2448) == (2448, 2448) and model.whole_image(2448, 2448)
    assert model.frame_size(3060, 1000) == (3060, 1000)  # up to 1.25x the finest scale: one frame
    assert model.frame_size(3061, 1000) == (2448, 1000) and not model.whole_image(3061, 1000)
    assert model.frame_size(4499, 6749) == (2448, 2448)


# --------------------------------------------------------------------------- inference


def test_coarse_only_until_the_refinement_is_trained():
    model = tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        coarse = model.infer(x, refine=False)
        expected = F.interpolate(
            area_resize(model.backbone_probs(area_resize(x, (32, 32))), (16, 16)),
            size=(64, 64),
            mode="bilinear",
            align_corners=False,
        )
        torch.testing.assert_close(coarse, expected)
        assert torch.equal(model.infer(x), coarse)
        torch.testing.assert_close(model.predict(x), torch.log(coarse.clamp_min(1e-8)))
        model.mark_refinement_trained()
        full = model.infer(x)
    assert not torch.allclose(full, coarse)
    torch.testing.assert_close(full.sum(1), torch.ones(1, 64, 64))
    # the refine option overrides the flag either way (same weights: an inference option)
    with torch.inference_mode():
        assert torch.equal(model.with_inference_options(refine="never").infer(x), coarse)
        untrained = tiny()
        assert not untrained.refines and untrained.with_inference_options(refine="always").refines
        assert torch.equal(untrained.with_inference_options(refine="always").infer(x), untrained.infer(x, refine=True))
    with pytest.raises(ConfigError, match="refine='off' is not one of"):
        tiny(refine="off")


def reference_two_scales(model, x):
    """MagNet with two scales written out directly: (upsampled current, refined canvas)."""
    geometry = model.frame_geometry(x.shape[-2:])
    read = tensor_reader(model, x)
    current = area_resize(model.backbone_probs(read(geometry.windows(0))), geometry.canvases[0])
    canvas = geometry.canvases[1]
    refined = torch.zeros(1, model.num_classes, *canvas)
    for box, window in zip(geometry.boxes[1], geometry.windows(1)):
        fine = model.backbone_probs(read([window]))
        coarse = crop_resize(current, [box], model.input_size)
        patch = torch.softmax(model.refinement(coarse, fine), 1)
        cells = box_on_grid(box, *canvas)
        refined[:, :, cells.top : cells.bottom, cells.left : cells.right] = F.interpolate(
            patch, size=cells.shape, mode="bilinear", align_corners=False
        )
    upsampled = F.interpolate(current, size=canvas, mode="bilinear", align_corners=False)
    return upsampled, refined


def test_all_points_gives_the_refined_canvas():
    model = tiny(scales=[[16, 16], [32, 32]], points=1.0)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        out = model.infer(x, refine=True)
        _, refined = reference_two_scales(model, x)
    torch.testing.assert_close(out, refined, rtol=1e-5, atol=1e-6)


def test_n_points_are_replaced_where_the_error_is_highest():
    model = tiny(scales=[[16, 16], [32, 32]], points=100, median_kernel=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        out = model.infer(x, refine=True)
        upsampled, refined = reference_two_scales(model, x)
        current = area_resize(model.backbone_probs(area_resize(x, (32, 32))), (16, 16))
        error = error_score(refined, area_resize(uncertainty(current), (32, 32)))[0, 0]
    from_refined = (out - refined).abs().amax(1)[0] < 1e-5
    from_current = (out - upsampled).abs().amax(1)[0] < 1e-5
    assert bool((from_refined | from_current).all())
    replaced = from_refined & ~from_current
    assert int(replaced.sum()) <= 100 <= int(from_refined.sum())
    # the replaced pixels are the 100 highest error scores
    top = select_points(error, 100)
    assert not (replaced & ~top).any()


def run_counting(model, x):
    patches = {"backbone": 0, "refinement": 0}
    real_backbone, real_refine = model.backbone_probs, model.refine_probs

    def backbone(batch, autocast=None):
        patches["backbone"] += batch.shape[0]
        return real_backbone(batch, autocast)

    def refine(coarse, fine, autocast=None):
        patches["refinement"] += coarse.shape[0]
        return real_refine(coarse, fine, autocast)

    model.backbone_probs, model.refine_probs = backbone, refine
    trace = []
    with torch.inference_mode():
        model.infer_frame(tensor_reader(model, x), x.shape[-2:], refine=True, sub_batch=3, trace=trace)
    return patches, trace


def test_magnet_refines_every_patch_and_exact_point_counts():
    model = tiny(points=0.75)
    patches, trace = run_counting(model, torch.randn(1, 3, 64, 64))
    assert patches == {"backbone": 1 + 4 + 16, "refinement": 4 + 16}
    assert [t["points"] for t in trace] == [0, 768, 3072]  # 0.75 of the 32x32 and 64x64 canvases
    assert all(t.get("chosen", 0) == t["points"] for t in trace)


def test_magnet_fast_refines_only_the_most_uncertain_patches(monkeypatch):
    model = tiny(fast_patches=3, points=0.9)
    seen = []
    real = magnet_module.select_patches

    def spy(current_uncertainty, boxes, n):
        chosen = real(current_uncertainty, boxes, n)
        seen.append((current_uncertainty.clone(), boxes, chosen))
        return chosen

    monkeypatch.setattr(magnet_module, "select_patches", spy)
    patches, trace = run_counting(model, torch.randn(1, 3, 64, 64))
    assert patches == {"backbone": 1 + 3 + 3, "refinement": 3 + 3}
    assert [t["patches"] for t in trace[1:]] == [chosen for _, _, chosen in seen]
    for u, boxes, chosen in seen:
        h, w = u.shape[-2:]
        means = [float(u[0, 0][box_on_grid(b, h, w).clip(h, w).slices].mean()) for b in boxes]
        assert len(chosen) == 3
        assert min(means[j] for j in chosen) >= max(means[j] for j in range(len(boxes)) if j not in chosen)
    # 0.9 of the refined area: 3 of the 4 16x16 patches at scale 1, 3 of the 16 at scale 2
    assert [t["points"] for t in trace[1:]] == [int(0.9 * 3 * 256), int(0.9 * 3 * 256)]
    assert all(t["chosen"] == t["points"] for t in trace[1:])


def test_infer_handles_other_image_sizes_and_batches():
    model = tiny()
    model.mark_refinement_trained()
    with torch.inference_mode():
        out = model.infer(torch.randn(2, 3, 50, 70))
    assert out.shape == (2, 3, 50, 70)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 50, 70))


def test_frame_window_rounding_tiles_tiny_frames():
    model = create_model("magnet", encoder="test_resnet", num_classes=7)
    geometry = model.frame_geometry((5, 3))
    assert all(w.area > 0 and Window(0, 0, 5, 3).contains(w) for i in range(3) for w in geometry.windows(i))
