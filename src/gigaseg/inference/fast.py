"""The fast inference path every predictor can take: folded networks, channels_last, ONNX Runtime, prefetch.

A predictor lists the networks it runs on patches (:meth:`gigaseg.inference.contract.Predictor.fast_networks`:
a dotted attribute path of its model, ``""`` for the model itself, with an example input);
:func:`accelerate_model` returns a copy of the model in which each of them is

- BatchNorm-folded (``gigaseg.export.fold_batchnorm``: every eval-mode ``BatchNorm2d`` that
  directly follows a ``Conv2d`` is folded into it and replaced by ``Identity``), converted to
  channels_last, optionally ``torch.compile``-d; or
- with ``backend="onnxruntime"``, exported to ONNX (in memory, BN-folded, one graph per input
  shape, dynamic batch) and run by an ONNX Runtime CPU session (:class:`OnnxNetwork`), for the
  networks whose inputs and outputs are plain tensors (``Predictor.onnx_networks``).

The rest of the model (the parts a method runs once per image, its bookkeeping) is shared with
the original, so a fast predictor holds one extra copy of the listed networks' weights only.

:func:`prefetch` runs a loader one item ahead in a background thread (order kept, errors
raised where the item is consumed, at most ``depth`` items ahead); the streaming driver uses
it with :class:`PrefetchedSource` to decode the next block's pixels (with the predictor's
halo) while the network runs on the current one.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..export import compile_model, fold_batchnorm, to_channels_last
from ..geometry import Window
from ..io.base import ImageSource

__all__ = [
    "BACKENDS",
    "FastOptions",
    "OnnxNetwork",
    "PrefetchedSource",
    "accelerate_model",
    "bf16_supported",
    "check_precision",
    "fast_options",
    "prefetch",
    "require_onnxruntime",
]

#: the network runtimes of the fast path
BACKENDS = ("torch", "onnxruntime")
#: the prediction precisions (``Predictor.autocast``): float32, bfloat16 autocast, float16 autocast
PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16", "16-mixed", "16")
#: what to install for the onnxruntime backend (the package's optional extra)
ONNX_HINT = "pip install 'gigaseg[onnx]' (or: pip install onnx onnxruntime)"


@dataclass(frozen=True)
class FastOptions:
    """How the fast path runs a predictor's networks.

    Attributes:
        fold_bn: fold batch norms into the convolutions before them.
        channels_last: weights and inputs in channels_last memory format (faster convolutions with oneDNN and
            on GPUs with tensor cores).
        compile: ``torch.compile`` each network (compiled at the first call; needs a C++ compiler on CPU).
        backend: ``"torch"`` or ``"onnxruntime"`` (the networks of ``Predictor.onnx_networks`` run in an ONNX
            Runtime CPU session; the others stay on the torch path).
        prefetch: decode the next block's pixels in a background thread while the network runs.
        full_batches: fill a block's last sub-batch of patches with patches of the next block of the row.
    """

    fold_bn: bool = True
    channels_last: bool = True
    compile: bool = False
    backend: str = "torch"
    prefetch: bool = True
    full_batches: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; use {' or '.join(BACKENDS)}")
        if self.backend == "onnxruntime" and self.compile:
            raise ConfigError("--compile compiles the torch networks: it does not combine with --backend onnxruntime")

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict.

        Returns:
            Field name -> value (kept in the prediction's fingerprint).
        """
        return asdict(self)


def check_precision(precision: str) -> str:
    """``precision`` checked.

    Args:
        precision: one of :data:`PRECISIONS`.

    Returns:
        ``precision`` as a str.

    Raises:
        ConfigError: any other value.
    """
    if str(precision) not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use 32, bf16-mixed or 16-mixed")
    return str(precision)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU that has it).

    Args:
        device: the device.

    Returns:
        True when bf16 autocast is worth trying there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def fast_options(fast=False, *, backend: str = "torch", compile: bool = False) -> FastOptions | None:
    """The fast-path options asked for, or None for the plain path.

    Args:
        fast: False/None (the plain path unless ``backend`` or ``compile`` ask for more), True (the default
            :class:`FastOptions`), a dict of its fields, or a :class:`FastOptions`.
        backend: ``"torch"`` or ``"onnxruntime"`` (the latter turns the fast path on).
        compile: ``torch.compile`` the networks (turns the fast path on).

    Returns:
        The options, or None.

    Raises:
        ConfigError: an unknown backend or option, or a contradiction.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
    if isinstance(fast, FastOptions):
        options = fast
    elif isinstance(fast, dict):
        unknown = sorted(set(fast) - set(FastOptions.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown fast-path option(s) {', '.join(unknown)}")
        options = FastOptions(**fast)
    elif fast or backend != "torch" or compile:
        options = FastOptions()
    else:
        return None
    changes = {}
    if backend != "torch":
        changes["backend"] = backend
    if compile:
        changes["compile"] = True
    return FastOptions(**{**options.to_dict(), **changes}) if changes else options


def require_onnxruntime():
    """The ``onnxruntime`` module (and ``onnx``, which the exporter needs).

    Returns:
        The imported ``onnxruntime``.

    Raises:
        ConfigError: one of them is missing (a one-line message saying what to install).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime
    except ImportError as error:
        raise ConfigError(f"--backend onnxruntime needs the {error.name} package: {ONNX_HINT}") from None
    return onnxruntime


# --------------------------------------------------------------------------- networks


def _as_tuple(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t


class ChannelsLastInputs(nn.Module):
    """A network fed its 4-D inputs in channels_last format (whatever format the caller gives).

    Args:
        net: the network (its weights already channels_last).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        """The network on ``inputs``, 4-D ones made channels_last.

        Args:
            *inputs: the network's positional arguments.

        Returns:
            What the network returns.
        """
        return self.net(*(_channels_last(x) for x in inputs))


class OnnxNetwork(nn.Module):
    """A network run by ONNX Runtime on the CPU, called like the torch module it replaces.

    The network is exported (BN-folded, TorchScript exporter, dynamic batch) the first time an input
    shape is seen and kept as one session per shape (a predictor runs one or two patch shapes). Inputs
    are sent as float32; outputs come back as float32 tensors on the inputs' device, as a tensor, or a
    list for a network with several outputs. Attributes the caller reads from the network
    (``out_channels``, ...) are the original's.

    Args:
        net: the eval-mode torch network (tensor inputs, a tensor or list/tuple of tensors out).
        threads: ONNX Runtime's intra-op threads (None: ``torch.get_num_threads()``).

    Raises:
        ConfigError: onnx or onnxruntime is missing.
    """

    def __init__(self, net: nn.Module, threads: int | None = None):
        super().__init__()
        self._ort = require_onnxruntime()
        self.original = net.eval()
        self.threads = threads or torch.get_num_threads()
        self._sessions: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._multiple: dict[tuple, bool] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original"), name)

    def _session(self, inputs: tuple[torch.Tensor, ...]):
        key = tuple(tuple(x.shape[1:]) for x in inputs)
        with self._lock:
            if key not in self._sessions:
                example = tuple(x[:1].detach().float().cpu().contiguous() for x in inputs)
                names = [f"input{i}" for i in range(len(example))]
                with torch.inference_mode(False), torch.no_grad():
                    reference = self.original(*example)
                outputs = len(reference) if isinstance(reference, (list, tuple)) else 1
                self._multiple[key] = isinstance(reference, (list, tuple))
                out_names = [f"output{i}" for i in range(outputs)]
                buffer = io.BytesIO()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
                    with torch.inference_mode(False), torch.no_grad():
                        torch.onnx.export(
                            self.original,
                            example,
                            buffer,
                            dynamo=False,
                            opset_version=17,
                            input_names=names,
                            output_names=out_names,
                            dynamic_axes={n: {0: "batch"} for n in (*names, *out_names)},
                            do_constant_folding=True,
                        )
                options = self._ort.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                self._sessions[key] = self._ort.InferenceSession(
                    buffer.getvalue(), options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[key], self._multiple[key]

    def forward(self, *inputs: torch.Tensor):
        """The ONNX Runtime session of the inputs' shapes on ``inputs``.

        Args:
            *inputs: the network's tensor arguments.

        Returns:
            A float32 tensor, or a list of them for a network with several outputs.
        """
        session, multiple = self._session(inputs)
        feed = {
            arg.name: np.ascontiguousarray(x.detach().float().cpu().numpy())
            for arg, x in zip(session.get_inputs(), inputs)
        }
        device = inputs[0].device
        results = [torch.from_numpy(r).to(device) for r in session.run(None, feed)]
        return results if multiple else results[0]


def accelerate_model(
    model: nn.Module,
    networks: dict[str, Any],
    options: FastOptions,
    onnx: Iterable[str] = (),
) -> nn.Module:
    """A copy of ``model`` whose listed networks run the fast path (the rest shared with ``model``).

    Args:
        model: the eval-mode model (not modified).
        networks: dotted attribute path (``""``: the model itself) -> an example input (a tensor or a
            tuple of the network's positional arguments; small sizes suffice) for every network the
            predictor runs on patches.
        options: the fast-path options.
        onnx: the paths among ``networks`` that ONNX Runtime can run (tensor inputs and outputs);
            with ``backend="onnxruntime"`` they do, the others take the torch fast path.

    Returns:
        The model to predict with: a shallow copy of ``model`` with each listed network replaced by its
        folded / channels_last / compiled copy or by an :class:`OnnxNetwork` (the model itself replaced
        when ``""`` is listed); ``folded_batchnorms`` counts the folded batch norms.

    Raises:
        ConfigError: ``backend="onnxruntime"`` and onnx / onnxruntime is missing, or ``compile`` without
            ``torch.compile``.
    """
    onnx = set(onnx) if options.backend == "onnxruntime" else set()
    if options.backend == "onnxruntime":
        require_onnxruntime()
    folded_count = 0

    def fast(net: nn.Module, example, on_onnx: bool) -> nn.Module:
        nonlocal folded_count
        example = _as_tuple(example)
        if options.fold_bn:
            net = fold_batchnorm(net, example)
            folded_count += net.folded_batchnorms
        else:
            net = copy.deepcopy(net).eval()
        if on_onnx:
            return OnnxNetwork(net)
        if options.channels_last:
            net = ChannelsLastInputs(to_channels_last(net))
        if options.compile:
            net = compile_model(net)
        return net

    if "" in networks:
        if networks.keys() != {""}:
            raise ValueError("the model itself ('') cannot be listed with its parts")
        result = _ForwardOnly(model, fast(model, networks[""], "" in onnx))
        result.folded_batchnorms = folded_count
        return result
    result = _shallow_copy_path(model, networks)
    for path, example in networks.items():
        parent, _, name = path.rpartition(".")
        owner = result.get_submodule(parent) if parent else result
        owner._modules[name] = fast(owner._modules[name], example, path in onnx)
    result.folded_batchnorms = folded_count
    return result


class _ForwardOnly(nn.Module):
    """The model's forward by its fast network; every other attribute (options, methods) is the model's."""

    def __init__(self, model: nn.Module, net: nn.Module):
        super().__init__()
        self.net = net
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_model"), name)

    def forward(self, *inputs, **kwargs):
        return self.net(*inputs, **kwargs)


def _shallow_copy_path(model: nn.Module, paths: Iterable[str]) -> nn.Module:
    """``model`` copied shallowly along every module on the ``paths`` (their ``_modules`` dicts copied).

    The copies share every parameter, buffer and other submodule with ``model``; replacing a
    module on a path in the copy leaves ``model`` untouched.
    """

    def clone(module: nn.Module) -> nn.Module:
        twin = copy.copy(module)
        twin._modules = dict(module._modules)
        return twin

    root = clone(model)
    for path in paths:
        owner = root
        for part in path.split(".")[:-1]:
            child = clone(owner._modules[part])
            owner._modules[part] = child
            owner = child
    return root


# --------------------------------------------------------------------------- prefetch


def prefetch(items: Iterable, load: Callable[[Any], Any], depth: int = 1) -> Iterator[tuple[Any, Any]]:
    """``(item, load(item))`` for each item, in order, each load started up to ``depth`` items ahead.

    The loads run one at a time in a background thread, so the next item's load overlaps the
    caller's work on the current one. An exception from ``load`` is raised when its item is reached
    (the items before it are yielded first). Closing the iterator early cancels the loads not started.

    Args:
        items: the items.
        load: the work to do ahead for each item (a read, a decode).
        depth: at most this many items are loaded ahead of the one being consumed (at least 1).

    Yields:
        ``(item, loaded)`` pairs, in the order of ``items``.
    """
    depth = max(1, int(depth))
    iterator = iter(items)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigaseg-prefetch")
    pending: deque = deque()
    try:
        for item in iterator:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= depth:
                break
        while pending:
            item, future = pending.popleft()
            for following in iterator:  # keep `depth` loads queued behind this one
                pending.append((following, pool.submit(load, following)))
                break
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class PrefetchedSource(ImageSource):
    """An image whose reads inside a prefetched region are served from memory.

    The driver calls :meth:`load` for the next block (in a background thread: :func:`prefetch`) and
    :meth:`use` before predicting it; a full-resolution ``read`` that falls inside the region then
    returns a copy of its part of the decoded pixels (the same values a read of the file gives), and
    any other read goes to the image. Reads of the image itself are serialised (a lock), so a reader
    that is not thread-safe is never entered twice at once. Memory: one region of pixels (the block
    with the predictor's halo) plus the one being loaded.

    Args:
        source: the image.
        halo: pixels around a block that the predictor reads as well.
    """

    def __init__(self, source: ImageSource, halo: int):
        self.source = source
        self.path = source.path
        self.halo = max(0, int(halo))
        self._region: Window | None = None
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()
        #: full-resolution reads served from the prefetched pixels / passed to the image
        self.hits = 0
        self.misses = 0

    def region_of(self, block: Window) -> Window:
        """The block grown by the halo, clipped to the image.

        Args:
            block: a block of the image.

        Returns:
            The region :meth:`load` decodes for it.
        """
        h = self.halo
        grown = Window(block.top - h, block.left - h, block.height + 2 * h, block.width + 2 * h)
        return grown.clip(self.source.height, self.source.width)

    def load(self, block: Window) -> tuple[Window, np.ndarray]:
        """Decode the pixels around ``block`` (called ahead, in a background thread).

        Args:
            block: the next block.

        Returns:
            ``(region, pixels)`` for :meth:`use`.
        """
        region = self.region_of(block)
        with self._lock:
            return region, self.source.read(region)

    def use(self, loaded: tuple[Window, np.ndarray] | None) -> None:
        """Serve reads from ``loaded`` (what :meth:`load` returned; None: from the image again).

        Args:
            loaded: the region and its pixels, or None.
        """
        self._region, self._pixels = loaded if loaded is not None else (None, None)

    @property
    def height(self) -> int:
        """The image's height."""
        return self.source.height

    @property
    def width(self) -> int:
        """The image's width."""
        return self.source.width

    @property
    def channels(self) -> int:
        """The image's bands."""
        return self.source.channels

    @property
    def dtype(self) -> np.dtype:
        """The image's pixel type."""
        return self.source.dtype

    @property
    def geo_tags(self):
        """The image's georeferencing."""
        return self.source.geo_tags

    @property
    def ome_pixel_size(self):
        """The image's OME pixel size."""
        return self.source.ome_pixel_size

    def read(self, window: Window | None = None, out_size=None, resample: str = "area") -> np.ndarray:
        """Pixels of ``window``: from the prefetched region when it holds them at full resolution, else the image's.

        Args:
            window: as ``ImageSource.read``.
            out_size: as ``ImageSource.read``.
            resample: as ``ImageSource.read``.

        Returns:
            ``(h, w, C)`` pixels, owned by the caller.
        """
        region = self._region
        if region is not None and out_size is None and window is not None:
            window = window if isinstance(window, Window) else Window(*window)
            if region.intersection(window) == window and window.area > 0:
                rel = window.relative_to(region)
                self.hits += 1
                return self._pixels[rel.top : rel.bottom, rel.left : rel.right].copy()
        self.misses += 1
        with self._lock:
            return self.source.read(window, out_size=out_size, resample=resample)
