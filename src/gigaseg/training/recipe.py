"""A method's training recipe: one or more stages, each saying what it trains and how."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class TrainSettings:
    """Run-wide knobs from the command line or a config file (method-independent).

    Attributes:
        epochs: overrides every stage's epochs (None: the stages' own).
        batch_size: overrides every stage's batch size.
        lr: overrides every stage's learning rate.
        max_memory: the memory budget in bytes; sets the sub-batch sizes (None: no budget).
        accelerator: Lightning Fabric's accelerator ("auto", "cpu", "cuda", ...).
        devices: Fabric's devices per node.
        num_nodes: Fabric's node count.
        strategy: Fabric's strategy ("auto", "ddp", ...).
        precision: Fabric's precision ("32-true", "bf16-mixed", "16-mixed", ...).
        accumulate: take an optimiser step every this many batches.
        seed: seeds the initial weights, the data order and the views' random crops.
        num_workers: data loader worker processes.
        val_block_size: block side of the streamed validation predictions.
        max_val_images: validate on at most this many images (None: all).
        progress: show progress bars.
    """

    epochs: int | None = None  # override every stage's epochs
    batch_size: int | None = None  # override every stage's batch size
    lr: float | None = None  # override every stage's learning rate
    max_memory: int | None = None  # bytes; sets sub-batch sizes
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    accumulate: int = 1  # optimiser step every N batches
    seed: int = 0
    num_workers: int = 0
    val_block_size: int = 2048
    max_val_images: int | None = None
    progress: bool = True


@dataclass
class StepContext:
    """What a stage's ``step`` gets: the wrapped model, how to backward, its sub-batch.

    Attributes:
        fabric: the Lightning Fabric of the run.
        model: the raw module (use it for submodules).
        wrapped: the Fabric-wrapped module (use it for forward passes, so DDP syncs).
        sub_batch: samples per backward.
        stage: the stage being trained.
        settings: the run's settings.
    """

    fabric: object
    model: nn.Module  # the raw module (use for submodules)
    wrapped: nn.Module  # the Fabric-wrapped module (use for forward with DDP sync)
    sub_batch: int
    stage: Stage
    settings: TrainSettings

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` through Fabric (which handles precision scaling and DDP).

        Args:
            loss: a scalar loss.
        """
        self.fabric.backward(loss)


@dataclass
class Stage:
    """One training stage.

    ``make_data(dataset, normalization, settings)`` builds the stage's training
    views; ``step(ctx, batch)`` runs forward and backward (possibly several
    backwards over sub-batches) and returns detached losses to log; the loop
    zeroes gradients before and steps the optimiser after.
    ``trainable(model)`` lists the modules trained; every other parameter is frozen
    and ``frozen_eval(model)`` lists modules kept in eval mode (frozen BN statistics).

    Attributes:
        name: the stage's name (``gigaseg train --stage`` picks it).
        epochs: epochs of this stage.
        lr: base learning rate.
        batch_size: samples per optimiser step (before ``TrainSettings.accumulate``).
        make_data: builds the stage's training views.
        step: one training step.
        trainable: the modules trained (default: the whole model).
        frozen_eval: modules kept in eval mode (default: none).
        optimizer: "adam", "adamw" or "sgd".
        weight_decay: the optimiser's weight decay.
        momentum: SGD's momentum.
        schedule: "poly" (per iteration, power ``poly_power``), "step" or "constant".
        poly_power: the poly schedule's power.
        milestones: epochs at which the "step" schedule multiplies the rate by ``gamma``.
        gamma: the "step" schedule's factor.
        sub_batch: samples per backward; None: the whole batch (a budget may split it).
        sample_inputs: ``sample_inputs(model)`` -> example inputs for memory estimates.
        before_stage: ``before_stage(model)`` runs once before the stage (e.g. copies weights
            between branches).
        options: anything else the stage's functions read.
    """

    name: str
    epochs: int
    lr: float
    batch_size: int
    make_data: Callable[..., Dataset]
    step: Callable[[StepContext, dict], dict[str, float]]
    trainable: Callable[[nn.Module], list[nn.Module]] = lambda model: [model]
    frozen_eval: Callable[[nn.Module], list[nn.Module]] = lambda model: []
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "poly"  # poly (per iteration, power 0.9) | step | constant
    poly_power: float = 0.9
    milestones: tuple[int, ...] = ()  # epochs, for schedule == "step"
    gamma: float = 0.1
    sub_batch: int | None = None  # samples per backward; None: the whole batch (budgets may split it)
    sample_inputs: Callable[[nn.Module], tuple] | None = None  # for memory estimates
    before_stage: Callable[[nn.Module], None] | None = None  # e.g. copy weights between branches
    options: dict = field(default_factory=dict)
