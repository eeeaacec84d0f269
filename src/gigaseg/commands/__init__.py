"""Subcommands of the ``gigaseg`` CLI (see ``gigaseg.cli``)."""
