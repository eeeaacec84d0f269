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
    # no argparse defaults for settings: a flag given overrides --config's settings, which override
    # TrainSettings' defaults (named in the help)
    parser.add_argument("--devices", help="devices per node (number or 'auto'; default: 1)")
    parser.add_argument("--num-nodes", type=int, help="nodes (default: 1)")
    parser.add_argument("--accelerator", help="cpu, cuda, mps or auto (default: auto)")
    parser.add_argument("--strategy", help="auto, ddp, ... (default: auto)")
    parser.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed (default: 32-true)")
    parser.add_argument("--accumulate", type=int, help="optimiser step every N batches (default: 1)")
    parser.add_argument("--seed", type=int, help="seeds weights, data order and crops (default: 0)")
    parser.add_argument("--workers", type=int, help="data loader worker processes (default: 0)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --set input_size=1024 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.ckpt")
    parser.add_argument(
        "--force", action="store_true", help="train over the run already in OUT (otherwise such a folder is refused)"
    )
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Train (:func:`gigaseg.api.train`) with the ``--config`` file's values under the command line's.

    Each value comes from the first of: the flag when it is given on the command line, the
    file's ``options`` / ``settings``, the default (``TrainSettings``'). A flag given with its
    default value (``--seed 0``) still overrides the file.

    Args:
        args: the parsed ``gigaseg train`` arguments.

    Returns:
        0.

    Raises:
        ConfigError: a bad config file (its ``options`` or ``settings`` not a mapping, an unknown
            or invalid setting: the file is named), ``--set``, ``--max-memory`` or setting flag.
    """
    from ..api import train
    from ..errors import ConfigError
    from ..memory import parse_size
    from .common import parse_options, read_config

    config = read_config(args.config)
    if not isinstance(config.get("options") or {}, dict):
        raise ConfigError(f"{args.config}: 'options' must be a mapping of method options to values")
    options = {**(config.get("options") or {}), **parse_options(args.set)}
    given = {
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
    given = {key: value for key, value in given.items() if value is not None}
    settings = _settings(config.get("settings") or {}, given, args.config)
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
        force=args.force,
    )
    last = result["history"][-1] if result["history"] else {}
    if last:
        score = "accuracy" if "val_accuracy" in last else "AP" if "val_AP" in last else "mIoU"
        value = last.get("val_accuracy", last.get("val_AP", last.get("val_miou", float("nan"))))
        print(
            f"trained {args.method}: {len(result['history'])} epochs, last val {score} "
            f"{float(value):.4f}; checkpoints in {args.out}"
        )
    return 0


def _settings(from_file, given: dict, config_path):
    """``TrainSettings`` from the file's settings under the flags given; errors name their source."""
    import dataclasses

    from ..errors import ConfigError
    from ..training.recipe import TrainSettings

    if not isinstance(from_file, dict):
        raise ConfigError(f"{config_path}: 'settings' must be a mapping of setting names to values")
    known = {field.name for field in dataclasses.fields(TrainSettings)}
    unknown = sorted(str(key) for key in from_file if key not in known)
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown setting(s) {', '.join(map(repr, unknown))} in 'settings' "
            f"(known: {', '.join(sorted(known))})"
        )
    try:  # the file's own values, where no flag replaces them
        TrainSettings(**{key: value for key, value in from_file.items() if key not in given})
    except ConfigError as error:
        raise ConfigError(f"{config_path}: in 'settings': {error}") from None
    return TrainSettings(**{**from_file, **given})
