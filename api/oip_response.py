"""The Open Inference Protocol answer: the requested outputs as JSON data or binary tensor blobs.

What a request asks for (api/oip_codec.requested_outputs) meets what was scored here: score FP32 [N],
verdict BYTES [N], logits FP32 [N, 2], request_id and reasons BYTES [N], the gate's recognised BOOL and
novelty FP32, and a named product's reference check. An output marked binary_data travels after the JSON
header, its length in `Inference-Header-Content-Length` (the binary tensor data extension).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi.responses import Response
from pydantic import BaseModel

from verity.api.oip_codec import BINARY_HEADER, OutputRequest
from verity.api.registry import ServedModel
from verity.inference.pipeline import Scored


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


def _reference_numbers(scored: list[Scored], field: str) -> np.ndarray:
    values = [getattr(s.reference, field, None) if s.reference else None for s in scored]
    return np.array([-1.0 if value is None else value for value in values], dtype="<f4")


def encode_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def response(
    model: ServedModel,
    request_id: str | None,
    scored: list[Scored],
    ids: list[str],
    requested: dict[str, OutputRequest | None],
    binary_all: bool,
) -> Response:
    """The answer holding the requested outputs (from requested_outputs), as JSON or binary blobs."""
    n = len(scored)
    values: dict[str, tuple[str, list[int], Any]] = {
        "score": ("FP32", [n], np.array([s.score for s in scored], dtype="<f4")),
        "verdict": ("BYTES", [n], [s.verdict for s in scored]),
        "logits": ("FP32", [n, 2], np.array([s.output.logits for s in scored], dtype="<f4")),
        "request_id": ("BYTES", [n], ids),
        "reasons": ("BYTES", [n], [",".join(s.reasons) for s in scored]),
        "recognised": ("BOOL", [n], np.array([bool(s.recognised) for s in scored])),
        "novelty": ("FP32", [n], np.array([s.novelty or 0.0 for s in scored], dtype="<f4")),
        # -1 where the check gave no distance or threshold (too few references: it abstained); distances
        # are never negative, and JSON has no NaN.
        "reference_status": ("BYTES", [n], [s.reference.status if s.reference else "" for s in scored]),
        "reference_distance": ("FP32", [n], _reference_numbers(scored, "distance")),
        "reference_threshold": ("FP32", [n], _reference_numbers(scored, "threshold")),
    }
    outputs, blobs = [], []
    for name, spec in requested.items():
        datatype, shape, data = values[name]
        wanted = spec.parameters.binary_data if spec is not None and spec.parameters else None
        if binary_all if wanted is None else wanted:
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
            if datatype == "BYTES":
                listed = data
            elif datatype == "BOOL":
                listed = [bool(value) for value in data.reshape(-1)]
            else:
                listed = data.reshape(-1).astype(float).tolist()
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
