"""One watcher per server process, fanning run changes out to all of its live streams.

An open run page does not query the database on its own once it has caught up. Per process,
a `Hub` learns which watched runs changed and, per changed run, reads the new epochs, the
run's summary and its alerts ONCE, and hands the same event text to every stream of that run:
the cost of a change is one read per process, whatever the number of viewers.

How a process learns of changes:
- PostgreSQL: writes send `NOTIFY` in their transaction (server.notify); the hub LISTENs on
  one dedicated connection, so a change made through any process reaches every process at
  commit. A poll every `SAFETY_POLL_SECONDS` (one query for all watched runs) covers
  notifications lost while the listening connection was down; it polls every second until the
  connection is back.
- SQLite (one machine, no NOTIFY): the same one-query poll, every `POLL_SECONDS`.

Each feed keeps a short log of the metrics events it sent, keyed by the cursor they start
from; a stream whose cursor is not in the log (it connected between two reads, or fell
behind) reads what it misses itself, once, and is back on the shared log. Events are encoded
once per process, as the bytes every stream writes (`sse`): a change costs each stream one
wake-up and one write of shared bytes, nothing else. Streams wait on their feed's event
alone (no timer of their own): every `TICK_SECONDS` the hub's tick wakes the streams of a
feed that has been quiet long enough to owe a heartbeat, or that holds a stream due to end,
and no others (waking a thousand streams at once costs the loop tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import heapq
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine.url import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from server import models, queries, schemas
from server.errors import RunNotFound
from server.notify import CHANNEL

POLL_SECONDS = 1.0
SAFETY_POLL_SECONDS = 10.0
TICK_SECONDS = 5.0
HEARTBEAT_SECONDS = 15.0
LOG_LENGTH = 64
TRIM_DELAY_SECONDS = 1.0
log = logging.getLogger("gradwatch.livefeed")
T = TypeVar("T")


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def sse(event: str, data: str, event_id: int | None = None) -> bytes:
    """One event in the text/event-stream format (`data` is single-line JSON), as sent."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


@dataclass
class Update:
    """One change of a run as its streams send it."""

    metrics: list[tuple[int, bytes]]  # (cursor, the `metrics` event), oldest first
    summary: str  # {"run": RunRead, "alerts": [...]} JSON
    status: str  # the run's status; "deleted" once it is gone
    cursor: int
    summary_event: bytes = b""  # the `run` event of `summary`, with `cursor` as its id

    def __post_init__(self) -> None:
        if self.summary and not self.summary_event:
            self.summary_event = sse("run", self.summary, self.cursor)


@dataclass
class RunFeed:
    """What a process knows of one watched run, shared by all its streams."""

    run_id: uuid.UUID
    viewers: int = 0
    cursor: int | None = None  # how far the shared log reaches
    log: deque[tuple[int, int, bytes]] = field(default_factory=lambda: deque(maxlen=LOG_LENGTH))
    summary: str = ""
    summary_event: bytes = b""
    status: str = "running"
    signature: tuple[Any, ...] | None = None
    version: int = 0
    published_at: float = field(default_factory=time.monotonic)
    deadlines: list[float] = field(default_factory=list)  # heap: when its streams end
    dirty: bool = True
    refreshing: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def chain(self, cursor: int) -> list[tuple[int, bytes]] | None:
        """The logged metrics events from `cursor` on, or None when the log cannot say
        (`cursor` is not where a logged event starts, nor the end of the log)."""
        if self.cursor is None:
            return None
        if cursor >= self.cursor:  # nothing newer (or the feed is behind us)
            return []
        out, at = [], cursor
        for start, end, text in self.log:
            if start == at:
                out.append((end, text))
                at = end
        return out if at == self.cursor else None


def summary_json(run: schemas.RunRead, alerts: list[schemas.AlertRead]) -> str:
    body = {
        "run": run.model_dump(mode="json"),
        "alerts": [a.model_dump(mode="json") for a in alerts],
    }
    return orjson.dumps(body).decode()


def read_update(session: Session, run_id: uuid.UUID, cursor: int | None) -> Update:
    """The run (first: if it reads finished, the metrics read after it hold every epoch), its
    alerts and the epochs stored after `cursor` (none read when `cursor` is None)."""
    try:
        run = queries.get_run(session, run_id)
    except RunNotFound:
        return Update([], "", "deleted", cursor or 0)
    summary = summary_json(run, queries.list_alerts(session, run_id=run_id))
    if cursor is None:
        e = models.Epoch
        latest = session.scalar(sa.select(sa.func.max(e.id)).where(e.run_id == run_id)) or 0
        return Update([], summary, run.status.value, latest)
    metrics = queries.get_metrics(session, run_id, since=cursor)
    text = metrics.model_dump_json()
    events = [(metrics.cursor, sse("metrics", text, metrics.cursor))] if metrics.epochs else []
    return Update(events, summary, run.status.value, metrics.cursor if events else cursor)


def signatures(session: Session, run_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[Any, ...]]:
    """One query: what changes when a run's epochs, summary or alerts change."""
    r = models.Run
    cols = (r.id, r.status, r.epoch_count, r.open_alert_count, r.flagged, r.updated_at)
    lost = _lost(session)
    return {
        row[0]: tuple(row[1:])
        for row in session.execute(sa.select(*cols, lost).where(r.id.in_(run_ids)))
    }


def _lost(session: Session) -> Any:
    """1 for a running run not heard from for GRADWATCH_LOST_AFTER (no write marks it: the
    polls notice it going lost, and back)."""
    r = models.Run
    cutoff = models.utcnow() - timedelta(seconds=queries.session_lost_after(session))
    seen = sa.func.coalesce(r.last_seen_at, r.updated_at)
    return sa.case((sa.and_(r.status == "running", seen < cutoff), 1), else_=0)


class Hub:
    """The watcher of one server process (one event loop); see the module docstring."""

    def __init__(self, factory: sessionmaker[Session], database_url: str) -> None:
        self.factory = factory
        self.url = database_url
        self.feeds: dict[uuid.UUID, RunFeed] = {}
        self.listening = False
        self.list_version = 0
        self.list_changed = asyncio.Event()
        self._list_signature: tuple[Any, ...] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    async def read(self, fn: Callable[[Session], T]) -> T:
        def call() -> T:
            with self.factory() as session:
                return fn(session)

        return await run_in_threadpool(call)

    # ------------------------------------------------------------ streams

    def subscribe(self, run_id: uuid.UUID, ends_at: float = math.inf) -> RunFeed:
        self._start()
        feed = self.feeds.get(run_id)
        if feed is None:
            feed = self.feeds[run_id] = RunFeed(run_id)
            self.mark_dirty(run_id)
        feed.viewers += 1
        heapq.heappush(feed.deadlines, ends_at)
        return feed

    def knows(self, run_id: uuid.UUID) -> bool:
        """Whether the run is watched here and was there at the last read of it."""
        feed = self.feeds.get(run_id)
        return feed is not None and feed.cursor is not None and feed.status != "deleted"

    def unsubscribe(self, feed: RunFeed) -> None:
        feed.viewers -= 1
        if feed.viewers <= 0 and self.feeds.get(feed.run_id) is feed:
            del self.feeds[feed.run_id]
            if not self.feeds:  # the last viewer left
                with contextlib.suppress(RuntimeError):  # no loop: a stream finalised late
                    asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._trim)

    def _trim(self) -> None:
        """Give the memory a crowd of viewers used back to the system once they are all gone:
        glibc keeps freed heap memory (per-connection buffers) unless asked to return it
        (malloc_trim(3)); a no-op elsewhere."""
        if not self.feeds:
            gc.collect()
            if _LIBC is not None:
                _LIBC.malloc_trim(0)

    def mark_dirty(self, run_id: uuid.UUID) -> None:
        feed = self.feeds.get(run_id)
        if feed is None:
            return
        feed.dirty = True
        if not feed.refreshing:
            feed.refreshing = True
            self._spawn(self._refresh(feed))

    async def _refresh(self, feed: RunFeed) -> None:
        """Read the run's change once for all its streams (again while changes keep coming)."""
        try:
            while feed.dirty and feed.status != "deleted":
                feed.dirty = False
                try:
                    update = await self.read(lambda s: read_update(s, feed.run_id, feed.cursor))
                except Exception:  # the database is away: the next notice or poll retries
                    log.exception("live feed read failed for run %s", feed.run_id)
                    feed.dirty = True
                    await asyncio.sleep(POLL_SECONDS)
                    continue
                self._publish(feed, update)
        finally:
            feed.refreshing = False

    def _publish(self, feed: RunFeed, update: Update) -> None:
        start = feed.cursor
        for end, text in update.metrics:
            if start is not None:
                feed.log.append((start, end, text))
            start = end
        feed.cursor = update.cursor
        feed.summary, feed.summary_event = update.summary, update.summary_event
        feed.status = update.status
        feed.version += 1
        feed.published_at = time.monotonic()
        self._wake(feed)

    @staticmethod
    def _wake(feed: RunFeed) -> None:
        feed.changed.set()
        feed.changed = asyncio.Event()

    async def _tick(self) -> None:
        """Wake the streams of the feeds that owe a heartbeat or hold a stream due to end."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            for feed in list(self.feeds.values()):
                due = feed.deadlines and feed.deadlines[0] <= now
                while feed.deadlines and feed.deadlines[0] <= now:  # (left streams' too)
                    heapq.heappop(feed.deadlines)
                if due or now - feed.published_at >= HEARTBEAT_SECONDS - TICK_SECONDS:
                    self._wake(feed)

    # ------------------------------------------------------------ list pages

    def list_waiter(self) -> asyncio.Event:
        self._start()
        return self.list_changed

    def _bump_list(self) -> None:
        self.list_version += 1
        self.list_changed.set()
        self.list_changed = asyncio.Event()

    # ------------------------------------------------------------ watching

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._spawn(self._poll())
        self._spawn(self._tick())
        if make_url(self.url).get_backend_name() == "postgresql":
            self._spawn(self._listen())

    async def _poll(self) -> None:
        """One query per interval for all watched runs (and the runs list), whatever the
        number of streams."""
        while True:
            await asyncio.sleep(POLL_SECONDS if not self.listening else SAFETY_POLL_SECONDS)
            with contextlib.suppress(Exception):  # database away: try again next time
                await self._poll_once()

    async def _poll_once(self) -> None:
        ids = list(self.feeds)
        sigs, list_sig = await self.read(
            lambda s: (signatures(s, ids) if ids else {}, list_signature(s))
        )
        for run_id in ids:
            feed = self.feeds.get(run_id)
            if feed is None:
                continue
            sig = sigs.get(run_id)
            if sig != feed.signature:
                feed.signature = sig
                self.mark_dirty(run_id)
        if list_sig != self._list_signature:
            self._list_signature = list_sig
            self._bump_list()

    async def _listen(self) -> None:
        """LISTEN on one connection; reconnect after a failure (polling every second meanwhile,
        and treating every watched run as changed once back, for what was missed)."""
        import psycopg

        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    for run_id in list(self.feeds):
                        self.mark_dirty(run_id)
                    self._bump_list()
                    async for notice in conn.notifies():
                        self._on_notice(notice.payload)
            except Exception:
                log.warning("live feed: LISTEN connection lost; polling until it is back")
            self.listening = False
            await asyncio.sleep(POLL_SECONDS)

    def _on_notice(self, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.mark_dirty(uuid.UUID(payload))
        self._bump_list()


def list_signature(session: Session) -> tuple[Any, ...]:
    """What changes when the runs list changes: a run added, updated, or going lost."""
    r = models.Run
    lost = sa.func.sum(_lost(session))
    return tuple(session.execute(sa.select(sa.func.count(), sa.func.max(r.updated_at), lost)).one())


def hub_of(app: Any) -> Hub:
    """The app's hub for the running event loop (a test client may run the app in several)."""
    loop = asyncio.get_running_loop()
    hub: Hub | None = getattr(app.state, "live_hub", None)
    if hub is None or getattr(app.state, "live_hub_loop", None) is not loop:
        hub = Hub(app.state.session_factory, app.state.settings.database_url)
        app.state.live_hub, app.state.live_hub_loop = hub, loop
    return hub
