"""``python -m gigaseg``: the ``gigaseg`` command (:func:`gigaseg.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
