"""The FastAPI app factory. Nothing happens at import time: `create_app(settings)` builds an app,
and its lifespan loads the models, so tests and `verity serve` each build their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from importlib.resources import files
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse

from verity import __version__
from verity.api import connection_balance
from verity.api.alert_delivery import AlertDispatcher, DeliveryOptions
from verity.api.alert_endpoints import EndpointStore
from verity.api.alerts import AlertPlanner
from verity.api.audit import AuditStore, open_audit_store
from verity.api.auth import KeyStore
from verity.api.docs import ASSETS_URL, DOCS_PAGES, OPENAPI_URL, install_docs
from verity.api.errors import ApiError, install_error_handlers, truncated
from verity.api.image_store import ImageStore
from verity.api.lifecycle_cli import adopt
from verity.api.limits import KeyLimits
from verity.api.logs import configure_logging
from verity.api.metrics import Metrics
from verity.api.middleware import (
    CrossSiteMiddleware,
    HostCheckMiddleware,
    RequestContextMiddleware,
    SecurityHeadersMiddleware,
)
from verity.api.registry import EngineFactory, ModelRegistry
from verity.api.routes import history, lifecycle, operations, products, references, v1, v2
from verity.api.schemas_references import GUIDE_BODY_MAX
from verity.api.settings import Settings, load_settings
from verity.api.shadow import ShadowScorer
from verity.api.shared_state import ReloadFollower
from verity.inference.references.store import ReferenceStore

log = logging.getLogger("verity.api")

SMALL_BODY_LIMIT = 1024 * 1024  # JSON routes: feedback, reload
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields

DESCRIPTION = """
Verity tells genuine goods from counterfeits in product photos and X-ray scans.

Every answer carries a **verdict** (`genuine`, `counterfeit` or `uncertain`), a calibrated **score**
(probability of counterfeit), the model's thresholds, the model version and a `request_id` under which
the answer was written to the audit log before it was sent. Officers' confirmed outcomes go to
`POST /v1/feedback`; `GET /v1/history` pages through the caller's own verdicts. The inspection console,
a web page for officers, is served at `/`.

**Auth**: station API keys in `X-API-Key` or `Authorization: Bearer`; required when the server binds
a non-loopback address. `/healthz` and `/readyz` are always open; `/metrics` takes any key when keys are
required; reloading models always needs an admin key, even on an unkeyed loopback server.

**Errors** (/v1): `{"error": {"code", "message", "request_id"}}` with 400, 401, 403, 404, 413, 415, 422,
429 or 503 (+ `Retry-After`); a 413 for a byte limit adds `limit_bytes`, a 429 or 503 `retry_after_s`.
The Open Inference Protocol routes under `/v2` answer `{"error": "..."}`.
"""

TAGS = [
    {"name": "predict", "description": "Verdicts for images."},
    {"name": "models", "description": "What is served, and hot reload."},
    {"name": "feedback", "description": "Confirmed outcomes that close the loop to retraining."},
    {"name": "history", "description": "The caller's recent verdicts from the audit log, newest first."},
    {"name": "health", "description": "Liveness, readiness and metrics."},
    {"name": "open inference protocol v2", "description": "KServe v2 / Triton HTTP protocol for consoles."},
    {"name": "references", "description": "Genuine reference images per product (admin)."},
]


CONSOLE_PAGE = "/"
CONSOLE_URL = "/console"
# The console's file types, each with the type a browser needs (an ES module must be text/javascript;
# Python 3.11's mimetypes says application/javascript); any other file there is not served.
CONSOLE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


def console_dir() -> Path:
    """The console's folder in the installed package (api/console in a checkout)."""
    return Path(str(files("verity.api") / "console"))


# The longest file name, and path, the console is asked for: a file system's limits (its own are short).
CONSOLE_NAME_MAX = 255
CONSOLE_PATH_MAX = 1024


def _console_name(relative: str) -> bool:
    """Whether `relative` could name one of the console's files: printable, short parts, none hidden,
    a type the console uses. Checked before the file system sees the name: an embedded NUL or a
    5,000-character name made it raise (a 500, and two tracebacks in the log)."""
    parts = relative.split("/")
    return (
        len(relative) <= CONSOLE_PATH_MAX
        and relative.isprintable()
        and all(0 < len(part) <= CONSOLE_NAME_MAX and not part.startswith(".") for part in parts)
        and Path(parts[-1]).suffix.lower() in CONSOLE_TYPES
    )


def _console_file(relative: str) -> Path:
    """The file under the console folder that `relative` names, or a 404: never a path outside it,
    a hidden file or a type the console does not use."""
    if _console_name(relative):
        root = console_dir().resolve()
        try:
            target = (root / relative).resolve()
            if target.is_relative_to(root) and target.is_file():
                return target
        except (OSError, ValueError):  # a name the file system refuses names no file of the console
            pass
    raise ApiError(404, "not_found", f"The console has no file {truncated(relative)!r}.")


def install_console(app: FastAPI) -> None:
    """Serves the console page at / and its files at /console/<file>. The page holds no data, so it is
    served without a key even where keys are required; its API calls carry the key."""

    @app.api_route(CONSOLE_PAGE, methods=["GET", "HEAD"], include_in_schema=False)
    async def console_page() -> FileResponse:
        return FileResponse(_console_file("index.html"), media_type=CONSOLE_TYPES[".html"])

    @app.api_route(CONSOLE_URL + "/{relative:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_asset(relative: str) -> FileResponse:
        target = _console_file(relative)
        return FileResponse(target, media_type=CONSOLE_TYPES[target.suffix.lower()])


def body_limit_for(settings: Settings):
    """The largest body each route accepts, checked while it streams in."""

    def limit(method: str, path: str) -> int:
        if method not in ("POST", "PUT", "PATCH"):
            return SMALL_BODY_LIMIT
        if path == "/v1/predict":
            return settings.max_upload_bytes + FORM_OVERHEAD
        if path in ("/v1/predict/batch", "/v1/references"):  # several files, max_batch_files at most
            return settings.max_batch_bytes
        if path.startswith("/v2/") and path.endswith("/infer"):
            return settings.max_batch_bytes
        if path.startswith("/v1/products/") and path.endswith("/guide"):  # photos of the genuine features
            return GUIDE_BODY_MAX
        return SMALL_BODY_LIMIT

    return limit


async def _initial_load(registry: ModelRegistry) -> None:
    try:
        report = await registry.reload()
        log.info(
            "models loaded",
            extra={"loaded": report.loaded, "failed": report.failed, "defaults": report.defaults},
        )
    except Exception:  # a failed first load must leave /healthz answering and /readyz saying why not
        log.exception("model loading failed")


def _lifespan(
    settings: Settings, registry: ModelRegistry, audit: AuditStore | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Opened per lifespan (and closed at its end), so an app can be started again after a stop.
        audit_store = audit if audit is not None else await run_in_threadpool(open_audit_store, settings)
        app.state.audit = audit_store
        registry.model_events = audit_store.model_events  # promotions decide the defaults on every reload
        registry.record_adoption = partial(adopt, audit_store)  # a first start fixes today's defaults
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threadpool_size
        loading = None
        if settings.background_load:
            loading = asyncio.create_task(_initial_load(registry))
        else:
            await _initial_load(registry)
        if settings.shared_limits:
            app.state.limits.share(audit_store)
        follower = ReloadFollower(audit_store, registry)
        app.state.reload_follower = follower
        shadow = None
        if settings.shadow:
            shadow = ShadowScorer(settings.shadow, registry, audit_store, app.state.metrics.shadow)
        app.state.shadow = shadow
        attempts = app.state.metrics.alert_attempts
        dispatcher = AlertDispatcher(
            audit_store, app.state.alert_planner.endpoints, DeliveryOptions.from_settings(settings),
            on_attempt=lambda endpoint, outcome: attempts.labels(endpoint, outcome).inc(),
        )  # fmt: skip
        app.state.alert_dispatcher = dispatcher
        dispatcher.start()
        if settings.connection_balance_dir is not None:
            connection_balance.start(settings.connection_balance_dir)
        try:
            async with follower.following(), shadow.running() if shadow else contextlib.nullcontext():
                yield
        finally:
            connection_balance.stop()
            await run_in_threadpool(dispatcher.stop)
            # Graceful shutdown: uvicorn has stopped accepting and finished in-flight requests; drain the
            # batch queues, then close the audit store (its writes are synchronous, so none is pending).
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await registry.close()
            if audit is None:  # a store passed in belongs to the caller
                await run_in_threadpool(audit_store.close)

    return lifespan


def _served_models(registry: ModelRegistry) -> list[tuple[str, str, str, bool, int]]:
    """(modality, name, version, is default, queue depth) of each loaded model, for the metrics gauges."""
    snapshot = registry.snapshot
    defaults = set(snapshot.defaults.values())
    return [
        (m.modality, m.engine.name, m.engine.version, key in defaults, m.queue_depth())
        for key, m in snapshot.models.items()
    ]


def create_app(
    settings: Settings | None = None,
    registry: ModelRegistry | None = None,
    audit: AuditStore | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """Builds the service. Tests pass settings, a registry or an audit store; `verity serve` passes none
    (everything comes from VERITY_* variables and the optional settings file)."""
    settings = settings or load_settings()
    if os.environ.get("VERITY_SERVE_PROCESS"):  # a `verity serve` worker: JSON logs with request_id
        configure_logging(settings.log_level, settings.log_json)
    metrics = Metrics()
    registry = registry or ModelRegistry(settings, engine_factory, on_batch=metrics.batch_size.observe)
    if audit is None:
        open_audit_store(settings).close()  # fail fast, at build time, on an unusable audit location

    app = FastAPI(
        title="Verity",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=_lifespan(settings, registry, audit),
        docs_url=None,  # api.docs serves /docs and /redoc from local files instead of a CDN
        redoc_url=None,
        openapi_url=OPENAPI_URL if settings.api_docs else None,
    )
    _attach_state(app, settings, registry, audit, metrics)
    metrics.watch_models(lambda: _served_models(registry))
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(operations.router)
    app.include_router(v2.router)
    app.include_router(references.router)
    app.include_router(history.router)
    app.include_router(lifecycle.router)
    app.include_router(products.router)
    install_docs(app)
    install_console(app)
    _add_middleware(app, settings, metrics)
    return app


def _attach_state(
    app: FastAPI, settings: Settings, registry: ModelRegistry, audit: AuditStore | None, metrics: Metrics
) -> None:
    """What the routes reach through `request.app.state` (api/deps.py)."""
    app.state.settings = settings
    app.state.registry = registry
    app.state.audit = audit  # replaced by the lifespan's store when it starts
    app.state.shadow = None  # the lifespan starts one when VERITY_SHADOW names a model
    app.state.keys = KeyStore(settings.keys_file)
    app.state.alert_planner = AlertPlanner(
        EndpointStore(settings.alert_endpoints_file), app.state.keys, settings.rightholder_sees_stations
    )
    app.state.alert_dispatcher = None  # the lifespan starts it
    app.state.image_store = ImageStore(settings.image_store_dir) if settings.store_images else None
    app.state.metrics = metrics
    # Built once, outside the registry: references outlive model reloads and are re-read from disk when
    # `verity refs` changes them.
    app.state.references = ReferenceStore(
        settings.references_dir,
        tiling=settings.tiling_options,
        limits=settings.decode_limits,
        false_alarm_rate=settings.reference_false_alarm_rate,
    )
    app.state.limits = KeyLimits(settings, metrics)  # request rates and decode slots per key


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """The request layers of api/middleware.py around every route."""
    # Innermost first: the cross-site check runs after the Host check (it compares Origin with a Host
    # already known to name this server), both inside the request context (their 400 and 403 have a
    # request_id), and the security headers wrap everything, the context's own 413 included.
    app.add_middleware(CrossSiteMiddleware, allowed_origins=settings.allowed_origins)
    app.add_middleware(HostCheckMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        body_limit=body_limit_for(settings),
        body_timeout_s=settings.body_timeout_s,
        body_min_rate=settings.body_min_rate,
    )
    app.add_middleware(
        SecurityHeadersMiddleware,
        docs_pages=DOCS_PAGES,
        assets_prefix=ASSETS_URL,
        console_pages=(CONSOLE_PAGE,),
        console_prefix=CONSOLE_URL,
    )
