"""One error shape for the whole /v1 API, and the Open Inference Protocol's shape under /v2.

/v1: `{"error": {"code", "message", "request_id"}}`, plus `limit_bytes` on a 413 for a byte limit and
`retry_after_s` (the Retry-After header's seconds) on a 429 or 503, so a client can say "the limit is
20 MB" or "retry in 5 s" in its user's language. /v2: `{"error": "message"}` (the OIP spec).
Bad input is always a 4xx with a message fit for the user; an unexpected failure is a 500 without a
traceback (the traceback goes to the log, next to the request_id).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from verity.api.logs import request_id_var
from verity.api.schemas import ErrorBody
from verity.inference.decode_limits import DecodeError, ImageTooLarge, UnsupportedFormat
from verity.inference.references.errors import (
    InvalidName,
    NoEmbedding,
    ReferenceConflict,
    ReferenceStoreError,
    UnknownProduct,
    UnknownReference,
)

log = logging.getLogger("verity.api")

# Characters of a client-sent name that a message quotes back (an 8 KB model name was echoed whole).
ECHO_MAX = 64
# Field errors one message names: a body with ten thousand bad fields still gets a short answer.
ERRORS_LISTED = 3


class ApiError(Exception):
    """An error a route wants the client to see, with its HTTP status and machine-readable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        limit_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.limit_bytes = limit_bytes  # the byte limit a 413 exceeded


def truncated(text: object, limit: int = ECHO_MAX) -> str:
    """A client-sent name as a message may quote it: its first `limit` characters, and "..." when cut."""
    value = str(text)
    return value if len(value) <= limit else value[:limit] + "..."


def decode_error_to_api(error: DecodeError) -> ApiError:
    """413 for too large, 415 for not an image type we read, 400 for anything else undecodable."""
    if isinstance(error, ImageTooLarge):
        return ApiError(413, error.code, str(error), limit_bytes=error.limit_bytes)
    if isinstance(error, UnsupportedFormat):
        return ApiError(415, error.code, str(error))
    return ApiError(400, error.code, str(error))


def service_unavailable(code: str, message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, code, message, {"Retry-After": str(retry_after_s)})


STORE_DAMAGED = (
    "The reference store cannot be read (its events log is damaged); the cause is logged for the operator."
)


def reference_error_to_api(error: ReferenceStoreError) -> ApiError:
    """The status and code of each reference store refusal (/v1/references and a product check)."""
    if isinstance(error, UnknownProduct):
        return ApiError(404, "unknown_product", str(error))
    if isinstance(error, UnknownReference):
        return ApiError(404, "unknown_reference", str(error))
    if isinstance(error, ReferenceConflict):
        return ApiError(409, "reference_conflict", str(error))
    if isinstance(error, InvalidName):
        return ApiError(422, "invalid_product", str(error))
    if isinstance(error, NoEmbedding):
        return ApiError(422, "no_embedding", str(error))
    # Anything else is the store's own damage (an events file that does not parse): its message names the
    # file, a server path no station should read, so it goes to the log and the client gets fixed words.
    log.error("reference store unusable", extra={"error": str(error)})
    return ApiError(503, "references_unavailable", STORE_DAMAGED)


def reference_store_unavailable(error: OSError) -> ApiError:
    """The reference folder cannot be written or read (disk full, permissions): nothing was changed. The
    client learns why in the system's words (strerror, never the file name); the path goes to the log."""
    log.error("reference store unavailable", extra={"error": str(error)})
    reason = f": {error.strerror}" if error.strerror else ""
    return ApiError(503, "references_unavailable", f"The reference store cannot be used{reason}.")


# What each status means on /v1, for the OpenAPI document of every /v1 route.
V1_ERROR_DESCRIPTIONS = {
    400: "The upload is not a decodable image, or the body cannot be parsed.",
    401: "No API key, or an unknown or revoked one.",
    403: "The key may not do this.",
    404: "Not found.",
    413: "The upload or the image is too large.",
    406: "A DICOS threat report was asked for (`format=dicos` or `Accept: application/dicom`) for an image "
    "that is not scored as X-ray.",
    415: "Not an image type the server reads.",
    422: "Missing or invalid fields.",
    408: "The request body did not arrive in time (VERITY_BODY_TIMEOUT_S, VERITY_BODY_MIN_RATE).",
    429: "Too many requests from this key, or too many of its images decoding; see Retry-After.",
    503: "Not ready, at capacity, or the audit log is unavailable; see Retry-After.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A /v1 route's `responses=`: the error body and what each status means."""
    return {code: {"model": ErrorBody, "description": V1_ERROR_DESCRIPTIONS[code]} for code in codes}


def current_request_id(request: Request | None = None) -> str:
    if request is not None and getattr(request.state, "request_id", None):
        return str(request.state.request_id)
    return request_id_var.get() or ""


def error_response(
    request: Request | None,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    path: str | None = None,
    limit_bytes: int | None = None,
) -> JSONResponse:
    """Builds the error body in the shape the route's API family uses."""
    request_id = current_request_id(request)
    path = path if path is not None else (request.url.path if request is not None else "")
    if path.startswith("/v2"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body = {"error": error_detail(code, message, request_id, status, headers, limit_bytes)}
    return JSONResponse(body, status_code=status, headers=headers)


def error_detail(
    code: str,
    message: str,
    request_id: str,
    status: int,
    headers: dict[str, str] | None = None,
    limit_bytes: int | None = None,
) -> dict[str, Any]:
    """The /v1 error detail: code, message and request_id, with limit_bytes on a 413 that has one and
    retry_after_s on a 429 or 503 that says when to retry (the Retry-After header, as a number)."""
    detail: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if status == 413 and limit_bytes is not None:
        detail["limit_bytes"] = limit_bytes
    retry_after = {name.lower(): value for name, value in (headers or {}).items()}.get("retry-after")
    if status in (429, 503) and retry_after is not None and retry_after.isdigit():
        detail["retry_after_s"] = int(retry_after)
    return detail


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_fields",
    503: "unavailable",
}


def describe_validation(errors: Sequence[Any]) -> str:
    """Pydantic's field errors as one bounded message: the first few, each field path cut short (a path
    holds the client's own keys), and how many more there were."""
    parts = []
    for item in errors[:ERRORS_LISTED]:
        location = ".".join(
            truncated(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header")
        )
        parts.append(f"{location or 'request'}: {item.get('msg', 'invalid')}")
    if len(errors) > ERRORS_LISTED:
        parts.append(f"and {len(errors) - ERRORS_LISTED} more")
    return "; ".join(parts) or "The request fields are invalid."


async def _api_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(
        request, error.status, error.code, error.message, error.headers, limit_bytes=error.limit_bytes
    )


async def _validation_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(request, 422, "invalid_fields", describe_validation(error.errors()))


async def _http_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = _HTTP_CODES.get(error.status_code, "http_error")
    message = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
    return error_response(request, error.status_code, code, message, dict(error.headers or {}))


async def _unexpected_handler(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=error)
    return error_response(
        request, 500, "internal_error", "The server failed to answer; the failure is logged."
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
