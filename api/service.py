"""The prediction path shared by /v1 and /v2: decode off the event loop, score through the pipeline
(`inference.pipeline`, whole images on the model's micro-batcher), audit, answer.

Decoding runs in the threadpool so it overlaps with inference on the other core; the audit record is
written before any verdict leaves the server, and a failed write turns the answer into a 503. The /v1
body and the audit row are both written from the pipeline's one result (`Scored`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from anyio import from_thread
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from verity.api.alert_delivery import Outbox
from verity.api.audit import AuditError, AuditRecord, AuditStore
from verity.api.auth import ANONYMOUS
from verity.api.deps import (
    Principal,
    PrincipalDep,
    get_outbox,
)
from verity.api.errors import (
    ApiError,
    decode_error_to_api,
    reference_error_to_api,
    reference_store_unavailable,
    service_unavailable,
    truncated,
)
from verity.api.image_store import ImageStore
from verity.api.limits import KeyLimits
from verity.api.metrics import Metrics
from verity.api.registry import ModelRegistry, ServedModel
from verity.api.result_images import NO_IMAGES, Images
from verity.api.settings import Settings
from verity.api.shadow import ShadowScorer
from verity.inference import pipeline
from verity.inference.batcher import QueueFullError
from verity.inference.decode_limits import DecodeError
from verity.inference.dual_energy import energy_used, pair_tiff
from verity.inference.engine import Prediction
from verity.inference.pipeline import ProductCheck, Scored, ScoringOptions, Upload, prepare, wants_profile
from verity.inference.references.check import ReferenceCheck
from verity.inference.references.errors import ReferenceStoreError, UnknownProduct
from verity.inference.references.names import validate_product
from verity.inference.references.store import ReferenceStore
from verity.inference.stamps import utc_now
from verity.inference.tiling import TooManyTiles
from verity.inference.vocabulary import NonFiniteScore

log = logging.getLogger("verity.api")


def station_for(key_station: str | None, named_station: str | None) -> str | None:
    """The station a verdict is recorded for, by one rule on every route: a keyed station speaks for
    itself only (naming another is 403); an unkeyed caller may name its station."""
    if key_station and named_station and named_station != key_station:
        raise ApiError(
            403, "forbidden", f"This key belongs to station {key_station!r}, not {named_station!r}."
        )
    return key_station or named_station


# The blocking decode of one upload, looked up here at each call (tests stand a slow decoder in for it).
prepare_image = prepare


def unscorable(served: ServedModel, error: NonFiniteScore) -> ApiError:
    """A score that is not a number never becomes a verdict or an audit row: the caller gets a 422 (the
    audit log is not at fault, so no audit failure is counted), the model's name goes to the log."""
    log.error(
        "non-finite score refused",
        extra={"model": served.engine.name, "version": served.engine.version, "score": str(error.score)},
    )
    message = "The model gave no finite score for this input, so no verdict was given or recorded."
    return ApiError(422, "unscorable_input", message)


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
        shadow: ShadowScorer | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.outbox = outbox  # alarms to the endpoints that asked for every one (api/alerts.py)
        self.shadow = shadow  # a candidate model scoring the answered images into the audit (api/shadow.py)
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

    def model_named(self, reference: str, modality: str | None) -> ServedModel:
        """The model a client names (`ModelRegistry.resolve`: name, name/version, name@alias or a
        modality): 404 naming what is loaded when none matches, 422 when it is of another modality."""
        served = self.registry.resolve(reference)
        if served is None:
            loaded = sorted({f"{k[0]}/{k[1]}" for k in self.registry.snapshot.models}) or ["none"]
            message = (f"No loaded model answers to {truncated(reference)!r}. Loaded: {', '.join(loaded)}; "
                       "name one as name, name/version or name@alias.")  # fmt: skip
            raise ApiError(404, "unknown_model", message)
        if modality is not None and served.modality != modality:
            raise ApiError(422, "invalid_fields", f"{truncated(reference)!r} is a {served.modality} model, "
                           f"not {modality}.")  # fmt: skip
        return served

    def check_items(self, count: int) -> None:
        """The one items cap of every route (files of a /v1 batch, images or tensors of a /v2 input),
        checked on the count a request declares, before any of its items is decoded."""
        limit = self.settings.max_batch_files
        if count > limit:
            raise ApiError(422, "too_many_files", f"{count:,} items sent; at most {limit} per request.")

    async def prepare(self, data: bytes, served: ServedModel) -> Upload:
        try:
            async with self.limits.decode_slot(self.caller):  # may wait its turn, or refuse with 429
                return await run_in_threadpool(
                    prepare_image,
                    data,
                    served.engine.spec,
                    self.settings.tiling_options,
                    self.settings.decode_limits,
                    wants_profile(served.engine),
                )
        except DecodeError as error:
            raise decode_error_to_api(error) from error

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
        self.metrics.inference_latency.observe(time.perf_counter() - started)
        return prediction

    async def score(self, data: bytes, served: ServedModel, product: str | None = None) -> Scored:
        return await self.score_prepared(served, await self.prepare(data, served), product)

    async def score_prepared(self, served: ServedModel, upload: Upload, product: str | None = None) -> Scored:
        """The scoring pipeline on one decoded upload, off the event loop: a whole image is predicted
        by the model's micro-batcher (back on the loop), a scan's tiles in their own batches."""

        def predict(model_input: np.ndarray) -> Prediction:
            return from_thread.run(self.infer, served, model_input)

        options = ScoringOptions(
            self.settings.tiling_options, self.settings.batch_max_size, self.settings.batch_workers
        )
        check = self.product_check(served, product)
        try:
            return await run_in_threadpool(pipeline.score, upload, served.engine, predict, options, check)
        except TooManyTiles as error:
            raise ApiError(413, "too_many_tiles", str(error)) from error
        except NonFiniteScore as error:
            raise unscorable(served, error) from error
        except ReferenceStoreError as error:
            raise reference_error_to_api(error) from error
        except DecodeError as error:
            raise decode_error_to_api(error) from error
        except OSError as error:
            raise reference_store_unavailable(error) from error

    def product_check(self, served: ServedModel, product: str | None) -> ProductCheck | None:
        """The named product's reference check (None without one). The first check after a change to
        the product's references embeds and calibrates them (seconds); later ones are matrix products."""
        if product is None:
            return None
        store, engine = self.references, served.engine

        def check(output: Prediction) -> ReferenceCheck:
            assert output.embedding is not None  # the pipeline asks only for an output with one
            return store.check(engine, product, output.embedding, output.patches, output.patch_grid)

        return check

    def require_product(self, served: ServedModel, product: str | None) -> None:
        """A named product must have genuine references for the model: 404 naming the known ones,
        checked before anything is decoded."""
        if product is None:
            return
        try:
            validate_product(product)
            if self.references.ready(served.engine, product):  # enrolled, and its index is current
                return
            known = self.references.products(served.engine.name)
            if not known.get(product):
                enrolled = sorted(name for name, count in known.items() if count)
                raise UnknownProduct(product, enrolled, served.engine.name)
        except ReferenceStoreError as error:
            raise reference_error_to_api(error) from error

    async def store_image(self, data: bytes, upload: Upload) -> str | None:
        if self.image_store is None:
            return None
        try:
            return await run_in_threadpool(self.image_store.put, data, upload.sha256, upload.kind)
        except OSError as error:
            # The image is a convenience for retraining; the audit row is what must not be lost.
            log.warning("image store write failed", extra={"error": str(error)})
            return None

    def record(
        self,
        request_id: str,
        scored: Scored,
        *,
        modality: str,
        station_id: str | None,
        case_id: str | None,
        latency_ms: float,
        image_path: str | None,
        api: str = "v1",
        key_id: str | None = None,
        caller_role: str | None = None,
        report_uid: str | None = None,
    ) -> AuditRecord:
        """The audit row of one result: its serialisation for the audit log."""
        reference = scored.reference
        return AuditRecord(
            request_id=request_id,
            created=utc_now(),
            station_id=station_id,
            case_id=case_id,
            image_sha256=scored.upload.sha256,
            modality=modality,
            model_name=scored.model,
            model_version=scored.version,
            score=scored.score,
            verdict=scored.verdict,
            alarm_threshold=scored.thresholds.alarm,
            clear_threshold=scored.thresholds.clear,
            latency_ms=round(latency_ms, 3),
            image_path=image_path,
            api=api,
            recognised=scored.recognised,
            novelty=scored.novelty,
            reasons=",".join(scored.reasons),
            product=reference.product if reference else None,
            reference_status=reference.status if reference else None,
            reference_distance=reference.distance if reference else None,
            reference_threshold=reference.threshold if reference else None,
            reference_count=reference.references if reference else None,
            key_id=key_id,
            caller_role=caller_role,
            report_uid=report_uid,
        )

    async def answer(
        self,
        items: Sequence[tuple[str, Scored, bytes | None]],
        *,
        modality: str,
        station_id: str | None,
        case_id: str | None,
        started: float,
        receiver: Principal,
        api: str = "v1",
        report_uids: Mapping[str, str] | None = None,
    ) -> list[AuditRecord]:
        """The one path from scored images to an answer, for every prediction route: each image is
        stored (when it came as a file), recorded with who received it (`receiver`), and the records
        written to the audit log before any verdict leaves the server. `items` are (request id, scored
        image, uploaded bytes or None); `modality` is that of the model that scored them; `report_uids` the
        DICOS report UID of each request answered with one."""
        records = []
        for request_id, scored, data in items:
            image_path = await self.store_image(data, scored.upload) if data is not None else None
            records.append(
                self.record(
                    request_id,
                    scored,
                    modality=modality,
                    station_id=station_id,
                    case_id=case_id,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    image_path=image_path,
                    api=api,
                    key_id=receiver.key_id,
                    caller_role=receiver.role,
                    report_uid=(report_uids or {}).get(request_id),
                )
            )
        await self.write_audit(records)
        for record, (_, scored, data) in zip(records, items, strict=True):
            self.observe_drift(record.station_id, modality, scored)
            if self.shadow is not None and data is not None:
                self.shadow.offer(record.request_id, modality, data)  # after the verdict is recorded
        return records

    def observe_drift(self, station_id: str | None, modality: str, scored: Scored) -> None:
        """Holds an answered verdict against its model's validation distribution (api/drift_monitor.py),
        when the model's card has one."""
        served = self.registry.find(scored.model, scored.version)
        reference = ((served.engine.card.novelty or {}).get("drift")) if served is not None else None
        if reference is None:
            return
        profile = scored.upload.decoded.profile
        self.metrics.drift.observe(station_id, modality, (scored.model, scored.version), reference,
                                   scored.score, profile, scored.recognised)  # fmt: skip

    async def write_audit(self, records: list[AuditRecord]) -> None:
        """Writes before the answer; no record, no verdict."""
        if not records:
            return
        alerts = self.outbox.planner.for_verdicts(records) if self.outbox is not None else []
        try:
            await run_in_threadpool(self.audit.record, records, alerts)
        except AuditError as error:
            self.metrics.audit_failures.inc()
            log.error("audit write failed", extra={"error": str(error)})
            raise service_unavailable(
                "audit_unavailable",
                "The audit log cannot be written, so no verdict can be given; retry shortly.",
                self.settings.retry_after_s,
            ) from error
        if self.outbox is not None:
            self.outbox.written(alerts)
        for record in records:
            self.metrics.predictions.labels(record.modality, record.verdict, record.model_version).inc()

    def result(
        self,
        record: AuditRecord,
        scored: Scored,
        images: Images = NO_IMAGES,
    ) -> dict[str, Any]:
        """The /v1 result body: the result's serialisation, with the request's own fields (request id,
        station, case, latency) as its audit record holds them."""
        return {
            "verdict": scored.verdict,
            "score": scored.score,
            "thresholds": {"alarm": scored.thresholds.alarm, "clear": scored.thresholds.clear},
            "modality": record.modality,
            "model": {"name": scored.model, "version": scored.version},
            "model_aliases": sorted(self.registry.snapshot.aliases.get((scored.model, scored.version), [])),
            "image_sha256": scored.upload.sha256,
            "request_id": record.request_id,
            "latency_ms": record.latency_ms,
            "station_id": record.station_id,
            "case_id": record.case_id,
            "heatmap_png": images.heatmap_png,
            "view_png": images.view_png,
            "tiles": len(scored.scan.tiles) if scored.scan is not None else None,
            "recognised": scored.recognised,
            "novelty": scored.novelty,
            "reasons": list(scored.reasons),
            "product": scored.reference.product if scored.reference is not None else None,
            "reference": reference_result(scored.reference, images.difference),
            "dual_energy_used": self._energy_used(scored),
        }

    def _energy_used(self, scored: Scored) -> str | None:
        served = self.registry.find(scored.model, scored.version)
        in_chans = served.engine.spec.in_chans if served is not None else 0
        return energy_used(scored.upload.decoded.dual_energy, in_chans)

    async def combine_pair(self, high: bytes, low: bytes) -> bytes:
        """A high and a low energy upload as the two-page TIFF they make (inference.dual_energy), decoded
        in a decode slot like any upload; a bad pair is the decoder's 4xx."""
        try:
            async with self.limits.decode_slot(self.caller):
                return await run_in_threadpool(pair_tiff, high, low, self.settings.decode_limits)
        except DecodeError as error:
            raise decode_error_to_api(error) from error


def reference_result(
    check: ReferenceCheck | None, difference: tuple[str, float] | None = None
) -> dict[str, Any] | None:
    """The product check of an answer (None when no product was named): its figures, the closest genuine
    references, and the difference overlay (base64 PNG) with its largest value when it was drawn."""
    if check is None:
        return None
    png, largest = difference if difference is not None else (None, None)
    return {
        "product": check.product,
        "status": check.status,
        "distance": check.distance,
        "threshold": check.threshold,
        "references": check.references,
        "min_references": check.min_references,
        "closest": [{"reference_id": near.reference_id, "distance": near.distance} for near in check.closest],
        "difference_png": png,
        "difference_max": largest,
    }


async def get_service(request: Request, principal: PrincipalDep) -> PredictionService:
    """The service for one prediction request, which is charged to its caller's rate here (429 when spent).
    It reads the app's parts from app.state itself rather than through a dependency each: FastAPI solves
    every sub-dependency on every request, and those eight took about 0.07 ms of the event loop's time
    (solve_dependencies 0.46-0.55 -> 0.41-0.43 ms per /v1/predict, in process)."""
    state = request.app.state
    limits: KeyLimits = state.limits
    caller = principal.key_id or ANONYMOUS
    await limits.admit(caller)
    return PredictionService(
        state.settings, state.registry, state.audit, state.image_store, state.metrics, limits, caller,
        state.references, state.shadow, await get_outbox(request),
    )  # fmt: skip


ServiceDep = Annotated[PredictionService, Depends(get_service)]
