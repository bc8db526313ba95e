"""Background delivery that never blocks or breaks training: the sinks (the thread is
`client_hook.worker`).

Modelled on sentry_sdk's ``worker.py`` and segment's ``consumer.py``: one named daemon thread,
started lazily and again after a ``fork`` (the pid is checked on every submit); a queue fed with
``put_nowait`` that never blocks the caller; batches closed on size or time; capped exponential
backoff that honours ``Retry-After``; no retry on a 4xx other than 408/429. Every failure is
warned once, never raised.

An epoch is written to disk on the training thread before it is queued (`DeliveryWorker.submit`
calls the sink's ``write_ahead``: one plain write, no fsync), so a process kill loses no epoch
whose ``end_epoch()`` returned. The queue is therefore unbounded: what it holds is on disk
already, and every unacknowledged epoch is kept in memory for sending anyway, so a bound would
bound nothing. A *sink* does the rest on the delivery thread: `HttpSink` (fsync, send, remove,
heartbeat) or `FileSink` (fsync of the local JSON-lines file). Items are epoch records (dicts,
or objects with ``to_record() -> dict``, converted on the submitting thread) or ``str`` (the
run's final status).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from client_hook import scalars
from client_hook.api import MAX_BATCH, RefusedError, RetryableError, RunUploader, deliver_spool
from client_hook.spool import EpochJournal, LocalRunFile, RunSpool, write_all

logger = logging.getLogger("gradwatch")


class GradwatchWarning(UserWarning):
    """Something went wrong in the background; training goes on."""


class WarnOnce:
    """Each kind of problem is reported once per monitor (and kept in `messages` for inspection)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key in self._seen:
            return
        self._seen.add(key)
        self.messages.append(message)
        warnings.warn(message, GradwatchWarning, stacklevel=2)


class EpochItem(Protocol):
    def to_record(self) -> dict: ...


@dataclass
class DeliveryReport:
    pending_epochs: int
    status_pending: bool
    location: str

    @property
    def complete(self) -> bool:
        return self.pending_epochs == 0 and not self.status_pending


class FileSink:
    """No server: the run header, epochs and status as lines of a local JSON-lines file, kept
    open. Epochs are appended on the training thread (one write each); the delivery thread
    fsyncs the file once per wake-up."""

    def __init__(self, path: Any, run: dict, warn: WarnOnce) -> None:
        self.file = LocalRunFile(path)
        self.run = run
        self.warn = warn
        self._header_written = False
        self._fd: int | None = None
        self._dirty = False
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _append(self, lines: list[tuple[str, dict]]) -> None:
        if self._pid != os.getpid():  # a forked child: the lock may have been copied held
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            try:
                if self._fd is None:
                    self.file.path.parent.mkdir(parents=True, exist_ok=True)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
                    self._fd = os.open(self.file.path, flags, 0o644)
                if not self._header_written:
                    lines = [("run", {"run": self.run}), *lines]
                data = "".join(LocalRunFile.line(k, p) for k, p in lines).encode()
                write_all(self._fd, data)
                self._header_written = self._dirty = True
            except OSError as exc:
                self.warn("file", f"gradwatch: cannot write the run file {self.file.path}: {exc}")
                self._close_locked()  # reopened on the next write

    def _close_locked(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def write_ahead(self, record: dict) -> None:
        self._append([("epoch", {"record": record})])

    def accept_scalars(self, record: dict) -> None:
        self._append([(scalars.KEY, {"record": record})])

    def accept_written(self, items: list[tuple[dict, Any]]) -> None:
        with self._lock:
            fd, dirty, self._dirty = self._fd, self._dirty, False
            if fd is not None and dirty:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    self.warn("file", f"gradwatch: cannot sync {self.file.path}: {exc}")

    def accept_status(self, status: str) -> None:
        self._append([("status", {"status": status})])

    def next_attempt_in(self) -> float | None:
        return None

    def attempt(self, timeout: float | None = None) -> None:
        return None

    def heartbeat(self) -> None:
        return None

    def report(self) -> DeliveryReport:
        self.accept_written([])
        with self._lock:
            self._close_locked()  # asked at close: nothing is written after it
        return DeliveryReport(0, False, str(self.file.path))


class HttpSink:
    """Write-ahead to the spool (training thread), then send in batches with backoff, and a
    heartbeat every `heartbeat_interval` seconds without an acknowledged epoch (None: none)."""

    def __init__(
        self,
        uploader: RunUploader,
        spool: RunSpool,
        server_url: str,
        warn: WarnOnce,
        *,
        batch_wait: float = 0.5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 120.0,
        heartbeat_interval: float | None = 30.0,
    ) -> None:
        self.uploader = uploader
        self.spool = spool
        self.journal = EpochJournal(spool)
        self.warn = warn
        self.batch_wait = batch_wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.heartbeat_interval = heartbeat_interval
        self.pending: dict[int, dict] = {}
        # the spool files that hold each pending epoch, the epochs each file holds, and how
        # many of its lines were seen here: a file is removed once sealed, every line seen and
        # every epoch acknowledged
        self._files_of: dict[int, set[Path]] = {}
        self._held: dict[Path, set[int]] = {}
        self._seen: dict[Path, int] = {}
        self.status: str | None = None
        self.refused: str | None = None
        self._lock = threading.Lock()
        self._first_pending_at: float | None = None
        self._next_try_at = 0.0
        self._backoff = backoff_base
        self._failing = False
        self._orphans_checked = False
        self._next_beat_at = time.monotonic() + (heartbeat_interval or 0.0)
        self._beats_stopped = heartbeat_interval is None
        self.scalars = scalars.ScalarOutbox(uploader, spool, warn)
        spool.set_open(True)
        try:
            spool.write_meta(uploader.run, server_url)
        except OSError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError) -> None:
        self.warn(
            "spool",
            f"gradwatch: cannot write the spool {self.spool.dir} ({exc}); "
            "undelivered epochs are kept in memory only",
        )

    def accept_scalars(self, record: dict) -> None:
        self.scalars.accept(record)  # spooled (one file, fsync) on the delivery thread

    def write_ahead(self, record: dict) -> Path | None:
        """On the training thread: append `record` to the spool (no fsync); the file, or None
        if the disk refused (then the record lives in memory only)."""
        try:
            return self.journal.append(record)
        except OSError as exc:
            self._spool_failed(exc)
            return None

    def accept_written(self, items: list[tuple[dict, Path | None]]) -> None:
        """On the delivery thread: queue the records written ahead for sending, then seal
        their spool file (one fsync)."""
        with self._lock:
            for record, path in items:
                epoch = int(record["epoch"])
                self.pending[epoch] = record
                self._track(epoch, path)
            if items and self._first_pending_at is None:
                self._first_pending_at = time.monotonic()
        try:
            self.journal.seal()
        except OSError as exc:
            self._spool_failed(exc)

    def _track(self, epoch: int, path: Path | None) -> None:
        """`path` (None: the spool could not be written) holds `epoch`; under the lock."""
        if path is not None:
            self._files_of.setdefault(epoch, set()).add(path)
            self._held.setdefault(path, set()).add(epoch)
            self._seen[path] = self._seen.get(path, 0) + 1

    def _acknowledged(self, epoch: int) -> None:
        """The server has `epoch`: every file that held it keeps one epoch fewer, and goes
        when it keeps none (under the lock)."""
        for path in self._files_of.pop(epoch, ()):
            held = self._held.get(path)
            if held is None:
                continue
            held.discard(epoch)
            self._remove_if_done(path)

    def _remove_if_done(self, path: Path) -> None:
        """Remove `path` once it holds nothing unacknowledged and nothing unseen (under the
        lock): a line the training thread wrote but did not queue yet keeps it."""
        if self._held.get(path) or not self.journal.complete(path, self._seen.get(path, 0)):
            return
        self._held.pop(path, None)
        self._seen.pop(path, None)
        self.journal.forget(path)
        try:
            self.spool.remove_files([path])
        except OSError as exc:  # left behind: a later resend is a duplicate
            self._spool_failed(exc)

    def accept_status(self, status: str) -> None:
        try:
            self.spool.write_status(status)
        except OSError as exc:
            self._spool_failed(exc)
        self.status = status

    def next_attempt_in(self) -> float | None:
        if self.refused or (not self.pending and not self.scalars.pending and not self.status):
            return None
        now = time.monotonic()
        batch_due = (self._first_pending_at or now) + self.batch_wait
        if len(self.pending) >= MAX_BATCH or self.status:
            batch_due = now
        return max(batch_due, self._next_try_at) - now

    def attempt(self, timeout: float | None = None) -> None:
        """One delivery attempt of everything pending; never raises."""
        if timeout is not None:
            timeout = max(0.05, min(timeout, self.uploader.client.timeout))
        try:
            while self.pending:
                with self._lock:
                    batch = [
                        self.pending[k] for k in sorted(self.pending)[: self.uploader.batch_size]
                    ]
                self.uploader.send_epochs(batch, timeout=timeout)
                self._beat_done()  # acknowledged epochs count as a heartbeat
                with self._lock:
                    for record in batch:
                        epoch = int(record["epoch"])
                        if self.pending.get(epoch) is record:  # not replaced meanwhile
                            del self.pending[epoch]
                            self._acknowledged(epoch)
            self.scalars.send(timeout)
            self.scalars.send(timeout)
            if self.status:
                self.uploader.send_status(self.status, timeout=timeout)
                self.spool.clear_status()
                self.spool.discard()
                self.status = None
        except RetryableError as exc:
            self._retry_later(exc)
            return
        except RefusedError as exc:
            self.refused = str(exc)
            self.warn(
                "refused",
                f"gradwatch: the server refused run {self.uploader.run_id} "
                f"({exc}); not retrying. Epochs stay in {self.spool.dir}; fix the "
                "cause and run `gradwatch sync`. Training continues.",
            )
            return
        except Exception as exc:  # noqa: BLE001 - a background failure must never escape
            self._retry_later(RetryableError(f"{type(exc).__name__}: {exc}"))
            return
        if self._failing:
            logger.warning("gradwatch: server reachable again; spooled epochs delivered")
        self._failing = False
        self._backoff = self.backoff_base
        self._first_pending_at = None
        if not self._orphans_checked:
            self._orphans_checked = True
            self._deliver_orphans()

    def _beat_done(self) -> None:
        if self.heartbeat_interval is not None:
            self._next_beat_at = time.monotonic() + self.heartbeat_interval

    def heartbeat(self) -> None:
        """Tell the server the process is alive, if `heartbeat_interval` passed without an
        acknowledged epoch. A failure is warned once; an older server without the endpoint
        (404/405) ends heartbeats without a word. Never raises."""
        if self._beats_stopped or self.refused or time.monotonic() < self._next_beat_at:
            return
        self._beat_done()
        try:
            self.uploader.send_heartbeat()
        except RefusedError as exc:
            if exc.status in (404, 405):
                self._beats_stopped = True
                return
            self.warn("heartbeat", f"gradwatch: heartbeat refused ({exc}); training continues")
        except Exception as exc:  # noqa: BLE001 - a background failure must never escape
            self.warn(
                "heartbeat",
                f"gradwatch: cannot send a heartbeat to {self.uploader.client.base_url} "
                f"({exc}); training continues",
            )

    def _deliver_orphans(self) -> None:
        """Send what earlier, dead runs left in the same spool for the same server."""
        client = self.uploader.client
        for spool in RunSpool.all_runs(self.spool.root):
            if spool.run_id == self.spool.run_id or spool.owner_alive():
                continue
            try:
                if spool.read_meta().get("server_url") != client.base_url:
                    continue
                accepted, _, _ = deliver_spool(spool, client.base_url, client.token)
                logger.warning(
                    "gradwatch: delivered %d spooled epoch(s) of earlier run %s",
                    accepted,
                    spool.run_id,
                )
            except Exception as exc:  # noqa: BLE001 - background work: warn, never raise
                self.warn(
                    "orphans",
                    f"gradwatch: could not deliver the spooled run "
                    f"{spool.run_id} ({exc}); try `gradwatch sync`",
                )

    def _retry_later(self, exc: RetryableError) -> None:
        delay = self._backoff
        self._backoff = min(self.backoff_cap, self._backoff * 2)
        if exc.retry_after is not None:
            delay = (
                exc.retry_after
                if exc.retry_after == 0.0
                else max(delay, min(exc.retry_after, self.retry_after_cap))
            )
        self._next_try_at = time.monotonic() + delay
        self._failing = True
        self.warn(
            "unreachable",
            f"gradwatch: cannot deliver to {self.uploader.client.base_url} "
            f"({exc}); epochs are spooled in {self.spool.dir} and retried "
            "in the background. Training continues.",
        )

    def report(self) -> DeliveryReport:
        self.spool.set_open(False)  # asked at close: from now on `gradwatch sync` may take over
        with self._lock:
            pending = len(self.pending) + len(self.scalars.pending)
        return DeliveryReport(pending, self.status is not None, str(self.spool.dir))
