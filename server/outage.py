"""A database outage answers 503 with Retry-After, not 500 with a traceback per request.

While PostgreSQL is down (or SQLite's file is locked past the busy timeout, or cannot be
opened) every endpoint that needs the database answers 503 `database unavailable` with
`Retry-After: GRADWATCH_DB_RETRY_AFTER`. One log line says when the database went away and
one when it came back (the pool's first successful new connection afterwards), however many
requests failed in between.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy.engine import Engine

from server.errors import error_response

log = logging.getLogger("gradwatch")

DATABASE_UNAVAILABLE = "database unavailable"
# SQLite raises OperationalError for SQL mistakes too; only these mean "not available now".
_SQLITE_UNAVAILABLE = re.compile(r"locked|busy|unable to open|disk i/o", re.I)


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


class DatabaseWatch:
    """Whether the database is reachable, as the last request found it; logs the changes."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect.name
        self.down = False
        self._lock = threading.Lock()
        sa.event.listen(engine, "connect", self._on_connect)

    def is_outage(self, exc: BaseException) -> bool:
        if isinstance(exc, sa.exc.TimeoutError):  # pool exhausted: overloaded, retry later
            return True
        if not isinstance(exc, sa.exc.DBAPIError):
            return False
        if exc.connection_invalidated or isinstance(exc, sa.exc.InterfaceError):
            return True
        if not isinstance(exc, sa.exc.OperationalError):
            return False
        return self.dialect != "sqlite" or bool(_SQLITE_UNAVAILABLE.search(first_line(exc)))

    def went_down(self, exc: BaseException) -> None:
        with self._lock:
            was_down, self.down = self.down, True
        if not was_down:
            log.error("database unavailable: %s (answering 503 until it is back)", first_line(exc))

    def _on_connect(self, *_: Any) -> None:
        with self._lock:
            was_down, self.down = self.down, False
        if was_down:
            log.warning("database available again")


def install(app: FastAPI, engine: Engine, retry_after: int) -> DatabaseWatch:
    """Watch `engine`; answer its outages with 503 + Retry-After, other errors as before."""
    watch = DatabaseWatch(engine)
    previous = app.exception_handlers.get(Exception)

    async def on_database_error(request: Request, exc: Exception) -> Response:
        if not watch.is_outage(exc):
            if previous is None:
                raise exc
            answer = previous(request, exc)
            return await answer if inspect.isawaitable(answer) else answer
        watch.went_down(exc)
        headers = {"Retry-After": str(retry_after)}
        return error_response(request, 503, DATABASE_UNAVAILABLE, None, headers)

    for kind in (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError):
        app.add_exception_handler(kind, on_database_error)
    app.state.database_watch = watch
    return watch
