"""``gigaseg train``: train a method on a dataset folder."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "train",
        help="train a method on a dataset",
        description="Train a method on a dataset folder (gigaseg layout with dataset.yaml, DeepGlobe, Inria, "
        "Cityscapes, or images/ + masks/). Multi-GPU/multi-node: launch with torchrun or srun and "
        "pass --devices/--num-nodes (see README).",
    )
    parser.add_argument("--method", required=True, help="method name (global, patch, glnet, magnet, icnet, ...)")
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--out", required=True, help="run folder for checkpoints, metrics.csv and config.yaml")
    parser.add_argument("--config", help="YAML file with encoder, options (method options) and settings")
    parser.add_argument("--encoder", help="timm encoder name (default: the method's paper backbone, mostly resnet50)")
    parser.add_argument("--pretrained", help="'imagenet' for timm's weights, or a local weights file")
    parser.add_argument("--stage", default="all", help="train one stage of a multi-stage method (default: all)")
    parser.add_argument("--init", help="start from this checkpoint or run folder (e.g. the previous stage's run)")
    parser.add_argument("--epochs", type=int, help="epochs per stage (overrides the method's default)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-memory", help="memory budget, e.g. 4GB: sets sub-batch sizes")
    parser.add_argument("--devices", default="1", help="devices per node (number or 'auto')")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--strategy", default="auto", help="auto, ddp, ...")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--accumulate", type=int, default=1, help="optimiser step every N batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --set input_size=1024 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.ckpt")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Train (:func:`gigaseg.api.train`) with the ``--config`` file's values under the command line's.

    Options given on the command line replace the file's ``options`` and ``settings``; those
    with a default (``--seed``, ``--workers``, ``--accelerator``, ``--devices``, ``--num-nodes``,
    ``--strategy``, ``--precision``, ``--accumulate``) always replace the file's settings.

    Args:
        args: the parsed ``gigaseg train`` arguments.

    Returns:
        0.

    Raises:
        ConfigError: a bad config file, ``--set`` or ``--max-memory``.
    """
    from ..api import train
    from ..memory import parse_size
    from ..training.recipe import TrainSettings
    from .common import parse_options, read_config

    config = read_config(args.config)
    options = {**config.get("options", {}), **parse_options(args.set)}
    settings = TrainSettings(**config.get("settings", {}))
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_memory": parse_size(args.max_memory) if args.max_memory else None,
        "seed": args.seed,
        "num_workers": args.workers,
        "accelerator": args.accelerator,
        "devices": int(args.devices) if str(args.devices).isdigit() else args.devices,
        "num_nodes": args.num_nodes,
        "strategy": args.strategy,
        "precision": args.precision,
        "accumulate": args.accumulate,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    pretrained = {"imagenet": True, None: config.get("pretrained", False)}.get(args.pretrained, args.pretrained)
    result = train(
        args.method,
        args.data,
        args.out,
        encoder=args.encoder or config.get("encoder"),
        pretrained=pretrained,
        options=options,
        settings=settings,
        stage=args.stage,
        resume=args.resume,
        init=args.init,
    )
    last = result["history"][-1] if result["history"] else {}
    if last:
        score = "accuracy" if "val_accuracy" in last else "mIoU"
        value = last.get("val_accuracy", last.get("val_miou", float("nan")))
        print(
            f"trained {args.method}: {len(result['history'])} epochs, last val {score} "
            f"{float(value):.4f}; checkpoints in {args.out}"
        )
    return 0
