"""The prediction path shared by /v1 and /v2: decode off the event loop, batch, score, audit, answer.

Decoding runs in the threadpool so it overlaps with inference on the other core; the audit record is
written before any verdict leaves the server, and a failed write turns the answer into a 503.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditError, AuditRecord, AuditStore, ImageStore, utc_now
from verity.api.deps import (
    AuditDep,
    ImageStoreDep,
    MetricsDep,
    Principal,
    PrincipalDep,
    ReferencesDep,
    RegistryDep,
    SettingsDep,
)
from verity.api.errors import ApiError, decode_error_to_api, service_unavailable
from verity.api.limits import ANONYMOUS_KEY, KeyLimits
from verity.api.metrics import Metrics
from verity.api.registry import ModelRegistry, ServedModel
from verity.api.settings import Settings
from verity.inference.batcher import QueueFullError
from verity.inference.decode import DecodeError, DecodeLimits, sniff_format
from verity.inference.engine import Prediction, envelope_judged
from verity.inference.heatmap import heatmap_over, png_bytes, scan_view_rgb, view_rgb
from verity.inference.open_set import open_set_verdict
from verity.inference.references import (
    ReferenceCheck,
    ReferenceStore,
    ReferenceStoreError,
    UnknownProduct,
    validate_product,
)
from verity.inference.spec import PreprocessSpec
from verity.inference.tiling import ScanResult, TilingOptions, TooManyTiles, load_for_scoring, score_scan
from verity.inference.vocabulary import NonFiniteScore

log = logging.getLogger("verity.api")


@dataclass(frozen=True)
class PreparedImage:
    model_input: np.ndarray | None  # CxSxS float32 in [0, 1]; None for a scan that will be tiled
    sha256: str
    kind: str  # container format, by content
    decoded: np.ndarray | None = None  # native-resolution pixels, kept only for tiling
    shorter_side: int | None = None  # of the decoded image: the training envelope's check


def station_for(key_station: str | None, named_station: str | None) -> str | None:
    """The station a verdict is recorded for, by one rule on every route: a keyed station speaks for
    itself only (naming another is 403); an unkeyed caller may name its station."""
    if key_station and named_station and named_station != key_station:
        raise ApiError(
            403, "forbidden", f"This key belongs to station {key_station!r}, not {named_station!r}."
        )
    return key_station or named_station


def unscorable(served: ServedModel, error: NonFiniteScore) -> ApiError:
    """A score that is not a number never becomes a verdict or an audit row: the caller gets a 422 (the
    audit log is not at fault, so no audit failure is counted), the model's name goes to the log."""
    log.error(
        "non-finite score refused",
        extra={"model": served.engine.name, "version": served.engine.version, "score": str(error.score)},
    )
    return ApiError(
        422,
        "unscorable_input",
        "The model gave no finite score for this input, so no verdict was given or recorded.",
    )


def prepare_image(
    data: bytes, spec: PreprocessSpec, limits: DecodeLimits, tiling: TilingOptions
) -> PreparedImage:
    """Blocking: hashes, sniffs and decodes one upload as the one tiling rule wants it: the model's
    input (the evaluation path), or the full-resolution pixels of a scan to tile."""
    kind = sniff_format(data)
    loaded = load_for_scoring(data, spec, tiling, limits)
    return PreparedImage(
        loaded.model_input, hashlib.sha256(data).hexdigest(), kind, loaded.pixels, loaded.shorter_side
    )


def _view(scored: Scored) -> np.ndarray | None:
    """The image as the model saw it, as HxWx3 uint8 (see inference.heatmap.view_rgb): the model input,
    or the decoded scan at the tile evidence's size. X-ray is display-windowed, so a dim 16-bit scan is
    not shown black."""
    spec = scored.model.engine.spec
    if scored.scan is not None and scored.prepared.decoded is not None:
        height, width = scored.scan.evidence.shape
        return scan_view_rgb(scored.prepared.decoded, spec, height, width)
    if scored.prepared.model_input is None:
        return None
    return view_rgb(scored.prepared.model_input, spec)


def render_images(scored: Scored, heatmap: bool, view: bool) -> tuple[str | None, str | None]:
    """Base64 PNGs of the heatmap (the class activation map over the view) and of the view itself,
    each when asked for; both have the view's pixel size, so a client can lay one over the other."""
    if not (heatmap or view):
        return None, None
    shown = _view(scored)
    if shown is None:
        return None, None
    evidence = scored.scan.evidence if scored.scan is not None else scored.prediction.cam
    heatmap_b64 = None
    if heatmap and evidence is not None:
        heatmap_b64 = base64.b64encode(heatmap_over(evidence, shown)).decode("ascii")
    view_b64 = base64.b64encode(png_bytes(shown)).decode("ascii") if view else None
    return heatmap_b64, view_b64


def render_heatmap(scored: Scored) -> str | None:
    """Base64 PNG of the class activation map over the model's view (or the whole scan, when tiled)."""
    return render_images(scored, heatmap=True, view=False)[0]


@dataclass(frozen=True)
class Scored:
    prepared: PreparedImage
    prediction: Prediction
    model: ServedModel
    scan: ScanResult | None = None  # set when a large scan was scored in tiles
    reference: ReferenceCheck | None = None  # set when the request named its product

    @property
    def tiles(self) -> int | None:
        return len(self.scan.tiles) if self.scan is not None else None


class PredictionService:
    """Everything a prediction route needs, bundled per request from the app's state."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        audit: AuditStore,
        image_store: ImageStore | None,
        metrics: Metrics,
        limits: KeyLimits,
        caller: str,
        references: ReferenceStore,
    ) -> None:
        self.references = references
        self.limits = limits
        self.caller = caller  # the key whose decode share this request's decodes use
        self.settings = settings
        self.registry = registry
        self.audit = audit
        self.image_store = image_store
        self.metrics = metrics

    def model_for(self, modality: str) -> ServedModel:
        served = self.registry.default_for(modality)
        if served is not None:
            return served
        reason = "no_model" if self.registry.load_finished else "not_ready"
        self.metrics.rejected.labels(reason).inc()
        message = self.registry.unavailable_message([modality])
        raise service_unavailable(reason, message, self.settings.retry_after_s)

    def check_items(self, count: int) -> None:
        """The one items cap of every route (files of a /v1 batch, images or tensors of a /v2 input),
        checked on the count a request declares, before any of its items is decoded."""
        limit = self.settings.max_batch_files
        if count > limit:
            raise ApiError(422, "too_many_files", f"{count:,} items sent; at most {limit} per request.")

    async def prepare(self, data: bytes, served: ServedModel) -> PreparedImage:
        try:
            async with self.limits.decode_slot(self.caller):  # may wait its turn, or refuse with 429
                return await run_in_threadpool(
                    prepare_image,
                    data,
                    served.engine.spec,
                    self.settings.decode_limits,
                    self.settings.tiling_options,
                )
        except DecodeError as error:
            raise decode_error_to_api(error) from error

    async def score_tiles(self, served: ServedModel, prepared: PreparedImage) -> Scored:
        """A large scan: tiles scored in their own batches on the threadpool, the highest tile decides."""
        assert prepared.decoded is not None
        try:
            scan = await run_in_threadpool(
                partial(
                    score_scan,
                    prepared.decoded,
                    served.engine,
                    self.settings.tiling_options,
                    batch_size=self.settings.batch_max_size,
                    workers=self.settings.batch_workers,
                )
            )
        except TooManyTiles as error:
            raise ApiError(413, "too_many_tiles", str(error)) from error
        except DecodeError as error:
            raise decode_error_to_api(error) from error
        except NonFiniteScore as error:
            raise unscorable(served, error) from error
        return Scored(prepared, scan.prediction, served, scan)

    async def infer(self, served: ServedModel, model_input: np.ndarray) -> Prediction:
        """Queues one input on the model's batcher; a full queue is an explicit 503 with Retry-After."""
        started = time.perf_counter()
        try:
            prediction = await served.predict(model_input)
        except QueueFullError as error:
            self.metrics.rejected.labels("queue_full").inc()
            raise service_unavailable(
                "queue_full", "The server is at capacity; retry shortly.", self.settings.retry_after_s
            ) from error
        except NonFiniteScore as error:
            raise unscorable(served, error) from error
        self.metrics.inference_latency.observe(time.perf_counter() - started)
        return prediction

    async def score(self, data: bytes, served: ServedModel, product: str | None = None) -> Scored:
        return await self.score_prepared(served, await self.prepare(data, served), product)

    async def score_prepared(
        self, served: ServedModel, prepared: PreparedImage, product: str | None = None
    ) -> Scored:
        if prepared.model_input is None:
            scored = await self.score_tiles(served, prepared)
        else:
            prediction = await self.infer(served, prepared.model_input)
            gate = served.engine.novelty_gate
            scored = Scored(prepared, envelope_judged(prediction, prepared.shorter_side, gate), served)
        return await self.check_product(scored, product)

    def require_product(self, served: ServedModel, product: str | None) -> None:
        """A named product must have genuine references for the model: 404 naming the known ones,
        checked before anything is decoded."""
        if product is None:
            return
        from verity.api.routes_references import store_error

        try:
            validate_product(product)
            if self.references.ready(served.engine, product):  # enrolled, and its index is current
                return
            known = self.references.products(served.engine.name)
            if not known.get(product):
                enrolled = sorted(name for name, count in known.items() if count)
                raise UnknownProduct(product, enrolled, served.engine.name)
        except ReferenceStoreError as error:
            raise store_error(error) from error

    async def check_product(self, scored: Scored, product: str | None) -> Scored:
        """The product's reference check, and the verdict by the open-set rule with it."""
        if product is None:
            return scored
        from verity.api.routes_references import store_error, store_unavailable

        prediction, engine = scored.prediction, scored.model.engine
        if prediction.embedding is None:
            raise ApiError(
                422, "no_embedding",
                f"{engine.name} {engine.version} has no embedding output, so it cannot check a product.",
            )
        arguments = (engine, product, prediction.embedding, prediction.patches)
        try:
            # Under a millisecond of matrix products when the product's index is current: cheaper here
            # than a threadpool round trip. The first check after a change embeds and calibrates
            # (seconds), off the loop.
            check = self.references.check_if_ready(*arguments)
            if check is None:
                check = await run_in_threadpool(self.references.check, *arguments)
        except ReferenceStoreError as error:
            raise store_error(error) from error
        except OSError as error:
            raise store_unavailable(error) from error
        classifier = prediction.classifier_verdict or prediction.verdict
        verdict, reasons = open_set_verdict(classifier, prediction.recognised, check.status)
        judged = replace(prediction, verdict=verdict, reasons=reasons)
        return replace(scored, prediction=judged, reference=check)

    async def store_image(self, data: bytes, prepared: PreparedImage) -> str | None:
        if self.image_store is None:
            return None
        try:
            return await run_in_threadpool(self.image_store.put, data, prepared.sha256, prepared.kind)
        except OSError as error:
            # The image is a convenience for retraining; the audit row is what must not be lost.
            log.warning("image store write failed", extra={"error": str(error)})
            return None

    def record(
        self,
        request_id: str,
        scored: Scored,
        *,
        station_id: str | None,
        case_id: str | None,
        latency_ms: float,
        image_path: str | None,
        api: str = "v1",
        sha256: str | None = None,
        key_id: str | None = None,
        caller_role: str | None = None,
    ) -> AuditRecord:
        engine, prediction, reference = scored.model.engine, scored.prediction, scored.reference
        return AuditRecord(
            request_id=request_id,
            created=utc_now(),
            station_id=station_id,
            case_id=case_id,
            image_sha256=sha256 or scored.prepared.sha256,
            modality=scored.model.modality,
            model_name=engine.name,
            model_version=engine.version,
            score=scored.prediction.score,
            verdict=scored.prediction.verdict,
            alarm_threshold=engine.thresholds.alarm,
            clear_threshold=engine.thresholds.clear,
            latency_ms=round(latency_ms, 3),
            image_path=image_path,
            api=api,
            recognised=prediction.recognised,
            novelty=prediction.novelty,
            reasons=",".join(prediction.reasons),
            product=reference.product if reference else None,
            reference_status=reference.status if reference else None,
            reference_distance=reference.distance if reference else None,
            reference_threshold=reference.threshold if reference else None,
            reference_count=reference.references if reference else None,
            key_id=key_id,
            caller_role=caller_role,
        )

    async def answer(
        self,
        items: Sequence[tuple[str, Scored, bytes | None]],
        *,
        station_id: str | None,
        case_id: str | None,
        started: float,
        receiver: Principal,
        api: str = "v1",
    ) -> list[AuditRecord]:
        """The one path from scored images to an answer, for every prediction route: each image is
        stored (when it came as a file), recorded with who received it (`receiver`), and the records
        written to the audit log before any verdict leaves the server. `items` are (request id, scored
        image, uploaded bytes or None)."""
        records = []
        for request_id, scored, data in items:
            image_path = await self.store_image(data, scored.prepared) if data is not None else None
            records.append(
                self.record(
                    request_id,
                    scored,
                    station_id=station_id,
                    case_id=case_id,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    image_path=image_path,
                    api=api,
                    key_id=receiver.key_id,
                    caller_role=receiver.role,
                )
            )
        await self.write_audit(records)
        return records

    async def write_audit(self, records: list[AuditRecord]) -> None:
        """Writes before the answer; no record, no verdict."""
        if not records:
            return
        try:
            await run_in_threadpool(self.audit.record, records)
        except AuditError as error:
            self.metrics.audit_failures.inc()
            log.error("audit write failed", extra={"error": str(error)})
            raise service_unavailable(
                "audit_unavailable",
                "The audit log cannot be written, so no verdict can be given; retry shortly.",
                self.settings.retry_after_s,
            ) from error
        for record in records:
            self.metrics.predictions.labels(record.modality, record.verdict, record.model_version).inc()

    def result(
        self,
        record: AuditRecord,
        heatmap_png: str | None = None,
        tiles: int | None = None,
        view_png: str | None = None,
    ) -> dict[str, Any]:
        """The /v1 result body, built from the audit record so the answer is exactly what was logged."""
        return {
            "verdict": record.verdict,
            "score": record.score,
            "thresholds": {"alarm": record.alarm_threshold, "clear": record.clear_threshold},
            "modality": record.modality,
            "model": {"name": record.model_name, "version": record.model_version},
            "image_sha256": record.image_sha256,
            "request_id": record.request_id,
            "latency_ms": record.latency_ms,
            "station_id": record.station_id,
            "case_id": record.case_id,
            "heatmap_png": heatmap_png,
            "view_png": view_png,
            "tiles": tiles,
            "recognised": record.recognised,
            "novelty": record.novelty,
            "reasons": record.reasons.split(",") if record.reasons else [],
            "product": record.product,
            "reference": reference_result(record),
        }


def reference_result(record: AuditRecord) -> dict[str, Any] | None:
    """The product check of an answer, as its audit record holds it (None when no product was named)."""
    if record.product is None:
        return None
    from verity.inference.references import MIN_REFERENCES

    return {
        "product": record.product,
        "status": record.reference_status,
        "distance": record.reference_distance,
        "threshold": record.reference_threshold,
        "references": record.reference_count,
        "min_references": MIN_REFERENCES,
    }


async def get_service(
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    audit: AuditDep,
    image_store: ImageStoreDep,
    metrics: MetricsDep,
    principal: PrincipalDep,
    references: ReferencesDep,
) -> PredictionService:
    """The service for one prediction request, which is charged to its caller's rate here (429 when spent)."""
    limits: KeyLimits = request.app.state.limits
    caller = principal.key_id or ANONYMOUS_KEY
    limits.admit(caller)
    return PredictionService(settings, registry, audit, image_store, metrics, limits, caller, references)


ServiceDep = Annotated[PredictionService, Depends(get_service)]
