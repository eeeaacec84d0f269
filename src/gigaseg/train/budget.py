"""Turn a memory budget into sub-batch sizes.

Estimates come from shapes, not from running anything: a copy of the model on
the ``meta`` device runs one forward pass at the real input size while forward
hooks add up the bytes of every leaf module's output. In training those outputs
are what autograd keeps for backward; in inference only a few are alive at once.
Parameters, gradients and optimiser state are counted from the parameters.
The estimates are deliberately simple; benchmarks/ compares them with measured
peaks.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BudgetError
from ..memory import format_size

#: fallback for the resident memory of a CPU process that has imported torch (when
#: /proc is unavailable); CPU budgets are budgets for the whole process
CPU_RUNTIME_BYTES = 750 * 10**6
#: share of the summed leaf outputs alive at the peak of an inference forward pass
#: (measured: ResNet-18 + FPN at 508 px keeps 0.59-0.75 of them, batch 4 and 1)
INFERENCE_LIVE_FRACTION = 0.75
#: optimiser state tensors per trainable parameter
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}


@dataclass(frozen=True)
class MemoryEstimate:
    fixed: int          # parameters, gradients, optimiser state, runtime
    per_sample: int     # activations of one sample of the sub-batch

    def total(self, sub_batch: int) -> int:
        return self.fixed + sub_batch * self.per_sample


def leaf_output_bytes(module: nn.Module, inputs: tuple, training: bool) -> tuple[int, int]:
    """(sum, max) of the bytes of leaf-module outputs in one forward pass on the meta device."""
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


def parameter_bytes(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only)


def training_estimate(module: nn.Module, sample_inputs: tuple, optimizer: str = "adam",
                      runtime: int = 0) -> MemoryEstimate:
    """Memory for training ``module`` with one sample shaped like ``sample_inputs`` (batch 1)."""
    activations, _ = leaf_output_bytes(module, sample_inputs, training=True)
    trainable = parameter_bytes(module, trainable_only=True)
    frozen = parameter_bytes(module) - trainable
    fixed = frozen + trainable * (2 + OPTIMIZER_STATES.get(optimizer, 2)) + runtime
    return MemoryEstimate(fixed=fixed, per_sample=int(activations * 1.2))  # 20%: autograd bookkeeping


def inference_estimate(module: nn.Module, sample_inputs: tuple, runtime: int = 0, extra: int = 0) -> MemoryEstimate:
    """Memory for inference: parameters, ``extra`` working buffers, and per sample most activations.

    Without autograd, activations die as the forward pass moves on, but the
    allocator and the decoder's skip connections keep much of them alive at the peak.
    """
    total, _ = leaf_output_bytes(module, sample_inputs, training=False)
    return MemoryEstimate(fixed=parameter_bytes(module) + runtime + extra,
                          per_sample=int(total * INFERENCE_LIVE_FRACTION))


def current_rss() -> int:
    """Resident memory of this process now (bytes)."""
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
    """
    return current_rss() if torch.device(device).type == "cpu" else 0


def plan_sub_batch(budget: int | None, estimate: MemoryEstimate, what: str, default: int, maximum: int | None = None) -> int:
    """Largest sub-batch that fits ``budget`` (``default`` when no budget is given).

    Raises BudgetError naming the smallest budget that works when even one sample does not fit.
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
