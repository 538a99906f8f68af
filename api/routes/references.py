"""/v1/references: genuine reference images per product (admin only, or a right holder for its own
products), and one reference's image for whoever compares a suspect with it (any caller of the server).

Enrolment embeds each file with the served model exactly as a prediction is scored, in the threadpool;
every add and remove is written to the audit log before it takes effect (a failed write is a 503 and
nothing changes). The store is `inference/references/store.py`'s ReferenceStore, shared with `verity refs`.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditError
from verity.api.deps import (
    AuditDep,
    Principal,
    PrincipalDep,
    ReferenceEditorDep,
    ReferencesDep,
    RegistryDep,
    SettingsDep,
)
from verity.api.errors import (
    ApiError,
    decode_error_to_api,
    error_responses,
    reference_error_to_api,
    reference_store_unavailable,
    service_unavailable,
    truncated,
)
from verity.api.reference_admin import audit_writer, calibration_or_none
from verity.api.registry import ModelRegistry, ServedModel
from verity.api.schemas import FILENAME_MAX, Modality
from verity.api.schemas_references import ReferenceRemoved, ReferencesEnrolled, ReferencesListing
from verity.api.settings import Settings
from verity.inference.decode_limits import DecodeError
from verity.inference.references.check import EngineEmbedder
from verity.inference.references.errors import (
    InvalidName,
    NoEmbedding,
    ReferenceStoreError,
    UnknownReference,
)
from verity.inference.references.names import validate_product
from verity.inference.references.store import ReferenceStore
from verity.inference.tiling import TooManyTiles
from verity.inference.vocabulary import NAME_MAX

router = APIRouter(tags=["references"])

ModelField = Annotated[str | None, Form(max_length=NAME_MAX, description="A loaded model's name.")]
ModalityForm = Annotated[Modality | None, Form(description="Or the default model of this modality.")]
ModelQuery = Annotated[str | None, Query(max_length=NAME_MAX, description="A loaded model's name.")]
ModalityQuery = Annotated[Modality | None, Query(description="Or the default model of this modality.")]
ProductForm = Annotated[
    str,
    Form(
        max_length=NAME_MAX, description=f"Product name: 1-{NAME_MAX} of a-z 0-9 . _ - (e.g. acme-watch-x2)."
    ),
]


def audit_unavailable(settings: Settings, what: str) -> ApiError:
    return service_unavailable(
        "audit_unavailable",
        f"The audit log cannot be written, so {what}; retry shortly.",
        settings.retry_after_s,
    )


def served_model(
    registry: ModelRegistry, settings: Settings, modality: str | None, model: str | None
) -> ServedModel:
    """The model a request names (model=NAME) or the default of its modality."""
    if model is not None:
        served = registry.find(model)
        if served is None:
            loaded = ", ".join(sorted({key[0] for key in registry.snapshot.models})) or "none"
            raise ApiError(404, "unknown_model", f"No loaded model {truncated(model)!r}. Loaded: {loaded}.")
        if modality is not None and served.modality != modality:
            raise ApiError(
                422, "modality_mismatch", f"Model {served.engine.name} is a {served.modality} model."
            )
        return served
    if modality is None:
        raise ApiError(
            422, "model_required", "Name the model: modality=photo|xray (its default) or model=NAME."
        )
    served = registry.default_for(modality)
    if served is not None:
        return served
    message = registry.unavailable_message([modality])
    if not registry.load_finished:
        raise service_unavailable("not_ready", message, settings.retry_after_s)
    raise ApiError(404, "no_model", message)


def _model_ref(served: ServedModel) -> dict[str, str]:
    return {"name": served.engine.name, "version": served.engine.version}


def _refused(index: int, filename: str | None, code: str, message: str) -> dict[str, Any]:
    return {
        "index": index,
        "filename": filename,
        "status": "refused",
        "error": {"code": code, "message": message},
    }


async def _enrol_one(
    store: ReferenceStore,
    served: ServedModel,
    product: str,
    upload: UploadFile,
    index: int,
    context: dict[str, Any],
) -> dict[str, Any]:
    """One file's result: added, duplicate, or refused with its own code. An audit failure is raised."""
    filename = truncated(upload.filename, FILENAME_MAX) if upload.filename is not None else None
    data = await upload.read()
    settings: Settings = context["settings"]
    if len(data) > settings.max_upload_bytes:
        return _refused(
            index, filename, "file_too_large", f"The file exceeds {settings.max_upload_bytes:,} bytes."
        )
    admin = context["admin"]
    add = partial(
        store.add,
        served.engine.name,
        product,
        data,
        source=filename,
        actor=admin.key_id,
        role=admin.role,
        embed=context["embed"],
        on_event=context["on_event"],
    )
    try:
        done = await run_in_threadpool(add)
    except DecodeError as error:
        api = decode_error_to_api(error)
        return _refused(index, filename, api.code, api.message)
    except TooManyTiles as error:
        return _refused(index, filename, "too_many_tiles", str(error))
    except ReferenceStoreError as error:
        api = reference_error_to_api(error)
        return _refused(index, filename, api.code, api.message)
    except OSError as error:
        raise reference_store_unavailable(error) from error
    return {"index": index, "filename": filename, **done.to_dict()}


@router.post(
    "/v1/references",
    response_model=ReferencesEnrolled,
    responses=error_responses(400, 401, 403, 404, 408, 413, 422, 503),
    summary="Enrol genuine reference images of a product (admin)",
    description="Each file is embedded by the model (model=NAME, or the default of modality=) as a "
    "prediction is scored, and enrolled as a genuine reference of `product` with who, when and its "
    "SHA-256, after the audit log has recorded it. An image already enrolled for the product is a "
    "`duplicate`; one enrolled for another product is refused. Returns per-file results and the "
    "product's calibration; 422 when no file could be enrolled.",
)
async def enrol_references(
    registry: RegistryDep,
    settings: SettingsDep,
    store: ReferencesDep,
    audit: AuditDep,
    admin: ReferenceEditorDep,
    product: ProductForm,
    files: Annotated[list[UploadFile], File(description="Genuine images of the product, one part each.")],
    modality: ModalityForm = None,
    model: ModelField = None,
) -> dict[str, Any]:
    try:
        validate_product(product)
    except InvalidName as error:
        raise reference_error_to_api(error) from error
    require_product(admin, product)
    if len(files) > settings.max_batch_files:
        raise ApiError(
            422, "too_many_files", f"{len(files):,} files sent; at most {settings.max_batch_files}."
        )
    served = served_model(registry, settings, modality, model)
    try:
        embed = EngineEmbedder(served.engine, store.tiling, store.limits)
    except NoEmbedding as error:
        raise reference_error_to_api(error) from error
    context = {
        "settings": settings,
        "admin": admin,
        "embed": embed,
        "on_event": audit_writer(audit, served.engine.name),
    }
    results: list[dict[str, Any]] = []
    for index, upload in enumerate(files):
        try:
            results.append(await _enrol_one(store, served, product, upload, index, context))
        except AuditError as error:
            done = sum(r["status"] == "added" for r in results)
            raise audit_unavailable(
                settings, f"file {index} was not enrolled ({done} before it were)"
            ) from error
    refused = [r for r in results if r["status"] == "refused"]
    if len(refused) == len(results):
        reasons = "; ".join(f"file {r['index']}: {r['error']['message']}" for r in refused[:3])
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise ApiError(422, "no_reference_added", f"No file was enrolled. {reasons}{more}")
    calibration = await run_in_threadpool(calibration_or_none, store, served.engine, product)
    return {"model": _model_ref(served), "product": product, "results": results, "calibration": calibration}


def _owns(store: ReferenceStore, model_name: str, principal: Principal, reference_id: str) -> bool:
    """Blocking: whether the reference is one of the right holder's products'."""
    known = store.products(model_name)
    owned = (store.references(model_name, product) for product in principal.products if known.get(product))
    return any(reference.reference_id == reference_id for references in owned for reference in references)


def require_product(principal: Principal, product: str) -> None:
    """403 for a right holder's key naming a product that is not its own."""
    if not principal.may_see_product(product):
        raise ApiError(403, "forbidden", f"This right holder's key is for {', '.join(principal.products)}; "
                       f"{truncated(product)!r} is not among its products.")  # fmt: skip


def _listing(store: ReferenceStore, served: ServedModel, product: str | None,
             principal: Principal) -> dict[str, Any]:  # fmt: skip
    """Blocking: every product with its count and calibration (a right holder's own only), or one
    product's references."""
    engine = served.engine
    if product is None:
        products = {name: count for name, count in store.products(engine.name).items()
                    if principal.may_see_product(name)}  # fmt: skip
        listed = [
            {"product": name, "references": count, "calibration": calibration_or_none(store, engine, name)}
            for name, count in products.items()
        ]
        return {"model": _model_ref(served), "products": listed}
    references = [reference.to_dict() for reference in store.references(engine.name, product)]
    calibration = calibration_or_none(store, engine, product)
    return {
        "model": _model_ref(served),
        "product": product,
        "calibration": calibration,
        "references": references,
    }


@router.get(
    "/v1/references",
    response_model=ReferencesListing,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Products with references, or one product's references with provenance (admin)",
)
async def list_references(
    registry: RegistryDep,
    settings: SettingsDep,
    store: ReferencesDep,
    admin: ReferenceEditorDep,
    modality: ModalityQuery = None,
    model: ModelQuery = None,
    product: Annotated[
        str | None, Query(max_length=NAME_MAX, description="List this product's references.")
    ] = None,
) -> dict[str, Any]:
    if product is not None:
        require_product(admin, product)
    served = served_model(registry, settings, modality, model)
    try:
        return await run_in_threadpool(_listing, store, served, product, admin)
    except ReferenceStoreError as error:
        raise reference_error_to_api(error) from error
    except OSError as error:
        raise reference_store_unavailable(error) from error


@router.delete(
    "/v1/references/{reference_id}",
    response_model=ReferenceRemoved,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Remove a genuine reference (admin; the removal is audited, the image file is kept)",
)
async def remove_reference(
    registry: RegistryDep,
    settings: SettingsDep,
    store: ReferencesDep,
    audit: AuditDep,
    admin: ReferenceEditorDep,
    reference_id: Annotated[str, Path(max_length=64)],
    modality: ModalityQuery = None,
    model: ModelQuery = None,
) -> dict[str, Any]:
    served = served_model(registry, settings, modality, model)
    engine = served.engine
    if admin.products and not await run_in_threadpool(_owns, store, engine.name, admin, reference_id):
        # The same 404 the store gives an unknown id: another holder's reference ids stay unknown.
        message = f"No reference {truncated(reference_id)!r} of this key's products."
        raise ApiError(404, "unknown_reference", message)
    remove = partial(
        store.remove,
        engine.name,
        reference_id,
        actor=admin.key_id,
        role=admin.role,
        on_event=audit_writer(audit, engine.name),
    )
    try:
        reference = await run_in_threadpool(remove)
    except AuditError as error:
        raise audit_unavailable(settings, "the reference was not removed") from error
    except ReferenceStoreError as error:
        raise reference_error_to_api(error) from error
    except OSError as error:
        raise reference_store_unavailable(error) from error
    calibration = await run_in_threadpool(calibration_or_none, store, engine, reference.product)
    return {"model": _model_ref(served), "removed": reference.to_dict(), "calibration": calibration}


# What a stored reference is served as, by the extension it was stored under (`private_files`).
IMAGE_TYPES = {
    "jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "bmp": "image/bmp",
    "tif": "image/tiff", "dcm": "application/dicom",
}  # fmt: skip
OTHER_IMAGE = "application/octet-stream"  # an extension the table does not know ("bin")
IMAGE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {kind: {"schema": {"type": "string", "format": "binary"}}
                    for kind in sorted({*IMAGE_TYPES.values(), OTHER_IMAGE})},
        "description": "The image as it was enrolled, in its own format.",
    }
}  # fmt: skip


def _image(
    store: ReferenceStore, model_name: str, principal: Principal, reference_id: str
) -> tuple[str, bytes]:
    """Blocking: a reference's extension and image bytes, for a caller who may see its product. A right
    holder asking for another holder's reference gets the store's own answer to an unknown id."""
    reference = store.reference(model_name, reference_id)
    if not principal.may_see_product(reference.product):
        raise UnknownReference(f"Model {model_name} has no reference {reference_id[:64]!r}.")
    return reference.ext, store.read_image(model_name, reference)


@router.get(
    "/v1/references/{reference_id}/image",
    response_class=Response,
    responses={**error_responses(401, 403, 404, 422, 503), **IMAGE_RESPONSE},
    summary="One genuine reference's image, to show beside a suspect",
    description="The image as enrolled (`closest` in a /v1/predict answer names the references nearest the "
    "suspect). A station or an admin reads any reference of the model, a right holder its own products' "
    "only (another's answers 404, as an unknown id does), an anonymous caller only where keys are not "
    "required.",
)
async def reference_image(
    registry: RegistryDep,
    settings: SettingsDep,
    store: ReferencesDep,
    principal: PrincipalDep,
    reference_id: Annotated[str, Path(max_length=64)],
    modality: ModalityQuery = None,
    model: ModelQuery = None,
) -> Response:
    served = served_model(registry, settings, modality, model)
    try:
        ext, data = await run_in_threadpool(_image, store, served.engine.name, principal, reference_id)
    except ReferenceStoreError as error:
        raise reference_error_to_api(error) from error
    except OSError as error:
        raise reference_store_unavailable(error) from error
    # Private: for this caller's browser, never a shared cache; varying on the key headers, so a browser
    # never answers one key's request with what it kept from another's.
    headers = {"Cache-Control": "private", "X-Content-Type-Options": "nosniff",
               "Vary": "X-API-Key, Authorization"}  # fmt: skip
    media_type = IMAGE_TYPES.get(ext, OTHER_IMAGE)
    return Response(data, media_type=media_type, headers=headers)
