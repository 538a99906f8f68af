"""/v1: predictions and feedback. Routes stay thin; the work is in api.service. The models, their
reload, health and metrics are `api.routes.operations`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import Scope

from verity.api.audit import AuditRecord, FeedbackRecord
from verity.api.auth import ANONYMOUS
from verity.api.deps import (
    AuditDep,
    OutboxDep,
    Principal,
    PrincipalDep,
    SettingsDep,
)
from verity.api.errors import (
    ApiError,
    current_request_id,
    error_responses,
    service_unavailable,
    truncated,
)
from verity.api.feedback import may_confirm
from verity.api.registry import ServedModel
from verity.api.result_images import NO_IMAGES, Images, render_images
from verity.api.routes.predict_input import (
    DICOM_MEDIA_TYPE,
    RAW_BODY_OPENAPI,
    RawPredictOptions,
    is_raw_image_body,
    modality_of,
    pair_input,
    predict_input,
    wants_report,
)
from verity.api.routes.report_answer import report_response
from verity.api.schemas import (
    CASE_ID_MAX,
    FILENAME_MAX,
    MODEL_REFERENCE_MAX,
    STATION_ID_MAX,
    AnswerFormat,
    BatchResponse,
    FeedbackIn,
    FeedbackOut,
    Modality,
    PredictionResult,
)
from verity.api.service import PredictionService, Scored, ServiceDep, station_for
from verity.api.settings import Settings
from verity.inference.dicos_report import new_report_uid
from verity.inference.stamps import utc_now
from verity.inference.vocabulary import NAME_MAX

router = APIRouter()
log = logging.getLogger("verity.api")


FileField = Annotated[UploadFile, File(description="The image: JPEG, PNG, WebP, GIF, BMP, TIFF or DICOM.")]
MODALITY_TEXT = "photo (a product or label photo) or xray (a scan)."
ModalityField = Annotated[Modality, Form(description=MODALITY_TEXT)]
StationField = Annotated[
    str | None, Form(max_length=STATION_ID_MAX, description="Inspection station; a keyed station's own.")
]
CaseField = Annotated[
    str | None, Form(max_length=CASE_ID_MAX, description="Seizure or shipment this image belongs to.")
]
HeatmapField = Annotated[bool, Form(description="Return the evidence heatmap as a base64 PNG.")]
FormatField = Annotated[
    AnswerFormat,
    Form(description="`dicos`: answer with a DICOS Threat Detection Report (application/dicom; X-ray "
         "only), as `Accept: application/dicom` asks; `json` (default): the JSON result."),
]  # fmt: skip
ViewField = Annotated[
    bool,
    Form(
        description="Return `view_png`: the image as the model saw it (X-ray windowed), the heatmap's "
        "size, for laying the heatmap over it."
    ),
]
ProductField = Annotated[
    str | None,
    Form(
        max_length=NAME_MAX,
        description="The product the item claims to be. Its genuine references (`/v1/references`) are "
        "then checked too; 404 lists the products that have references.",
    ),
]


ModelField = Annotated[
    str | None,
    Form(
        max_length=MODEL_REFERENCE_MAX,
        description="The model to answer, instead of the modality's default: `name` (the version serving), "
        "`name/version`, or `name@alias` (e.g. photo-default@production, which follows every promotion).",
    ),
]


def _elapsed_ms(request: Request) -> float:
    return (time.perf_counter() - request.state.started) * 1000.0


async def _images(scored: Scored, served: ServedModel, heatmap: bool, view: bool) -> Images:
    """The pictures asked for, rendered off the event loop."""
    if not (heatmap or view):
        return NO_IMAGES
    return await run_in_threadpool(render_images, scored, served.engine.spec, heatmap, view)


class RawImageRoute(APIRoute):
    """/v1/predict when the body is the image itself (`predict_input.is_raw_image_body`), as scanner SDKs
    send it. Matched before the multipart route, so that FastAPI does not parse and validate the form's
    eleven fields for a request that has none: 0.2 ms of the event loop's time per request (in process).
    Any other request falls through to the multipart route, which documents both forms."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL and not is_raw_image_body(Headers(scope=scope).get("content-type")):
            return Match.NONE, {}
        return match, child


async def predict_raw(
    request: Request, service: ServiceDep, principal: PrincipalDep, settings: SettingsDep
) -> Any:
    data, options = await predict_input(request, None, None)
    return await _predict_answer(request, service, principal, settings, data, options)


router.add_api_route(
    "/v1/predict",
    predict_raw,
    methods=["POST"],
    response_model=PredictionResult,
    include_in_schema=False,
    route_class_override=RawImageRoute,
)


@router.post(
    "/v1/predict",
    response_model=PredictionResult,
    tags=["predict"],
    responses={
        **error_responses(400, 401, 403, 404, 406, 408, 413, 415, 422, 429, 503),
        200: {"content": {DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
              "description": "The JSON result; or, with `format=dicos` or `Accept: application/dicom` for "
              "an X-ray, a DICOS Threat Detection Report (its verdict, score and SOP Instance UID also in "
              "the X-Verity-Verdict, X-Verity-Score and X-Verity-Report-UID headers)."},
    },  # fmt: skip
    summary="Verdict for one image",
    description="Decodes the image by content (never by file name), scores it with the modality's "
    "default model, writes the audit record, then answers. The image comes as the `file` part of a "
    "multipart form with the options as form fields, or as the whole body (`Content-Type: image/*`, "
    "`application/dicom` or `application/octet-stream`) with the options as query parameters, as "
    "scanner SDKs send it. Examples: "
    "`curl -F file=@label.jpg -F modality=photo http://127.0.0.1:8000/v1/predict`; "
    "`curl -H 'Content-Type: image/jpeg' --data-binary @label.jpg "
    "'http://127.0.0.1:8000/v1/predict?modality=photo'`.",
    openapi_extra=RAW_BODY_OPENAPI,
)
async def predict(
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File(description="The image (multipart).")] = None,
    high: Annotated[UploadFile | None, File(description="A dual-energy pair's high-energy image, with `low` "
                                                        "and instead of `file`.")] = None,  # fmt: skip
    low: Annotated[UploadFile | None, File(description="A dual-energy pair's low-energy image.")] = None,
    modality: Annotated[
        Modality | None,
        Form(description=MODALITY_TEXT + " May be left out for DICOM and 16-bit PNG or TIFF (X-ray)."),
    ] = None,
    station_id: StationField = None,
    case_id: CaseField = None,
    return_heatmap: HeatmapField = False,
    product: ProductField = None,
    return_view: ViewField = False,
    model: ModelField = None,
    format: FormatField = "json",  # noqa: A002 - the field's name in the form and the query
) -> Any:
    form = None if file is None and high is None and low is None else RawPredictOptions(
        modality=modality, station_id=station_id, case_id=case_id, product=product,
        return_heatmap=return_heatmap, return_view=return_view, model=model, format=format,
    )  # fmt: skip
    if high is not None or low is not None:
        data, options = await pair_input(service, file, high, low, form)
    else:
        data, options = await predict_input(request, file, form)
    return await _predict_answer(request, service, principal, settings, data, options)


async def _predict_answer(
    request: Request,
    service: PredictionService,
    principal: Principal,
    settings: Settings,
    data: bytes,
    options: RawPredictOptions,
) -> Any:
    """/v1/predict's answer to one image and its options, however they came (a form, a raw body)."""
    station = station_for(principal.station_id, options.station_id)
    if options.model:
        served = service.model_named(options.model, options.modality)
    else:
        served = service.model_for(modality_of(options, data))
    report = wants_report(request, options)
    if report and served.modality != "xray":
        raise ApiError(
            406, "not_acceptable", "A DICOS threat detection report answers X-ray scans; this image is "
            f"scored by the {served.modality} model. Ask for JSON (the default).",
        )  # fmt: skip
    service.require_product(served, options.product)
    scored = await service.score(data, served, options.product)
    request_id = current_request_id(request)
    report_uids = {request_id: new_report_uid(settings.uid_root)} if report else None
    wanted = (options.return_heatmap, options.return_view)
    images = NO_IMAGES if report else await _images(scored, served, *wanted)
    (record,) = await service.answer(
        [(request_id, scored, data)],
        modality=served.modality,
        station_id=station,
        case_id=options.case_id,
        started=request.state.started,
        receiver=principal,
        report_uids=report_uids,
    )
    if report_uids:
        return await report_response(record, scored, served, data, settings.uid_root, request.state.started)
    return service.result(record, scored, images)


async def _batch_item(
    service: PredictionService,
    index: int,
    upload: UploadFile,
    served: ServedModel,
    wanted: tuple[bool, bool],
    product: str | None,
) -> tuple[int, str | None, bytes, Scored | None, Images, ApiError | None]:
    """One file of a batch: its result (with the heatmap and view asked for) or its own error, never
    the whole batch's."""
    data = await upload.read()
    filename = truncated(upload.filename, FILENAME_MAX) if upload.filename is not None else None
    try:
        scored = await service.score(data, served, product)
        return index, filename, data, scored, await _images(scored, served, *wanted), None
    except ApiError as error:
        return index, filename, data, None, NO_IMAGES, error


@router.post(
    "/v1/predict/batch",
    response_model=BatchResponse,
    tags=["predict"],
    responses=error_responses(400, 401, 403, 404, 408, 413, 422, 429, 503),
    summary="Verdicts for several images",
    description="Up to `max_batch_files` files (field `files`, repeated); one result per file in upload "
    "order. A file that cannot be decoded fails alone, with its own error entry.",
)
async def predict_batch(
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    files: Annotated[list[UploadFile], File(description="The images, one part each.")],
    modality: ModalityField,
    station_id: StationField = None,
    case_id: CaseField = None,
    return_heatmap: HeatmapField = False,
    product: ProductField = None,
    return_view: ViewField = False,
) -> dict[str, Any]:
    service.check_items(len(files))
    station = station_for(principal.station_id, station_id)
    served = service.model_for(modality)
    service.require_product(served, product)
    wanted = (return_heatmap, return_view)
    outcomes = await asyncio.gather(
        *(_batch_item(service, i, f, served, wanted, product) for i, f in enumerate(files))
    )
    request_id = current_request_id(request)
    done = [(i, data, scored, images) for i, _, data, scored, images, _ in outcomes if scored is not None]
    records = await service.answer(
        [(f"{request_id}-{index}", scored, data) for index, data, scored, _ in done],
        modality=served.modality,
        station_id=station,
        case_id=case_id,
        started=request.state.started,
        receiver=principal,
    )
    results = {
        index: service.result(record, scored, images)
        for (index, _, scored, images), record in zip(done, records, strict=True)
    }
    items = []
    for index, filename, _, _, _, error in outcomes:
        if index in results:
            items.append({"index": index, "filename": filename, "result": results[index]})
        else:
            assert error is not None  # each outcome holds a result or an error
            failure = {"code": error.code, "message": error.message, "request_id": request_id}
            items.append({"index": index, "filename": filename, "error": failure})
    return {"request_id": request_id, "latency_ms": round(_elapsed_ms(request), 3), "results": items}


def confirmable(record: AuditRecord | None, request_id: str, principal: Principal) -> AuditRecord:
    """The audited verdict this caller may confirm (api.feedback.may_confirm), or the refusal: 403 saying
    why for an anonymous caller's own verdict that names a station, else the 404 of an unknown id."""
    allowed = record is not None and may_confirm(principal.role, principal.station_id, record.station_id)
    if record is not None and allowed:
        return record
    if record is not None and principal.role == ANONYMOUS == record.caller_role:
        raise ApiError(
            403,
            "forbidden",
            f"This verdict names station {truncated(record.station_id)!r}, and a station named without a "
            "key is only a claim: an anonymous caller may confirm only verdicts recorded without a station. "
            "Confirm it with that station's key or an admin key.",
        )
    if record is not None:
        log.warning(
            "feedback refused: not the verdict's station",
            extra={"station_id": principal.station_id, "key_id": principal.key_id},
        )
    raise ApiError(
        404,
        "unknown_request_id",
        f"No audited prediction has request_id {request_id!r} for this caller "
        "(a verdict is confirmed by the station that received it, or an admin).",
    )


@router.post(
    "/v1/feedback",
    response_model=FeedbackOut,
    tags=["feedback"],
    responses=error_responses(400, 401, 403, 404, 408, 413, 422, 503),
    summary="Record an officer's confirmed outcome for a prediction",
    description=(
        "Confirmed cases with stored images become training data: `verity audit confirmed`, then "
        "`verity data ingest`. `unsure` (cannot tell) is recorded and shown in `/v1/history` but never "
        "exported as training data. A verdict is confirmed by the station (key) that received it or an "
        "admin; an anonymous caller on an unkeyed server may confirm only verdicts recorded without a "
        "station (403 for one naming a station)."
    ),
)
async def feedback(
    request: Request,
    body: FeedbackIn,
    audit: AuditDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    outbox: OutboxDep,
) -> dict[str, Any]:
    """Only the station that received the verdict, or an admin, may confirm it; an anonymous caller only
    the verdicts recorded without a station (api.feedback.may_confirm). An anonymous caller refused on a
    verdict it received itself (one naming a station) gets 403 saying why; anyone else the same 404 as
    for an id that was never issued, not 403: a 403 would tell a station that another station's request
    id exists, and request ids are quoted on paper and in case files."""
    record = confirmable(await run_in_threadpool(audit.get, body.request_id), body.request_id, principal)
    entry = FeedbackRecord(
        request_id=body.request_id,
        created=utc_now(),
        confirmed_label=body.confirmed_label,
        case_id=body.case_id,
        notes=body.notes,
        station_id=principal.station_id,
        key_id=principal.key_id,
        role=principal.role,
    )
    alerts = outbox.planner.for_confirmation(record, entry)  # written with the confirmation, or neither
    try:
        await run_in_threadpool(audit.add_feedback, entry, alerts)
    except RuntimeError as error:  # the cause (which may name the database file) is for the log only
        log.error("feedback write failed", extra={"error": str(error)})
        raise service_unavailable(
            "audit_unavailable",
            "The audit log cannot be written, so the feedback was not recorded; retry shortly.",
            settings.retry_after_s,
        ) from error
    outbox.written(alerts)
    kept = record.image_path is not None
    note = None if kept else (
        "The feedback is recorded, but the verdict's image was not stored (VERITY_STORE_IMAGES is off), so "
        "this case cannot become training data."
    )  # fmt: skip
    return {"request_id": body.request_id, "confirmed_label": body.confirmed_label, "recorded": True,
            "image_kept": kept, "note": note, "alerts": len(alerts)}  # fmt: skip
