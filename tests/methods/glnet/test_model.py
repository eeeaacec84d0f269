"""GLNet's network: parameter count, feature sharing both ways, stages and forward/backward."""

from __future__ import annotations

import pytest
import torch

from gigaseg.errors import ConfigError
from gigaseg.geometry import PatchGrid, crop_resize
from gigaseg.methods.glnet.model import STAGES, GLNet, LocalToGlobal, crop_global, stage_number
from gigaseg.methods.registry import create_model
from gigaseg.nn.encoders import Encoder

from ..base import ModelTester, conv_parameters

TINY = {"size_g": 64, "size_p": 32, "min_overlap": 8}


class TestGLNet(ModelTester):
    method = "glnet"
    options = TINY
    # a fresh model predicts as stage 1: only the global branch runs
    unused_parameters = ("local_branch", "global_ext", "ensemble", "global_fixed")


def tiny(stage=1, encoder="test_resnet", num_classes=3, **options):
    torch.manual_seed(0)
    model = create_model("glnet", encoder=encoder, num_classes=num_classes, **{**TINY, **options})
    model.set_stage(stage)
    return model


# --------------------------------------------------------------------------- size


def test_resnet50_parameter_count_is_the_papers():
    model = create_model("glnet", encoder="resnet50", num_classes=7)
    parts = model.parameter_breakdown()
    # both branches, both FPNs with their sharing layers, ensemble head: 79.2 M in the paper
    assert parts["paper"] == pytest.approx(79.2e6, rel=0.01)
    assert parts["paper"] == 79_200_917
    # the frozen stage-1 copy (ResNet-50 + plain FPN) is extra, and documented as such; it shares the
    # global branch's tensors until stage 3 starts, and is a separate copy from then on
    assert parts["global_fixed"] == parts["global_branch"] == 28_064_839
    assert parts["total"] == parts["paper"] + parts["global_fixed"]
    assert model.fixed_is_tied and model.num_parameters() == parts["paper"]
    model.copy_global_to_fixed()
    assert not model.fixed_is_tied and model.num_parameters() == parts["total"]
    # hand count of the sharing layers: every local FPN input doubles, ps2 concat -> 3x3 1024 -> 512
    fpn = model.local_branch.fpn
    laterals = sum(conv_parameters(2 * c, 256, 1) for c in (256, 512, 1024, 2048))
    smooth = 4 * (conv_parameters(512, 256, 3) + conv_parameters(512, 128, 3))
    assert sum(p.numel() for p in fpn.parameters()) == laterals + smooth + conv_parameters(
        1024, 512, 3
    ) + conv_parameters(512, 7, 3)
    assert sum(p.numel() for p in model.ensemble.parameters()) == conv_parameters(1024, 7, 3)


@pytest.mark.parametrize("encoder", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_channel_counts_come_from_the_encoders_feature_info(encoder):
    model = tiny(encoder=encoder)
    channels = Encoder(encoder).out_channels
    assert [c.in_channels for c in model.local_branch.fpn.lateral_convs] == [2 * c for c in channels]
    assert [c.in_channels for c in model.global_ext.lateral_convs] == [2 * c for c in channels]
    assert [c.in_channels for c in model.global_branch.fpn.lateral_convs] == channels
    model.set_stage(3)
    x = torch.randn(1, 3, 80, 72)
    assert tuple(model(x).shape) == (1, 3, 80, 72)


def test_fpn_channels_narrow_every_fpn_and_the_ensemble_head():
    model = tiny(fpn_channels=32, num_classes=3)
    for fpn in (model.global_branch.fpn, model.local_branch.fpn, model.global_ext, model.global_fixed.fpn):
        assert {c.out_channels for c in fpn.lateral_convs} == {32}
        assert {c.out_channels for c in fpn.smooth2_convs} == {16}
    assert model.local_branch.fpn.lateral_convs[0].in_channels == 2 * Encoder("test_resnet").out_channels[0]
    assert model.ensemble.in_channels == 2 * 4 * 16  # concat(ps3 local, ps3 global), ps3 = 4 x smoothing
    assert model.context_shapes()["ps3"][0][0] == 64
    model.set_stage(3)
    x = torch.randn(1, 3, 80, 72)
    assert tuple(model(x).shape) == (1, 3, 80, 72)
    assert model.num_parameters() < tiny().num_parameters()
    with pytest.raises(ConfigError, match="fpn_channels must be > 0"):
        tiny(fpn_channels=0)


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"min_overlap must be in \[0, size_p=32\)"):
        tiny(min_overlap=32)
    with pytest.raises(ConfigError, match="size_g must be > 0"):
        tiny(size_g=0)
    with pytest.raises(ConfigError, match="global_context='block' is not one of"):
        tiny(global_context="block")
    assert GLNet.default_options["size_g"] == GLNet.default_options["size_p"] == 508
    assert GLNet.default_options["focal_gamma"] == 3.0 and GLNet.default_options["fmreg"] == 0.15


# --------------------------------------------------------------------------- stages


def test_stage_lives_in_a_buffer_that_checkpoints_carry():
    model = tiny(stage=0)
    assert int(model.trained_stage) == 0 and model.stage == 1  # untrained predicts as stage 1
    model.set_stage("local2global")
    assert model.stage == 3 and stage_number("global2local") == 2 and STAGES[0] == "global"
    rebuilt = create_model(**model.config)  # the config is stage-free: --init works across stages
    assert rebuilt.config == model.config and rebuilt.stage == 1
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.stage == 3
    with pytest.raises(ConfigError, match="no stage 'local'"):
        model.set_stage("local")


def test_stage_outputs_differ_and_have_input_size():
    x = torch.randn(2, 3, 80, 72)
    outputs = {}
    model = tiny().eval()
    for stage in (1, 2, 3):
        model.set_stage(stage)
        with torch.no_grad():
            outputs[stage] = model(x)
        assert tuple(outputs[stage].shape) == (2, 3, 80, 72)
    assert not torch.allclose(outputs[1], outputs[2]) and not torch.allclose(outputs[2], outputs[3])


def test_no_per_image_state_is_kept_in_modules():
    model = tiny(stage=3).eval()

    def tensors(m):
        return {
            (name, key)
            for name, mod in m.named_modules()
            for key, value in vars(mod).items()
            if isinstance(value, torch.Tensor)
            or (isinstance(value, list) and value and isinstance(value[0], torch.Tensor))
        }

    before = tensors(model)
    with torch.no_grad():
        first = model(torch.randn(1, 3, 80, 72, generator=torch.Generator().manual_seed(1)))
        model(torch.randn(1, 3, 64, 96))
        again = model(torch.randn(1, 3, 80, 72, generator=torch.Generator().manual_seed(1)))
    assert tensors(model) == before
    torch.testing.assert_close(first, again)


# --------------------------------------------------------------------------- sharing


def test_global_to_local_sharing_feeds_the_patch_crop_of_every_point():
    model = tiny(stage=2).eval()
    view = torch.randn(1, 3, 64, 64)
    patches = torch.randn(2, 3, 32, 32)
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.25, 1.0, 0.75)]
    with torch.no_grad():
        context = model.global_features(view)
        seen = {}

        def visit(point, own):
            seen[point] = [m.shape for m in own]

        out = model.patch_forward(patches, boxes, context)
        model.local_features(patches, boxes, context, visit=visit)
        assert list(seen) == ["c", "p", "ps1", "ps2"]
        # the ensemble consumed exactly the crop of the global ps3 the patch covers
        crop = crop_resize(context.ps3, boxes, out.local.ps3.shape[-2:])
        torch.testing.assert_close(out.global_ps3, crop)
        expected = model.ensemble(torch.cat([out.local.ps3, crop], 1))
        torch.testing.assert_close(out.ensemble, expected)
        # every sharing point matters: zeroing the context at any one point changes the output
        for point in ("c", "p", "ps1", "ps2"):
            altered = type(context)(**{**vars(context), point: [torch.zeros_like(m) for m in getattr(context, point)]})
            assert not torch.allclose(model.patch_forward(patches, boxes, altered).local.logits, out.local.logits), (
                point
            )


def test_local_to_global_merge_averages_patches_on_the_global_grids():
    model = tiny(stage=3).eval()
    view = torch.randn(1, 3, 64, 64)
    grid = PatchGrid.glnet(96, 96, 32, 8)  # 4 x 4 overlapping patches
    boxes = grid.normalized_boxes()
    with torch.no_grad():
        context = model.global_features(view, fixed=True)
        merger = LocalToGlobal.like(context)
        # constant maps average to the same constant everywhere the patches cover
        merger.add_point("c", [torch.full((len(boxes), *m.shape[1:]), 2.0) for m in context.c], boxes)
        for point in ("p", "ps1", "ps2"):
            merger.add_point(point, [torch.ones((len(boxes), *m.shape[1:])) for m in getattr(context, point)], boxes)
        merged = merger.result()
    for point in ("c", "p", "ps1", "ps2"):
        assert [m.shape for m in merged[point]] == [m.shape for m in getattr(context, point)]
    torch.testing.assert_close(merged["c"][0], torch.full_like(merged["c"][0], 2.0))
    # the _ext layers consume the merged maps: other local maps give another global output
    with torch.no_grad():
        a = model.global_features(view, merged).logits
        merged["ps1"] = [m * 3 for m in merged["ps1"]]
        b = model.global_features(view, merged).logits
    assert a.shape == context.logits.shape
    assert not torch.allclose(a, b)


def test_ext_layers_share_the_global_classifier_and_fixed_copy_is_a_copy():
    model = tiny()
    assert model.global_ext.classifier is None
    first = next(model.global_branch.parameters())
    assert model.fixed_is_tied and next(model.global_fixed.parameters()) is first  # follows stages 1 and 2
    model.copy_global_to_fixed()  # stage 3 starts: a snapshot
    assert not model.fixed_is_tied
    first.data.add_(1.0)
    assert not torch.equal(next(model.global_fixed.parameters()), first)
    model.copy_global_to_fixed()
    for (name, a), (_, b) in zip(model.global_branch.state_dict().items(), model.global_fixed.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_ties_the_fixed_copy_exactly_when_the_checkpoint_copies_are_equal(tmp_path):
    model = tiny(stage=2)
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    model.copy_global_to_fixed()
    next(model.global_branch.parameters()).data.add_(1.0)
    model.set_stage(3)
    torch.save(model.state_dict(), tmp_path / "untied.pt")
    assert (tmp_path / "untied.pt").stat().st_size > (tmp_path / "tied.pt").stat().st_size * 1.1  # stored once
    fresh = create_model(**model.config)
    fresh.load_state_dict(torch.load(tmp_path / "untied.pt", weights_only=True))
    assert not fresh.fixed_is_tied and fresh.stage == 3
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), key
    fresh.load_state_dict(torch.load(tmp_path / "tied.pt", weights_only=True))
    assert fresh.fixed_is_tied and fresh.stage == 2


def test_context_shapes_are_the_global_maps_shapes():
    model = tiny(stage=2)
    with torch.no_grad():
        features = model.global_features(torch.zeros(1, 3, 64, 64))
    shapes = model.context_shapes()
    for point in ("c", "p", "ps1", "ps2"):
        assert shapes[point] == [tuple(m.shape[1:]) for m in getattr(features, point)], point
    assert shapes["ps3"] == [tuple(features.ps3.shape[1:])]


def test_global_crops_are_the_tiling_crops_and_stay_inside_coarse_maps():
    features = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    boxes = [(0.0, 0.0, 0.25, 0.25), (0.5, 0.25, 1.0, 0.75), (0.1, 0.3, 0.35, 0.55)]
    torch.testing.assert_close(crop_global(features, boxes, (6, 6)), crop_resize(features, boxes, (6, 6)))
    # a patch at the far border of a large image rounds past a 2 x 2 map: its last cell is used
    coarse = torch.arange(4, dtype=torch.float32).reshape(1, 1, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        crop_resize(coarse, [(0.0, 0.75, 0.25, 1.0)], (3, 3))
    torch.testing.assert_close(crop_global(coarse, [(0.0, 0.75, 0.25, 1.0)], (3, 3)), torch.full((1, 1, 3, 3), 1.0))
    torch.testing.assert_close(crop_global(coarse, [(0.8, 0.8, 1.0, 1.0)], (1, 1)), torch.full((1, 1, 1, 1), 3.0))


def test_fpn_pass_equals_the_fpn_module_with_and_without_autograd():
    model = tiny(stage=2).eval()
    view, patches = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 32, 32)
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    with torch.no_grad():
        context = model.global_features(view)
        reference = model.global_branch.fpn(model.global_branch.encoder(view))
        torch.testing.assert_close(context.logits, reference)

        def share(point, own):
            return [crop_resize(g, boxes, o.shape[-2:]) for g, o in zip(getattr(context, point), own)]

        shared = model.local_branch.fpn(model.local_branch.encoder(patches), share=share)
        lowmem = model.local_features(patches, boxes, context).logits  # no concatenations built
    torch.testing.assert_close(lowmem, shared, rtol=1e-4, atol=1e-6)
    with torch.enable_grad():
        torch.testing.assert_close(model.local_features(patches, boxes, context).logits, shared, rtol=1e-4, atol=1e-6)
