"""One planner for every predictor: how many patches per forward pass, and how large a block.

A predictor describes its memory as a :class:`gigaseg.budget.MemoryEstimate` for a given
block side (what stays fixed: the process, the per-image context, one block's buffers; and
what each patch of a sub-batch adds). :func:`plan_inference` turns that and a budget into
an :class:`InferencePlan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..budget import MemoryEstimate, plan_sub_batch

__all__ = ["InferencePlan", "block_size_for", "plan_inference"]

#: block side for streaming prediction by memory budget (bytes): smaller blocks hold less
#: but recompute more of the patches that straddle block borders
_BLOCK_FOR_BUDGET = ((1.5e9, 1024), (4e9, 2048))

#: the block side a plan falls back to when the budget leaves room for few patches
SMALL_BLOCK = 1024


def block_size_for(max_memory: int | None) -> int:
    """The block side the streaming driver uses under a budget (predictors plan their buffers with it).

    Args:
        max_memory: the budget in bytes, or None.

    Returns:
        2048 without a budget; 1024 up to 1.5 GB, 2048 up to 4 GB, 4096 above.
    """
    if max_memory is None:
        return 2048
    for limit, block in _BLOCK_FOR_BUDGET:
        if max_memory <= limit:
            return block
    return 4096


@dataclass(frozen=True)
class InferencePlan:
    """Sub-batch and block size of one prediction.

    Attributes:
        sub_batch: patches (or tiles, or frames) per forward pass.
        block_size: the block side the memory was planned for; None leaves it to the driver.
    """

    sub_batch: int
    block_size: int | None = None


def plan_inference(
    max_memory: int | None,
    estimate: Callable[[int], MemoryEstimate],
    what: str,
    *,
    default: int,
    maximum: int = 32,
    few_patches: int = 0,
) -> InferencePlan:
    """The largest sub-batch that fits ``max_memory`` with the driver's blocks.

    Args:
        max_memory: the budget in bytes; None plans ``default`` patches and no block size.
        estimate: ``estimate(block_side)`` -> the prediction's memory with blocks of that side.
        what: what is planned, for the error message ("glnet prediction with 508-px patches").
        default: the sub-batch without a budget.
        maximum: the largest sub-batch worth running.
        few_patches: when the driver's block leaves room for at most this many patches and is
            larger than ``SMALL_BLOCK``, plan ``SMALL_BLOCK``-px blocks instead (their buffers
            hold less; more patches that straddle block rows are computed twice). 0: never.

    Returns:
        The plan.

    Raises:
        BudgetError: not even one patch fits, naming the smallest budget that works.
    """
    if max_memory is None:
        return InferencePlan(default, None)
    block = block_size_for(max_memory)
    sub_batch = plan_sub_batch(max_memory, estimate(block), what, default=default, maximum=maximum)
    if sub_batch <= few_patches and block > SMALL_BLOCK:
        block = SMALL_BLOCK
        sub_batch = plan_sub_batch(max_memory, estimate(block), what, default=default, maximum=few_patches)
    return InferencePlan(sub_batch, block)
