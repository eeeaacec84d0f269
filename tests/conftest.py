"""Test-wide settings: small thread counts so the suite behaves on 2 CPU cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
