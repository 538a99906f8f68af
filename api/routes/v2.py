"""Open Inference Protocol (KServe v2 / Triton HTTP) for scanner-console integration.

Infer takes ONE input: either "image" FP32 [N, C, S, S] (preprocessed, values in [0, 1], no
normalization) or "image_bytes" BYTES [N] holding encoded image files (base64 strings in JSON, raw
bytes with the binary tensor data extension). Outputs: score FP32 [N], verdict BYTES [N], logits FP32
[N, 2], request_id BYTES [N] (each answer is audited under its request_id). Errors: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from verity import __version__
from verity.api import oip_codec as oip
from verity.api import oip_response
from verity.api.deps import PrincipalDep, RegistryDep
from verity.api.errors import ApiError, current_request_id, truncated
from verity.api.registry import ServedModel
from verity.api.schemas import OIP_NAME_MAX, PARAMETER_TEXT_MAX, PARAMETERS_MAX, STATION_ID_MAX, OipError
from verity.api.service import ServiceDep, station_for
from verity.inference.pipeline import Upload, prepare_tensor

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

SERVER_NAME = "verity"
SERVER_VERSION = __version__  # the package's, as the OpenAPI document gives it


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OipError} for code in codes}


def _model(registry, name: str, version: str | None = None) -> ServedModel:
    """A model by name (and version), or as `ModelRegistry.resolve` reads a reference: `name@alias`, or a
    modality's name for the model serving it by default, so a console follows every promotion."""
    served = registry.find(name, version) if version else registry.resolve(name)
    if served is None:
        known = ", ".join(sorted({f"{k[0]}/{k[1]}" for k in registry.snapshot.models})) or "none loaded"
        label = f"{name}/{version}" if version else name
        raise ApiError(404, "unknown_model", f"Unknown model {truncated(label)!r}. Loaded: {known}.")
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


OUTPUT_SHAPES = {
    "score": {"datatype": "FP32", "shape": [-1]},
    "verdict": {"datatype": "BYTES", "shape": [-1]},
    "logits": {"datatype": "FP32", "shape": [-1, 2]},
    "request_id": {"datatype": "BYTES", "shape": [-1]},
    "reasons": {"datatype": "BYTES", "shape": [-1]},
    "recognised": {"datatype": "BOOL", "shape": [-1]},
    "novelty": {"datatype": "FP32", "shape": [-1]},
}


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
            {"name": name, **OUTPUT_SHAPES[name]}
            for name in oip.output_names(engine.novelty_gate is not None)
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


def _tensor_images(tensor: oip.TensorIn, binary: bytes | None, served: ServedModel) -> list[Upload]:
    """Blocking: the model inputs of an FP32 input, each hashed for its audit record."""
    batch = oip.fp32_batch(tensor, binary, served.engine.input_shape())
    return [prepare_tensor(x, served.engine.spec) for x in batch]


async def _prepare(
    service, served: ServedModel, tensor: oip.TensorIn, tail: bytes
) -> tuple[list[Upload], list[bytes | None]]:
    """The input's images ready to score, and the uploaded bytes of each (None for tensors)."""
    binary, _ = oip.binary_part(tensor, tail, 0)
    if tensor.datatype == "FP32":
        prepared = await run_in_threadpool(_tensor_images, tensor, binary, served)
        return prepared, [None] * len(prepared)
    items = oip.bytes_items(tensor, binary)
    return list(await asyncio.gather(*(service.prepare(item, served) for item in items))), list(items)


async def _infer(
    request: Request, service, principal, name: str, version: str | None, header_length: str | None
) -> Response:
    served = _model(service.registry, name, version)
    settings = service.settings
    limits = oip.json_limits(settings.max_batch_files, served.engine.input_shape(), settings.max_json_depth)
    infer, tail = await run_in_threadpool(oip.parse_request, await request.body(), header_length, limits)
    # Everything a request can be refused for is checked before its first image is decoded or scored, so
    # only answered verdicts are audited.
    tensor = oip.single_input(infer)
    params = infer.parameters or oip.RequestParameters()
    station = station_for(principal.station_id, params.station_id)
    gated = served.engine.novelty_gate is not None
    outputs = oip.requested_outputs(infer.outputs, gated, bool(params.product))
    service.check_items(oip.item_count(tensor))
    service.require_product(served, params.product)
    prepared, datas = await _prepare(service, served, tensor, tail)
    # The items of one request are scored concurrently, as the files of a /v1 batch are: the batcher
    # gathers them into one model batch.
    scored = list(
        await asyncio.gather(*(service.score_prepared(served, p, params.product) for p in prepared))
    )
    request_id = current_request_id(request)
    ids = [request_id] if len(scored) == 1 else [f"{request_id}-{i}" for i in range(len(scored))]
    await service.answer(
        list(zip(ids, scored, datas, strict=True)),
        modality=served.modality,
        station_id=station,
        case_id=params.case_id,
        started=request.state.started,
        receiver=principal,
        api="v2",
    )
    return oip_response.response(served, infer.id, scored, ids, outputs, params.binary_data_output)


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` written in place: the request body schema sits inside the
    OpenAPI document, where "#/$defs/..." references point at nothing (schemathesis sent no JSON body)."""
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


INFER_DOC: dict[str, Any] = dict(
    response_model=oip_response.InferResponse,
    description=(
        "One input: `image` FP32 [N, C, S, S] (preprocessed, values in [0, 1], no normalization; NaN, "
        "infinities and values outside [0, 1] are a 422) or "
        "`image_bytes` BYTES [N] (encoded image files: base64 strings in JSON, raw bytes with the binary "
        "tensor data extension and the `Inference-Header-Content-Length` header). Outputs `score` FP32 [N], "
        "`verdict` BYTES [N], `logits` FP32 [N, 2], `request_id` BYTES [N]; request `parameters` may carry "
        "`case_id` and `station_id`; `binary_data_output: true` returns binary outputs. Every answer is "
        "audited under its request_id before it is sent. Limits, checked before any image is decoded: at "
        "most `max_batch_files` images per request (422), a JSON body nesting at most `max_json_depth` "
        "deep (400) and holding no more numbers than those images need (413), parameter maps of at most "
        f"{PARAMETERS_MAX} entries, names of at most {OIP_NAME_MAX} characters and strings of at most "
        f"{PARAMETER_TEXT_MAX} (station_id {STATION_ID_MAX})."
    ),
    responses=_errors(400, 401, 403, 404, 408, 413, 415, 422, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inlined(oip.InferRequest.model_json_schema())},
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
    header_length: Annotated[str | None, Header(alias=oip.BINARY_HEADER, include_in_schema=False)] = None,
) -> Response:
    return await _infer(request, service, principal, name, None, header_length)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version", **INFER_DOC)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    header_length: Annotated[str | None, Header(alias=oip.BINARY_HEADER, include_in_schema=False)] = None,
) -> Response:
    return await _infer(request, service, principal, name, version, header_length)
