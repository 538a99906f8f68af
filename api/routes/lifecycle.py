"""GET /v1/lifecycle (admin): where each model stands, in one answer for the console's admin panel and
for an operator's curl: the aliases and the versions loaded, the last promotions and rollbacks, the
shadow model's agreement over the last day, and the drift of each station's stream."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from verity.api.audit_records import current_aliases
from verity.api.deps import AdminDep, AuditDep, RegistryDep
from verity.api.errors import error_responses
from verity.api.lifecycle_cli import shadow_report

router = APIRouter()
EVENTS_SHOWN = 5
SHADOW_WINDOW = timedelta(days=1)


def _models(registry: Any, events: list[Any]) -> list[dict[str, Any]]:
    snapshot = registry.snapshot
    names = sorted({name for name, _ in snapshot.models})
    aliases = current_aliases(events)
    return [
        {
            "name": name,
            "modality": next(m.modality for k, m in snapshot.models.items() if k[0] == name),
            "versions": sorted(k[1] for k in snapshot.models if k[0] == name),
            "serving": sorted(f"{k[0]}/{k[1]}" for k in snapshot.defaults.values() if k[0] == name),
            "aliases": {alias: e.version for (n, alias), e in aliases.items() if n == name},
            "events": [asdict(e) for e in events if e.model_name == name][-EVENTS_SHOWN:],
        }
        for name in names
    ]


@router.get("/v1/lifecycle", tags=["models"], responses=error_responses(401, 403),
            summary="Models, aliases, recent promotions, shadow agreement and drift (admin)")  # fmt: skip
async def lifecycle(
    request: Request, registry: RegistryDep, audit: AuditDep, admin: AdminDep
) -> dict[str, Any]:
    since = (datetime.now(UTC) - SHADOW_WINDOW).isoformat()
    events = await run_in_threadpool(audit.model_events)
    shadow = await run_in_threadpool(shadow_report, audit, since, EVENTS_SHOWN)
    return {
        "models": _models(registry, events),
        "shadow": {"model": request.app.state.settings.shadow, "since": since, **shadow},
        "drift": request.app.state.metrics.drift.figures(),
    }
