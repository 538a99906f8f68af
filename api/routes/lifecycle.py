"""GET /v1/lifecycle (admin): where each model stands, in one answer for the console's admin panel and
for an operator's curl: the aliases and the versions loaded, the last promotions and rollbacks, the
shadow model's agreement over the last day, the drift of each station's stream, and each version's last
comparison against production (`verity compare` or `verity retrain` writes compare.json beside the model;
`verity promote --comparison` keeps it in the event)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from verity.api.audit_records import current_aliases
from verity.api.deps import AdminDep, AuditDep, RegistryDep
from verity.api.errors import error_responses
from verity.api.lifecycle_cli import shadow_report
from verity.inference.artifacts import COMPARISON_FILE

router = APIRouter()
EVENTS_SHOWN = 5
SHADOW_WINDOW = timedelta(days=1)
BRIEF = ("images", "roc_auc_difference", "roc_auc_difference_interval", "confidence", "verdict_changes",
         "worse_beyond_noise", "better_beyond_noise")  # fmt: skip


def comparison_brief(text: str | None) -> dict[str, Any] | None:
    """The figures of a `verity compare` result that decide a promotion; None when there is none or it
    does not read as one (a hand-edited file must not break the admin's page)."""
    if not text:
        return None
    try:
        result = json.loads(text)
    except ValueError:
        return None
    if not isinstance(result, dict) or "roc_auc_difference" not in result:
        return None
    return {key: result.get(key) for key in BRIEF}


def _stored_comparison(model_file: Path) -> dict[str, Any] | None:
    path = model_file.parent / COMPARISON_FILE
    try:
        return comparison_brief(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _versions(snapshot: Any, name: str) -> list[dict[str, Any]]:
    return [
        {
            "version": key[1],
            "aliases": sorted(snapshot.aliases.get(key, [])),
            "weak": bool(served.engine.card.weak),
            "comparison": _stored_comparison(served.path),
        }
        for key, served in sorted(snapshot.models.items())
        if key[0] == name
    ]


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
            "events": [
                {**asdict(e), "comparison": comparison_brief(e.comparison)}
                for e in events
                if e.model_name == name
            ][-EVENTS_SHOWN:],
            "loaded": _versions(snapshot, name),
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
    models = await run_in_threadpool(_models, registry, events)  # reads each version's compare.json
    return {
        "models": models,
        "shadow": {"model": request.app.state.settings.shadow, "since": since, **shadow},
        "drift": request.app.state.metrics.drift.figures(),
    }
