"""How /v1/predict reads its input: a multipart form (the image as `file`, the options as fields), or the
image as the whole body (`Content-Type: image/*`, `application/dicom`, `application/octet-stream`) with
the options as query parameters, as scanner SDKs send it, or a dual-energy pair as `high` and `low`
files; and the modality, asked for or decided by the bytes (DICOM and 16-bit PNG or TIFF are X-ray)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from verity.api.errors import ApiError
from verity.api.schemas import (
    ANSWER_FORMATS,
    CASE_ID_MAX,
    MODEL_REFERENCE_MAX,
    STATION_ID_MAX,
    AnswerFormat,
    Modality,
)
from verity.inference.decode import content_modality
from verity.inference.vocabulary import NAME_MAX

if TYPE_CHECKING:
    from verity.api.service import PredictionService

DICOM_MEDIA_TYPE = "application/dicom"  # a DICOM/DICOS Part-10 file, sent or answered
# The body types /v1/predict takes as the image itself (options then in the query), besides multipart.
RAW_IMAGE_TYPES = ("image/", DICOM_MEDIA_TYPE, "application/octet-stream")


def is_raw_image_body(content_type: str | None) -> bool:
    """Whether a request's Content-Type says its body is the image itself."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return any(kind.startswith(prefix) if prefix.endswith("/") else kind == prefix
               for prefix in RAW_IMAGE_TYPES)  # fmt: skip


class RawPredictOptions(BaseModel):
    """/v1/predict's options: a multipart form's fields, or a raw image body's query parameters."""

    model_config = ConfigDict(extra="forbid")

    modality: Modality | None = None  # None: the bytes decide where they can (DICOM, 16-bit), else 422
    # The model to answer: name, name/version, name@alias or a modality (api.registry.resolve).
    model: str | None = Field(None, max_length=MODEL_REFERENCE_MAX)
    station_id: str | None = Field(None, max_length=STATION_ID_MAX)
    case_id: str | None = Field(None, max_length=CASE_ID_MAX)
    product: str | None = Field(None, max_length=NAME_MAX)
    return_heatmap: bool = False
    return_view: bool = False
    # "dicos": the answer is a DICOS Threat Detection Report (X-ray only), as `Accept: application/dicom`.
    format: AnswerFormat = "json"


RAW_BODY_OPENAPI = {
    "requestBody": {
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in ("image/*", DICOM_MEDIA_TYPE, "application/octet-stream")
        }
    },
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
        for name, schema, text in (
            ("modality", {"type": "string", "enum": ["photo", "xray"]},
             "With a raw body; may be left out for DICOM and 16-bit PNG or TIFF (X-ray)."),
            ("station_id", {"type": "string", "maxLength": STATION_ID_MAX}, "With a raw body."),
            ("case_id", {"type": "string", "maxLength": CASE_ID_MAX}, "With a raw body."),
            ("product", {"type": "string", "maxLength": NAME_MAX}, "With a raw body."),
            ("model", {"type": "string", "maxLength": MODEL_REFERENCE_MAX}, "With a raw body."),
            ("return_heatmap", {"type": "boolean"}, "With a raw body."),
            ("return_view", {"type": "boolean"}, "With a raw body."),
            ("format", {"type": "string", "enum": list(ANSWER_FORMATS)}, "With a raw body."),
        )
    ],
}


def raw_options(request: Request) -> RawPredictOptions:
    """The options of a raw-body request, from its query (422 naming what is wrong)."""
    try:
        return RawPredictOptions.model_validate(dict(request.query_params))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'query'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ApiError(422, "invalid_fields", f"Invalid query for a raw image body: {problems}.") from error


async def predict_input(
    request: Request, file: UploadFile | None, options: RawPredictOptions | None
) -> tuple[bytes, RawPredictOptions]:
    """The image bytes and the options: a multipart form's, or a raw body's with its query."""
    if is_raw_image_body(request.headers.get("content-type")):
        options = raw_options(request)
        return await request.body(), options
    if file is None or options is None:
        raise ApiError(
            422,
            "invalid_fields",
            "Missing form field: file. Send multipart/form-data with `file` (and `modality`), or the image "
            "itself as the body (Content-Type: image/*) with ?modality=.",
        )
    return await file.read(), options


def wants_report(request: Request, options: RawPredictOptions) -> bool:
    """A DICOS threat report rather than JSON: `format=dicos`, or an Accept header that ranks
    application/dicom above application/json (a scanner console's DICOS client asks so)."""
    if options.format == "dicos":
        return True
    ranks: dict[str, float] = {}
    for part in request.headers.get("accept", "").split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media.strip().lower()] = quality
    return ranks.get(DICOM_MEDIA_TYPE, 0.0) > max(ranks.get("application/json", 0.0), 0.0)


def modality_of(options: RawPredictOptions, data: bytes) -> str:
    """The modality asked for, else the one the bytes decide (DICOM and 16-bit PNG or TIFF are X-ray)."""
    modality = options.modality or content_modality(data)
    if modality is None:
        raise ApiError(
            422,
            "invalid_fields",
            "Missing field: modality (photo or xray). The image's bytes decide it only for DICOM and 16-bit "
            "PNG or TIFF (X-ray); an 8-bit image may be either.",
        )
    return modality


async def pair_input(
    service: PredictionService, file: UploadFile | None, high: UploadFile | None, low: UploadFile | None,
    form: RawPredictOptions | None,
) -> tuple[bytes, RawPredictOptions]:
    """A dual-energy pair sent as two files: one two-page TIFF, the form a pair file takes (X-ray)."""
    if file is not None or high is None or low is None or form is None:
        raise ApiError(422, "invalid_fields", "A dual-energy pair is `high` and `low` together, instead of "
                       "`file`.")  # fmt: skip
    pair = await service.combine_pair(await high.read(), await low.read())
    return pair, form.model_copy(update={"modality": form.modality or "xray"})
