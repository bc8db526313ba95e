"""Assemble the FastAPI app: settings, database, routers, static files, middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from server.config import Settings, asset_dir, get_settings
from server.db import create_db_engine, make_session_factory
from server.errors import install_handlers
from server.schemas import EpochBatch
from server.security import BodyLimitMiddleware, SecurityHeadersMiddleware

NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}


def _document_non_finite(node: Any) -> None:
    """Metric fields (`float | None`) also take and give "NaN"/"Infinity"/"-Infinity"."""
    if isinstance(node, dict):
        if node.get("anyOf") == [{"type": "number"}, {"type": "null"}]:
            node["anyOf"] = [{"type": "number"}, NON_FINITE, {"type": "null"}]
        for value in node.values():
            _document_non_finite(value)
    elif isinstance(node, list):
        for value in node:
            _document_non_finite(value)


def _add_models(spec: dict[str, Any], *models: type[BaseModel]) -> None:
    """Put models that no route parameter names into components/schemas."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = schema


def _with_non_finite_docs(app: FastAPI) -> Callable[[], dict[str, Any]]:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            _add_models(spec, EpochBatch)  # the ingest route parses its body itself (speed)
            _document_non_finite(spec)
        return app.openapi_schema or {}

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app on `settings` (default: GRADWATCH_* variables). Migrations are not run here:
    `gradwatch serve` (and the tests) run `server.db.run_migrations` first."""
    from server.routes import api, api_docs, login, pages, stream

    settings = settings or get_settings()
    engine = create_db_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="gradwatch",
        summary="Per-task gradient statistics of multi-task training runs.",
        version=api.app_version(),
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own /docs loads Swagger UI from a CDN; see routes/api_docs.py
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine, {"lost_after": settings.lost_after})
    app.openapi = _with_non_finite_docs(app)  # type: ignore[method-assign]
    install_handlers(app)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(stream.router)
    login.install(app)  # /login, /logout, and the form for LoginRequired
    api_docs.install(app)
    app.mount("/static", StaticFiles(directory=asset_dir("static")), name="static")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    return app
