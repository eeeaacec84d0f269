"""The ``gigaseg`` command: one entry point, one module per subcommand.

Each module in ``gigaseg.commands`` defines ``add_parser(subparsers)`` (cheap:
no torch import) and ``run(args) -> int``. Errors the user caused
(``GigasegError``) end with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import GigasegError

#: subcommand name -> module under gigaseg.commands, in the order ``--help`` lists them
COMMANDS = ("demo", "synth", "train", "predict", "evaluate", "bench")


def _available_commands() -> list:
    modules = []
    for name in COMMANDS:
        try:
            modules.append(importlib.import_module(f"gigaseg.commands.{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"gigaseg.commands.{name}":
                raise  # a real missing dependency, not a command that does not exist yet
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gigaseg",
        description="Memory-efficient segmentation of ultra-high-resolution images.",
    )
    parser.add_argument("--version", action="version", version=f"gigaseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _available_commands():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
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
