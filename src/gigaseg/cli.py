"""The ``gigaseg`` command: one entry point, one module per subcommand.

Each subcommand's module in ``gigaseg.commands`` defines ``add_parser(subparsers)``
(cheap: no torch import), which sets a ``run(args) -> int`` as ``args.run`` (``synth``:
one per kind). Errors the user caused (``GigasegError``) end with a one-line message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import __version__
from .commands import bench, demo, evaluate, predict, synth, train, vectorize, view
from .errors import ENVIRONMENT_ERRNOS, GigasegError, GigasegNotice, describe_os_error

#: the subcommands' modules, in the order ``--help`` lists them
COMMANDS = (demo, synth, train, predict, vectorize, view, evaluate, bench)


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

    Errors the user caused (``GigasegError``) and OS errors of their environment (a full disk,
    a read-only folder, a file where a folder belongs: ``ENVIRONMENT_ERRNOS``) end with one line
    and exit code 2; notices (``GigasegNotice``) are printed as one line each.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the subcommand's, 2 for an error the user caused, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)

    def show_notice(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GigasegNotice):
            print(f"gigaseg {args.command}: note: {message}", file=sys.stderr)
        else:
            default_showwarning(message, category, filename, lineno, file, line)

    default_showwarning = warnings.showwarning
    warnings.showwarning = show_notice
    try:
        return int(args.run(args) or 0)
    except GigasegError as error:
        print(f"gigaseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"gigaseg {args.command}: error: {describe_os_error(error, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gigaseg {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = default_showwarning


if __name__ == "__main__":
    sys.exit(main())
