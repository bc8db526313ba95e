"""Background delivery that never blocks or breaks training.

Modelled on sentry_sdk's ``worker.py`` and segment's ``consumer.py``: one named daemon thread,
started lazily and again after a ``fork`` (the pid is checked on every submit); a bounded queue fed
with ``put_nowait`` (when it is full the item is written to the disk spool on the caller's thread:
never block, never lose); batches closed on size or time; capped exponential backoff that honours
``Retry-After``; no retry on a 4xx other than 408/429. Every failure is warned once, never raised.

A *sink* does the actual work: `HttpSink` (spool, then send) or `FileSink` (local JSON-lines file).
Items are objects with ``to_record() -> dict`` (an epoch; numbers are read off the device here, not
on the training thread) or ``str`` (the run's final status).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from client_hook import scalars
from client_hook.api import MAX_BATCH, RefusedError, RetryableError, RunUploader, deliver_spool
from client_hook.spool import LocalRunFile, RunSpool

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
    """No server: append the run header, epochs and status to a local JSON-lines file (kept
    open; one write per batch of epochs, flushed at once)."""

    def __init__(self, path: Any, run: dict, warn: WarnOnce) -> None:
        self.file = LocalRunFile(path)
        self.run = run
        self.warn = warn
        self._header_written = False
        self._handle: Any = None

    def _append(self, lines: list[tuple[str, dict]]) -> None:
        try:
            if self._handle is None:
                self.file.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.file.path, "a", encoding="utf-8")  # noqa: SIM115
            if not self._header_written:
                lines = [("run", {"run": self.run}), *lines]
            self._handle.write("".join(LocalRunFile.line(k, p) for k, p in lines))
            self._handle.flush()
            self._header_written = True
        except OSError as exc:
            self.warn("file", f"gradwatch: cannot write the run file {self.file.path}: {exc}")
            self._close()  # reopened on the next write

    def _close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass

    def accept(self, record: dict) -> None:
        kind = scalars.KEY if scalars.KEY in record else "epoch"
        self._append([(kind, {"record": record})])

    def accept_many(self, records: list[dict]) -> None:
        self._append([("epoch", {"record": r}) for r in records])

    def accept_status(self, status: str) -> None:
        self._append([("status", {"status": status})])

    spill = accept

    def next_attempt_in(self) -> float | None:
        return None

    def attempt(self, timeout: float | None = None) -> None:
        return None

    def report(self) -> DeliveryReport:
        self._close()  # asked at close: nothing is written after it
        return DeliveryReport(0, False, str(self.file.path))


class HttpSink:
    """Write-ahead to the spool, then send in batches with backoff."""

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
    ) -> None:
        self.uploader = uploader
        self.spool = spool
        self.warn = warn
        self.batch_wait = batch_wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.pending: dict[int, dict] = {}
        # the spool files that hold each pending epoch, and the epochs each file holds: a file
        # is removed once the server acknowledged all of them
        self._files_of: dict[int, set[Path]] = {}
        self._held: dict[Path, set[int]] = {}
        self.status: str | None = None
        self.refused: str | None = None
        self.spilled = False  # set by the training thread after writing to the spool itself
        self._lock = threading.Lock()
        self._first_pending_at: float | None = None
        self._next_try_at = 0.0
        self._backoff = backoff_base
        self._failing = False
        self._orphans_checked = False
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

    def accept(self, record: dict) -> None:
        if scalars.KEY in record:
            self.scalars.accept(record)
            return
        self.accept_many([record])

    def accept_many(self, records: list[dict]) -> None:
        """Spool the records (one file, one fsync), then queue them for sending."""
        if not records:
            return
        path: Path | None = None
        try:
            if len(records) == 1:
                path = self.spool.write_epoch(records[0])
            else:
                path = self.spool.write_epochs(records)
        except OSError as exc:
            self._spool_failed(exc)
        with self._lock:
            for record in records:
                epoch = int(record["epoch"])
                self.pending[epoch] = record
                self._track(epoch, path)
            if self._first_pending_at is None:
                self._first_pending_at = time.monotonic()

    def _track(self, epoch: int, path: Path | None) -> None:
        """`path` (None: the spool could not be written) holds `epoch`; under the lock."""
        if path is not None:
            self._files_of.setdefault(epoch, set()).add(path)
            self._held.setdefault(path, set()).add(epoch)

    def _acknowledged(self, epoch: int) -> None:
        """The server has `epoch`: every file that held it keeps one epoch fewer, and goes
        when it keeps none (under the lock)."""
        for path in self._files_of.pop(epoch, ()):
            held = self._held.get(path)
            if held is None:
                continue
            held.discard(epoch)
            if not held:
                del self._held[path]
                try:
                    self.spool.remove_files([path])
                except OSError as exc:  # left behind: a later resend is a duplicate
                    self._spool_failed(exc)

    def spill(self, record: dict) -> None:
        """Called on the training thread when the queue is full: disk only, picked up later."""
        if scalars.KEY in record:
            self.scalars.accept(record)
            return
        try:
            self.spool.write_epoch(record)
            self.spilled = True
        except OSError as exc:
            self._spool_failed(exc)
            self.accept(record)

    def accept_status(self, status: str) -> None:
        try:
            self.spool.write_status(status)
        except OSError as exc:
            self._spool_failed(exc)
        self.status = status

    def next_attempt_in(self) -> float | None:
        idle = not self.pending and not self.scalars.pending
        if self.refused or (idle and not self.status and not self.spilled):
            return None
        now = time.monotonic()
        batch_due = (self._first_pending_at or now) + self.batch_wait
        if len(self.pending) >= MAX_BATCH or self.status or self.spilled:
            batch_due = now
        return max(batch_due, self._next_try_at) - now

    def attempt(self, timeout: float | None = None) -> None:
        """One delivery attempt of everything pending; never raises."""
        if timeout is not None:
            timeout = max(0.05, min(timeout, self.uploader.client.timeout))
        if self.spilled:
            self.spilled = False
            self._load_spilled()
        try:
            while self.pending:
                with self._lock:
                    batch = [
                        self.pending[k] for k in sorted(self.pending)[: self.uploader.batch_size]
                    ]
                self.uploader.send_epochs(batch, timeout=timeout)
                with self._lock:
                    for record in batch:
                        epoch = int(record["epoch"])
                        if self.pending.get(epoch) is record:  # not replaced meanwhile
                            del self.pending[epoch]
                            self._acknowledged(epoch)
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

    def _load_spilled(self) -> None:
        """Take what the training thread spooled itself (the queue was full) into `pending`:
        every file not yet known, each epoch not already pending."""
        for path, records in self.spool.spooled():
            with self._lock:
                if path in self._held:
                    continue
                for record in records:
                    epoch = int(record["epoch"])
                    self.pending.setdefault(epoch, record)
                    self._track(epoch, path)  # removed when that epoch is acknowledged

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
        pending = (
            len(self.pending)
            if not self.spilled
            else max(len(self.pending), self.spool.pending_epochs())
        )
        pending += len(self.scalars.pending)
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
    polling every 0.25 s). The records reach the sink within about `poll_interval` seconds.
    """

    def __init__(
        self,
        sink: FileSink | HttpSink,
        warn: WarnOnce,
        queue_size: int = 256,
        name: str = "gradwatch-delivery",
        poll_interval: float = 1.0,
    ) -> None:
        self.sink = sink
        self.warn = warn
        self.queue_size = queue_size
        self.name = name
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._pid: int | None = None
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._deadline = float("inf")
        # items submitted / handed to the sink, for `wait_idle`
        self._idle = threading.Condition()
        self._submitted = self._handled = 0

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use, or we are a forked child: the thread is gone
            self._pid = os.getpid()
            self._queue = queue.Queue(self.queue_size)
            self._thread = None
            self._idle = threading.Condition()  # the parent's items are not ours to wait for
            self._submitted = self._handled = 0
            self._wake = threading.Event()
        if self._thread is None or not self._thread.is_alive():
            thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            thread.start()
            self._thread = thread

    def submit(self, item: Any) -> None:
        try:
            self._ensure_thread()
            with self._idle:
                self._submitted += 1
            self._queue.put_nowait(item)
        except queue.Full:
            self._handle(item, self.sink.spill)
            self._done()
        except RuntimeError:  # no new threads at interpreter shutdown: do it here
            self._handle(item, self.sink.accept)
            self._done()

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

    def _handle(self, item: Any, accept: Callable[[dict], None]) -> None:
        try:
            if isinstance(item, str):
                self.sink.accept_status(item)
            else:
                accept(item.to_record())
        except Exception as exc:  # noqa: BLE001 - never raise into the training loop
            self.warn("convert", f"gradwatch: could not record an epoch ({exc!r}); it is skipped")

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
                return

    def _handle_queued(self) -> bool:
        """Hand everything queued to the sink, consecutive epochs converted and accepted
        together; True if the queue held the close request."""
        epochs: list[Any] = []
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
                self._accept_epochs(epochs)
                epochs = []
                self._handle(item, self.sink.accept)
            elif isinstance(item, scalars.ScalarsItem):  # its own path (not an epoch)
                self._handle(item, self.sink.accept)
            else:
                epochs.append(item)
        self._accept_epochs(epochs)
        self._done(count)
        return closing

    def _accept_epochs(self, items: list[Any]) -> None:
        """Convert together (where the items know how: ``to_records``) and accept in one
        batch; if that fails, item by item (`_handle`: each failure warned, never raised)."""
        if not items:
            return
        together = getattr(type(items[0]), "to_records", None)
        if together is not None and all(type(i) is type(items[0]) for i in items):
            try:
                records = together(items)
            except Exception:  # noqa: BLE001 - one by one below, each failure warned
                records = None
            if records is not None:
                try:
                    self.sink.accept_many(records)
                except Exception as exc:  # noqa: BLE001 - never raise into the training loop
                    self.warn("accept", f"gradwatch: could not record epochs ({exc!r})")
                return
        for item in items:
            self._handle(item, self.sink.accept)

    def _final_flush(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _CLOSE:
                self._handle(item, self.sink.accept)
                self._done()
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
            self._wake.set()
            self._queue.put(_CLOSE, timeout=max(0.0, timeout))
            self._wake.set()
        except (queue.Full, RuntimeError):
            self._final_flush_here()
        if self._thread is not None:
            self._thread.join(max(0.0, self._deadline - time.monotonic()) + 0.2)
            if self._thread.is_alive():
                self._final_flush_here()
        return self.sink.report()

    def _final_flush_here(self) -> None:
        """The worker is stuck (or cannot run): spool what is still queued, from this thread."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _CLOSE:
                self._handle(item, self.sink.spill)
                self._done()
