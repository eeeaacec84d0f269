"""The training loop every method shares, on Lightning Fabric.

Fabric gives devices, mixed precision and DDP (one process per device, under
``torchrun``/SLURM or Fabric's own launcher). The loop runs a method's stages
in order; each epoch it validates on whole images through the streaming
predictor (the same code path users run), writes ``last.ckpt``, ``best.ckpt``
(by validation mIoU, accuracy for image classifiers or COCO AP for detectors: the best epoch
so far of the current stage, also kept as ``best-<stage>.ckpt``; every epoch when there is no validation),
``metrics.csv`` and the resolved ``config.yaml``, and can resume exactly from ``last.ckpt``.

A run that diverges stops with a ``TrainingDiverged`` naming the stage, epoch and step: a
non-finite loss, non-finite gradients (one check of the total gradient norm before each
optimiser step; skipped under a GradScaler, ``16-mixed``, which skips such steps itself) or
non-finite weights at the end of an epoch. Nothing non-finite is ever saved: ``last.ckpt`` and
``best.ckpt`` keep the last good epoch, so ``--resume`` (with a lower ``--lr``) continues from it.
"""

from __future__ import annotations

import csv
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..budget import plan_sub_batch, runtime_bytes, training_estimate
from ..errors import ConfigError, TrainingDiverged
from ..inference.contract import ClassificationPredictor, DetectionPredictor, Predictor
from ..inference.stream import predict_image
from ..io.atomic import atomic_output
from ..io.normalize import Normalization
from ..metrics import ConfusionMatrix
from ..progress import progress_bar
from .checkpoint import data_info, load_checkpoint, non_finite_entry, restore_rng, rng_state, save_checkpoint
from .recipe import Stage, StepContext, TrainSettings

#: files whose presence marks a folder as holding a run
RUN_FILES = ("last.ckpt", "best.ckpt", "config.yaml")


def check_run_folder(out_dir, resume: bool = False, force: bool = False) -> None:
    """Refuse to start a run in a folder that already holds one, unless resuming it or told to overwrite it.

    Called before anything is written (in every process of a distributed run, before they
    connect, so no process can see another's new files).

    Args:
        out_dir: the run folder.
        resume: the run continues the folder's run (its files are expected).
        force: overwrite the folder's run.

    Raises:
        ConfigError: ``out_dir`` is a file, or holds ``last.ckpt``, ``best.ckpt`` or ``config.yaml``
            while neither ``resume`` nor ``force`` is set.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, not a run folder")
    if resume or force:
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise ConfigError(
            f"{out}: already holds a run ({', '.join(found)}); continue it with --resume (resume=True) "
            f"or overwrite it with --force (force=True)"
        )


def divergence_message(
    stage: str, epoch: int, epochs: int, step: int, steps: int, problem: str, lr: float, precision: str, out_dir
) -> str:
    """The one-line message of a ``TrainingDiverged``: where, what, the likely causes and what was kept.

    Args:
        stage: the stage's name.
        epoch: the epoch (0-based; shown 1-based as in the progress bar).
        epochs: the stage's epochs.
        step: the batch within the epoch (0-based; shown 1-based).
        steps: batches per epoch.
        problem: what was not finite (``"the loss 'loss' is nan"``).
        lr: the learning rate in use.
        precision: the run's precision (fp16 overflow is a likely cause under ``16-mixed``).
        out_dir: the run folder.

    Returns:
        The message.
    """
    causes = [f"a learning rate too high (lr {lr:.3g}: lower --lr)"]
    if str(precision) in ("16-mixed", "16", "16-true"):
        causes.append(f"fp16 overflow with --precision {precision} (try bf16-mixed or 32-true)")
    causes.append("bad input values (NaN or infinite pixels)")
    out = Path(out_dir)
    kept = (
        f"{out / 'last.ckpt'} and best.ckpt keep the last good epoch (--resume continues from it)"
        if (out / "last.ckpt").exists()
        else f"no checkpoint was saved (to start again in {out}, add --force)"
    )
    return (
        f"training diverged in stage {stage!r}, epoch {epoch + 1}/{epochs}, step {step + 1}/{steps}: {problem}; "
        f"likely causes: {', '.join(causes[:-1])} or {causes[-1]}; {kept}"
    )


def make_fabric(settings: TrainSettings):
    """A Lightning Fabric for the run's accelerator, devices, nodes, strategy and precision.

    With several devices or nodes and the "ddp" or "auto" strategy, DDP runs with
    ``find_unused_parameters=True``: stages train parts of the model, and parameters a stage
    does not use must not stall DDP.

    Args:
        settings: the run's settings.

    Returns:
        The (not yet launched) ``Fabric``.
    """
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    strategy = settings.strategy
    if strategy in ("ddp", "auto") and _wants_several(settings):
        # stages train parts of the model: parameters unused by a stage must not stall DDP
        strategy = DDPStrategy(find_unused_parameters=True)
    return Fabric(
        accelerator=settings.accelerator,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
        precision=settings.precision,
    )


def _wants_several(settings: TrainSettings) -> bool:
    return (
        settings.num_nodes > 1
        or (isinstance(settings.devices, int) and settings.devices > 1)
        or str(settings.devices) not in ("1", "auto")
    )


class Trainer:
    """Runs ``stages`` of ``model`` on ``train_data`` and validates on ``val_data`` each epoch.

    Args:
        model: the network (a ``GigasegModel``).
        stages: the stages to run, in order (its method's recipe, or some of them).
        train_data: the training dataset (segmentation or classification).
        val_data: the validation dataset, or None to train without validation.
        out_dir: the run folder (checkpoints, metrics.csv, config.yaml).
        settings: the run-wide settings.
        normalization: how the images' pixels are normalised (stored in checkpoints).
        make_predictor: ``make_predictor(normalization, device=..., max_memory=...)`` -> the
            model's whole-image predictor, which validation runs (the path users predict with).
        run_config: more entries for config.yaml.

    Raises:
        ConfigError: the training split is empty.
    """

    def __init__(
        self,
        model,
        stages: list[Stage],
        train_data,
        val_data,
        out_dir,
        settings: TrainSettings,
        normalization: Normalization,
        make_predictor: Callable[..., Predictor],
        run_config: dict | None = None,
    ):
        if len(train_data) == 0:
            raise ConfigError("the training split is empty")
        self.model = model
        self.stages = stages
        self.make_predictor = make_predictor
        self.train_data = train_data
        self.val_data = val_data
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.normalization = normalization
        self.data = data_info(train_data, normalization, _class_frequencies(train_data))
        self.run_config = run_config or {}
        self.fabric = make_fabric(settings)
        self.fabric.launch()
        self.fabric.seed_everything(settings.seed)
        self.history: list[dict] = []

    # ---------------------------------------------------------------- public
    def fit(self, resume: bool = False) -> dict:
        """Run the stages in order, validating and checkpointing after every epoch.

        Args:
            resume: continue from ``out_dir/last.ckpt`` (its stage, the epoch after its own,
                optimiser, scheduler and random states) instead of starting afresh. A
                ``settings.lr`` that differs from the run's own replaces its rate (the schedule
                goes on from where it stopped), e.g. to continue a run that diverged.

        Returns:
            ``{"history": [...], "out_dir": ...}``: one row per epoch (stage, epoch, lr, seconds,
            peak_memory in bytes, ``train_*`` losses, ``val_*`` scores), as in ``metrics.csv``.

        Raises:
            ConfigError: resuming from a missing or foreign checkpoint (no training state, other
                model config, a stage this run lacks), or a stage trains nothing.
            BudgetError: ``max_memory`` is too small for a stage's sub-batch of one.
            TrainingDiverged: a loss, the gradients or the weights became non-finite (NaN or
                infinite); the checkpoints keep the last good epoch.
        """
        start_stage, start_epoch, state = 0, 0, None
        if resume:
            state = self._load_resume_state()
            names = [s.name for s in self.stages]
            if state["stage"] not in names:
                raise ConfigError(
                    f"{self.out_dir / 'last.ckpt'}: stopped in stage {state['stage']!r}, "
                    f"which this run does not include ({', '.join(names)})"
                )
            start_stage, start_epoch = names.index(state["stage"]), state["epoch"] + 1
        self._write_config()
        for index in range(start_stage, len(self.stages)):
            stage = self.stages[index]
            first_epoch = start_epoch if index == start_stage else 0
            self._run_stage(index, stage, first_epoch, state if index == start_stage else None)
            state = None
        return {"history": self.history, "out_dir": str(self.out_dir)}

    # ---------------------------------------------------------------- stages
    def _epochs(self, stage: Stage) -> int:
        return self.settings.epochs if self.settings.epochs is not None else stage.epochs

    def _run_stage(self, index: int, stage: Stage, first_epoch: int, state: dict | None) -> None:
        fabric, model = self.fabric, self.model
        if state is None and stage.before_stage is not None:
            stage.before_stage(model)
        trainable = self._freeze_for(stage)
        batch_size = self.settings.batch_size or stage.batch_size
        data = stage.make_data(self.train_data, self.normalization, self.settings)
        steps_per_epoch = max(1, math.ceil(len(data) / (batch_size * fabric.world_size)) // self.settings.accumulate)
        total_steps = steps_per_epoch * self._epochs(stage)
        lr = self.settings.lr if self.settings.lr is not None else stage.lr
        optimizer = _optimizer(stage, trainable, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(stage, total_steps, steps_per_epoch))
        sub_batch = self._sub_batch(stage, batch_size)
        wrapped, optimizer = fabric.setup(model, optimizer)
        best = -1.0
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng(state["rng"])
            best = state.get("best_miou", -1.0)
            if self.settings.lr is not None and self.settings.lr != (state.get("settings") or {}).get("lr"):
                _set_base_lr(optimizer, scheduler, self.settings.lr)
        ctx = StepContext(fabric, model, wrapped, sub_batch, stage, self.settings)
        for epoch in range(first_epoch, self._epochs(stage)):
            started = time.perf_counter()
            losses, steps = self._train_epoch(ctx, data, batch_size, optimizer, scheduler, epoch, index)
            self._check_weights(ctx, scheduler, epoch, steps)  # never validate or save non-finite weights
            val = self.validate()
            self._train_modes(stage)  # validation switched the model to eval mode
            row = {
                "stage": stage.name,
                "epoch": epoch,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - started, 2),
                "peak_memory": _peak_memory(fabric.device),
                **{f"train_{k}": v for k, v in losses.items()},
                **{f"val_{k}": v for k, v in val.items()},
            }
            self.history.append(row)
            # the score that picks best.ckpt: mIoU, accuracy for image classifiers, AP for detectors
            miou = val.get("miou", val.get("accuracy", val.get("AP", float("nan"))))
            improved = not math.isnan(miou) and miou > best
            best = max(best, miou) if not math.isnan(miou) else best
            train_state = {
                "stage_index": index,
                "stage": stage.name,
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "best_miou": best,
                "settings": _plain(asdict(self.settings)),
            }
            if fabric.global_rank == 0:
                # last.ckpt, what --resume continues from, comes after this epoch's metrics row and best
                # checkpoints: a run killed before it is in place redoes the epoch and writes them again
                # (the resume drops the metrics rows after last.ckpt's epoch), never the other way round
                self._log(row)
                if improved or math.isnan(miou):
                    save_checkpoint(self.out_dir / f"best-{stage.name}.ckpt", model, self.data, None, row)
                    save_checkpoint(self.out_dir / "best.ckpt", model, self.data, None, row)
                save_checkpoint(self.out_dir / "last.ckpt", model, self.data, train_state, row)
            fabric.barrier()

    def _freeze_for(self, stage: Stage) -> list[torch.nn.Parameter]:
        model = self.model
        model.requires_grad_(False)
        for module in stage.trainable(model):
            module.requires_grad_(True)
        for module in stage.frozen_eval(model):
            module.requires_grad_(False)
        self._train_modes(stage)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"stage {stage.name!r} has nothing to train")
        return params

    def _train_modes(self, stage: Stage) -> None:
        """Training mode, except the stage's frozen modules (their BN statistics stay fixed)."""
        self.model.train()
        for module in stage.frozen_eval(self.model):
            module.eval()

    def _sub_batch(self, stage: Stage, batch_size: int) -> int:
        """Samples per backward: the stage's own choice, or as many as ``--max-memory`` allows."""
        default = stage.sub_batch or batch_size
        if self.settings.max_memory is None or stage.sample_inputs is None:
            return default
        estimate = training_estimate(
            self.model, stage.sample_inputs(self.model), stage.optimizer, runtime=runtime_bytes(self.fabric.device)
        )
        return plan_sub_batch(
            self.settings.max_memory,
            estimate,
            f"training stage {stage.name!r}",
            default=default,
            maximum=default if stage.sub_batch is None else 64,
        )

    def _train_epoch(self, ctx: StepContext, data, batch_size, optimizer, scheduler, epoch, stage_index):
        """One epoch; returns the mean logged values and the number of batches."""
        fabric = self.fabric
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        loader = self._loader(data, batch_size, epoch, stage_index)
        sums: dict[str, float] = {}
        count = 0
        accumulate = self.settings.accumulate
        steps = len(loader)
        bad_loss: tuple[str, int] | None = None  # the first non-finite loss of the group and its batch
        with progress_bar(
            f"{ctx.stage.name} epoch {epoch + 1}",
            steps,
            enabled=self.settings.progress and fabric.global_rank == 0,
        ) as advance:
            for i, batch in enumerate(loader):
                last_in_group = (i + 1) % accumulate == 0 or i + 1 == steps
                with fabric.no_backward_sync(ctx.wrapped, enabled=not last_in_group), fabric.autocast():
                    logged = ctx.stage.step(ctx, batch)
                values = {key: float(value) for key, value in logged.items()}
                if bad_loss is None:
                    key = next((k for k, v in values.items() if k.startswith("loss") and not math.isfinite(v)), None)
                    if key is not None:
                        bad_loss = (f"the loss {key!r} is {values[key]}", i)
                if last_in_group:
                    self._check_step(ctx, optimizer, scheduler, bad_loss, i, steps, epoch)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
                advance(1)
        return {k: v / max(count, 1) for k, v in sums.items()}, steps

    # ---------------------------------------------------------------- divergence
    def _check_step(self, ctx: StepContext, optimizer, scheduler, bad_loss, step: int, steps: int, epoch: int) -> None:
        """Before an optimiser step: stop on a non-finite loss of the group or non-finite gradients.

        The gradients are checked with one ``isfinite`` of their total norm, unless a GradScaler
        (``16-mixed``) runs the step: it skips steps with non-finite gradients and lowers its scale.
        Under DDP the verdict is shared, so every process stops at the same step.
        """
        fabric = self.fabric
        problem, where = bad_loss if bad_loss is not None else (None, step)
        if problem is None and _grad_scaler(fabric) is None:
            norm = _grad_norm(optimizer)
            if norm is not None and not bool(torch.isfinite(norm)):
                problem = f"the gradients are not finite (their total norm is {float(norm)})"
        if fabric.world_size > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=fabric.device)
            if float(fabric.all_reduce(flag, reduce_op="sum")[0]) > 0 and problem is None:
                problem = "the loss or the gradients were not finite in another process"
        if problem is not None:
            raise TrainingDiverged(self._divergence(ctx, scheduler, epoch, where, steps, problem))

    def _check_weights(self, ctx: StepContext, scheduler, epoch: int, steps: int) -> None:
        """After an epoch: stop when a weight or buffer is not finite (before validating or saving it)."""
        key = non_finite_entry(self.model.state_dict())
        if key is not None:
            problem = f"the weights are not finite at the end of the epoch ({key})"
            raise TrainingDiverged(self._divergence(ctx, scheduler, epoch, steps - 1, steps, problem))

    def _divergence(self, ctx: StepContext, scheduler, epoch: int, step: int, steps: int, problem: str) -> str:
        return divergence_message(
            ctx.stage.name,
            epoch,
            self._epochs(ctx.stage),
            step,
            steps,
            problem,
            scheduler.get_last_lr()[0],
            self.settings.precision,
            self.out_dir,
        )

    def _loader(self, data, batch_size, epoch, stage_index) -> DataLoader:
        fabric = self.fabric
        if fabric.world_size > 1:
            sampler = DistributedSampler(
                data,
                num_replicas=fabric.world_size,
                rank=fabric.global_rank,
                shuffle=True,
                seed=self.settings.seed + 1000 * stage_index,
            )
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(self.settings.seed * 100003 + 1000 * stage_index + epoch)
            sampler = RandomSampler(data, generator=generator)
        loader = DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.settings.num_workers,
            collate_fn=getattr(data, "collate", None),  # detection views batch variable box counts
        )
        return fabric.setup_dataloaders(loader, use_distributed_sampler=False)

    # ---------------------------------------------------------------- validation
    def validate(self) -> dict:
        """Whole-image validation through the streaming predictor; ranks split images and sum matrices.

        Returns:
            ``{"miou", "pixel_accuracy", "iou_<class name>" for every class}`` for segmentation
            (a class neither predicted nor present scores NaN), ``{"accuracy", "balanced_accuracy"}``
            for image classifiers, COCO's ``{"AP", "AP50", "AP75", "AP_small", "AP_medium",
            "AP_large", "AR100"}`` for detectors, or ``{}`` without validation data.
        """
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        fabric = self.fabric
        predictor = self.make_predictor(self.normalization, device=fabric.device, max_memory=self.settings.max_memory)
        if isinstance(predictor, ClassificationPredictor):
            return self._validate_classification(predictor)
        if isinstance(predictor, DetectionPredictor):
            return self._validate_detection(predictor)
        matrix = ConfusionMatrix(self.model.num_classes, ignore_index=self.data["ignore_index"])
        count = (
            len(self.val_data)
            if self.settings.max_val_images is None
            else min(len(self.val_data), self.settings.max_val_images)
        )
        self.model.eval()
        for index in range(fabric.global_rank, count, fabric.world_size):
            sample = self.val_data[index]
            evaluate_sample(predictor, sample, matrix, self.settings.val_block_size)
        matrix.all_reduce(fabric)  # each rank scored its share of the images
        exclude = self.data["exclude_from_miou"]
        scores = {"miou": float(matrix.miou(exclude=exclude)), "pixel_accuracy": float(matrix.pixel_accuracy())}
        # per class, so a class that one epoch finds and the next loses shows in metrics.csv
        scores.update({f"iou_{name}": float(v) for name, v in zip(self.data["classes"], matrix.iou(), strict=True)})
        return scores

    def _validate_classification(self, classifier: ClassificationPredictor) -> dict:
        """Image classifiers: one predicted class per validation image; accuracy and balanced accuracy."""
        fabric = self.fabric
        matrix = ConfusionMatrix(self.model.num_classes, ignore_index=None)
        count = (
            len(self.val_data)
            if self.settings.max_val_images is None
            else min(len(self.val_data), self.settings.max_val_images)
        )
        self.model.eval()
        for index in range(fabric.global_rank, count, fabric.world_size):
            with self.val_data[index] as sample:
                if sample.label is not None:
                    matrix.update(np.array([int(classifier.predict(sample.image).argmax())]), np.array([sample.label]))
        matrix.all_reduce(fabric)
        return {"accuracy": float(matrix.pixel_accuracy()), "balanced_accuracy": float(matrix.balanced_accuracy())}

    def _validate_detection(self, detector: DetectionPredictor) -> dict:
        """Detectors: every validation image's detections scored by COCO's evaluator (pycocotools).

        Rank 0 detects and scores all images (COCO's matching needs them in one evaluator) and
        shares the scores with the other ranks. As in ``gigaseg evaluate``, up to 100 detections
        per image are scored, or up to the most objects one validation image holds when that is more.
        """
        from ..detection_metrics import DetectionEvaluator, max_detections_for

        fabric = self.fabric
        scores: dict = {}
        if fabric.global_rank == 0:
            count = (
                len(self.val_data)
                if self.settings.max_val_images is None
                else min(len(self.val_data), self.settings.max_val_images)
            )
            cap = max_detections_for([len(sample.labels) for sample in self.val_data.samples[:count]])
            evaluator = DetectionEvaluator(list(self.val_data.classes), max_detections=cap)
            self.model.eval()
            for index in range(count):
                sample = self.val_data[index]
                with sample.open() as source:
                    found = detector.predict(source)
                evaluator.add(
                    sample.name,
                    int(sample.width),
                    int(sample.height),
                    sample.boxes,
                    sample.labels,
                    found,
                    gt_iscrowd=getattr(sample, "iscrowd", None),
                )
            computed = evaluator.compute()
            scores = {key: float(value) for key, value in computed.items() if isinstance(value, (int, float))}
        if fabric.world_size > 1:
            scores = fabric.broadcast(scores, src=0)
        return scores

    # ---------------------------------------------------------------- files
    def _load_resume_state(self) -> dict:
        payload = load_checkpoint(self.out_dir / "last.ckpt")
        if payload.get("train") is None:
            raise ConfigError(f"{self.out_dir / 'last.ckpt'}: has no training state to resume from")
        config = self.model.canonical_config(payload["model"]["config"])
        if config != dict(self.model.config):
            raise ConfigError(f"{self.out_dir / 'last.ckpt'}: was trained with {config}, not {dict(self.model.config)}")
        self.model.load_state_dict(payload["model"]["state_dict"])
        self._read_history(payload["train"])
        return payload["train"]

    def _write_config(self) -> None:
        if self.fabric.global_rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "model": dict(self.model.config),
            "settings": _plain(asdict(self.settings)),
            "stages": [
                {
                    "name": s.name,
                    "epochs": self._epochs(s),
                    "lr": s.lr,
                    "batch_size": s.batch_size,
                    "optimizer": s.optimizer,
                }
                for s in self.stages
            ],
            **self.run_config,
        }
        with atomic_output(self.out_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))

    def _log(self, row: dict) -> None:
        path = self.out_dir / "metrics.csv"
        fields = list(dict.fromkeys(k for r in self.history for k in r))
        # rewritten whole (columns may grow between stages), under a temporary name: a kill mid-write
        # must not leave a truncated file for --resume to read its history from
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)
        _tensorboard(self.out_dir, row, len(self.history))

    def _read_history(self, state: dict) -> None:
        """The metrics rows of the epochs up to the resumed checkpoint's (stage, epoch).

        Rows of later epochs are left out: a run killed after it logged an epoch but before that epoch's
        ``last.ckpt`` was in place trains the epoch again, and logs it again.
        """
        path = self.out_dir / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as handle:
            rows = [dict(r) for r in csv.DictReader(handle)]
        stopped = [
            i
            for i, r in enumerate(rows)
            if r.get("stage") == state.get("stage") and r.get("epoch") == str(state.get("epoch"))
        ]
        self.history = rows[: stopped[-1] + 1] if stopped else rows


def evaluate_sample(predictor, sample, matrix: ConfusionMatrix, block_size: int) -> None:
    """Predict one dataset sample band by band and add it to ``matrix`` against its mask.

    Args:
        predictor: a ``SegmentationPredictor`` of the model.
        sample: a dataset sample with ``image`` and ``mask`` sources.
        matrix: the confusion matrix to update.
        block_size: the block side when the predictor planned none.
    """

    def update(window, labels):
        matrix.update(labels, sample.mask.read(window)[..., 0])

    predict_image(predictor, sample.image, None, block_size=block_size, on_band=update, progress=False)


def _grad_scaler(fabric):
    """The precision plugin's GradScaler (``16-mixed``), or None."""
    return getattr(getattr(getattr(fabric, "strategy", None), "precision", None), "scaler", None)


def _grad_norm(optimizer) -> torch.Tensor | None:
    """The total 2-norm of the optimiser's gradients (float32, so fp16 gradients do not overflow), or None."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    device = grads[0].device
    norms = []
    wide = [g for g in grads if g.dtype != torch.float16]
    if wide and hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        norms.append(torch.nn.utils.get_total_norm(wide).float().to(device))
    else:
        norms += [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in wide]
    norms += [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads if g.dtype == torch.float16]
    return torch.linalg.vector_norm(torch.stack(norms))


def _set_base_lr(optimizer, scheduler, lr: float) -> None:
    """Give a resumed run the base rate ``lr``; the schedule's factor stays where it stopped."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _class_frequencies(dataset):
    """The training masks' class frequencies, stored with the run (None for image-level labels)."""
    from ..data.base import SegmentationDataset
    from ..data.statistics import class_frequencies

    return class_frequencies(dataset) if isinstance(dataset, SegmentationDataset) else None


def _optimizer(stage: Stage, params, lr: float) -> torch.optim.Optimizer:
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=stage.weight_decay)
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=stage.weight_decay)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    raise ConfigError(f"unknown optimizer {stage.optimizer!r}")


def _schedule(stage: Stage, total_steps: int, steps_per_epoch: int):
    if stage.schedule == "poly":
        return lambda step: max(0.0, 1 - step / max(total_steps, 1)) ** stage.poly_power
    if stage.schedule == "step":
        milestones = [m * steps_per_epoch for m in stage.milestones]
        return lambda step: stage.gamma ** sum(step >= m for m in milestones)
    if stage.schedule == "constant":
        return lambda step: 1.0
    raise ConfigError(f"stage {stage.name!r}: unknown schedule {stage.schedule!r}; use poly, step or constant")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plain(value):
    """Settings as YAML/weights_only-safe plain values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _tensorboard(out_dir: Path, row: dict, step: int) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            writer.add_scalar(key, value, step)
    writer.close()
