"""/v1/products: a right holder's guide to its genuine product (inference/references/guides.py), for the
stations that inspect it. An admin, or the right holder whose product it is, publishes a guide; any keyed
caller reads it (a right holder its own products only). Each publication is recorded in the audit log
before it is written, as a reference event (action `guide`, the guide's SHA-256), and kept for good."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditError, ReferenceEvent
from verity.api.deps import AuditDep, PrincipalDep, ReferenceEditorDep, SettingsDep
from verity.api.errors import ApiError, error_responses, service_unavailable, truncated
from verity.api.routes.references import require_product
from verity.api.schemas_references import GuideIn, ProductOut
from verity.inference.decode import sniff_format
from verity.inference.decode_limits import UnsupportedFormat
from verity.inference.references.errors import InvalidName
from verity.inference.references.guides import GuideStore
from verity.inference.references.names import validate_product
from verity.inference.stamps import utc_now
from verity.inference.vocabulary import NAME_MAX

router = APIRouter(tags=["references"])
PHOTO_FORMATS = ("jpeg", "png", "webp")
ProductPath = Annotated[str, Path(max_length=NAME_MAX, description="The product's name (e.g. velmor-tea).")]


def _product(name: str) -> str:
    try:
        return validate_product(name)
    except InvalidName as error:
        raise ApiError(422, "invalid_product", str(error)) from error


def _check_photos(guide: GuideIn) -> None:
    """Each photo must be base64 of a JPEG, PNG or WebP: the console shows it as an image, nothing else."""
    for index, point in enumerate(guide.points):
        if point.photo is None:
            continue
        try:
            data = base64.b64decode(point.photo, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ApiError(422, "invalid_fields", f"points[{index}].photo is not base64.") from error
        try:
            kind = sniff_format(data)
        except UnsupportedFormat:
            kind = None
        if kind not in PHOTO_FORMATS:
            raise ApiError(422, "invalid_fields", f"points[{index}].photo is not a JPEG, PNG or WebP image.")


@router.put(
    "/v1/products/{product}/guide",
    responses=error_responses(400, 401, 403, 413, 422, 503),
    summary="Publish a product's guide (admin, or the product's right holder)",
    description="Plain data: points to check (text by language, an optional photo), contacts and the "
    "date it is valid through. Each publication is a new version; none is replaced.",
)
async def publish_guide(
    product: ProductPath, guide: GuideIn, editor: ReferenceEditorDep, audit: AuditDep, settings: SettingsDep
) -> dict[str, Any]:
    product = _product(product)
    require_product(editor, product)
    _check_photos(guide)
    body = guide.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    event = ReferenceEvent(utc_now(), "guide", "*", product, digest, "guide", editor.key_id, editor.role)
    try:
        await run_in_threadpool(audit.record_reference_event, event)  # recorded before it is written
    except AuditError as error:
        raise service_unavailable("audit_unavailable", "The audit log cannot be written; the guide was not "
                                  "published. Retry shortly.", settings.retry_after_s) from error  # fmt: skip
    store = GuideStore(settings.references_dir)
    return await run_in_threadpool(store.publish, product, body, editor.key_id, editor.role)


@router.get(
    "/v1/products/{product}",
    response_model=ProductOut,
    responses=error_responses(401, 403, 404, 422),
    summary="A product's guide, for the officer who names the product",
)
async def product(
    product: ProductPath,
    principal: PrincipalDep,
    settings: SettingsDep,
    version: Annotated[int | None, Query(ge=1, le=1_000_000, description="An earlier version.")] = None,
) -> dict[str, Any]:
    product = _product(product)
    require_product(principal, product)
    store = GuideStore(settings.references_dir)
    versions = await run_in_threadpool(store.versions, product)
    if version is not None and version not in versions:
        message = f"{truncated(product)!r} has no guide version {version}."
        raise ApiError(404, "unknown_guide_version", message)
    chosen = version or (versions[-1] if versions else None)
    guide = await run_in_threadpool(store.version, product, chosen) if chosen is not None else None
    expired = None
    if guide is not None:
        expired = datetime.fromisoformat(guide["valid_until"]).date() < datetime.now(UTC).date()
    return {"product": product, "guide": guide, "guide_versions": versions, "expired": expired}
