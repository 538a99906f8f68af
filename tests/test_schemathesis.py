"""Property-based tests generated from the app's own OpenAPI schema (schemathesis): no 5xx, and every
response conforms to the documented status codes, content types and schemas."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from api_fixtures import make_models_dir, make_settings
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from verity.api.app import create_app

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _build_app():
    """Built at import (schemathesis parametrizes at collection): tiny models in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="verity-schemathesis-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    make_models_dir(root)
    # Hundreds of requests a second from one caller: its rate limit (api/limits.py) would answer most of
    # them 429 before their input is looked at. The limits have their own tests (test_connections.py).
    return create_app(make_settings(root, rate_limit_per_s=0))


schema = schemathesis.openapi.from_asgi("/openapi.json", _build_app())


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case) -> None:
    case.call_and_validate(checks=CHECKS)
