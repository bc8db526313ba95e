"""Engines, sessions and migrations.

SQLite: WAL (readers never block the writer), a busy timeout, foreign keys on, and write
transactions that start with BEGIN IMMEDIATE: a deferred transaction that reads first and
then writes cannot wait for the lock in WAL mode (SQLITE_BUSY_SNAPSHOT), which is where
"database is locked" comes from under concurrent writers. Reads stay deferred.
PostgreSQL: psycopg 3 (`postgresql+psycopg://`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.orm import Session, sessionmaker

from server.config import asset_dir

SQLITE_BUSY_TIMEOUT_MS = 60_000
PG_CONNECT_TIMEOUT_S = 5
WRITE_OPTIONS = {"sqlite_begin": "IMMEDIATE"}
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` URLs (SQLAlchemy would pick psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_events(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see `on_begin`)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def create_db_engine(url: str) -> Engine:
    """A new engine for `url` with the settings above."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if parsed.database in (None, "", ":memory:"):  # one shared in-memory database
            pool: dict[str, Any] = {"poolclass": sa.StaticPool}
        else:
            pool = {"pool_size": 8, "max_overflow": 32}
        engine = sa.create_engine(url, connect_args=connect_args, **pool)
        _sqlite_events(engine)
        return engine
    # A database host that does not answer fails a request after 5 s instead of hanging it.
    connect_args = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return sa.create_engine(
        url, pool_size=8, max_overflow=32, pool_pre_ping=True, connect_args=connect_args
    )


def get_engine(url: str) -> Engine:
    """One shared engine per URL."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_db_engine(url)
        return engine


def dispose_engine(url: str) -> None:
    with _engines_lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


def make_session_factory(
    engine: Engine, info: dict[str, Any] | None = None
) -> sessionmaker[Session]:
    """Sessions on `engine`; `info` (e.g. the app's `lost_after`) is every session's `.info`."""
    return sessionmaker(engine, expire_on_commit=False, autoflush=False, info=info or {})


def write_session(factory: sessionmaker[Session]) -> Session:
    """A session whose transaction takes the SQLite write lock up front."""
    session = factory()
    session.connection(execution_options=WRITE_OPTIONS)
    return session


def run_migrations(url: str) -> None:
    """`alembic upgrade head` on `url`, programmatically (the migrations ship in the wheel)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(asset_dir("migrations")))
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


@functools.cache
def database_kind(url: str) -> str:
    return make_url(normalise_url(url)).get_backend_name()


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; non-GET requests start a write transaction (see above)."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    if request.method in ("GET", "HEAD", "OPTIONS"):
        session = factory()
    else:
        session = write_session(factory)
    with session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
