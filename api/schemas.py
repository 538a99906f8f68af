"""Request and response bodies, with the examples the OpenAPI docs show."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from verity.inference.vocabulary import NAME_MAX

# inference.vocabulary spelled out as Literal types, so OpenAPI lists the values (a Literal cannot be
# built from a tuple and still be read by type checkers); tests/test_vocabulary.py keeps them equal.
Verdict = Literal["genuine", "counterfeit", "uncertain"]
Modality = Literal["photo", "xray"]
# What /v1/predict answers with: its JSON, or a DICOS Threat Detection Report (X-ray; inference.dicos_report).
AnswerFormat = Literal["json", "dicos"]
ANSWER_FORMATS: tuple[str, ...] = get_args(AnswerFormat)
Label = Literal["genuine", "counterfeit"]
FeedbackLabel = Literal["genuine", "counterfeit", "unsure"]
# The history's verdict filter: the three verdicts, with not_recognised (recognised false) on its own.
HistoryVerdict = Literal["genuine", "counterfeit", "uncertain", "not_recognised"]
Reason = Literal[
    "classifier", "reference_mismatch", "not_recognised", "unlike_training", "smaller_than_training",
    "other_modality", "other_colour_scheme", "classifier_uncertain",
]  # fmt: skip  (vocabulary.REASONS; tests/test_vocabulary.py keeps the two equal)
ReferenceStatus = Literal["match", "mismatch", "abstained"]

EXAMPLE_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

# Length caps on the free strings a client sends, the same on every route (/v1 form fields, /v1/feedback,
# /v2 parameters): room for any real station, case or note, never megabytes stored in the audit log or
# echoed back (a /v2 case_id of 1,000,000 characters was stored whole).
STATION_ID_MAX = 100
CASE_ID_MAX = 200
NOTES_MAX = 4000
REQUEST_ID_MAX = 100  # a request id quoted back (ours are 32 hex digits and "-index"), and a /v2 request's id
OIP_NAME_MAX = 64  # a /v2 tensor, output or parameter name
PARAMETER_TEXT_MAX = 200  # any other string parameter of /v2
PARAMETERS_MAX = 16  # entries in one /v2 parameters map
MODEL_REFERENCE_MAX = 2 * NAME_MAX + 1  # name/version or name@alias: two names and the sign between
FILENAME_MAX = 255  # a file name a result quotes back (batch, enrolment): a file system's longest name


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. unsupported_media_type.")
    message: str = Field(description="What went wrong, fit to show a user.")
    request_id: str


class ErrorDetailOut(ErrorDetail):
    """An error answer's detail. The numbers a client shows in its own words are absent from the JSON
    where they do not apply (a batch's per-file errors are plain ErrorDetail)."""

    limit_bytes: int | None = Field(
        None, description="On a 413 for a byte limit: the limit, in bytes, that was exceeded."
    )
    retry_after_s: int | None = Field(
        None, description="On a 429 or 503: seconds to wait before retrying, as in Retry-After."
    )


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "error": {
                    "code": "unsupported_media_type",
                    "request_id": "5f0c6a2e9b3d4c1e8a7f6b5c4d3e2f10",
                    "message": "Not a supported image: expected JPEG, PNG, WebP, GIF, BMP, TIFF or DICOM.",
                }
            }
        }
    )
    error: ErrorDetailOut


class OipError(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"error": "Unknown model 'shoes'."}})
    error: str


class ModelRef(BaseModel):
    name: str
    version: str


class ThresholdsOut(BaseModel):
    alarm: float = Field(description="Counterfeit at or above this score.")
    clear: float = Field(description="Genuine at or below this score; uncertain between.")


class ClosestReference(BaseModel):
    reference_id: str
    distance: float = Field(description="Cosine distance of the two images' embeddings (0: alike).")


class ReferenceOut(BaseModel):
    product: str
    status: ReferenceStatus = Field(
        description="match: near the product's genuine references; mismatch: too far (an alarm); "
        "abstained: fewer references than the check needs (min_references), so it gave no answer."
    )
    distance: float | None = Field(None, description="Cosine distance to the nearest genuine reference.")
    threshold: float | None = Field(
        None, description="The product's alarm distance, calibrated by leave-one-out on its references."
    )
    references: int | None = None
    min_references: int
    closest: list[ClosestReference] = Field(
        default_factory=list,
        description="The product's genuine references nearest the image (by embedding), nearest first, "
        "up to 3: show them beside it (GET /v1/references/{reference_id}/image).",
    )
    difference_png: str | None = Field(
        None,
        description="Base64 PNG, with return_heatmap and a model with local features (an image scored "
        "whole): where the image differs from every genuine reference, over the same view and at the "
        "same size as heatmap_png. Coloured from the genuine limit (what genuine images stay within) to "
        "twice it.",
    )
    difference_max: float | None = Field(
        None,
        description="The largest difference drawn in difference_png, in genuine limits: above 1, some part "
        "lies further from the genuine references than genuine items' parts do.",
    )


class PredictionResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "verdict": "counterfeit",
                "score": 0.93,
                "thresholds": {"alarm": 0.71, "clear": 0.12},
                "modality": "photo",
                "model": {"name": "photo-default", "version": "2026.11.29"},
                "image_sha256": EXAMPLE_SHA,
                "request_id": "5f0c6a2e9b3d4c1e8a7f6b5c4d3e2f10",
                "latency_ms": 18.4,
                "station_id": "gate-3",
                "case_id": "SEZ-2026-0412",
                "heatmap_png": None,
                "tiles": None,
            }
        }
    )
    verdict: Verdict
    score: float = Field(ge=0.0, le=1.0, description="Calibrated probability that the item is counterfeit.")
    thresholds: ThresholdsOut
    modality: Modality
    model: ModelRef
    model_aliases: list[str] = Field(
        default_factory=list,
        description="The aliases naming the version that answered (`production`: the one promoted).",
    )
    image_sha256: str
    request_id: str = Field(description="Quote it in feedback; it keys the audit record.")
    latency_ms: float
    station_id: str | None = None
    case_id: str | None = None
    heatmap_png: str | None = Field(None, description="Base64 PNG: the evidence overlaid on the image.")
    view_png: str | None = Field(
        None,
        description="Base64 8-bit PNG of the image as the model saw it (16-bit and DICOM X-ray windowed; "
        "a tiled scan downscaled), the heatmap's size, for a client to lay the heatmap over.",
    )
    tiles: int | None = Field(None, description="Tiles scored when a large X-ray scan was tiled (else null).")
    dual_energy_used: Literal["high", "high and low"] | None = Field(
        None,
        description="For a dual-energy pair (a two-page TIFF, a two-frame DICOM/DICOS, or `high` and `low` "
        "files): the images the model scored. A single-energy model scores the high-energy image only. "
        "Null for a single image.",
    )
    recognised: bool | None = Field(
        None,
        description="False when the image is unlike anything the model was trained on (its novelty is "
        "beyond the model's gate): the verdict is then uncertain with reason not_recognised. Null for a "
        "model without a novelty gate.",
    )
    novelty: float | None = Field(
        None, description="Cosine distance (0-2) from the image to its nearest training images."
    )
    reasons: list[Reason] = Field(
        default_factory=list,
        description="Why the verdict: the checks that alarmed (classifier, reference_mismatch) for a "
        "counterfeit; not_recognised followed by its cause (unlike_training; smaller_than_training: send "
        "the whole scan or a closer photo; other_modality: a colour photo sent as X-ray or an X-ray sent as "
        "photo; other_colour_scheme: another scanner's colours than the model's training), or "
        "classifier_uncertain, for an uncertain; none for a genuine.",
    )
    product: str | None = Field(None, description="The product the request named, if any.")
    reference: ReferenceOut | None = Field(
        None, description="The check against the named product's genuine references."
    )


class BatchItem(BaseModel):
    index: int
    filename: str | None = None
    result: PredictionResult | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    request_id: str
    latency_ms: float
    results: list[BatchItem] = Field(
        description="One entry per file, in upload order; a bad file fails alone."
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    modality: Modality
    default: bool
    aliases: list[str] = Field(
        default_factory=list,
        description="The aliases naming this version (`production` is what the modality serves once a "
        "model of it was promoted with `verity promote`).",
    )
    weak: bool = Field(
        False,
        description="Marked weak by the weak-run guard (kept with --allow-weak): never a default unless "
        "pinned with VERITY_PINNED_MODELS.",
    )
    backbone: str | None = None
    created: str | None = None
    thresholds: ThresholdsOut
    input_shape: list[int]
    metrics: dict = Field(default_factory=dict)
    data_fingerprint: str | None = Field(None, description="sha256 of the training rows (the card's data)")
    lineage: dict | None = Field(
        None,
        description="Where the weights started: `init_from` (name, version, data_fingerprint, file) for a "
        "model fine-tuned from another with `verity train --init-from`; null from ImageNet or scratch.",
    )
    precision: str = Field("fp32", description="the served file variant: fp32, int8 or fp16")
    provider: str | None = Field(None, description="the onnxruntime execution provider running it")


class Caller(BaseModel):
    station_id: str | None = Field(description="The station or right holder the key names; else null.")
    role: Literal["station", "admin", "anonymous", "rightholder"]
    products: list[str] = Field(default_factory=list, description="A right holder's products; else empty.")


class ModelsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "defaults": {"photo": "photo-default/2026.11.29"},
                "models": [
                    {
                        "name": "photo-default",
                        "version": "2026.11.29",
                        "modality": "photo",
                        "default": True,
                        "backbone": "efficientnet_lite0",
                        "created": "2026-11-29T01:00:00+00:00",
                        "thresholds": {"alarm": 0.71, "clear": 0.12},
                        "input_shape": [3, 224, 224],
                        "metrics": {},
                    }
                ],
            }
        }
    )
    models: list[ModelInfo]
    defaults: dict[str, str] = Field(description="modality -> name/version that /v1/predict uses.")
    caller: Caller = Field(description="Who asked: the console shows the admin panel to an admin key.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    defaults: dict[str, str] = Field(default_factory=dict)
    models_dir: str = Field(description="The folder models are loaded from (VERITY_MODELS_DIR).")
    message: str = Field(description="What is served, or why a modality has no model.")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "request_id": "5f0c6a2e9b3d4c1e8a7f6b5c4d3e2f10",
                "confirmed_label": "counterfeit",
                "case_id": "SEZ-2026-0412",
                "notes": "Hologram missing; seized.",
            }
        },
    )
    request_id: str = Field(min_length=1, max_length=REQUEST_ID_MAX)
    confirmed_label: FeedbackLabel = Field(
        description="genuine or counterfeit; unsure (cannot tell) is recorded but never training data."
    )
    case_id: str | None = Field(None, max_length=CASE_ID_MAX)
    notes: str | None = Field(None, max_length=NOTES_MAX)


class FeedbackOut(BaseModel):
    request_id: str
    confirmed_label: FeedbackLabel
    recorded: bool = True
    image_kept: bool = Field(
        description="Whether the verdict's image is stored, so that the confirmed case can train a model "
        "(`verity audit confirmed`); the server keeps images only with VERITY_STORE_IMAGES=1."
    )
    note: str | None = Field(None, description="What the operator must know, e.g. why the image is not kept.")
    alerts: int = Field(
        0,
        description="Signed seizure alerts this confirmation raised (to the product's right holders and "
        "the agency), committed with it and sent in the background. Confirming a seizure again raises "
        "the same alerts (the same ids), which are queued and sent once.",
    )


class HistoryFeedback(BaseModel):
    """The confirmation that labels a verdict, resolved by api.feedback's rule (admin over station,
    latest among equals; unauthorised rows ignored)."""

    confirmed_label: FeedbackLabel
    created: str
    notes: str | None = None
    station_id: str | None = Field(None, description="The sender's station (its key's), not the verdict's.")
    role: str | None = Field(None, description="station, admin or anonymous; null on old rows.")


class HistoryItem(BaseModel):
    request_id: str
    created: str = Field(description="ISO 8601 UTC: when the verdict was written to the audit log.")
    station_id: str | None = None
    case_id: str | None = None
    product: str | None = None
    modality: Modality
    verdict: Verdict
    score: float
    thresholds: ThresholdsOut
    recognised: bool | None = None
    novelty: float | None = None
    reasons: list[Reason] = Field(default_factory=list)
    model: ModelRef
    reference_status: ReferenceStatus | None = None
    reference_distance: float | None = None
    reference_threshold: float | None = None
    image_sha256: str
    api: Literal["v1", "v2"]
    caller_role: str | None = Field(
        None,
        description="Who received the verdict: a station key, an admin key, or a caller without a key "
        "(whose station_id is only a claim); null on rows from before receivers were recorded.",
    )
    key_id: str | None = Field(None, description="The id of the key that received it (never the secret).")
    report_uid: str | None = Field(
        None, description="The SOP Instance UID of the DICOS threat report it was answered with, if any."
    )
    feedback: HistoryFeedback | None = Field(None, description="The resolved confirmation, if any.")


class HistoryPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "items": [
                    {
                        "request_id": "5f0c6a2e9b3d4c1e8a7f6b5c4d3e2f10",
                        "created": "2026-12-02T04:46:36.123456+00:00",
                        "station_id": "gate-3",
                        "case_id": "SEZ-2026-0412",
                        "product": None,
                        "modality": "photo",
                        "verdict": "counterfeit",
                        "score": 0.93,
                        "thresholds": {"alarm": 0.71, "clear": 0.12},
                        "recognised": True,
                        "novelty": 0.12,
                        "reasons": ["classifier"],
                        "model": {"name": "photo-default", "version": "2026.11.29"},
                        "reference_status": None,
                        "reference_distance": None,
                        "reference_threshold": None,
                        "image_sha256": EXAMPLE_SHA,
                        "api": "v1",
                        "caller_role": "station",
                        "key_id": "3f9a2c71",
                        "feedback": {
                            "confirmed_label": "counterfeit",
                            "created": "2026-12-02T04:50:01.000000+00:00",
                            "notes": "Hologram missing; seized.",
                            "station_id": "gate-3",
                            "role": "station",
                        },
                    }
                ],
                "next": "eyJjIjoiMjAyNi0xMi0wMlQwNDo0NjozNi4xMjM0NTYrMDA6MDAiLCJyIjoiNWYwYyJ9",
                "limit": 20,
            }
        }
    )
    items: list[HistoryItem] = Field(description="Newest first.")
    next: str | None = Field(
        description="Pass as `before` for the next (older) page; null on the last page."
    )
    limit: int


class ReloadFailure(BaseModel):
    path: str
    error: str


class ReloadResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "ok": False,
                "loaded": ["photo-default/2026.12.01"],
                "kept": ["xray-default/2026.11.29"],
                "unloaded": [],
                "defaults": {"photo": "photo-default/2026.12.01", "xray": "xray-default/2026.11.29"},
                "failed": [
                    {
                        "path": "checkpoints/photo-default/2026.12.02/model.onnx",
                        "error": "not a loadable model",
                    }
                ],
            }
        }
    )
    ok: bool = Field(description="False when a file failed to load; what served before keeps serving.")
    loaded: list[str]
    kept: list[str]
    unloaded: list[str]
    failed: list[ReloadFailure]
    defaults: dict[str, str]
    passed_over: list[str] = Field(
        default_factory=list,
        description="Loaded models marked weak in their card, not made a default (pin one to serve it).",
    )
