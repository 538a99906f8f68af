"""Shared test settings: keep torch to one thread so parallel test runs on 2 cores stay fast."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
