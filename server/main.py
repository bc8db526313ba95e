"""Assemble the FastAPI app: settings, database, routers, static files, middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from server import openapi, outage, webhooks
from server.config import Settings, asset_dir, get_settings
from server.db import create_db_engine, make_session_factory
from server.errors import install_handlers
from server.guards import BodyTimeoutMiddleware, HostCheckMiddleware, JsonBodyMiddleware
from server.queries import warm_up
from server.security import BodyLimitMiddleware, SecurityHeadersMiddleware


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app on `settings` (default: GRADWATCH_* variables). Migrations are not run here:
    `gradwatch serve` (and the tests) run `server.db.run_migrations` first."""
    from server.routes import api, api_docs, epochs, login, pages, run_page, scalars, stream

    settings = settings or get_settings()
    engine = create_db_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        warm_up(app.state.session_factory)
        yield
        if app.state.webhooks is not None:
            app.state.webhooks.close()
        engine.dispose()

    app = FastAPI(
        title="gradwatch",
        summary="Per-task gradient statistics of multi-task training runs.",
        version=api.app_version(),
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own /docs loads Swagger UI from a CDN; see routes/api_docs.py
        redoc_url=None,
        openapi_url=None,  # served by routes/api_docs.py, behind GRADWATCH_PROTECT_READS
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine, {"lost_after": settings.lost_after})
    app.state.webhooks = webhooks.install(app.state.session_factory, settings)
    openapi.install(app, settings)
    install_handlers(app)
    outage.install(app, engine, settings.db_retry_after)
    app.include_router(api.router)
    app.include_router(epochs.router)
    app.include_router(scalars.router)
    app.include_router(pages.router)
    app.include_router(run_page.router)
    app.include_router(stream.router)
    login.install(app)  # /login, /logout, and the form for LoginRequired
    api_docs.install(app)
    app.mount("/static", StaticFiles(directory=asset_dir("static")), name="static")
    # Outermost last: security headers on every answer, then Host, then the body's type,
    # its arrival in time, its size; innermost, the live streams that are in order.
    app.add_middleware(stream.RunStreams)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyTimeoutMiddleware, seconds=settings.body_timeout)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(HostCheckMiddleware, allowed=settings.host_names())
    app.add_middleware(SecurityHeadersMiddleware)
    return app
