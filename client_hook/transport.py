"""Background delivery that never blocks or breaks training.

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
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from client_hook import scalars
from client_hook.api import MAX_BATCH, RefusedError, RetryableError, RunUploader, deliver_spool
from client_hook.spool import EpochJournal, LocalRunFile, RunSpool, write_all

logger = logging.getLogger("gradwatch")
_CLOSE = object()


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


class DeliveryWorker:
    """The queue and its daemon thread. `submit` never blocks; `close` is bounded by a timeout.

    The thread is not woken by `submit`: it looks at the queue every `poll_interval` seconds
    (and at once on `flush`/`close`) and handles everything queued in one go. Each time it
    wakes it takes the GIL, and each of its system calls hands the GIL back and forth with the
    training thread, which on a small model costs the training thread far more than the work
    itself (measured: ~0.5 ms per epoch woken one by one, for ~0.07 ms of work; bench/
    hook_overhead.py). Waking once a second bounds that cost by time, not by epochs (on
    DualTaskMLP with default sampling, in one paired run: 1.054x a plain step, against 1.061x
    polling every 0.25 s). The records reach the server within about `poll_interval` seconds;
    they are on disk before `submit` returns.
    """

    def __init__(
        self,
        sink: FileSink | HttpSink,
        warn: WarnOnce,
        name: str = "gradwatch-delivery",
        poll_interval: float = 1.0,
        writers: Sequence[Any] = (),
    ) -> None:
        self.sink = sink
        # extra writers (e.g. a tracker): ``write(records)`` after the sink took them, on this
        # thread; ``close()`` at the end if they have one. A failing writer is warned once.
        self.writers = list(writers)
        self.warn = warn
        self.name = name
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._pid: int | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._deadline = float("inf")
        # items submitted / handed to the sink, for `wait_idle`
        self._idle = threading.Condition()
        self._submitted = self._handled = 0

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use, or we are a forked child: the thread is gone
            self._pid = os.getpid()
            self._queue = queue.SimpleQueue()
            self._thread = None
            self._idle = threading.Condition()  # the parent's items are not ours to wait for
            self._submitted = self._handled = 0
            self._wake = threading.Event()
        if self._thread is None or not self._thread.is_alive():
            thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            thread.start()
            self._thread = thread

    def submit(self, item: EpochItem | dict | str) -> None:
        """Queue an epoch (written to disk here first), evaluation metrics (`scalars`, spooled
        by the delivery thread) or the final status; never raises."""
        if not isinstance(item, (str, scalars.ScalarsItem)):
            try:
                record = item if isinstance(item, dict) else item.to_record()
                item = (record, self.sink.write_ahead(record))  # type: ignore[assignment]
            except Exception as exc:  # noqa: BLE001 - never raise into the training loop
                self.warn("convert", f"gradwatch: could not record an epoch ({exc!r}); skipped")
                return
        try:
            self._ensure_thread()
        except RuntimeError:  # no new threads at interpreter shutdown: the caller delivers
            pass
        with self._idle:
            self._submitted += 1
        self._queue.put_nowait(item)

    def _done(self, count: int = 1) -> None:
        with self._idle:
            self._handled += count
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds until every submitted item has been handed to the
        sink (or skipped with a warning); True if it has."""
        self._wake.set()
        with self._idle:
            return self._idle.wait_for(lambda: self._handled >= self._submitted, timeout)

    def _run(self) -> None:
        while True:
            wait = self.sink.next_attempt_in()
            if wait is not None and wait <= 0:
                self.sink.attempt()
                continue
            self._wake.wait(self.poll_interval if wait is None else min(wait, self.poll_interval))
            self._wake.clear()
            if self._handle_queued():
                self._final_flush()
                self._forward(None)
                return
            self.sink.heartbeat()

    def _handle_queued(self) -> bool:
        """Hand everything queued to the sink (the epochs together); True if the queue held
        the close request."""
        epochs: list[tuple[dict, Any]] = []
        count, closing = 0, False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSE:
                closing = True
                break
            count += 1
            if isinstance(item, str):  # the final status, after the epochs before it
                self._accept(epochs)
                epochs = []
                self._accept_status(item)
            elif isinstance(item, scalars.ScalarsItem):
                self._accept_scalars(item)
            else:
                epochs.append(item)
        self._accept(epochs)
        self._done(count)
        return closing

    def _accept(self, epochs: list[tuple[dict, Any]]) -> None:
        try:
            self.sink.accept_written(epochs)
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.warn("accept", f"gradwatch: could not queue epochs for sending ({exc!r})")
        if epochs:
            self._forward([record for record, _ in epochs])

    def _accept_scalars(self, item: scalars.ScalarsItem) -> None:
        try:
            self.sink.accept_scalars(item.to_record())
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.warn("scalars", f"gradwatch: could not record metrics ({exc!r}); skipped")

    def _accept_status(self, status: str) -> None:
        try:
            self.sink.accept_status(status)
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.warn("status", f"gradwatch: could not record the final status ({exc!r})")

    def _forward(self, records: list[dict] | None) -> None:
        """Hand `records` to each extra writer (None: close them); failures warned once each."""
        for writer in self.writers:
            try:
                if records is not None:
                    writer.write(records)
                elif hasattr(writer, "close"):
                    writer.close()
            except Exception as exc:  # noqa: BLE001 - a tracker must never break delivery
                name = type(writer).__name__
                self.warn(
                    f"writer:{name}",
                    f"gradwatch: {name} failed ({exc!r}); its numbers may be incomplete, "
                    "training continues",
                )

    def _final_flush(self) -> None:
        self._handle_queued()  # anything queued after the close request
        while (wait := self.sink.next_attempt_in()) is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0.05:
                return
            if wait > 0:
                time.sleep(min(wait, remaining))
                continue
            self.sink.attempt(timeout=remaining)

    def close(self, timeout: float) -> DeliveryReport:
        """Flush for at most `timeout` seconds; whatever is left stays spooled."""
        self._deadline = time.monotonic() + timeout
        try:
            self._ensure_thread()
        except RuntimeError:  # interpreter shutdown: no thread to wait for
            self._handle_queued()
            return self.sink.report()
        self._queue.put_nowait(_CLOSE)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, self._deadline - time.monotonic()) + 0.2)
            if self._thread.is_alive():  # stuck in a request: seal and record from here
                self._handle_queued()
        return self.sink.report()
