"""``gigaseg bench``: methods side by side on one dataset (accuracy, memory, speed)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "bench",
        help="compare methods on a dataset: mIoU, peak memory, speed",
        description="Train each method with the same encoder and budget in a fresh process, evaluate it through "
        "the streaming predictor, and write results.json/.md/.png.",
    )
    parser.add_argument("--methods", required=True, help="comma-separated methods, e.g. global,patch,glnet")
    parser.add_argument("--data", required=True, help="dataset folder (with train and val splits)")
    parser.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--epochs", type=int, help="epochs per stage for every method")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-memory", help="memory budget given to every method, e.g. 4GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method option, e.g. --set patch.patch_size=256 (repeatable)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Train and evaluate every method of ``--methods`` (``gigaseg.bench.compare``) and print the table.

    Args:
        args: the parsed ``gigaseg bench`` arguments.

    Returns:
        0; results.json, .md and .png are written to ``--out``.

    Raises:
        ConfigError: a ``--set`` that is not ``METHOD.KEY=VALUE``, or a bad ``--max-memory``.
    """
    from ..bench.compare import MethodSpec, compare, markdown
    from ..errors import ConfigError
    from ..memory import parse_size
    from .common import parse_options

    options: dict[str, dict] = {}
    for key, value in parse_options(args.set).items():
        if "." not in key:
            raise ConfigError(f"--set expects METHOD.KEY=VALUE, got {key!r}")
        method, option = key.split(".", 1)
        options.setdefault(method, {})[option] = value
    specs = [
        MethodSpec(
            method=m.strip(),
            options=options.get(m.strip(), {}),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
        )
        for m in args.methods.split(",")
        if m.strip()
    ]
    results = compare(
        specs,
        args.data,
        args.out,
        encoder=args.encoder,
        seed=args.seed,
        max_memory=parse_size(args.max_memory) if args.max_memory else None,
    )
    print(markdown(results))
    print(f"results in {args.out}/results.json, .md, .png")
    return 0
