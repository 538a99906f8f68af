"""The Open Inference Protocol codec (KServe v2 / Triton HTTP): request bodies in.

Reads the JSON header and the binary tensor data extension (`Inference-Header-Content-Length`), and
which outputs a request asks for (api/oip_response.py writes them). A body is measured before it is
parsed: its nesting depth and its count of JSON values, read from the brackets and commas alone, so a
hostile body (100,000 nested "[", 16 MB of "[]") is refused without being built in memory. Parsing is
blocking work: the routes in api/routes/v2.py run it in the threadpool, and tie the rest to the
prediction service.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from verity.api.errors import ApiError, describe_validation, truncated
from verity.api.schemas import (
    CASE_ID_MAX,
    OIP_NAME_MAX,
    PARAMETER_TEXT_MAX,
    PARAMETERS_MAX,
    REQUEST_ID_MAX,
    STATION_ID_MAX,
)
from verity.inference.vocabulary import NAME_MAX

BINARY_HEADER = "Inference-Header-Content-Length"
OUTPUTS = ("score", "verdict", "logits", "request_id", "reasons")
# Only a model with a novelty gate (inference.open_set) answers these.
OPEN_SET_OUTPUTS = ("recognised", "novelty")
# Only a request that names its product (parameters.product) answers these: the reference check, as
# /v1's `reference` holds it (status match, mismatch or abstained; the distance and the alarm distance).
PRODUCT_OUTPUTS = ("reference_status", "reference_distance", "reference_threshold")


def output_names(open_set: bool, product: bool = False) -> tuple[str, ...]:
    """The outputs a model answers: the five of every model, the gate's two when it has one, and the
    reference check's three when the request names a product."""
    return (*OUTPUTS, *(OPEN_SET_OUTPUTS if open_set else ()), *(PRODUCT_OUTPUTS if product else ()))


DATATYPES = ("FP32", "BYTES")
MAX_RANK = 8  # dimensions of an input's shape: FP32 inputs have 4, BYTES 1
INT64_MAX = 2**63 - 1  # a dimension, as the OIP spec types it
# JSON values a body may hold besides its tensor data (names, shapes, parameters, base64 strings).
JSON_OVERHEAD_VALUES = 4096


def _scalar(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= PARAMETER_TEXT_MAX):
        return value
    raise ValueError(
        f"a parameter is a boolean, a number or a string of at most {PARAMETER_TEXT_MAX} characters"
    )


Scalar = Annotated[
    Any,
    AfterValidator(_scalar),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "boolean"},
                {"type": "number"},
                {"type": "string", "maxLength": PARAMETER_TEXT_MAX},
            ]
        }
    ),
]
ParameterName = Annotated[str, StringConstraints(max_length=OIP_NAME_MAX)]


class Parameters(BaseModel):
    """A parameters map as the OIP spec has it (names to booleans, numbers or strings), kept small: at
    most PARAMETERS_MAX entries, short names, short strings. The subclasses type the ones we read."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"maxProperties": PARAMETERS_MAX, "propertyNames": {"maxLength": OIP_NAME_MAX}},
    )
    __pydantic_extra__: dict[ParameterName, Scalar] = Field(init=False)

    @model_validator(mode="before")
    @classmethod
    def _few(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > PARAMETERS_MAX:
            raise ValueError(f"at most {PARAMETERS_MAX} parameters")
        return data


class RequestParameters(Parameters):
    case_id: str | None = Field(None, max_length=CASE_ID_MAX, description="Seizure or shipment.")
    station_id: str | None = Field(
        None, max_length=STATION_ID_MAX, description="Inspection station; a keyed station's own."
    )
    binary_data_output: StrictBool = False
    product: str | None = Field(
        None, max_length=NAME_MAX, description="The product claimed; its genuine references are checked too."
    )


class TensorParameters(Parameters):
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None


class OutputParameters(Parameters):
    binary_data: StrictBool | None = None


class TensorIn(BaseModel):
    name: str = Field(max_length=OIP_NAME_MAX)
    shape: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] = Field(max_length=MAX_RANK)
    datatype: str = Field(max_length=OIP_NAME_MAX)
    parameters: TensorParameters | None = None
    data: Any = None


class OutputRequest(BaseModel):
    name: str = Field(max_length=OIP_NAME_MAX)
    parameters: OutputParameters | None = None


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
    id: str | None = Field(None, max_length=REQUEST_ID_MAX)
    parameters: RequestParameters | None = None
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[OutputRequest] | None = Field(
        None, max_length=len(output_names(open_set=True, product=True))
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@dataclass(frozen=True)
class JsonLimits:
    """What a JSON header may hold: its nesting depth, and its JSON values (numbers, strings, containers)."""

    max_depth: int
    max_values: int


def json_limits(max_items: int, input_shape: tuple[int, ...], max_depth: int) -> JsonLimits:
    """Room for the numbers of max_items model inputs sent as JSON data, and the rest of a request."""
    return JsonLimits(max_depth, max_items * math.prod(input_shape) + JSON_OVERHEAD_VALUES)


_NOT_STRUCTURE = bytes(range(256)).translate(None, b'[]{}",')  # the bytes json_skeleton drops
_STRING = re.compile(rb'"[^"]*"')


def json_skeleton(text: bytes) -> bytes:
    """The brackets and commas of a JSON text outside its strings, in a few passes of C code (about 50 ms
    for 64 MB of base64): escaped backslashes and escaped quotes go first (only a text with a backslash
    pays for that search), then every byte but brackets, commas and quotes, then each (now quote-free)
    string. Exact for valid JSON; invalid JSON fails its parse afterwards."""
    if b"\\" in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _STRING.sub(b"", text.translate(None, _NOT_STRUCTURE))


def json_values(skeleton: bytes) -> int:
    """An upper bound on the values of a JSON text, from its skeleton: every value (number, string,
    container), and once more every empty container."""
    return skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") + 1


def json_depth(skeleton: bytes) -> int:
    """How deep a JSON text nests (0 for a scalar), from its skeleton."""
    brackets = np.frombuffer(skeleton.translate(None, b","), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), np.int8(1), np.int8(-1))
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def check_structure(header: bytes, limits: JsonLimits) -> None:
    """Refuses a header holding too many JSON values (413) or nesting too deep (400), before parsing.
    Values are counted first: that bounds the brackets json_depth then reads."""
    skeleton = json_skeleton(header)
    values = json_values(skeleton)
    if values > limits.max_values:
        raise ApiError(
            413,
            "request_too_large",
            f"The JSON body holds {values:,} values; at most {limits.max_values:,} fit one request to this "
            "model.",
        )
    depth = json_depth(skeleton)
    if depth > limits.max_depth:
        raise bad_request(f"The JSON body nests {depth:,} deep; at most {limits.max_depth} levels are read.")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tail (binary tensor data extension), or all JSON."""
    if header_length is None:
        return body, b""
    try:
        size = int(header_length)
    except ValueError:
        raise bad_request(f"{BINARY_HEADER} must be a whole number of bytes.") from None
    if not 0 < size <= len(body):
        raise bad_request(f"{BINARY_HEADER} {size} does not fit a body of {len(body)} bytes.")
    return body[:size], body[size:]


def parse_request(body: bytes, header_length: str | None, limits: JsonLimits) -> tuple[InferRequest, bytes]:
    """Blocking (run it in the threadpool): the request validated, and the binary tail. The JSON header is
    measured before it is parsed, since parsing holds the interpreter until it is done."""
    header, tail = split_body(body, header_length)
    check_structure(header, limits)
    try:
        document = json.loads(header or b"null")
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        where = f" (at character {error.pos:,})" if isinstance(error, json.JSONDecodeError) else ""
        raise bad_request(f"The request body is not valid JSON{where}.") from error
    try:
        return InferRequest.model_validate(document), tail
    except ValidationError as error:
        raise bad_request("Invalid inference request: " + describe_validation(error.errors())) from error


def single_input(infer: InferRequest) -> TensorIn:
    if len(infer.inputs) != 1:
        raise bad_request("Send exactly one input: 'image' (FP32) or 'image_bytes' (BYTES).")
    tensor = infer.inputs[0]
    if tensor.datatype not in DATATYPES:
        raise bad_request(
            f"Unsupported datatype {truncated(tensor.datatype)!r}: send FP32 (preprocessed tensor) or BYTES "
            "(image)."
        )
    return tensor


def item_count(tensor: TensorIn) -> int:
    """The images an input declares by its shape, before any of its data is read: N of FP32
    [N, C, S, S] (1 for [C, S, S]), every element of BYTES."""
    if tensor.datatype == "FP32":
        return tensor.shape[0] if len(tensor.shape) == 4 else 1
    return math.prod(tensor.shape)


def requested_outputs(
    wanted: list[OutputRequest] | None, open_set: bool = False, product: bool = False
) -> dict[str, OutputRequest | None]:
    """The outputs to answer (all the model has unless some are named), checked before anything is
    scored, so a refused request leaves no audit row."""
    available = output_names(open_set, product)
    if not wanted:
        return {name: None for name in available}
    requested: dict[str, OutputRequest | None] = {o.name: o for o in wanted}
    if len(requested) < len(wanted):  # which of two entries would the answer follow?
        repeated = sorted({o.name for o in wanted if sum(w.name == o.name for w in wanted) > 1})
        names = ", ".join(repr(truncated(name)) for name in repeated)
        raise bad_request(f"Each output may be named once in `outputs`; named more than once: {names}.")
    unknown = sorted(set(requested) - set(available))
    if unknown:
        names = ", ".join(repr(truncated(name)) for name in unknown)
        raise bad_request(f"Unknown output(s) {names}. Outputs of this model: {', '.join(available)}.")
    return requested


def binary_part(tensor: TensorIn, tail: bytes, offset: int) -> tuple[bytes | None, int]:
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is None:
        return None, offset
    if offset + size > len(tail):
        raise bad_request(f"Input {tensor.name!r}: binary_data_size {size} runs past the end of the body.")
    return tail[offset : offset + size], offset + size


def unpack_bytes(tensor: TensorIn, blob: bytes, count: int) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then the bytes;
    exactly `count` of them fill the blob."""
    items: list[bytes] = []
    offset = 0
    while offset < len(blob) and len(items) < count:
        if offset + 4 > len(blob):
            raise bad_request(f"Input {tensor.name!r}: a BYTES element is cut short.")
        (length,) = struct.unpack_from("<I", blob, offset)
        if offset + 4 + length > len(blob):
            raise bad_request(f"Input {tensor.name!r}: a BYTES element is longer than the data sent.")
        items.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
    if len(items) != count or offset != len(blob):
        raise bad_request(
            f"Input {tensor.name!r}: the binary data does not hold the {count:,} elements of shape "
            f"{tensor.shape}."
        )
    return items


def base64_items(tensor: TensorIn, count: int) -> list[bytes]:
    """BYTES elements sent as JSON: base64 strings, as many as the shape declares."""
    data = tensor.data
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise bad_request(f"Input {tensor.name!r}: JSON BYTES data must be a list of base64 strings.")
    if len(data) != count:
        raise bad_request(f"Input {tensor.name!r} has shape {tensor.shape} but holds {len(data):,} elements.")
    items = []
    for index, text in enumerate(data):
        try:
            items.append(base64.b64decode(text, validate=True))
        except binascii.Error as error:
            raise bad_request(f"Input {tensor.name!r}: element {index} is not valid base64.") from error
    return items


def bytes_items(tensor: TensorIn, binary: bytes | None) -> list[bytes]:
    """The encoded images of a BYTES input (its count already checked against the items cap)."""
    count = math.prod(tensor.shape)
    if count < 1:
        raise bad_request(f"Input {tensor.name!r} has shape {tensor.shape}: it holds no image.")
    return unpack_bytes(tensor, binary, count) if binary is not None else base64_items(tensor, count)


def fp32_batch(tensor: TensorIn, binary: bytes | None, expected: tuple[int, int, int]) -> np.ndarray:
    """Blocking: the FP32 input as an [N, C, S, S] array (N already checked against the items cap)."""
    shape = tuple(tensor.shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise bad_request(
            f"Input {tensor.name!r} must have shape [N, {', '.join(map(str, expected))}] with N >= 1, "
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
    check_input_range(tensor.name, array)
    return np.ascontiguousarray(array, dtype=np.float32)


def check_input_range(name: str, array: np.ndarray) -> None:
    """A preprocessed input holds values in [0, 1], as the protocol documents: NaN, infinities and
    values like 3e38 are a 422, never scored (they made the model's score NaN, which the audit refused,
    so any station could fake an audit outage)."""
    if not np.isfinite(array).all():
        raise ApiError(422, "invalid_tensor", f"Input {truncated(name)!r} holds NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ApiError(
            422,
            "invalid_tensor",
            f"Input {truncated(name)!r} holds values from {low:.6g} to {high:.6g}; a preprocessed image "
            "holds values in [0, 1].",
        )
