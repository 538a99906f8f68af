"""What `verity refs` and /v1/references share: the audit row of each reference store event, and the
calibration a listing shows. Neither front end imports the other; both import this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from verity.api.audit import AuditStore, ReferenceEvent
from verity.inference.engine import Engine
from verity.inference.references.errors import NoEmbedding, UnknownProduct
from verity.inference.references.store import ReferenceStore


def reference_event(model_name: str, event: dict[str, Any]) -> ReferenceEvent:
    """The audit row of one store event (inference/references/store.py), for the CLI and the API alike."""
    return ReferenceEvent(
        created=str(event["created"]),
        action=str(event["action"]),
        model_name=model_name,
        product=str(event["product"]),
        image_sha256=str(event["sha256"]),
        reference_id=str(event["reference_id"]),
        actor=event.get("actor"),
        role=event.get("role"),
        source=event.get("source"),
    )


def audit_writer(audit: AuditStore, model_name: str) -> Callable[[dict[str, Any]], None]:
    """`on_event` for the store: the audit row is written (or AuditError raised) before the change."""

    def write(event: dict[str, Any]) -> None:
        audit.record_reference_event(reference_event(model_name, event))

    return write


def calibration_or_none(store: ReferenceStore, engine: Engine, product: str) -> dict[str, Any] | None:
    """The product's calibration, or None when it has no usable references or the model no embedding
    (a listing still shows the product and its count)."""
    try:
        return store.calibration(engine, product)
    except (UnknownProduct, NoEmbedding):
        return None
