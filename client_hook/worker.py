"""The delivery thread: one named daemon thread and its queue, generic over the sink.

Modelled on sentry_sdk's ``worker.py``: started lazily and again after a ``fork`` (the pid is
checked on every submit), `submit` never blocks, `close` is bounded by a timeout. What to do with
an epoch (spool, send, retry) is the sink's business (`client_hook.transport`); extra writers
(trackers) get the records the sink accepted.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from client_hook import scalars
from client_hook.transport import DeliveryReport, EpochItem, FileSink, HttpSink, WarnOnce

_CLOSE = object()


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
