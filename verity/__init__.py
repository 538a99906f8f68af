"""Verity: tells genuine goods from counterfeits in photos and X-ray scans.

The project's packages live in the top-level folders the design card fixes (`api/`, `inference/`,
`datasets/`, `training/`) and are installed under this one namespace as `verity.api`,
`verity.inference`, `verity.datasets` and `verity.training` (see `[tool.setuptools]` in
pyproject.toml), so that no import name shadows a PyPI package such as Hugging Face's `datasets`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("verity")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
