"""The prediction path shared by /v1 and /v2: decode off the event loop, batch, score, audit, answer.

Decoding runs in the threadpool so it overlaps with inference on the other core; the audit record is
written before any verdict leaves the server, and a failed write turns the answer into a 503.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends
from starlette.concurrency import run_in_threadpool

from api.audit import AuditError, AuditRecord, AuditStore, ImageStore, utc_now
from api.deps import AuditDep, ImageStoreDep, MetricsDep, RegistryDep, SettingsDep
from api.errors import decode_error_to_api, service_unavailable
from api.metrics import Metrics
from api.registry import ModelRegistry, ServedModel
from api.settings import Settings
from inference.batcher import QueueFullError
from inference.decode import DecodeError, DecodeLimits, decode_image, sniff_format, to_model_input
from inference.engine import Prediction
from inference.spec import PreprocessSpec

log = logging.getLogger("verity.api")


@dataclass(frozen=True)
class PreparedImage:
    model_input: np.ndarray  # CxSxS float32 in [0, 1]
    sha256: str
    kind: str  # container format, by content


def prepare_image(data: bytes, spec: PreprocessSpec, limits: DecodeLimits) -> PreparedImage:
    """Blocking: hashes, sniffs and decodes one upload into the model's input (the evaluation path)."""
    kind = sniff_format(data)
    image = decode_image(data, limits, draft_size=spec.image_size)
    return PreparedImage(to_model_input(image, spec), hashlib.sha256(data).hexdigest(), kind)


def render_heatmap(prediction: Prediction, model_input: np.ndarray) -> str | None:
    """Base64 PNG of the class activation map over the model's view of the image."""
    if prediction.cam is None:
        return None
    from inference.heatmap import heatmap_png

    return base64.b64encode(heatmap_png(prediction.cam, model_input)).decode("ascii")


@dataclass(frozen=True)
class Scored:
    prepared: PreparedImage
    prediction: Prediction
    model: ServedModel


class PredictionService:
    """Everything a prediction route needs, bundled per request from the app's state."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        audit: AuditStore,
        image_store: ImageStore | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.audit = audit
        self.image_store = image_store
        self.metrics = metrics

    def model_for(self, modality: str) -> ServedModel:
        served = self.registry.default_for(modality)
        if served is not None:
            return served
        if not self.registry.ready:
            self.metrics.rejected.labels("not_ready").inc()
            raise service_unavailable(
                "not_ready", "Models are still loading; retry shortly.", self.settings.retry_after_s
            )
        self.metrics.rejected.labels("no_model").inc()
        raise service_unavailable(
            "no_model", f"No {modality} model is loaded on this server.", self.settings.retry_after_s
        )

    async def prepare(self, data: bytes, served: ServedModel) -> PreparedImage:
        try:
            return await run_in_threadpool(
                prepare_image, data, served.engine.spec, self.settings.decode_limits
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

    async def score(self, data: bytes, served: ServedModel) -> Scored:
        prepared = await self.prepare(data, served)
        return Scored(prepared, await self.infer(served, prepared.model_input), served)

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
    ) -> AuditRecord:
        engine = scored.model.engine
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
        )

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

    def result(self, record: AuditRecord, heatmap_png: str | None = None) -> dict[str, Any]:
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
        }


def get_service(
    settings: SettingsDep,
    registry: RegistryDep,
    audit: AuditDep,
    image_store: ImageStoreDep,
    metrics: MetricsDep,
) -> PredictionService:
    return PredictionService(settings, registry, audit, image_store, metrics)


ServiceDep = Annotated[PredictionService, Depends(get_service)]
