"""Open Inference Protocol (KServe v2 / Triton HTTP) for scanner-console integration.

Infer takes ONE input: either "image" FP32 [N, C, S, S] (preprocessed, values in [0, 1], no
normalization) or "image_bytes" BYTES [N] holding encoded image files (base64 strings in JSON, raw
bytes with the binary tensor data extension). Outputs: score FP32 [N], verdict BYTES [N], logits FP32
[N, 2], request_id BYTES [N] (each answer is audited under its request_id). Errors: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import struct
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.deps import PrincipalDep, RegistryDep
from api.errors import ApiError, current_request_id
from api.registry import ServedModel
from api.schemas import OipError
from api.service import PreparedImage, Scored, ServiceDep, station_for

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

SERVER_NAME = "verity"
SERVER_VERSION = "0.1.0"
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


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OipError} for code in codes}


def _model(registry, name: str, version: str | None = None) -> ServedModel:
    served = registry.find(name, version)
    if served is None:
        known = ", ".join(sorted({f"{k[0]}/{k[1]}" for k in registry.snapshot.models})) or "none loaded"
        label = f"{name}/{version}" if version else name
        raise ApiError(404, "unknown_model", f"Unknown model {label!r}. Loaded: {known}.")
    return served


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness", responses=_errors(503))
async def ready(registry: RegistryDep) -> JSONResponse:
    return JSONResponse({"ready": registry.ready}, status_code=200 if registry.ready else 503)


def _metadata(served: ServedModel, registry) -> dict[str, Any]:
    engine = served.engine
    versions = sorted(v for n, v in registry.snapshot.models if n == engine.name)
    channels, size, _ = engine.input_shape()
    return {
        "name": engine.name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": [-1, channels, size, size]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "verdict", "datatype": "BYTES", "shape": [-1]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "request_id", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "modality": served.modality,
            "version": engine.version,
            "alarm_threshold": engine.thresholds.alarm,
            "clear_threshold": engine.thresholds.clear,
        },
    }


@router.get("/models/{name}", summary="Model metadata", responses=_errors(401, 404))
async def model_metadata(name: str, registry: RegistryDep, principal: PrincipalDep) -> dict[str, Any]:
    return _metadata(_model(registry, name), registry)


@router.get(
    "/models/{name}/versions/{version}", summary="Model version metadata", responses=_errors(401, 404)
)
async def model_version_metadata(
    name: str, version: str, registry: RegistryDep, principal: PrincipalDep
) -> dict[str, Any]:
    return _metadata(_model(registry, name, version), registry)


@router.get("/models/{name}/ready", summary="Model readiness", responses=_errors(401, 404))
async def model_ready(name: str, registry: RegistryDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"name": _model(registry, name).engine.name, "ready": True}


@router.get(
    "/models/{name}/versions/{version}/ready", summary="Model version readiness", responses=_errors(401, 404)
)
async def model_version_ready(
    name: str, version: str, registry: RegistryDep, principal: PrincipalDep
) -> dict[str, Any]:
    served = _model(registry, name, version)
    return {"name": served.engine.name, "version": served.engine.version, "ready": True}


# Parsing ---------------------------------------------------------------------------------------


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tail (binary tensor data extension), or all JSON."""
    try:
        if header_length is None:
            return json.loads(body or b"null"), b""
        size = int(header_length)
        if not 0 < size <= len(body):
            raise _bad(f"{BINARY_HEADER} {size} does not fit a body of {len(body)} bytes.")
        return json.loads(body[:size]), body[size:]
    except (ValueError, UnicodeDecodeError) as error:
        if isinstance(error, ApiError):
            raise
        raise _bad(f"The request is not valid JSON: {error}") from error


def _binary_part(tensor: TensorIn, tail: bytes, offset: int) -> tuple[bytes | None, int]:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None, offset
    if not isinstance(size, int) or size < 0 or offset + size > len(tail):
        raise _bad(f"Input {tensor.name!r}: binary_data_size {size} runs past the end of the body.")
    return tail[offset : offset + size], offset + size


def _unpack_bytes(blob: bytes) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise _bad("A BYTES element is cut short.")
        (length,) = struct.unpack_from("<I", blob, offset)
        if offset + 4 + length > len(blob):
            raise _bad("A BYTES element is longer than the data sent.")
        items.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def _fp32_batch(tensor: TensorIn, binary: bytes | None, expected: tuple[int, int, int]) -> np.ndarray:
    shape = tuple(tensor.shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != expected or not 1 <= shape[0] <= 256:
        raise _bad(
            f"Input {tensor.name!r} must have shape [N, {', '.join(map(str, expected))}] with 1 <= N <= 256, "
            f"got {tensor.shape}."
        )
    try:
        if binary is not None:
            array = np.frombuffer(binary, dtype="<f4").reshape(shape)
        else:
            array = np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    except (ValueError, TypeError) as error:
        raise _bad(
            f"Input {tensor.name!r}: the data does not fill shape {list(shape)} with FP32 values."
        ) from error
    if not np.isfinite(array).all():
        raise _bad(f"Input {tensor.name!r} holds NaN or infinite values.")
    return np.ascontiguousarray(array, dtype=np.float32)


def _bytes_items(tensor: TensorIn, binary: bytes | None) -> list[bytes]:
    if binary is not None:
        items = _unpack_bytes(binary)
    else:
        if not isinstance(tensor.data, list) or not all(isinstance(x, str) for x in tensor.data):
            raise _bad(f"Input {tensor.name!r}: JSON BYTES data must be a list of base64 strings.")
        try:
            items = [base64.b64decode(x, validate=True) for x in tensor.data]
        except binascii.Error as error:
            raise _bad(f"Input {tensor.name!r}: an element is not valid base64: {error}") from error
    count = int(np.prod(tensor.shape)) if tensor.shape else 0
    if len(items) != count or not 1 <= count <= 256:
        raise _bad(
            f"Input {tensor.name!r} has shape {tensor.shape} but holds {len(items)} elements (1 to 256)."
        )
    return items


# Answering -------------------------------------------------------------------------------------


def _encode_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def _response(
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
        raise _bad(f"Unknown output(s) {', '.join(unknown)}. Outputs: {', '.join(OUTPUTS)}.")
    outputs, blobs = [], []
    for name, spec in requested.items():
        datatype, shape, data = values[name]
        binary = binary_all if spec is None else bool((spec.parameters or {}).get("binary_data", binary_all))
        if binary:
            blob = _encode_bytes(data) if datatype == "BYTES" else data.tobytes()
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


async def _infer(
    request: Request, service, principal, name: str, version: str | None, header_length: str | None
) -> Response:
    served = _model(service.registry, name, version)
    header, tail = _split_body(await request.body(), header_length)
    try:
        infer = InferRequest.model_validate(header)
    except ValidationError as error:
        raise _bad(
            "Invalid inference request: "
            + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        ) from error
    if len(infer.inputs) != 1:
        raise _bad("Send exactly one input: 'image' (FP32) or 'image_bytes' (BYTES).")
    tensor = infer.inputs[0]
    binary, _ = _binary_part(tensor, tail, 0)
    if tensor.datatype == "FP32":
        batch = _fp32_batch(tensor, binary, served.engine.input_shape())
        prepared = [PreparedImage(x, hashlib.sha256(x.tobytes()).hexdigest(), "tensor") for x in batch]
        datas: list[bytes | None] = [None] * len(prepared)
    elif tensor.datatype == "BYTES":
        items = _bytes_items(tensor, binary)
        prepared = list(await asyncio.gather(*(service.prepare(item, served) for item in items)))
        datas = list(items)
    else:
        raise _bad(
            f"Unsupported datatype {tensor.datatype!r}: send FP32 (preprocessed tensor) or BYTES (image)."
        )
    params = infer.parameters or {}
    case_id = params.get("case_id") if isinstance(params.get("case_id"), str) else None
    named = params.get("station_id") if isinstance(params.get("station_id"), str) else None
    station = station_for(principal.station_id, named)
    # The items of one request are scored concurrently, as the files of a /v1 batch are: the batcher
    # gathers them into one model batch.
    scored = list(await asyncio.gather(*(service.score_prepared(served, p) for p in prepared)))
    request_id = current_request_id(request)
    ids = [request_id] if len(scored) == 1 else [f"{request_id}-{i}" for i in range(len(scored))]
    await service.answer(
        list(zip(ids, scored, datas, strict=True)),
        station_id=station,
        case_id=case_id,
        started=request.state.started,
        api="v2",
    )
    return _response(
        served, infer.id, scored, ids, infer.outputs, bool(params.get("binary_data_output", False))
    )


INFER_DOC: dict[str, Any] = dict(
    response_model=InferResponse,
    description=(
        "One input: `image` FP32 [N, C, S, S] (preprocessed, values in [0, 1], no normalization) or "
        "`image_bytes` BYTES [N] (encoded image files: base64 strings in JSON, raw bytes with the binary "
        "tensor data extension and the `Inference-Header-Content-Length` header). Outputs `score` FP32 [N], "
        "`verdict` BYTES [N], `logits` FP32 [N, 2], `request_id` BYTES [N]; request `parameters` may carry "
        "`case_id` and `station_id`; `binary_data_output: true` returns binary outputs. Every answer is "
        "audited under its request_id before it is sent."
    ),
    responses=_errors(400, 401, 404, 413, 415, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": InferRequest.model_json_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)


@router.post("/models/{name}/infer", summary="Inference", **INFER_DOC)
async def infer(
    name: str,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    header_length: Annotated[str | None, Header(alias=BINARY_HEADER, include_in_schema=False)] = None,
) -> Response:
    return await _infer(request, service, principal, name, None, header_length)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version", **INFER_DOC)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    header_length: Annotated[str | None, Header(alias=BINARY_HEADER, include_in_schema=False)] = None,
) -> Response:
    return await _infer(request, service, principal, name, version, header_length)
