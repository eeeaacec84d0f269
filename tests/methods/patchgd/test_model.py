"""PatchGD with a global patch: the classifier, the segmenter and the downsampled baseline networks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import gigaseg
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window
from gigaseg.inference.contract import ClassificationPredictor
from gigaseg.io.array import ArraySource
from gigaseg.io.normalize import Normalization
from gigaseg.methods.patchgd.model import (
    GLOBAL_GRADIENTS,
    PatchGDClassifier,
    PatchGDSegmenter,
    batch_norms,
    even_chunks,
    global_view_of,
    grid_shape,
    patch_at,
)
from gigaseg.methods.registry import build_predictor, create_model

from ..base import ModelTester

CLASSIFIER = {"patch_size": 32, "latent_dim": 16}
SEGMENTER = {"patch_size": 32}


class _ClassifierTester(ModelTester):
    def expected_shape(self, x):
        return (x.shape[0], self.num_classes)

    def test_predict_gives_input_size_logits_without_grad(self):
        model = self.build().train()
        out = model.predict(self.make_input(batch_size=1))
        assert tuple(out.shape) == (1, self.num_classes) and not out.requires_grad
        assert model.training


class TestPatchGDClassifier(_ClassifierTester):
    method = "patchgd_classifier"
    options = CLASSIFIER


class TestPatchGDClassifierConcat(_ClassifierTester):
    method = "patchgd_classifier"
    options = {**CLASSIFIER, "fusion": "concat"}


class TestPatchGDClassifierNoGlobal(_ClassifierTester):
    method = "patchgd_classifier"
    options = {**CLASSIFIER, "global_patch": False}


class TestDownsampledClassifier(_ClassifierTester):
    method = "downsampled_classifier"
    options = {"input_size": 48, "latent_dim": 16}


class TestPatchGDSegmenter(ModelTester):
    method = "patchgd_segmenter"
    options = SEGMENTER


class TestPatchGDSegmenterBinary(ModelTester):
    method = "patchgd_segmenter"
    num_classes = 2
    options = SEGMENTER


class TestPatchGDSegmenterDeepLabNoGlobal(ModelTester):
    method = "patchgd_segmenter"
    options = {**SEGMENTER, "theta1": "deeplabv3", "global_patch": False}


def image(height=80, width=100, batch=2, channels=3, seed=0):
    return torch.randn((batch, channels, height, width), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- geometry


def test_grid_and_padded_patches():
    assert grid_shape(80, 100, 32) == (3, 4) and grid_shape(64, 64, 32) == (2, 2)
    x = image(batch=1)[0]
    corner = patch_at(x, 64, 96, 32)
    assert corner.shape == (3, 32, 32)
    torch.testing.assert_close(corner[:, :16, :4], x[:, 64:80, 96:100])
    assert corner[:, 16:].abs().sum() == 0 and corner[:, :, 4:].abs().sum() == 0
    assert [len(c) for c in even_chunks(list(range(9)), 8)] == [5, 4]
    assert [len(c) for c in even_chunks(list(range(8)), 8)] == [8]


# ----------------------------------------------------------------------------- the classifier


def classifier(**options):
    torch.manual_seed(0)
    return create_model("patchgd_classifier", encoder="test_resnet", num_classes=5, **{**CLASSIFIER, **options})


def test_classifier_fill_equals_per_patch_encodings():
    model = classifier().eval()
    x = image()  # 80x100: a 3x4 grid, the last row and column padded
    z = model.fill(x, sub_batch=5)
    assert z.shape == (2, 16, 3, 4) and not z.requires_grad
    with torch.no_grad():
        for b in range(2):
            for r in range(3):
                for c in range(4):
                    alone = model.theta1(patch_at(x[b], 32 * r, 32 * c, 32)[None])[0]
                    torch.testing.assert_close(z[b, :, r, c], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion, channels", [("add", 16), ("concat", 32)])
def test_global_fusion_shapes(fusion, channels):
    model = classifier(fusion=fusion).eval()
    assert model.theta2.convs[0].in_channels == channels
    z, g = torch.randn(2, 16, 3, 4), torch.randn(2, 16)
    fused = model.fuse(z, g)
    assert fused.shape == (2, channels, 3, 4)
    if fusion == "add":
        torch.testing.assert_close(fused, z + g[:, :, None, None])
    else:
        torch.testing.assert_close(fused[:, :16], z)
        torch.testing.assert_close(fused[:, 16:], g[:, :, None, None].expand(-1, -1, 3, 4))
    no_global = classifier(global_patch=False)
    assert no_global.theta2.convs[0].in_channels == 16 and no_global.fuse(z, None) is z


def test_classifier_forward_equals_fill_plus_global_patch():
    model = classifier().eval()
    x = image()
    with torch.no_grad():
        g = model.theta1(global_view_of(x, 32))
        torch.testing.assert_close(model(x), model.classify(model.fill(x, 4), g), rtol=1e-5, atol=1e-5)


def test_classifier_update_rewrites_only_the_sampled_patches_with_gradients():
    model = classifier().eval()
    x = image()
    z = torch.randn(2, 16, 3, 4)
    indices = torch.tensor([[0, 7], [11, 5]])
    logits, z_new = model(x, latents=z, indices=indices)
    assert logits.shape == (2, 5) and z_new.requires_grad
    fresh = model.fill(x, 8).flatten(2)
    changed = torch.zeros(2, 12, dtype=torch.bool)
    changed[0, [0, 7]] = True
    changed[1, [11, 5]] = True
    flat = z_new.detach().flatten(2)
    for b in range(2):
        torch.testing.assert_close(flat[b][:, changed[b]], fresh[b][:, changed[b]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flat[b][:, ~changed[b]], z.flatten(2)[b][:, ~changed[b]])
    logits.sum().backward()
    assert model.theta1.fc.weight.grad.abs().sum() > 0


def test_global_patch_can_use_running_statistics_and_leave_them_alone():
    model = classifier(global_norm="running").train()
    x = image()
    norm = model.theta1.encoder.model.conv1[1]  # a BatchNorm of the stem
    before = norm.running_mean.clone()
    g = model.encode_global(global_view_of(x, 32))
    torch.testing.assert_close(norm.running_mean, before)
    assert norm.training and g.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(g.detach(), model.theta1(global_view_of(x, 32)))
    model.train()
    model.theta1(patch_at(x[0], 0, 0, 32)[None].expand(2, -1, -1, -1).contiguous())
    assert not torch.equal(norm.running_mean, before)  # patches in training mode do update them


def test_global_patch_with_its_own_batch_statistics_by_default():
    model = classifier().train()
    assert model.options["global_norm"] == "batch"
    x = image()
    norm = model.theta1.encoder.model.conv1[1]
    before = norm.running_mean.clone()
    single = model.encode_global(global_view_of(x[:1], 32))  # one patch: running statistics, left alone
    torch.testing.assert_close(norm.running_mean, before)
    assert single.requires_grad
    view = global_view_of(x, 32).expand(2, -1, -1, -1).contiguous()
    g = model.encode_global(view)
    assert not torch.equal(norm.running_mean, before)  # a training-mode forward of its own
    torch.testing.assert_close(g, model.theta1(view))
    with pytest.raises(ConfigError, match="global_norm"):
        classifier(global_norm="group")


def test_classifier_options_are_checked():
    with pytest.raises(ConfigError, match="fusion"):
        classifier(fusion="max")
    with pytest.raises(ConfigError, match="sampling_fraction must be in"):
        classifier(sampling_fraction=0.0)
    with pytest.raises(ConfigError, match="inner_iterations must be > 0"):
        classifier(inner_iterations=0)
    model = classifier(sampling_fraction=0.25)
    assert [model.num_sampled(n) for n in (1, 4, 16, 256)] == [1, 1, 4, 64]
    assert PatchGDClassifier.default_options["latent_dim"] == 256
    assert PatchGDClassifier.default_options["fusion"] == "add"


def test_classifier_is_not_a_segmenter(tmp_path):
    model = classifier()
    assert isinstance(build_predictor(model, Normalization.for_image(3, np.uint8)), ClassificationPredictor)
    pixels = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ConfigError, match="is a classification method: it gives one class per image, not a mask"):
        gigaseg.predict(model, pixels, out=tmp_path / "mask.tif", info={})
    assert not (tmp_path / "mask.tif").exists()


def test_image_classifier_reads_band_by_band_like_the_in_memory_forward():
    model = classifier().eval()
    pixels = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    norm = Normalization.for_image(3, np.uint8)
    source = ArraySource(pixels)
    probs = build_predictor(model, norm).predict(source)
    x = torch.from_numpy(norm.apply(pixels))[None]
    thumb = torch.from_numpy(norm.apply(source.read(out_size=(32, 32), resample="area")))[None]
    expected = torch.softmax(model(x, thumb), dim=1)[0].detach().numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)
    assert probs.shape == (5,) and abs(probs.sum() - 1) < 1e-5


# ----------------------------------------------------------------------------- the segmenter


def segmenter(num_classes=3, **options):
    torch.manual_seed(0)
    return create_model("patchgd_segmenter", encoder="test_resnet", num_classes=num_classes, **{**SEGMENTER, **options})


def test_segmenter_structure_follows_the_paper():
    model = segmenter()
    assert model.theta1.segmentation_head[0].out_channels == 8  # theta1's head: 8 channels
    assert model.theta2.in_channels == 16 and model.theta2.kernel_size == (1, 1)  # Z (8) + global (8)
    assert segmenter(global_patch=False).theta2.in_channels == 8
    assert segmenter(num_classes=2).theta2.out_channels == 1  # binary: one logit, BCE + Dice
    assert segmenter(num_classes=2, loss="ce_dice").theta2.out_channels == 2
    with pytest.raises(ConfigError, match="multiple of 32"):
        segmenter(patch_size=48, theta1="deeplabv3")
    assert segmenter(patch_size=48).patch_size == 48  # smp's U-Net pads its input itself
    with pytest.raises(ConfigError, match="two classes"):
        segmenter(loss="bce_dice")
    narrow = segmenter(decoder_channels=[32, 16, 16, 8, 8])
    assert narrow.theta1.decoder.blocks[-1].conv2[0].out_channels == 8
    assert narrow(image(64, 64, batch=1)).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="decoder_channels must be"):
        segmenter(decoder_channels=[32, 16])


def test_segmenter_fill_is_the_stitched_patch_outputs():
    model = segmenter().eval()
    x = image()
    z = model.fill(x, sub_batch=3)
    assert z.shape == (2, 8, 96, 128)
    with torch.no_grad():
        for b, r, c in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
            alone = model.theta1(patch_at(x[b], 32 * r, 32 * c, 32)[None])[0]
            torch.testing.assert_close(z[b, :, 32 * r : 32 * r + 32, 32 * c : 32 * c + 32], alone, rtol=1e-5, atol=1e-5)


def test_segmenter_global_features_are_upsampled_and_concatenated():
    model = segmenter().eval()
    x = image()
    with torch.no_grad():
        z = model.fill(x, 12)[..., :80, :100]
        g = model.global_features(global_view_of(x, 32))
        assert g.shape == (2, 8, 32, 32)
        g_up = torch.nn.functional.interpolate(g, size=(80, 100), mode="bilinear", align_corners=False)
        expected = model.theta2(torch.cat([z, g_up], dim=1))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_binary_segmenter_logits_are_zero_and_the_single_logit():
    model = segmenter(num_classes=2).eval()
    with torch.no_grad():
        logits = model(image())
    assert logits.shape == (2, 2, 80, 100) and logits[:, 0].abs().sum() == 0
    probs = torch.softmax(logits, dim=1)[:, 1]
    torch.testing.assert_close(probs, torch.sigmoid(logits[:, 1]))


def test_segmenter_update_gives_gradients_only_through_the_sampled_patches():
    model = segmenter().eval()
    x = image(batch=1)
    z0 = model.fill(x, 12)
    indices = torch.tensor([[5]])  # row 1, column 1
    logits = model(x, latents=z0, indices=indices)
    batches = []
    handle = model.theta1.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    model(x, latents=z0, indices=indices)
    handle.remove()
    assert batches == [1, 1]  # the sampled patch, then the global patch
    logits[:, :, 32:64, 32:64].sum().backward()
    assert all(p.grad is not None for p in model.theta1.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), model(x), rtol=1e-4, atol=1e-5)  # same Z either way (eval)


@pytest.mark.parametrize("build", ["segmenter", "classifier"])
def test_global_gradient_scales_only_what_reaches_theta1_through_the_global_patch(build):
    x = image(batch=1)
    indices = torch.tensor([[1, 5, 6]])  # k = 3 of 12 patches: "balanced" scales the global path by 1/4

    def gradients(mode):
        model = {"segmenter": segmenter, "classifier": classifier}[build](global_gradient=mode).eval()
        z0 = model.fill(x, 12)
        out = model(x, latents=z0, indices=indices)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()
        return (
            {n: p.grad.clone() for n, p in model.theta1.named_parameters()},
            {n: p.grad.clone() for n, p in model.theta2.named_parameters()},
        )

    (full, head_full), (balanced, head_balanced), (none, head_none) = (gradients(m) for m in GLOBAL_GRADIENTS)
    for name in full:  # theta1's gradient is local + factor x global, linear in the factor
        torch.testing.assert_close(balanced[name], none[name] + 0.25 * (full[name] - none[name]), rtol=1e-4, atol=1e-7)
    assert any((full[n] - none[n]).abs().max() > 1e-6 for n in full)  # the global path does reach theta1
    for name in head_full:  # theta2 learns from the global features the same way in every mode
        torch.testing.assert_close(head_balanced[name], head_full[name])
        torch.testing.assert_close(head_none[name], head_full[name])
    # defaults: the segmenter balances (measured: the paper's graph collapsed it), the classifier keeps it
    assert segmenter().global_gradient_factor(3, 12) == 0.25 and classifier().global_gradient_factor(3, 12) == 1.0
    with pytest.raises(ConfigError, match="global_gradient='half' is not one of"):
        classifier(global_gradient="half")


@pytest.mark.parametrize("options", [{}, {"global_patch": False}])
def test_segmentation_predictor_blocks_equal_the_whole_image_forward(options):
    model = segmenter(**options).eval()
    pixels = np.random.default_rng(1).integers(0, 255, (90, 110, 3), dtype=np.uint8)
    norm = Normalization.for_image(3, np.uint8)
    source = ArraySource(pixels)
    predictor = build_predictor(model, norm)
    context = predictor.prepare(source)
    x = torch.from_numpy(norm.apply(pixels))[None]
    thumb = torch.from_numpy(norm.apply(source.read(out_size=(32, 32), resample="area")))[None]
    with torch.no_grad():
        full = torch.softmax(model(x, thumb), dim=1)[0].numpy()
    for window in [Window(0, 0, 90, 110), Window(10, 20, 40, 50), Window(33, 70, 57, 40), Window(89, 109, 1, 1)]:
        block = predictor.predict_block(source, context, window)
        assert block.shape == (3, window.height, window.width) and block.dtype == np.float32
        np.testing.assert_allclose(block, full[(slice(None), *window.slices)], rtol=1e-4, atol=1e-5)


def test_segmenter_defaults():
    assert PatchGDSegmenter.default_options["latent_channels"] == 8
    assert PatchGDSegmenter.default_options["theta1"] == "unet"
    assert segmenter(num_classes=2).binary and not segmenter(num_classes=3).binary


@pytest.mark.parametrize("build", [classifier, segmenter])
def test_global_patch_with_running_statistics_of_its_own(build):
    model = build(global_norm="separate").train()
    x = image()
    norms = batch_norms(model.theta1)
    stem, own = norms[0], model.global_statistics
    assert torch.equal(own.mean_0, stem.running_mean) and own.mean_0 is not stem.running_mean
    local_before, global_before = stem.running_mean.clone(), own.mean_0.clone()
    view = global_view_of(x, 32)
    reference = copy.deepcopy(model)
    g = model.encode_global(view) if build is classifier else model.global_features(view)
    torch.testing.assert_close(stem.running_mean, local_before)  # the patches' statistics are left alone
    assert not torch.equal(own.mean_0, global_before)  # the global patches' own ones moved
    torch.testing.assert_close(g, reference.theta1(view))  # batch statistics, as with "batch"
    model.theta1(patch_at(x[0], 0, 0, 32)[None].expand(2, -1, -1, -1).contiguous())
    assert not torch.equal(stem.running_mean, local_before)
    after_global = own.mean_0.clone()
    model.theta1(patch_at(x[0], 0, 0, 32)[None].expand(2, -1, -1, -1).contiguous())
    torch.testing.assert_close(own.mean_0, after_global)  # patches do not touch the global ones

    # inference: the global patch is normalised by its own statistics, the patches by theirs
    model.eval()
    expected = copy.deepcopy(model)
    for i, norm in enumerate(batch_norms(expected.theta1)):
        norm.running_mean.copy_(getattr(own, f"mean_{i}"))
        norm.running_var.copy_(getattr(own, f"var_{i}"))
    with torch.no_grad():
        g = model.encode_global(view) if build is classifier else model.global_features(view)
        torch.testing.assert_close(g, expected.theta1(view))
        patch = patch_at(x[0], 0, 0, 32)[None]
        assert not torch.allclose(model.theta1(patch), expected.theta1(patch))

    # the statistics travel with the checkpoint's state dict
    assert {f"global_statistics.mean_{i}" for i in range(len(norms))} <= set(model.state_dict())
    restored = build(global_norm="separate").eval()
    restored.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
    assert not hasattr(build(global_norm="separate", global_patch=False), "global_statistics")


def test_global_dropout_zeroes_whole_images_global_features_in_training_only():
    model = classifier(global_dropout=0.3).train()
    g = torch.randn(4000, 16, requires_grad=True)
    torch.manual_seed(1)
    dropped = model.drop_global(g)
    zeroed = (dropped == 0).all(dim=1)
    assert torch.equal(dropped[~zeroed], g[~zeroed])  # kept features are not rescaled
    assert 0.27 < zeroed.float().mean().item() < 0.33
    dropped.sum().backward()
    assert torch.equal(g.grad[:, 0], (~zeroed).float())  # no gradient through a dropped image
    assert model.eval().drop_global(g) is g
    assert classifier().train().drop_global(g) is g  # the default: off


@pytest.mark.parametrize("build", [classifier, segmenter])
def test_the_training_forward_passes_dropped_global_features_to_theta2(build):
    model = build(global_dropout=0.5).train()
    x = image(batch=8, height=64, width=64)
    seen = []
    if build is classifier:
        classify = model.classify
        model.classify = lambda z, g: seen.append(g) or classify(z, g)
    else:
        head = model.head
        model.head = lambda z, g_up: seen.append(g_up) or head(z, g_up)
    latents = model.fill(x)
    torch.manual_seed(3)
    model(x, latents=latents, indices=torch.zeros((8, 1), dtype=torch.long))
    zeroed = seen[-1].flatten(1).eq(0).all(dim=1)
    assert 0 < zeroed.sum() < 8  # some images lost their global features, not all
    assert not seen[-1][~zeroed].flatten(1).eq(0).all(dim=1).any()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not seen[-1].flatten(1).eq(0).all(dim=1).any()  # inference always has them


@pytest.mark.parametrize("build", [classifier, segmenter])
def test_global_dropout_must_be_a_probability_below_one(build):
    for rate in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="global_dropout must be in"):
            build(global_dropout=rate)
