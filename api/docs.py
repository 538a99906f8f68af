"""/docs (Swagger UI) and /redoc from files the server itself serves, so both render on an air-gapped
customs network: FastAPI's own pages load their JavaScript from a CDN and show a blank page offline.

The files are those of the `fastapi-offline` package (Swagger UI 5, which reads the OpenAPI 3.1 that
FastAPI writes, and ReDoc), mounted under /docs/assets. `VERITY_API_DOCS=false` turns off the two pages
and /openapi.json together.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OPENAPI_URL = "/openapi.json"
ASSETS_URL = "/docs/assets"
# The pages a browser renders (the CSP that lets their own inline start-up script run applies to these).
DOCS_PAGES = (DOCS_URL, REDOC_URL)


def _assets_dir() -> str:
    return str(files("fastapi_offline") / "static")


def install_docs(app: FastAPI) -> None:
    """Adds /docs, /redoc and their assets when the app publishes /openapi.json (VERITY_API_DOCS)."""
    if app.openapi_url is None:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")
    favicon = f"{ASSETS_URL}/favicon.png"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=favicon,
            # No spec validation by swagger.io's online validator: nothing leaves the server.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )
