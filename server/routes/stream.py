"""Server-sent events that keep the dashboard live.

`GET /api/runs/{id}/stream?since=CURSOR`: `event: metrics` with only the epochs stored after the
cursor (a columnar `MetricsRead`; its `cursor` is the event id, so a browser that reconnects
after a server restart resumes with `Last-Event-ID`), `event: run` when the run's summary or
alerts change, and `event: end` once the run is no longer running and every epoch has been sent.

`GET /api/stream/runs?project=&status=&flagged=&offset=`: `event: runs` with the runs list page
(a `RunList`) whenever it changes.

Streams do not poll: after catching up (from the feed when it can say, else with one read)
each follows its process's hub (server.livefeed), which reads each change of a watched run once
for all of its streams and encodes its events once. Each response ends after
`MAX_STREAM_SECONDS` (within the hub's tick); EventSource then reconnects on its own, so no
connection outlives a server's graceful-shutdown window for long.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from server import feed_reads, livefeed, queries, schemas
from server.errors import InvalidInput
from server.routes.pages import RUNS_PER_PAGE, runs_filters
from server.schemas import MAX_INT32, MAX_INT63
from server.security import bearer, read_allowed, require_read

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_read)])

POLL_SECONDS = livefeed.POLL_SECONDS
HEARTBEAT_SECONDS = livefeed.HEARTBEAT_SECONDS
MAX_STREAM_SECONDS = 120.0
RETRY_MS = 2000
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


class EventStream(StreamingResponse):
    """A text/event-stream response that watches for the client's disconnect with one task
    of its own, where Starlette's `StreamingResponse` (under an ASGI 2.3 server such as
    uvicorn) opens a task group of two: what each open stream keeps alive is ~5 KiB less
    (1,000 viewers, bench/fanout.py: peak RSS 135 -> 130 MiB), and memory a crowd of
    viewers leaves fragmented shrinks with it. The stream ends when its events end or the
    client goes; the events' generator is closed either way (its cleanup runs now)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # noqa: BLE001 - the server's receive failed: treat as gone
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone:
                raise  # cancelled from outside (shutdown): not ours to swallow
            if hasattr(task, "uncancel"):  # Python 3.11+; 3.10 consumed the request here
                task.uncancel()
        except OSError:  # an ASGI 2.4 server: send raises once the client is gone
            pass
        except Exception as exc:
            # the database went away: the stream just ends (no traceback; the outage is
            # logged once by server/outage.py, and the reconnect answers 503)
            watch_db = scope["app"].state.database_watch
            if not watch_db.is_outage(exc):
                raise
            watch_db.went_down(exc)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def sse(event: str, data: str, event_id: int | None = None) -> str:
    """One event in the text/event-stream format (`data` is single-line JSON)."""
    return feed_reads.sse(event, data, event_id).decode()


async def in_session(request: Request, fn: Callable[[Session], T]) -> T:
    """Run `fn` with a fresh read session in the thread pool (the DB drivers are blocking)."""
    return await livefeed.hub_of(request.app).read(fn)


def parse_cursor(since: int | None, last_event_id: str | None) -> int | None:
    """The browser's Last-Event-ID (sent on reconnect) wins over the page's `since`; one that
    is not a cursor we could have sent is ignored, one beyond BIGINT refused (422)."""
    text = (last_event_id or "").strip()
    if not (text.isascii() and text.isdigit()):
        return since
    if len(text) > 19 or int(text) > MAX_INT63:
        raise InvalidInput("Last-Event-ID", f"must be at most {MAX_INT63}")
    return int(text)


async def run_events(
    request: Request, run_id: uuid.UUID, cursor: int | None
) -> AsyncIterator[bytes]:
    """Catch up from `cursor` (None: from now on), from the process's shared feed when it
    can say (server.livefeed) or with one read of our own, then follow the feed: per change
    it publishes, one write of the bytes it encoded for every stream, and no query of ours
    while its log covers our cursor."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    hub = livefeed.hub_of(request.app)
    started = written = time.monotonic()
    feed = hub.subscribe(run_id, ends_at=started + MAX_STREAM_SECONDS)
    try:
        await hub.opened(run_id)
        seen = feed.version  # before our read: a change published meanwhile is acted on
        if cursor is None and feed.cursor is not None:
            cursor = feed.cursor
        update = await _follow(hub, feed, run_id, cursor)
        cursor = update.cursor if cursor is None else cursor
        sent = ""
        while True:
            out = []
            for at, event in update.metrics:
                if at > cursor:
                    cursor = at
                    out.append(event)
            if update.status == "deleted":  # deleted while watched
                yield b"".join([*out, feed_reads.sse("end", '{"deleted":true}')])
                return
            if update.summary != sent:
                sent = update.summary
                out.append(update.summary_event if update.cursor == cursor
                           else feed_reads.sse("run", sent, cursor))  # fmt: skip
            if update.status != schemas.RunStatus.running.value:
                end = orjson.dumps({"status": update.status}).decode()
                yield b"".join([*out, feed_reads.sse("end", end, cursor)])
                return
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
                written = time.monotonic()
            while feed.version == seen:
                await feed.changed.wait()  # a change, or the hub's tick
                now = time.monotonic()
                if now - started >= MAX_STREAM_SECONDS:
                    return
                if feed.version == seen and now - written >= HEARTBEAT_SECONDS:
                    yield b": ping\n\n"
                    written = now
            seen = feed.version
            update = await _follow(hub, feed, run_id, cursor)
    finally:
        hub.unsubscribe(feed)


async def _follow(hub: livefeed.Hub, feed: livefeed.RunFeed, run_id: uuid.UUID,
                  cursor: int | None) -> feed_reads.Update:  # fmt: skip
    """The feed's news after `cursor`: from its shared log, or (when the log cannot say, or
    the run ended and we must be sure to hold every epoch) one read of our own."""
    chain = None if cursor is None else feed.chain(cursor)
    if chain is not None and feed.status == "running" and feed.cursor is not None:
        return feed_reads.Update(chain, feed.summary, feed.status, feed.cursor, feed.summary_event)
    return await hub.read(lambda s: feed_reads.read_update(s, run_id, cursor))


@router.get("/api/runs/{run_id}/stream")
async def run_stream(
    request: Request,
    run_id: uuid.UUID,
    since: Annotated[int | None, Query(ge=0, le=MAX_INT63)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventStream:
    """Live epochs of one run (see module docstring). 404 for an unknown run. A request
    that is in order is answered by `RunStreams` before it gets here."""
    cursor = parse_cursor(since, last_event_id)
    await livefeed.hub_of(request.app).check_exists(run_id)  # raises RunNotFound
    events = run_events(request, run_id, cursor)
    return EventStream(events, media_type="text/event-stream", headers=HEADERS)


class RunStreams:
    """`GET /api/runs/{id}/stream` without FastAPI's request handling, for every request that
    is in order (a canonical run id, a plain `since`, readable credentials, a run that
    exists); anything else goes on to `run_stream`, which answers it (422, 401, 404, 503) as
    every route does. Installed as the innermost middleware: Host check, body guards and
    security headers still apply.

    Why: a stream lives for minutes, and everything between the middlewares and the events'
    generator lives with it: the router's and FastAPI's coroutines, the request's exit
    stacks and solved dependencies. With 1,000 viewers on one process (bench/fanout.py,
    PostgreSQL) that was most of what each stream kept: peak RSS 129 -> 119 MiB, and after
    the viewers left +22% -> +15% of idle (the small-object arenas they dirtied stay)."""

    PREFIX, SUFFIX = "/api/runs/", "/stream"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if (
            scope.get("method") == "GET"
            and path.startswith(self.PREFIX)
            and path.endswith(self.SUFFIX)
        ):
            events = await self._open(Request(scope, receive), path)
            if events is not None:
                stream = EventStream(events, media_type="text/event-stream", headers=HEADERS)
                await stream(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _open(self, request: Request, path: str) -> AsyncIterator[bytes] | None:
        """The request's events, or None to leave it to the route."""
        text = path[len(self.PREFIX) : -len(self.SUFFIX)]
        since = request.query_params.get("since")
        try:
            run_id = uuid.UUID(text)
            if str(run_id) != text.lower():
                return None
            if since is not None and not (since.isascii() and since.isdigit() and len(since) < 20):
                return None
            given = None if since is None else int(since)
            if given is not None and given > MAX_INT63:
                return None
            cursor = parse_cursor(given, request.headers.get("last-event-id"))
            if not read_allowed(request, await bearer(request)):
                return None
            await livefeed.hub_of(request.app).check_exists(run_id)
        except Exception:  # noqa: BLE001 - the route answers it (and logs what it should)
            return None
        return run_events(request, run_id, cursor)


async def list_events(request: Request, filters: dict[str, Any], offset: int) -> AsyncIterator[str]:
    """The page now, then again after each change the process's hub sees (at most one read a
    second per stream)."""
    yield f"retry: {RETRY_MS}\n\n"
    hub = livefeed.hub_of(request.app)
    started = time.monotonic()
    sent = ""
    while True:
        seen = hub.list_version
        runs = await in_session(
            request, lambda s: queries.list_runs(s, **filters, limit=RUNS_PER_PAGE, offset=offset)
        )
        text = runs.model_dump_json()
        if text != sent:
            sent = text
            yield sse("runs", text)
        while hub.list_version == seen:
            left = MAX_STREAM_SECONDS - (time.monotonic() - started)
            if left <= 0:
                return
            try:
                await asyncio.wait_for(hub.list_waiter().wait(), min(left, HEARTBEAT_SECONDS))
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                yield ": ping\n\n"
        await asyncio.sleep(POLL_SECONDS)


@router.get("/api/stream/runs")
async def runs_stream(
    request: Request,
    project: str | None = None,
    status: str | None = None,
    flagged: str | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
) -> EventStream:
    """The runs list page, re-sent whenever a run in it changes."""
    filters = runs_filters(project, status, flagged)
    await in_session(request, lambda s: s.execute(sa.text("SELECT 1")))  # database down: 503 now
    events = list_events(request, filters, offset)
    return EventStream(events, media_type="text/event-stream", headers=HEADERS)
