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
from typing import Any, TypeVar

from sqlalchemy.engine.url import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from server import feed_reads
from server.errors import RunNotFound
from server.feed_reads import Update
from server.notify import CHANNEL

POLL_SECONDS = 1.0
SAFETY_POLL_SECONDS = 10.0
TICK_SECONDS = 5.0
HEARTBEAT_SECONDS = 15.0
LOG_LENGTH = 64
TRIM_DELAY_SECONDS = 1.0
OPEN_WAIT_SECONDS = 5.0
log = logging.getLogger("gradwatch.livefeed")
T = TypeVar("T")


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


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
        self._checks: dict[uuid.UUID, asyncio.Future[bool]] = {}
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

    async def check_exists(self, run_id: uuid.UUID) -> None:
        """Raise RunNotFound unless the run exists: known from its feed when it is watched
        here, else one read shared by every stream asking at the same time."""
        await self.opened(run_id)
        if self.knows(run_id):
            return
        pending = self._checks.get(run_id)
        if pending is None:
            pending = asyncio.ensure_future(self.read(lambda s: feed_reads.exists(s, run_id)))
            self._checks[run_id] = pending
            pending.add_done_callback(lambda _: self._checks.pop(run_id, None))
        if not await asyncio.shield(pending):
            raise RunNotFound({"run_id": str(run_id)})

    async def opened(self, run_id: uuid.UUID) -> None:
        """Wait (at most `OPEN_WAIT_SECONDS`) for the first read of a feed that another stream
        just opened. With `check_exists`: a crowd of viewers opening one run costs a read or
        two, not two each (and no burst of worker threads that outlives it)."""
        feed = self.feeds.get(run_id)
        if feed is not None and feed.cursor is None and feed.refreshing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(feed.changed.wait(), OPEN_WAIT_SECONDS)

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
                    update = await self.read(
                        lambda s: feed_reads.read_update(s, feed.run_id, feed.cursor)
                    )
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
            lambda s: (feed_reads.signatures(s, ids) if ids else {}, feed_reads.list_signature(s))
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


def hub_of(app: Any) -> Hub:
    """The app's hub for the running event loop (a test client may run the app in several)."""
    loop = asyncio.get_running_loop()
    hub: Hub | None = getattr(app.state, "live_hub", None)
    if hub is None or getattr(app.state, "live_hub_loop", None) is not loop:
        hub = Hub(app.state.session_factory, app.state.settings.database_url)
        app.state.live_hub, app.state.live_hub_loop = hub, loop
    return hub
