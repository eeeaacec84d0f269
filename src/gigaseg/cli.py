"""The ``gigaseg`` command: one entry point, one module per subcommand.

Each subcommand's module in ``gigaseg.commands`` defines ``add_parser(subparsers)``
(cheap: no torch import), which sets a ``run(args) -> int`` as ``args.run`` (``synth``:
one per kind). Errors the user caused (``GigasegError``) end with a one-line message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import bench, demo, evaluate, predict, synth, train
from .errors import GigasegError

#: the subcommands' modules, in the order ``--help`` lists them
COMMANDS = (demo, synth, train, predict, evaluate, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``gigaseg`` argument parser with every subcommand.

    Returns:
        The parser; each subcommand's parsed arguments carry its ``run`` function as ``args.run``.
    """
    parser = argparse.ArgumentParser(
        prog="gigaseg",
        description="Memory-efficient segmentation of ultra-high-resolution images.",
    )
    parser.add_argument("--version", action="version", version=f"gigaseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gigaseg`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the subcommand's, 2 for an error the user caused, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except GigasegError as error:
        print(f"gigaseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gigaseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
