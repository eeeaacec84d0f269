"""A method's training recipe: one or more stages, each saying what it trains and how."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError

#: the precisions Lightning Fabric accepts (``Fabric(precision=...)``), with its short aliases
PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
)

#: the ``gigaseg train`` flag of each setting that has one
_FLAGS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "max_memory": "--max-memory",
    "accelerator": "--accelerator",
    "devices": "--devices",
    "num_nodes": "--num-nodes",
    "strategy": "--strategy",
    "precision": "--precision",
    "accumulate": "--accumulate",
    "seed": "--seed",
    "num_workers": "--workers",
}

#: the largest seed Fabric's ``seed_everything`` takes (numpy's limit); larger ones it replaces by a random seed
_MAX_SEED = 2**32 - 1


@dataclass
class TrainSettings:
    """Run-wide knobs from the command line or a config file (method-independent).

    Every value is checked when the settings are made (also by ``dataclasses.replace``); an
    invalid one is a ``ConfigError`` naming the setting and its ``gigaseg train`` flag.
    ``lr`` may be given as a numeric string (PyYAML reads ``1e-3`` as one) and ``max_memory``
    as a size like ``"4GB"``; both are converted.

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

    Raises:
        ConfigError: ``epochs``, ``batch_size``, ``accumulate``, ``num_nodes`` or
            ``max_val_images`` below 1 or not integers, ``lr`` not a positive finite number,
            ``max_memory`` not a positive size, ``num_workers`` negative, ``seed`` not an integer
            in 0..2**32-1, ``val_block_size`` below one writer tile (512), or ``precision`` not
            one of :data:`PRECISIONS`.
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

    def __post_init__(self):
        from ..inference.stream import WRITER_TILE
        from ..memory import parse_size

        for name in ("epochs", "batch_size", "max_val_images"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), 1, "or None")
        for name in ("accumulate", "num_nodes"):
            _require_int(name, getattr(self, name), 1)
        _require_int("num_workers", self.num_workers, 0)
        _require_int("seed", self.seed, 0, maximum=_MAX_SEED)
        if not _is_int(self.val_block_size) or self.val_block_size < WRITER_TILE:
            raise _invalid(
                "val_block_size",
                f"an integer of at least {WRITER_TILE} (the prediction writer's tile; blocks are whole tiles)",
                self.val_block_size,
            )
        if self.lr is not None:
            lr = self.lr
            if isinstance(lr, str):
                try:
                    lr = float(lr)
                except ValueError:
                    pass
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise _invalid("lr", "a positive finite number, or None", self.lr)
            self.lr = float(lr)
        if self.max_memory is not None:
            if isinstance(self.max_memory, bool) or not isinstance(self.max_memory, (int, float, str)):
                raise _invalid("max_memory", "a positive size (bytes, or like '4GB'), or None", self.max_memory)
            try:
                self.max_memory = parse_size(self.max_memory)
            except ConfigError:
                raise _invalid(
                    "max_memory", "a positive size (bytes, or like '4GB'), or None", self.max_memory
                ) from None
        if _is_int(self.precision) and str(self.precision) in PRECISIONS:
            self.precision = str(self.precision)  # YAML reads "precision: 16" as a number
        if self.precision not in PRECISIONS:
            raise _invalid("precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        if not isinstance(self.progress, bool):
            raise _invalid("progress", "true or false", self.progress)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(name: str, value, minimum: int, extra: str = "", maximum: int | None = None) -> None:
    if _is_int(value) and value >= minimum and (maximum is None or value <= maximum):
        return
    what = f"an integer of at least {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    raise _invalid(name, f"{what} {extra}".strip(), value)


def _invalid(name: str, what: str, value) -> ConfigError:
    flag = f" ({_FLAGS[name]})" if name in _FLAGS else ""
    return ConfigError(f"setting {name}{flag} must be {what}, got {value!r}")


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


def prepare_class_balance(stage: Stage, dataset, loss: str, sampling: str = "uniform"):
    """Measure what a rare-class loss or a balanced crop sampler needs, once per stage's data.

    Stores in ``stage.options``: ``ignore_index`` (the dataset's) and, when ``loss`` weights its
    classes, ``class_weights`` (``gigaseg.nn.losses.class_weights`` of the training frequencies).
    The masks are read at most once per process (``gigaseg.data.statistics`` caches them), so the
    trainer's own measurement and this one share a pass.

    Args:
        stage: the stage whose ``make_data`` is building its views.
        dataset: the training dataset.
        loss: the model's ``loss`` option (``gigaseg.nn.losses.LOSSES``).
        sampling: the model's crop sampling (``gigaseg.data.statistics.CROP_SAMPLINGS``).

    Returns:
        The dataset's ``ClassStatistics`` when ``sampling`` is ``"balanced"`` (for ``RandomCrops``),
        else None.

    Raises:
        ConfigError: an unknown ``sampling``.
    """
    from ..data.statistics import CROP_SAMPLINGS, class_statistics
    from ..nn.losses import WEIGHTED_LOSSES, class_weights

    if sampling not in CROP_SAMPLINGS:
        raise ConfigError(f"unknown crop sampling {sampling!r}; use one of {', '.join(CROP_SAMPLINGS)}")
    stage.options["ignore_index"] = int(getattr(dataset, "ignore_index", 255))
    statistics = class_statistics(dataset) if loss in WEIGHTED_LOSSES or sampling == "balanced" else None
    if loss in WEIGHTED_LOSSES:
        stage.options["class_weights"] = [float(w) for w in class_weights(statistics.frequencies)]
    return statistics if sampling == "balanced" else None


def stage_loss(ctx: StepContext, name: str) -> nn.Module:
    """The training loss ``name`` for the stage that is running, with its class weights and ignore index.

    Args:
        ctx: the step's context (``ctx.stage.options`` as :func:`prepare_class_balance` left them).
        name: the model's ``loss`` option.

    Returns:
        ``gigaseg.nn.losses.segmentation_loss(name, ...)``, called as ``loss(logits, labels)``.

    Raises:
        ConfigError: an unknown loss, or a weighted loss whose weights were not prepared.
    """
    from ..nn.losses import segmentation_loss

    options = ctx.stage.options
    return segmentation_loss(
        name, int(ctx.model.num_classes), options.get("class_weights"), int(options.get("ignore_index", 255))
    )
