"""The Open Inference Protocol codec (KServe v2 / Triton HTTP): request bodies in, answers out.

Reads the JSON header and the binary tensor data extension (`Inference-Header-Content-Length`), checks
shapes and counts before anything is decoded, and writes the outputs (score FP32 [N], verdict BYTES
[N], logits FP32 [N, 2], request_id BYTES [N]) as JSON data or binary blobs as asked. The routes in
api/routes_v2.py only tie this to the prediction service.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from verity.api.errors import ApiError
from verity.api.registry import ServedModel
from verity.api.service import Scored

BINARY_HEADER = "Inference-Header-Content-Length"
OUTPUTS = ("score", "verdict", "logits", "request_id")


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class OutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "console-42",
                "parameters": {"case_id": "SEZ-2026-0412"},
                "inputs": [
                    {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["<base64 JPEG>"]}
                ],
            }
        }
    )
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[OutputRequest] | None = None


class TensorOut(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[TensorOut]


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tail (binary tensor data extension), or all JSON."""
    try:
        if header_length is None:
            return json.loads(body or b"null"), b""
        size = int(header_length)
        if not 0 < size <= len(body):
            raise bad_request(f"{BINARY_HEADER} {size} does not fit a body of {len(body)} bytes.")
        return json.loads(body[:size]), body[size:]
    except (ValueError, UnicodeDecodeError) as error:
        if isinstance(error, ApiError):
            raise
        raise bad_request(f"The request is not valid JSON: {error}") from error


def binary_part(tensor: TensorIn, tail: bytes, offset: int) -> tuple[bytes | None, int]:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None, offset
    if not isinstance(size, int) or size < 0 or offset + size > len(tail):
        raise bad_request(f"Input {tensor.name!r}: binary_data_size {size} runs past the end of the body.")
    return tail[offset : offset + size], offset + size


def unpack_bytes(blob: bytes) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise bad_request("A BYTES element is cut short.")
        (length,) = struct.unpack_from("<I", blob, offset)
        if offset + 4 + length > len(blob):
            raise bad_request("A BYTES element is longer than the data sent.")
        items.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def fp32_batch(tensor: TensorIn, binary: bytes | None, expected: tuple[int, int, int]) -> np.ndarray:
    shape = tuple(tensor.shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != expected or not 1 <= shape[0] <= 256:
        raise bad_request(
            f"Input {tensor.name!r} must have shape [N, {', '.join(map(str, expected))}] with 1 <= N <= 256, "
            f"got {tensor.shape}."
        )
    try:
        if binary is not None:
            array = np.frombuffer(binary, dtype="<f4").reshape(shape)
        else:
            array = np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    except (ValueError, TypeError) as error:
        raise bad_request(
            f"Input {tensor.name!r}: the data does not fill shape {list(shape)} with FP32 values."
        ) from error
    if not np.isfinite(array).all():
        raise bad_request(f"Input {tensor.name!r} holds NaN or infinite values.")
    return np.ascontiguousarray(array, dtype=np.float32)


def bytes_items(tensor: TensorIn, binary: bytes | None) -> list[bytes]:
    if binary is not None:
        items = unpack_bytes(binary)
    else:
        if not isinstance(tensor.data, list) or not all(isinstance(x, str) for x in tensor.data):
            raise bad_request(f"Input {tensor.name!r}: JSON BYTES data must be a list of base64 strings.")
        try:
            items = [base64.b64decode(x, validate=True) for x in tensor.data]
        except binascii.Error as error:
            raise bad_request(f"Input {tensor.name!r}: an element is not valid base64: {error}") from error
    count = int(np.prod(tensor.shape)) if tensor.shape else 0
    if len(items) != count or not 1 <= count <= 256:
        raise bad_request(
            f"Input {tensor.name!r} has shape {tensor.shape} but holds {len(items)} elements (1 to 256)."
        )
    return items


def encode_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def response(
    model: ServedModel,
    request_id: str | None,
    scored: list[Scored],
    ids: list[str],
    wanted: list[OutputRequest] | None,
    binary_all: bool,
) -> Response:
    n = len(scored)
    values: dict[str, tuple[str, list[int], Any]] = {
        "score": ("FP32", [n], np.array([s.prediction.score for s in scored], dtype="<f4")),
        "verdict": ("BYTES", [n], [s.prediction.verdict for s in scored]),
        "logits": ("FP32", [n, 2], np.array([s.prediction.logits for s in scored], dtype="<f4")),
        "request_id": ("BYTES", [n], ids),
    }
    requested = {o.name: o for o in wanted} if wanted else {name: None for name in OUTPUTS}
    unknown = sorted(set(requested) - set(OUTPUTS))
    if unknown:
        raise bad_request(f"Unknown output(s) {', '.join(unknown)}. Outputs: {', '.join(OUTPUTS)}.")
    outputs, blobs = [], []
    for name, spec in requested.items():
        datatype, shape, data = values[name]
        binary = binary_all if spec is None else bool((spec.parameters or {}).get("binary_data", binary_all))
        if binary:
            blob = encode_bytes(data) if datatype == "BYTES" else data.tobytes()
            blobs.append(blob)
            outputs.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
        else:
            listed = data if datatype == "BYTES" else data.reshape(-1).astype(float).tolist()
            outputs.append({"name": name, "datatype": datatype, "shape": shape, "data": listed})
    body = {"model_name": model.engine.name, "model_version": model.engine.version, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={BINARY_HEADER: str(len(header))},
    )
