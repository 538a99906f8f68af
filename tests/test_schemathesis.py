"""Property-based tests generated from the app's own OpenAPI schema (schemathesis): no 5xx, and every
response conforms to the documented status codes, content types and schemas. The whole API without keys,
and /v1 and /v2 again as a keyed station calls them on a server that requires keys."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from api_fixtures import make_models_dir, make_settings
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from verity.api.app import create_app
from verity.api.auth import KeyStore

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schemathesis.serializer("application/dicom")
def _dicom_body(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """/v1/predict's raw DICOM body: generated as binary, sent as it is (the decoder then judges it)."""
    return value if isinstance(value, bytes) else str(value).encode()


def _build_app(require_api_keys: bool = False) -> tuple[FastAPI, str]:
    """Built at import (schemathesis parametrizes at collection): tiny models in a temporary folder, and
    one station key in its keys file; the app and that key."""
    root = Path(tempfile.mkdtemp(prefix="verity-schemathesis-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    make_models_dir(root)
    _, station_key = KeyStore(root / "keys.json").add("gate-1")
    # Hundreds of requests a second from one caller: its rate limit (api/limits.py) would answer most of
    # them 429 before their input is looked at. The limits have their own tests (test_connections.py).
    return create_app(make_settings(root, rate_limit_per_s=0, require_api_keys=require_api_keys)), station_key


schema = schemathesis.openapi.from_asgi("/openapi.json", _build_app()[0])
KEYED_APP, STATION_KEY = _build_app(require_api_keys=True)
keyed = schemathesis.openapi.from_asgi("/openapi.json", KEYED_APP).include(path_regex="^/v[12](/|$)")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case) -> None:
    case.call_and_validate(checks=CHECKS)


@keyed.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_v1_and_v2_with_keys_required_conform_to_their_schema(case) -> None:
    """Every /v1 and /v2 route with the station's key; /v2 on a served model (the test above tries
    unknown names), so the generated bodies reach the codec and the prediction path."""
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "name": "photo-test"}
        if "version" in case.path_parameters:
            case.path_parameters["version"] = "1"
    case.call_and_validate(headers={"X-API-Key": STATION_KEY}, checks=CHECKS)
