"""The server's operations: the loaded models and their reload, health, readiness and metrics. Routes
stay thin; the work is in api.registry and api.metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from verity.api.deps import AdminDep, MetricsDep, PrincipalDep, RegistryDep, SettingsDep
from verity.api.errors import error_responses
from verity.api.schemas import Health, ModelsResponse, Readiness, ReloadResponse

router = APIRouter()


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    tags=["models"],
    responses=error_responses(401),
    summary="Loaded models and the default per modality",
)
async def list_models(registry: RegistryDep, principal: PrincipalDep) -> dict[str, Any]:
    snapshot = registry.snapshot
    defaults = set(snapshot.defaults.values())
    models = [
        {**m.describe(key in defaults), "aliases": sorted(snapshot.aliases.get(key, []))}
        for key, m in sorted(snapshot.models.items())
    ]
    return {
        "models": models,
        "defaults": {mod: f"{k[0]}/{k[1]}" for mod, k in snapshot.defaults.items()},
        "caller": {"station_id": principal.station_id, "role": principal.role,
                   "products": list(principal.products)},  # fmt: skip
    }


@router.post(
    "/v1/models/reload",
    response_model=ReloadResponse,
    tags=["models"],
    responses=error_responses(401, 403),
    summary="Load new model versions and swap atomically (admin)",
    description="Rescans the models folder, loads and warms new or changed files beside the serving "
    "ones, then swaps. A file that fails to load is listed in `failed` and what served "
    "before keeps serving.",
)
async def reload_models(request: Request, registry: RegistryDep, admin: AdminDep) -> dict[str, Any]:
    report = await registry.reload()
    # Every other worker follows within a second (api/shared_state.py).
    await request.app.state.reload_follower.announce()
    return {
        "ok": report.ok,
        "loaded": report.loaded,
        "kept": report.kept,
        "unloaded": report.unloaded,
        "failed": report.failed,
        "defaults": report.defaults,
        "passed_over": report.passed_over,
    }


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    tags=["health"],
    responses={503: {"model": Readiness, "description": "Models still loading, or none in the models dir."}},
    summary="Readiness: models loaded and warmed",
)
async def readyz(registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    snapshot = registry.snapshot
    body = {
        "ready": registry.ready,
        "defaults": {m: f"{k[0]}/{k[1]}" for m, k in snapshot.defaults.items()},
        "models_dir": str(settings.models_dir.absolute()),
        "message": registry.readiness_message(),
    }
    headers = None if registry.ready else {"Retry-After": str(settings.retry_after_s)}
    return JSONResponse(body, status_code=200 if registry.ready else 503, headers=headers)


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format.",
        },
        **error_responses(401),
    },
    summary="Prometheus metrics (any station or admin key when keys are required)",
)
async def metrics(metrics: MetricsDep, principal: PrincipalDep) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
