"""Deployment helpers for any gigaseg network: BN folding, channels_last, torch.compile, ONNX.

- :func:`fold_batchnorm` folds every eval-mode ``BatchNorm2d`` that directly follows a
  ``Conv2d`` into that convolution's weight and bias (``w' = w * g / sqrt(v + eps)``,
  ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaces the BN with ``Identity``.
  Pairs are found from one forward pass on an example input, not from module names: a
  BN is folded only when its input is the output of a convolution called once, and that
  output feeds nothing else (checked on the autograd graph) and is not itself an output.
  The folded copy is compared with the original on the example (``check``).
- :func:`to_channels_last` / :func:`compile_model` / :func:`optimize_for_inference`: the
  other speed options a real-time user expects (channels_last pays off on GPUs with
  tensor cores and often on CPUs with oneDNN; ``torch.compile`` needs a C++ compiler on CPU).
- :func:`export_onnx` writes the eval-mode network (by default BN-folded) with the
  TorchScript exporter (``torch.onnx.export(dynamo=False)``), which needs the ``onnx``
  package but not ``onnxscript``; :func:`onnx_max_difference` runs the file in
  onnxruntime and returns the largest absolute difference to PyTorch.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "to_channels_last",
    "compile_model",
    "optimize_for_inference",
    "export_onnx",
    "onnx_max_difference",
    "run_onnx",
]


def _as_tuple(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def find_conv_bn_pairs(model: nn.Module, example_inputs) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` of every eval-mode BN that can be folded into the conv before it.

    Runs ``model`` once in eval mode (with autograd, on ``example_inputs``) on a copy, so
    ``model`` itself is untouched. Only exact ``nn.Conv2d`` and ``nn.BatchNorm2d`` modules
    with tracked running statistics are considered.

    Args:
        model: the network.
        example_inputs: a tensor, or a tuple/list of the forward's positional arguments.

    Returns:
        ``(conv name, bn name)`` pairs, as ``named_modules`` names them.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also when called under inference_mode
        return _find_pairs(copy.deepcopy(model).eval(), example_inputs)


def _find_pairs(probe: nn.Module, example_inputs) -> list[tuple[str, str]]:
    names = {m: n for n, m in probe.named_modules()}
    calls: dict[nn.Module, int] = {}
    conv_out: dict[object, nn.Module] = {}  # grad_fn of a conv's output -> the conv
    bn_in: dict[nn.Module, object] = {}  # bn -> grad_fn of its input

    def conv_hook(module, _inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if output.grad_fn is not None:
            conv_out[output.grad_fn] = module

    def bn_hook(module, inputs, _output):
        calls[module] = calls.get(module, 0) + 1
        bn_in[module] = inputs[0].grad_fn

    handles = []
    for module in probe.modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(conv_hook))
        elif type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_mean is not None:
            handles.append(module.register_forward_hook(bn_hook))
    inputs = [
        x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
        for x in _as_tuple(example_inputs)
    ]
    try:
        outputs = _flat_tensors(probe(*inputs))
    finally:
        for handle in handles:
            handle.remove()

    # consumers of every autograd node reachable from the outputs
    consumers: dict[object, int] = {}
    seen, stack = set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent in {p for p, _ in node.next_functions if p is not None}:
            consumers[parent] = consumers.get(parent, 0) + 1
            stack.append(parent)
    returned = {t.grad_fn for t in outputs}

    pairs = []
    for bn, source in bn_in.items():
        conv = conv_out.get(source)
        if (
            conv is None
            or calls.get(conv) != 1
            or calls.get(bn) != 1
            or consumers.get(source, 0) != 1
            or source in returned
            or conv.out_channels != bn.num_features
        ):
            continue
        pairs.append((names[conv], names[bn]))
    return pairs


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    grad = conv.weight.requires_grad
    new_bias = (bias - bn.running_mean) * scale + shift
    # new parameters, not written in place: a tensor the conv shares with another module stays as it was
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=grad)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=grad)


def fold_batchnorm(
    model: nn.Module, example_inputs, *, inplace: bool = False, check: bool = True, rtol: float = 1e-3
) -> nn.Module:
    """An eval-mode copy of ``model`` (or ``model`` itself with ``inplace``) with BNs folded into convs.

    Args:
        model: the network; left in its training mode (unless ``inplace``).
        example_inputs: a tensor or a tuple, used to find the pairs (small sizes suffice:
            folding does not depend on the input size).
        inplace: fold into ``model`` itself instead of a copy.
        check: compare the folded network's output on the example with the original's.
        rtol: the largest allowed difference, relative to the output's largest magnitude (at least 1).

    Returns:
        The folded network in eval mode; ``folded.folded_batchnorms`` is the number of BNs folded.

    Raises:
        RuntimeError: with ``check``, folding changed the output beyond ``rtol``.
    """
    pairs = find_conv_bn_pairs(model, example_inputs)
    reference = None
    if check:
        model_mode = model.training
        model.eval()
        with torch.inference_mode():
            reference = [t.float().clone() for t in _flat_tensors(model(*_as_tuple(example_inputs)))]
        model.train(model_mode)
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    for conv_name, bn_name in pairs:
        _fold_pair(_get(folded, conv_name), _get(folded, bn_name))
        _set(folded, bn_name, nn.Identity())
    if check:
        with torch.inference_mode():
            result = [t.float() for t in _flat_tensors(folded(*_as_tuple(example_inputs)))]
        for want, got in zip(reference, result):
            scale = max(float(want.abs().max()), 1.0)
            error = float((want - got).abs().max())
            if error > rtol * scale:
                raise RuntimeError(
                    f"folding {len(pairs)} batch norms changed the output by {error:.3g} "
                    f"(largest output {scale:.3g}); the network reuses a folded tensor elsewhere"
                )
    folded.folded_batchnorms = len(pairs)
    return folded


def to_channels_last(model: nn.Module) -> nn.Module:
    """Move ``model``'s 4-D parameters to channels_last, in place.

    Feed the result ``x.contiguous(memory_format=torch.channels_last)``.

    Args:
        model: the network.

    Returns:
        ``model`` itself.
    """
    return model.to(memory_format=torch.channels_last)


def compile_model(model: nn.Module, **options) -> nn.Module:
    """``torch.compile(model, **options)`` (compilation happens at the first call).

    Args:
        model: the network.
        **options: keyword arguments of ``torch.compile``.

    Returns:
        The compiled module.

    Raises:
        ConfigError: this torch has no ``torch.compile``.
    """
    if not hasattr(torch, "compile"):
        raise ConfigError(f"torch {torch.__version__} has no torch.compile")
    return torch.compile(model, **options)


def optimize_for_inference(
    model: nn.Module,
    example_inputs=None,
    *,
    fold_bn: bool = True,
    channels_last: bool = False,
    compile: bool | dict = False,
) -> nn.Module:
    """An eval-mode copy of ``model`` with the chosen speed options (the original is untouched).

    Args:
        model: the network.
        example_inputs: input used by ``fold_bn``; None means one random 64x64 image with
            the model's ``in_channels`` (default 3) on its device.
        fold_bn: fold batch norms into the convolutions (:func:`fold_batchnorm`).
        channels_last: convert to channels_last (:func:`to_channels_last`).
        compile: ``torch.compile`` the result; a dict gives its options.

    Returns:
        The optimized eval-mode copy.

    Raises:
        ConfigError: ``compile`` is asked for and this torch has no ``torch.compile``.
    """
    if fold_bn:
        if example_inputs is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
            example_inputs = torch.randn(1, getattr(model, "in_channels", 3), 64, 64, device=device)
        net = fold_batchnorm(model, example_inputs)
    else:
        net = copy.deepcopy(model).eval()
    if channels_last:
        net = to_channels_last(net)
    if compile:
        net = compile_model(net, **(compile if isinstance(compile, dict) else {}))
    return net


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs,
    *,
    opset: int = 17,
    fold_bn: bool = True,
    dynamic_batch: bool = True,
    input_names: Sequence[str] = ("image",),
    output_names: Sequence[str] = ("logits",),
) -> Path:
    """Write the eval-mode ``model`` (BN-folded unless ``fold_bn=False``) to ``path`` as ONNX.

    Spatial sizes are fixed to the example's (a real-time deployment runs one frame
    size). Needs the ``onnx`` package (``pip install onnx``).

    Args:
        model: the network (not modified).
        path: the ``.onnx`` file to write; missing parent folders are created.
        example_inputs: a tensor or a tuple traced through the network.
        opset: the ONNX opset version.
        fold_bn: fold batch norms first (:func:`fold_batchnorm`).
        dynamic_batch: make dimension 0 of every input and output dynamic.
        input_names: names of the graph's inputs.
        output_names: names of the graph's outputs.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: the ``onnx`` package is missing.
    """
    try:
        import onnx  # noqa: F401  (the TorchScript exporter imports it)
    except ImportError:
        raise ConfigError("ONNX export needs the 'onnx' package: pip install onnx") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _as_tuple(example_inputs)
    net = fold_batchnorm(model, example) if fold_bn else copy.deepcopy(model).eval()
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        with torch.no_grad():
            torch.onnx.export(
                net,
                example,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    return path


def run_onnx(path: str | os.PathLike, *inputs: torch.Tensor) -> list:
    """Run the ONNX file at ``path`` in onnxruntime on CPU.

    Args:
        path: the ``.onnx`` file.
        *inputs: one tensor per graph input, in order (sent as float32).

    Returns:
        The outputs, as numpy arrays.

    Raises:
        ConfigError: onnxruntime is missing.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("running an ONNX file needs onnxruntime: pip install onnxruntime") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: x.detach().cpu().float().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def onnx_max_difference(path: str | os.PathLike, model: nn.Module, example_inputs) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's (eval-mode) outputs.

    Args:
        path: the ``.onnx`` file exported from ``model``.
        model: the PyTorch network; its training mode is restored afterwards.
        example_inputs: a tensor or a tuple fed to both.

    Returns:
        The largest absolute difference over all outputs.

    Raises:
        ConfigError: onnxruntime is missing.
        RuntimeError: the two give different numbers of outputs.
    """
    example = _as_tuple(example_inputs)
    mode = model.training
    model.eval()
    try:
        with torch.inference_mode():
            reference = _flat_tensors(model(*example))
    finally:
        model.train(mode)
    results = run_onnx(path, *example)
    if len(results) != len(reference):
        raise RuntimeError(f"{path}: {len(results)} outputs, PyTorch gives {len(reference)}")
    return max(float((torch.from_numpy(r) - t.float().cpu()).abs().max()) for r, t in zip(results, reference))
