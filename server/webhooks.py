"""Alert webhooks: announce alert episodes as they open and close, to chat or any HTTP endpoint.

`alerts` calls `notify` with the episodes it writes; nothing is announced until the write
commits (a refused batch announces nothing). At commit the transitions are worked out (an
episode is announced once it has lasted `webhook_min_epochs` epochs; its close only if its open
was announced; re-reading history - late epochs, a new threshold - announces nothing) and handed
to the `Dispatcher`, which applies a cooldown per (run, kind, task) so that a flapping ratio
does not spam. Each URL has its own `Lane`, as in sentry-python's `worker.py`: a bounded queue
(`put_nowait`: a full queue drops and counts, ingest never waits) and a daemon thread that
POSTs with capped exponential backoff (honouring `Retry-After`; no retry on a 4xx other than
408/429); a slow receiver delays only itself. Failures are logged and counted in `/health`.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from server import models
from server.config import Settings, WebhookTarget

logger = logging.getLogger("gradwatch.webhooks")
DISPATCHER, PENDING, READY = "gradwatch_webhooks", "gradwatch_webhooks_pending", "gradwatch_ready"


@dataclass(frozen=True)
class Snapshot:
    """An episode as `alerts` wrote it, and what it was before that write."""

    kind: str
    task: str | None
    opened_epoch: int
    closed_epoch: int | None
    value: float | None
    message: str
    is_new: bool
    was_open: bool


@dataclass(frozen=True)
class AlertEvent:
    event: str  # "opened" | "closed"
    run_id: str
    run_name: str
    project: str
    kind: str
    task: str | None
    opened_epoch: int
    closed_epoch: int | None
    value: float | None
    message: str
    url: str


def notify(session: Session, run_id: uuid.UUID, episodes: Iterable[Any]) -> None:
    """Called by `alerts` with the episodes it has just written (`alerts.Episode`); free when
    no webhook is configured. Announced after the transaction commits."""
    if DISPATCHER not in session.info:
        return
    run = session.get(models.Run, run_id)  # in the identity map: the caller holds it
    snaps = [
        Snapshot(
            e.kind, e.task, e.opened_epoch, e.closed_epoch, e.peak_value, e.message,
            e.id is None, e.id is None or e.was_open,
        )
        for e in episodes
    ]  # fmt: skip
    session.info.setdefault(PENDING, []).append((run, run.last_epoch if run else None, snaps))


def transitions(
    snaps: Iterable[Snapshot], prev_last: int | None, new_last: int, min_epochs: int
) -> list[tuple[str, Snapshot]]:
    """("opened" | "closed", episode) to announce, given the run's last epoch before and after
    the write. An episode lasts from its opened epoch to the epoch before it closed."""
    fresh = prev_last is None or new_last > prev_last
    out = []
    for s in snaps:
        if not s.was_open or (s.is_new and not fresh):
            continue  # closed before this write, or history re-read
        end = s.closed_epoch if s.closed_epoch is not None else new_last + 1
        if end - s.opened_epoch < min_epochs:
            continue
        before = 0 if s.is_new or prev_last is None else prev_last + 1 - s.opened_epoch
        if before < min_epochs:
            out.append(("opened", s))
        if s.closed_epoch is not None:
            out.append(("closed", s))
    return out


def slack_body(ev: AlertEvent) -> dict[str, Any]:
    where = f"{ev.kind}" + (f" ({ev.task})" if ev.task else "")
    if ev.event == "opened":
        head = f":warning: gradwatch: {where} alert opened at epoch {ev.opened_epoch}"
    else:
        head = f":white_check_mark: gradwatch: {where} alert closed at epoch {ev.closed_epoch}"
    return {
        "text": f"{head} in run *{ev.run_name}* ({ev.project}): {ev.message}. <{ev.url}|Open run>"
    }


def json_body(ev: AlertEvent) -> dict[str, Any]:
    body = asdict(ev)
    body["event"] = f"alert.{ev.event}"
    if ev.value is not None and not math.isfinite(ev.value):
        body["value"] = str(ev.value).replace("inf", "Infinity").replace("nan", "NaN")
    return body


@dataclass
class Delivery:
    event: AlertEvent
    attempts: int = 0


class Dispatcher:
    """Decides what is announced (the cooldown) and hands it to one `Lane` per URL, so that a
    slow or dead receiver delays only its own announcements. Its figures go to /health."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        base = settings.public_url or f"http://{settings.host}:{settings.port}"
        self.base_url = base.rstrip("/")
        self.lanes = [Lane(t, settings) for t in settings.webhooks]
        self._lock = threading.Lock()
        self._last_opened: dict[tuple[str, str, str | None], float] = {}
        self._quiet: set[tuple[str, str, str | None, int]] = set()
        self.suppressed = 0

    def submit(self, events: list[AlertEvent]) -> None:
        """Called after a commit on the request's thread: never blocks (see `Lane.put`)."""
        for ev in events:
            if self._announce(ev):
                for lane in self.lanes:
                    if ev.kind in lane.target.kinds:
                        lane.put(ev)

    def _announce(self, ev: AlertEvent) -> bool:
        """False within the cooldown after an announced open of the same run, kind and task
        (and then for that episode's close too): a flapping rule stays quiet."""
        key = (ev.run_id, ev.kind, ev.task)
        episode = (*key, ev.opened_epoch)
        now = time.monotonic()
        with self._lock:
            if ev.event == "opened":
                last = self._last_opened.get(key)
                if last is not None and now - last < self.settings.webhook_cooldown_s:
                    self._quiet.add(episode)
                    self.suppressed += 1
                    return False
                self._last_opened[key] = now
            elif episode in self._quiet:
                self._quiet.discard(episode)
                self.suppressed += 1
                return False
        return True

    def status(self) -> dict[str, Any]:
        lanes = [lane.status() for lane in self.lanes]
        total = {k: sum(lane[k] for lane in lanes) for k in (*COUNTS, "queued", "retrying")}
        errors = [lane["last_error"] for lane in lanes if lane["last_error"]]
        return {
            "status": "failing" if any(lane["failing"] for lane in lanes) else "ok",
            "urls": len(lanes),
            **total,
            "suppressed": self.suppressed,
            "last_error": max(errors, key=lambda e: e["at"]) if errors else None,
        }

    def close(self, timeout: float = 2.0) -> None:
        for lane in self.lanes:
            lane.close(timeout / max(1, len(self.lanes)))


COUNTS = ("sent", "failed", "retried", "dropped")


class Lane:
    """One URL: a bounded queue, a daemon thread, a heap of retries (capped exponential
    backoff, honouring Retry-After; no retry on a 4xx other than 408/429)."""

    def __init__(self, target: WebhookTarget, settings: Settings) -> None:
        self.target, self.settings = target, settings
        self._queue: queue.Queue[AlertEvent | None] = queue.Queue(settings.webhook_queue_size)
        self._retries: list[tuple[float, int, Delivery]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counts = dict.fromkeys(COUNTS, 0)
        self.last_error: dict[str, Any] | None = None
        self._failing = False

    def put(self, ev: AlertEvent) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="gradwatch-webhooks", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(ev)
        except queue.Full:
            self.counts["dropped"] += 1
            logger.warning("webhook %s: queue full (%d), dropped the %s %s alert of run %s",
                           self.target.url, self._queue.maxsize, ev.event, ev.kind,
                           ev.run_id)  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {
            **self.counts,
            "queued": self._queue.qsize(),
            "retrying": len(self._retries),
            "failing": self._failing,
            "last_error": self.last_error,
        }

    def close(self, timeout: float) -> None:
        """Stop the thread; what is still queued or waiting to retry is logged, not sent."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
        left = self._queue.qsize() + len(self._retries)
        if left:
            logger.warning("webhook %s: %d announcement(s) not delivered at shutdown",
                           self.target.url, left)  # fmt: skip

    def _run(self) -> None:
        while True:
            wait = self._retries[0][0] - time.monotonic() if self._retries else None
            try:
                ev = self._queue.get(timeout=None if wait is None else max(0.0, wait))
            except queue.Empty:
                self._retry_due()
                continue
            if ev is None:
                return
            self._attempt(Delivery(ev))
            self._retry_due()

    def _retry_due(self) -> None:
        while self._retries and self._retries[0][0] <= time.monotonic():
            self._attempt(heapq.heappop(self._retries)[2])

    def _attempt(self, d: Delivery) -> None:
        d.attempts += 1
        body = slack_body(d.event) if self.target.format == "slack" else json_body(d.event)
        retry_after: float | None = None
        try:
            request = urllib.request.Request(
                self.target.url,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "User-Agent": "gradwatch-webhooks"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=self.settings.webhook_timeout_s):
                pass
            self.counts["sent"] += 1
            self._failing = False
            return
        except urllib.error.HTTPError as exc:
            error, retryable = f"HTTP {exc.code}", exc.code in (408, 429) or exc.code >= 500
            retry_after = _retry_after(exc.headers.get("Retry-After"))
        except (OSError, ValueError) as exc:  # refused, timed out, DNS, bad URL
            error, retryable = f"{type(exc).__name__}: {exc}", True
        self._failed(d, error, retryable, retry_after)

    def _failed(self, d: Delivery, error: str, retryable: bool, retry_after: float | None) -> None:
        self._failing = True
        self.last_error = {"url": self.target.url, "error": error, "at": time.time()}
        url, ev = self.target.url, d.event
        if retryable and d.attempts < self.settings.webhook_max_attempts:
            s = self.settings
            delay = min(s.webhook_backoff_cap_s, s.webhook_backoff_s * 2 ** (d.attempts - 1))
            if retry_after is not None:
                delay = max(delay, min(retry_after, s.webhook_backoff_cap_s))
            self.counts["retried"] += 1
            self._seq += 1
            heapq.heappush(self._retries, (time.monotonic() + delay, self._seq, d))
            logger.warning("webhook %s failed (%s); retry %d in %.1fs",
                           url, error, d.attempts, delay)  # fmt: skip
            return
        self.counts["failed"] += 1
        logger.error("webhook %s failed (%s) after %d attempt(s); %s alert of run %s not sent",
                     url, error, d.attempts, ev.kind, ev.run_id)  # fmt: skip


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the backoff decides


# ---------------------------------------------------------------- wiring to the sessions


def install(factory: sessionmaker[Session], settings: Settings) -> Dispatcher | None:
    """Announce the alerts written through `factory`'s sessions; None when no URL is set."""
    if not settings.webhooks:
        return None
    dispatcher = Dispatcher(settings)
    factory.configure(info={DISPATCHER: dispatcher})
    event.listen(factory, "before_commit", _before_commit)
    event.listen(factory, "after_commit", _after_commit)
    event.listen(factory, "after_rollback", _forget)
    return dispatcher


def _before_commit(session: Session) -> None:
    dispatcher: Dispatcher = session.info[DISPATCHER]
    min_epochs = dispatcher.settings.webhook_min_epochs
    ready = []
    for run, prev_last, snaps in session.info.pop(PENDING, ()):
        if run is None or run.last_epoch is None:
            continue
        url = f"{dispatcher.base_url}/runs/{run.id}"
        for name, s in transitions(snaps, prev_last, run.last_epoch, min_epochs):
            ready.append(_event(name, run, s, url))
    if ready:
        session.info[READY] = ready


def _event(name: str, run: models.Run, s: Snapshot, url: str) -> AlertEvent:
    return AlertEvent(
        name, str(run.id), run.name, run.project, s.kind, s.task,
        s.opened_epoch, s.closed_epoch, s.value, s.message, url,
    )  # fmt: skip


def _after_commit(session: Session) -> None:
    ready = session.info.pop(READY, None)
    if ready:
        session.info[DISPATCHER].submit(ready)


def _forget(session: Session) -> None:
    session.info.pop(PENDING, None)
    session.info.pop(READY, None)
