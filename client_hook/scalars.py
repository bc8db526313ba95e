"""Named scalars per epoch that the training script logs itself (`GradMonitor.log_metrics`:
test RMSE, accuracy ...), delivered like epochs: written to the spool first, then POSTed to
``/api/runs/{id}/scalars`` on the delivery thread with the same retries; removed from the spool
once acknowledged. A resend is a duplicate on the server, never a second row. A batch the server
refuses (a 4xx) is warned once and dropped: metrics never stop the gradient records.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client_hook.api import RefusedError, RetryableError, RunUploader
from client_hook.spool import RunSpool, _atomic_write, _unlink, dumps

NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,100}$")  # as the server's schemas.ScalarName
MAX_PER_REQUEST = 500
KEY = "scalars"  # a record with this key is a scalars record, not an epoch
_FILES = itertools.count()  # file names written by this process stay distinct


class ScalarsItem:
    """Values logged for one epoch, waiting for the delivery thread (`to_record` runs there:
    a tensor is read off the device there, not on the training thread)."""

    def __init__(self, epoch: int, values: dict[str, Any], warn: Callable[[str, str], None]):
        self.epoch, self.values, self.warn = epoch, values, warn

    def to_record(self) -> dict:
        out: dict[str, float | str] = {}
        for name, value in self.values.items():
            if not isinstance(name, str) or not NAME.match(name):
                self.warn(f"scalar-name-{name}", f"gradwatch: metric name {name!r} skipped "
                          "(letters, digits and _ . : / - only, at most 100)")  # fmt: skip
                continue
            try:
                v = float(
                    value.detach().reshape(()).cpu().item() if hasattr(value, "detach") else value
                )
            except (TypeError, ValueError, RuntimeError):
                self.warn(
                    f"scalar-value-{name}", f"gradwatch: metric {name!r} is not a number; skipped"
                )
                continue
            out[name] = (
                v if math.isfinite(v) else str(v).replace("inf", "Infinity").replace("nan", "NaN")
            )
        return {"epoch": self.epoch, KEY: out}


class ScalarOutbox:
    """Scalars records on their way to the server (one spool file each)."""

    def __init__(self, uploader: RunUploader, spool: RunSpool, warn: Callable[[str, str], None]):
        self.uploader, self.spool, self.warn = uploader, spool, warn
        self.pending: list[tuple[Path | None, dict]] = []
        self._lock = threading.Lock()

    def accept(self, record: dict) -> None:
        if not record[KEY]:
            return
        target = spool_path(self.spool)
        path: Path | None = target
        try:
            self.spool.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, dumps(record))
        except OSError as exc:
            path = None
            self.warn("scalars-spool", f"gradwatch: cannot spool metrics ({exc}); kept in memory")
        with self._lock:
            self.pending.append((path, record))

    def send(self, timeout: float | None = None) -> None:
        """POST what is pending; RetryableError goes to the caller's backoff."""
        while self.pending:
            with self._lock:
                batch = self.pending[:MAX_PER_REQUEST]
            send(self.uploader, [r for _, r in batch], self.warn, timeout)
            with self._lock:
                del self.pending[: len(batch)]
            self.spool.remove_files(p for p, _ in batch if p is not None)


def spool_path(spool: RunSpool) -> Path:
    return spool.dir / f"scalars-{time.time_ns():020d}-{os.getpid()}-{next(_FILES):06d}.json"


def send(
    uploader: RunUploader,
    records: list[dict],
    warn: Callable[[str, str], None],
    timeout: float | None,
) -> None:
    """One POST of scalars records; a refusal other than 404 is warned and dropped."""
    body = {"records": [{"epoch": r["epoch"], "values": r[KEY]} for r in records]}
    uploader.ensure_run(timeout)
    try:
        uploader.client.request(
            "POST", f"/api/runs/{uploader.run_id}/scalars", body, timeout=timeout
        )
    except RefusedError as exc:
        if exc.status == 404:
            uploader.created = False
            raise RetryableError("run unknown to the server; creating it again", 0.0) from None
        warn("scalars-refused", f"gradwatch: the server refused metrics of run "
             f"{uploader.run_id} ({exc}); they are dropped. Training continues.")  # fmt: skip


def deliver_spooled(spool: RunSpool, uploader: RunUploader) -> int:
    """Send the scalars a spool holds (`gradwatch sync`, a later run); returns how many records."""
    files = sorted(spool.dir.glob("scalars-*.json")) if spool.dir.is_dir() else []
    records = []
    for path in files:
        try:
            records.append(json_load(path))
        except (OSError, ValueError):
            continue
    for i in range(0, len(records), MAX_PER_REQUEST):
        send(uploader, records[i : i + MAX_PER_REQUEST], _log, None)
    for path in files:
        _unlink(path)
    return len(records)


def read_local(path: Path | str) -> list[dict]:
    """The scalars records of a local run file (`FileSink`), for `gradwatch import`."""
    with open(path, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    return [dict(i["record"]) for i in items if i.get("kind") == KEY]


def upload_local(path: Path | str, uploader: RunUploader) -> int:
    """Send a local run file's scalars records (synchronously); returns how many."""
    records = read_local(path)
    for i in range(0, len(records), MAX_PER_REQUEST):
        send(uploader, records[i : i + MAX_PER_REQUEST], _log, None)
    return len(records)


def json_load(path: Path) -> dict:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _log(_key: str, message: str) -> None:
    logging.getLogger("gradwatch").warning(message)
