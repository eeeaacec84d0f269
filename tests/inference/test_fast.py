"""The fast inference path (gigaseg.inference.fast): masks against the plain path for every method's
predictor, BatchNorm folding, the background prefetch, sub-batches across block borders, ONNX Runtime,
and the CLI's flags."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

import gigaseg
from gigaseg.errors import ConfigError
from gigaseg.geometry import PatchGrid, Window
from gigaseg.inference.fast import (
    FastOptions,
    OnnxNetwork,
    PrefetchedSource,
    accelerate_model,
    fast_options,
    prefetch,
    require_onnxruntime,
)
from gigaseg.inference.stream import predict_image
from gigaseg.io.array import ArraySource
from gigaseg.io.normalize import Normalization
from gigaseg.methods.registry import build_predictor

#: the scene: 2 x 2 blocks of 512 px (the last ones cut), so block borders and the prefetch are crossed
SCENE = (600, 700)

#: method name in the test id -> (create_model method, options, GLNet stage, build_predictor options, scene size);
#: GLNet and MagNet predict a smaller scene (one block: the block borders and prefetch are the other methods')
METHODS = {
    "patch": ("patch", {"patch_size": 64, "overlap": 16, "fpn_channels": 16}, None, {}, SCENE),
    "global": ("global", {"input_size": 128, "fpn_channels": 16}, None, {}, SCENE),
    "glnet_stage3": ("glnet", {"size_g": 96, "size_p": 96, "min_overlap": 16}, 3, {}, (300, 350)),
    "magnet": (
        "magnet",
        {"scales": [[64, 64], [128, 128], [256, 256]], "input_size": [64, 64], "median_kernel": 3},
        None,
        {"refine": True},
        (300, 350),
    ),
    "icnet": (
        "icnet",
        {"width": 0.25, "crop_size": 64, "tile_size": [256, 256], "tile_overlap": 32},
        None,
        {},
        SCENE,
    ),
    "patchgd_segmenter": ("patchgd_segmenter", {"patch_size": 32}, None, {}, SCENE),
}
#: bf16 agreement floors below the issue's 99%, with the reason: MagNet picks the points it refines by
#: uncertainty, so bf16's rounding moves whole refined patches; its plain path in bf16 agrees as little
#: (0.979 on this scene) - it is bf16, not the fast path
BF16_FLOOR = {"magnet": 0.98}


def scene(seed: int = 0) -> np.ndarray:
    """Colour regions with noise: each class's region readable from colour, as the tiny datasets'."""
    rng = np.random.default_rng(seed)
    h, w = SCENE
    rows, cols = np.mgrid[0:h, 0:w]
    labels = ((rows // 90 + cols // 130) % 3).astype(np.uint8)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    return (colours[labels] + rng.integers(-40, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def with_statistics(model: nn.Module, seed: int = 1) -> nn.Module:
    """BatchNorm running statistics and affine terms far from the fresh (0, 1, 1, 0), as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and not m.running_mean.is_meta:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.bias.add_(torch.randn(n, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def trained(sharpened_checkpoint):
    """name -> (model, build_predictor options, scene, plain-path labels): sharpened checkpoints of every method,
    loaded, with BatchNorm statistics."""
    cache = {}

    def get(name):
        if name not in cache:
            method, options, stage, predictor_options, size = METHODS[name]
            model, _ = gigaseg.load_model(sharpened_checkpoint(method, f"fast_{name}", **options))
            if stage is not None:
                model.set_stage(stage)
                if stage == 3:
                    model.copy_global_to_fixed()
            if method == "patchgd_segmenter":  # weights x 20 overflow its deep U-Net (NaN): x 2 instead
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.div_(10)
            model = with_statistics(model).eval()
            image = scene()[: size[0], : size[1]]
            plain = labels_of(build_predictor(model, NORM, **predictor_options), image)
            cache[name] = (model, predictor_options, image, plain)
        return cache[name]

    return get


NORM = Normalization.for_image(3, np.uint8)


def labels_of(predictor, image: np.ndarray) -> np.ndarray:
    bands = []
    predict_image(
        predictor, ArraySource(image), None, block_size=512, on_band=lambda _w, b: bands.append(b), progress=False
    )
    return np.concatenate(bands)


#: GLNet and MagNet take 5-8 s here with their plain prediction (once per module): their whole-image logic
#: (stage 3's pass over every patch, MagNet's three scales and refinement) is what the fast path must keep
SLOW = {"glnet_stage3", "magnet"}


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in METHODS])
def test_fast_path_masks_equal_the_plain_path(trained, name, precision):
    model, options, image, plain = trained(name)
    floor = 0.999 if precision == "32" else BF16_FLOOR.get(name, 0.99)
    fast_predictor = build_predictor(model, NORM, precision=precision, fast=FastOptions(), **options)
    fast = labels_of(fast_predictor, image)
    counts = np.bincount(plain.ravel(), minlength=3)
    assert (counts > 0.02 * plain.size).sum() >= 2, f"{name}: the plain mask is nearly one class {counts}"
    agreement = (plain == fast).mean()
    assert agreement >= floor, f"{name} {precision}: {agreement:.5f} of the pixels agree"
    # the fast copy folded batch norms, and the predictor's own model is untouched
    assert getattr(fast_predictor, "net", fast_predictor.model).folded_batchnorms > 0
    assert fast_predictor.plain_model is model


def test_fast_networks_hold_no_batchnorm_after_folding(trained):
    model, *_ = trained("glnet_stage3")
    predictor = build_predictor(model, NORM, fast=FastOptions())
    for path in predictor.fast_networks():
        fast_net = predictor.model.get_submodule(path)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast_net.modules()), path
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.get_submodule(path).modules()), path
    # the original model, the one listed parts aside, is shared rather than copied
    assert predictor.model.global_ext is model.global_ext


def test_plain_path_is_the_default(trained):
    model, *_ = trained("patch")
    predictor = build_predictor(model, NORM)
    assert predictor.fast is None and predictor.model is model


# --------------------------------------------------------------------------- BatchNorm folding


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(4)
        self.in_channels = 3

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_folding_keeps_outputs_and_counts_parameters():
    torch.manual_seed(0)
    net = with_statistics(ConvBN()).eval()
    x = torch.randn(2, 3, 20, 20)
    fast = accelerate_model(net, {"": x[:1]}, FastOptions(channels_last=False))
    assert fast.folded_batchnorms == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.net.modules())
    with torch.inference_mode():
        assert torch.allclose(fast(x), net(x), atol=1e-5, rtol=1e-5)
    # conv1 gains an 8-bias, each BN loses its 2 x C affine terms: 8*27 + 8 + 4*8 + 4 parameters
    assert sum(p.numel() for p in fast.net.parameters()) == 8 * 27 + 8 + 4 * 8 + 4
    assert sum(p.numel() for p in net.parameters()) == 8 * 27 + 16 + 4 * 8 + 4 + 8


def test_folding_leaves_a_shared_conv_weight_alone():
    """A weight another module shares (GLNet's global copy before stage 3) keeps its value."""
    torch.manual_seed(0)
    net = with_statistics(ConvBN()).eval()
    twin = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    twin.weight = net.conv1.weight
    before = twin.weight.detach().clone()
    accelerate_model(net, {"": torch.randn(1, 3, 16, 16)}, FastOptions())
    assert torch.equal(twin.weight, before) and twin.weight is net.conv1.weight


def test_channels_last_copy_agrees():
    torch.manual_seed(0)
    net = with_statistics(ConvBN()).eval()
    x = torch.randn(2, 3, 20, 20)
    fast = accelerate_model(net, {"": x[:1]}, FastOptions())
    with torch.inference_mode():
        out = fast(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, net(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_loads_in_another_thread():
    main = threading.get_ident()
    seen = []

    def load(i):
        seen.append(threading.get_ident())
        return i * i

    assert list(prefetch(range(7), load)) == [(i, i * i) for i in range(7)]
    assert seen and all(t != main for t in seen)


def test_prefetch_raises_at_the_failing_item():
    def load(i):
        if i == 3:
            raise ValueError("bad item 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item, _ in prefetch(range(6), load):
            got.append(item)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_loads_at_most_depth_ahead(depth):
    started = []
    ahead = []

    def load(i):
        started.append(i)
        return i

    for item, _ in prefetch(range(10), load, depth=depth):
        time.sleep(0.01)  # the consumer is slow: the loader runs as far ahead as it may
        ahead.append(max(started) - item)
    assert max(ahead) == depth


def test_prefetch_overlaps_loading_with_work():
    def load(i):
        time.sleep(0.05)
        return i

    start = time.perf_counter()
    for _ in prefetch(range(6), load):
        time.sleep(0.05)
    # serial would take 0.6 s; overlapped about 0.35 s
    assert time.perf_counter() - start < 0.5


def test_prefetched_source_serves_reads_inside_its_region():
    image = scene()
    source = ArraySource(image)
    reader = PrefetchedSource(source, halo=64)
    block = Window(0, 512, 512, 188)
    reader.use(reader.load(block))
    assert reader.region_of(block) == Window(0, 448, 576, 252)
    inside = Window(10, 460, 100, 200)
    assert np.array_equal(reader.read(inside), image[10:110, 460:660]) and reader.hits == 1
    outside = Window(0, 0, 50, 50)
    assert np.array_equal(reader.read(outside), image[:50, :50]) and reader.misses == 1
    small = reader.read(Window(0, 0, 600, 700), out_size=(60, 70))
    assert small.shape == (60, 70, 3) and reader.misses == 2


# --------------------------------------------------------------------------- full sub-batches


def batch_sizes(predictor) -> list[int]:
    sizes = []
    net = predictor.model.net if predictor.fast is not None else predictor.model
    handle = net.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        labels = labels_of(predictor, scene())
    finally:
        handle.remove()
    return sizes, labels


def test_sub_batches_stay_full_across_block_borders(trained):
    model, *_ = trained("patch")
    plain = build_predictor(model, NORM)
    plain.sub_batch = 5
    fast = build_predictor(model, NORM, fast=FastOptions())
    fast.sub_batch = 5
    plain_sizes, plain_labels = batch_sizes(plain)
    fast_sizes, fast_labels = batch_sizes(fast)
    # the plain path has a short batch per block (4 blocks); the fast path at most at a row's last block (2 rows)
    assert sum(s < 5 for s in plain_sizes) == 4
    assert sum(s < 5 for s in fast_sizes) <= 2
    # every window of the grid computed once on the fast path; the plain path computes the row of windows
    # that straddles the border between the two rows of blocks (rows 512 to 576) twice
    grid = PatchGrid.sliding(*SCENE, 64, 48)
    straddling = [w for w in grid.windows if w.top < 512 < w.bottom]
    assert sum(fast_sizes) == len(grid.windows) == 195
    assert sum(plain_sizes) == len(grid.windows) + len(straddling) == 195 + 15
    assert (fast_labels == plain_labels).mean() >= 0.999


# --------------------------------------------------------------------------- ONNX Runtime


@pytest.mark.parametrize("name", ["patch", "icnet", "glnet_stage3", "magnet"])
def test_onnxruntime_backend_agrees_with_torch(trained, name):
    model, options, image, plain = trained(name)
    predictor = build_predictor(model, NORM, fast=FastOptions(backend="onnxruntime"), **options)
    onnx = labels_of(predictor, image)
    runs = [m for m in predictor.model.modules() if isinstance(m, OnnxNetwork)]
    if name == "icnet":
        runs = [m for m in predictor.net.modules() if isinstance(m, OnnxNetwork)]
    assert runs and all(m._sessions for m in runs), "no network ran in ONNX Runtime"
    assert (plain == onnx).mean() >= 0.999


def test_onnxruntime_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError) as caught:
        require_onnxruntime()
    message = str(caught.value)
    assert "onnxruntime" in message and "gigaseg[onnx]" in message and "\n" not in message


def test_fast_options():
    assert fast_options(False) is None
    assert fast_options(True) == FastOptions()
    assert fast_options(False, backend="onnxruntime").backend == "onnxruntime"
    assert fast_options({"prefetch": False}, compile=True) == FastOptions(prefetch=False, compile=True)
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        fast_options(True, backend="tensorrt")
    with pytest.raises(ConfigError, match="does not combine"):
        fast_options(True, backend="onnxruntime", compile=True)
    with pytest.raises(ConfigError, match="unknown fast-path option"):
        fast_options({"fold": True})


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def scene_file(tmp_path):
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, scene()[:300, :400], tile=(64, 64))
    return path


def run_cli(capsys, *argv):
    from gigaseg.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("flags", [["--fast"], ["--backend", "onnxruntime"], ["--fast", "--precision", "bf16-mixed"]])
def test_cli_fast_flags_write_the_plain_mask(capsys, tmp_path, tiny_checkpoint, scene_file, flags):
    code, _ = run_cli(capsys, "predict", scene_file, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "plain")
    assert code == 0
    code, _ = run_cli(
        capsys, "predict", scene_file, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "fast", *flags
    )
    assert code == 0
    plain = tifffile.imread(tmp_path / "plain" / "scene.tif")
    fast = tifffile.imread(tmp_path / "fast" / "scene.tif")
    assert (plain == fast).mean() >= (0.99 if "bf16-mixed" in flags else 0.999)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--backend", "onnxruntime", "--compile"], "does not combine"),
        (["--backend", "onnxruntime", "--precision", "bf16-mixed"], "runs float32"),
    ],
)
def test_cli_bad_fast_flags_exit_2(capsys, tmp_path, tiny_checkpoint, scene_file, flags, fragment):
    out = tmp_path / "out"
    code, captured = run_cli(capsys, "predict", scene_file, "--checkpoint", tiny_checkpoint, "--out", out, *flags)
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and fragment in err, err
    assert not (out / "scene.tif").exists()


def test_cli_backend_without_onnxruntime_exits_2(capsys, monkeypatch, tmp_path, tiny_checkpoint, scene_file):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, captured = run_cli(
        capsys,
        "predict",
        scene_file,
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        tmp_path / "o",
        "--backend",
        "onnxruntime",
    )
    err = captured.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'gigaseg[onnx]'" in err, err


def test_block_argmax_equals_numpys_with_ties():
    from gigaseg.inference.stream import _argmax

    probs = np.random.default_rng(0).random((5, 40, 30)).astype(np.float32)
    probs[1, :8] = probs[3, :8] = 2.0  # a tie: the first class wins, as numpy's argmax
    probs[4, 8:10] = probs[0, 8:10] = 3.0
    for view in (probs, probs[:, ::3, 1:], probs[:, :, ::-1], probs[:1], probs.astype(np.float16)):
        got = _argmax(view)
        assert got.dtype == np.uint8 and np.array_equal(got, view.argmax(axis=0))
    assert (_argmax(probs)[:8] == 1).all() and (_argmax(probs)[8:10] == 0).all()
