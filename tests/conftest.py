"""Shared fixtures and settings of the test suite.

Torch is kept to one thread so parallel test runs on 2 cores stay fast. The API fixtures build on
tests/api_fixtures.py: `models_dir` (photo-test 1 and 2, xray-test 1, tiny ONNX models), `settings`
(every file under tmp_path) and `client` (the app in-process, started and stopped around the test).
FastAPI and the app are imported inside the fixtures, so tests that use none of them do not load them.

Markers (registered in pyproject.toml): `slow` for tests that train, export or start a server, `torch`
for tests that import torch or train/export a model; `make test-fast` leaves both out.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and onnxruntime start their thread pools

import pytest  # noqa: E402
from api_fixtures import make_models_dir, make_settings  # noqa: E402

# The browser tests' fixtures (tests/test_console*.py), there for each module that asks for them.
pytest_plugins = ["console_pages"]

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from verity.api.settings import Settings


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """A test that runs `verity serve` in-process (its refusals are tested so) leaves what it exports for
    its workers in os.environ: VERITY_MODELS_DIR, and VERITY_SERVE_PROCESS, which makes every later
    create_app reconfigure logging. Each test starts from the environment the session started with."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _heap_unfrozen() -> Iterator[None]:
    """An app started with a server's default settings freezes the whole test process after its load
    (api/registry.freeze_long_lived); unfrozen after each test, so its apps and models are collected like
    any other garbage instead of being held for the rest of the run."""
    yield
    gc.unfreeze()


@pytest.fixture()
def models_dir(tmp_path: Path) -> Path:
    """tmp_path/models with photo-test 1 and 2 (2 is the photo default) and xray-test 1."""
    return make_models_dir(tmp_path)


@pytest.fixture()
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    """The test settings (api_fixtures.make_settings) on `models_dir`."""
    return make_settings(tmp_path)


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    """The app built from `settings`, in-process, with its startup and shutdown run."""
    from fastapi.testclient import TestClient

    from verity.api.app import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client
