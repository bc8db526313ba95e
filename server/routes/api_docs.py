"""/docs: Swagger UI for the OpenAPI schema, its assets served from the installed `fastapi-offline`
package (Swagger UI 5, which reads OpenAPI 3.1).

FastAPI's built-in page loads Swagger UI from a CDN, which fails offline and needs a CDN in the
Content-Security-Policy; this one needs neither.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from server.security import require_read

SWAGGER_UI_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS = "/docs-assets"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
OPENAPI = "/openapi.json"


def install(app: FastAPI) -> None:
    """/openapi.json, /docs and Swagger UI's assets; the first two need what the pages need
    (the token or the session cookie) under GRADWATCH_PROTECT_READS."""
    app.mount(ASSETS, StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")
    guarded = [Depends(require_read)]

    @app.get(OPENAPI, include_in_schema=False, dependencies=guarded)
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
            oauth2_redirect_url=OAUTH2_REDIRECT,
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
