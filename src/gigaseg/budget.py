"""Turn a memory budget into sub-batch sizes.

Estimates come from shapes, not from running anything: a copy of the model on
the ``meta`` device runs one forward pass at the real input size. In training,
forward hooks add up the bytes of every leaf module's output: what autograd keeps
for backward. In inference only a few tensors are alive at once, so a dispatch mode
follows every tensor the pass creates until Python frees it, and the peak of the
live bytes is the activations' share.
Parameters, gradients and optimiser state are counted from the parameters.
The estimates are deliberately simple; benchmarks/ compares them with measured
peaks.
"""

from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import BudgetError
from .memory import format_size

#: fallback for the resident memory of a CPU process that has imported torch (when
#: /proc is unavailable); CPU budgets are budgets for the whole process
CPU_RUNTIME_BYTES = 750 * 10**6
#: inference peak per sample (CPU RSS above the warmed-up process) / the peak of live
#: tensors, for the extra that convolution workspaces, weight reorders and the allocator
#: add: calibrated on measured peaks of FPN segmenters and ICNet (the largest ratio, rounded up)
INFERENCE_WORKSPACE_FACTOR = 1.8
#: optimiser state tensors per trainable parameter
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs: a fixed part and a part per sample of the sub-batch.

    Attributes:
        fixed: parameters, gradients, optimiser state, runtime (and any extra buffers).
        per_sample: activations of one sample of the sub-batch.
    """

    fixed: int  # parameters, gradients, optimiser state, runtime
    per_sample: int  # activations of one sample of the sub-batch

    def total(self, sub_batch: int) -> int:
        """The estimate for a sub-batch.

        Args:
            sub_batch: samples per pass.

        Returns:
            ``fixed + sub_batch x per_sample`` bytes.
        """
        return self.fixed + sub_batch * self.per_sample


def leaf_output_bytes(module: nn.Module, inputs: tuple, training: bool) -> tuple[int, int]:
    """The bytes of leaf-module outputs in one forward pass on the meta device.

    In training this is what autograd keeps for backward. ``module`` is copied to the meta
    device, so nothing is computed or allocated.

    Args:
        module: the network.
        inputs: its positional inputs (tensors are moved to the meta device).
        training: run in training mode with autograd (else eval mode without).

    Returns:
        (sum, max) of the output bytes of every leaf module.
    """
    meta = copy.deepcopy(module).to("meta")
    meta.train(training)
    sizes: list[int] = []

    def hook(_m, _inp, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
    try:
        with torch.set_grad_enabled(training):
            meta(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs])
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors (not views) created under it that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not tensor._is_view() and id(tensor) not in self._tracked:
                self._track(tensor)  # in-place ops return a tensor already tracked
        self.peak = max(self.peak, self.live)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        size, key = tensor.numel() * tensor.element_size(), id(tensor)
        self.live += size
        self._tracked.add(key)

        def freed() -> None:
            self.live -= size
            self._tracked.discard(key)

        weakref.finalize(tensor, freed)


def peak_live_bytes(module: nn.Module, inputs: tuple) -> int:
    """Peak bytes of intermediate tensors alive at once in one no-grad forward pass (meta device).

    Args:
        module: the network (copied to the meta device, in eval mode).
        inputs: its positional inputs (tensors are moved to the meta device).

    Returns:
        The peak of the live bytes of the tensors (not views) the pass creates.
    """
    meta = copy.deepcopy(module).to("meta").eval()
    inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    tracker = _LiveBytes()
    with torch.no_grad(), tracker:
        out = meta(*inputs)
    del out
    return tracker.peak


def parameter_bytes(module: nn.Module, trainable_only: bool = False) -> int:
    """The bytes of a module's parameters.

    Args:
        module: the network.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The bytes of the parameters.
    """
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only)


def training_estimate(
    module: nn.Module, sample_inputs: tuple, optimizer: str = "adam", runtime: int = 0
) -> MemoryEstimate:
    """Memory for training ``module`` with one sample shaped like ``sample_inputs`` (batch 1).

    Per sample: the leaf-module outputs of a training forward, plus 20% for autograd's
    bookkeeping. Fixed: frozen parameters, trainable ones with their gradients and optimiser
    state, and ``runtime``.

    Args:
        module: the network.
        sample_inputs: its positional inputs for one sample.
        optimizer: the optimiser's name (``OPTIMIZER_STATES``; others count 2 states).
        runtime: bytes the process already holds (:func:`runtime_bytes`).

    Returns:
        The ``MemoryEstimate``.
    """
    activations, _ = leaf_output_bytes(module, sample_inputs, training=True)
    trainable = parameter_bytes(module, trainable_only=True)
    frozen = parameter_bytes(module) - trainable
    fixed = frozen + trainable * (2 + OPTIMIZER_STATES.get(optimizer, 2)) + runtime
    return MemoryEstimate(fixed=fixed, per_sample=int(activations * 1.2))  # 20%: autograd bookkeeping


def inference_estimate(module: nn.Module, sample_inputs: tuple, runtime: int = 0, extra: int = 0) -> MemoryEstimate:
    """Memory for inference.

    Fixed: parameters, ``runtime`` and ``extra`` working buffers. Per sample: the peak of
    live activations (with the decoder's skip connections) times ``INFERENCE_WORKSPACE_FACTOR``.

    Args:
        module: the network.
        sample_inputs: its positional inputs for one sample.
        runtime: bytes the process already holds (:func:`runtime_bytes`).
        extra: bytes of other working buffers held next to the pass.

    Returns:
        The ``MemoryEstimate``.
    """
    live = peak_live_bytes(module, sample_inputs)
    return MemoryEstimate(
        fixed=parameter_bytes(module) + runtime + extra, per_sample=int(live * INFERENCE_WORKSPACE_FACTOR)
    )


def current_rss() -> int:
    """Resident memory of this process now.

    Returns:
        Bytes, from ``/proc/self/statm``; ``CPU_RUNTIME_BYTES`` where that cannot be read.
    """
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return CPU_RUNTIME_BYTES


def runtime_bytes(device: torch.device | str) -> int:
    """What the process already holds that a budget must leave room for.

    On CPU the budget is for the whole process, so this is its resident memory now
    (the Python + torch runtime and anything loaded). On CUDA budgets count only
    tensors on the device, which start empty.

    Args:
        device: where the run happens.

    Returns:
        Bytes: :func:`current_rss` on CPU, else 0.
    """
    return current_rss() if torch.device(device).type == "cpu" else 0


def plan_sub_batch(
    budget: int | None, estimate: MemoryEstimate, what: str, default: int, maximum: int | None = None
) -> int:
    """Largest sub-batch that fits ``budget`` (``default`` when no budget is given).

    Args:
        budget: the budget in bytes, or None.
        estimate: the memory estimate.
        what: what is planned, for the error message.
        default: the sub-batch without a budget.
        maximum: the largest sub-batch to return; None: no cap.

    Returns:
        The sub-batch, at least 1.

    Raises:
        BudgetError: even one sample does not fit (the message names the smallest budget
            that works).
    """
    if budget is None:
        return default
    if estimate.total(1) > budget:
        raise BudgetError(
            f"a memory budget of {format_size(budget)} is too small for {what}: the smallest that works "
            f"is about {format_size(estimate.total(1))} (sub-batch 1: {format_size(estimate.fixed)} fixed + "
            f"{format_size(estimate.per_sample)} per sample)"
        )
    fits = (budget - estimate.fixed) // max(estimate.per_sample, 1)
    return int(max(1, min(fits, maximum if maximum is not None else fits)))
