"""On-disk storage of the client: the delivery spool and the local run file.

Spool (``GRADWATCH_SPOOL_DIR``, default ``.gradwatch/spool`` under the working directory)::

    <spool>/<run_id>/run.json             RunCreate payload + server URL, pid and host of the writer
    <spool>/<run_id>/epochs-<seq>.jsonl   epochs not yet acknowledged, one JSON line each
    <spool>/<run_id>/status.json          a final status not yet acknowledged

Every epoch is written here *before* it is sent (write-ahead), by the training thread inside
``end_epoch()``: one plain write to the open ``epochs-`` segment (`EpochJournal`), no fsync. A
killed process loses nothing whose write returned (the page cache is the kernel's); the delivery
thread closes the segment with one fsync per wake-up (a machine crash is the only loss window,
about a second) and removes it once the server acknowledged all its epochs. A resend is harmless
because the server skips identical epochs; ``gradwatch sync`` delivers what is left. Where two
lines hold the same epoch, the later one (in file-name order, then line order) wins. Files
written by earlier versions (``epoch-N.json``, ``epochs-<seq>.json`` and a complete
``.epoch*.tmp`` left by a killed process) are read too.

Local run file (no server configured): JSON lines ``{"kind": "run"|"epoch"|"status", ...}`` that
``gradwatch import FILE`` uploads later. Non-finite floats are written as the API's strings
"NaN", "Infinity", "-Infinity" so that every line is valid JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPOOL_ENV = "GRADWATCH_SPOOL_DIR"
_BATCHES = itertools.count()  # names `epochs-` files written by this process
_OPEN_HERE: set[str] = set()  # runs whose monitor in THIS process is not closed yet


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by the API's strings, recursively; UUIDs become strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> str:
    """Strict JSON (no bare NaN literal) with non-finite floats as strings.

    The C encoder alone when every float is finite (it refuses the others); `json_safe`'s
    Python walk only then (on the delivery thread the walk cost more than the encoding)."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), default=_json_default)
    except (ValueError, TypeError):  # a non-finite float, or a key json does not take
        return json.dumps(json_safe(value), allow_nan=False, separators=(",", ":"))


def default_spool_dir() -> Path:
    return Path(os.environ.get(SPOOL_ENV) or Path.cwd() / ".gradwatch" / "spool")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass  # another deliverer (e.g. `gradwatch sync`) got there first


class RunSpool:
    """The spool folder of one run. Safe against concurrent deliverers (the server dedups)."""

    def __init__(self, root: Path | str, run_id: str) -> None:
        self.root = Path(root)
        self.run_id = str(run_id)
        self.dir = self.root / self.run_id

    @classmethod
    def all_runs(cls, root: Path | str) -> list[RunSpool]:
        root = Path(root)
        if not root.is_dir():
            return []
        return [cls(root, d.name) for d in sorted(root.iterdir()) if (d / "run.json").is_file()]

    def write_meta(self, run: dict, server_url: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "run": run,
            "server_url": server_url,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        _atomic_write(self.dir / "run.json", dumps(meta))

    def set_open(self, is_open: bool) -> None:
        """Whether a monitor of this process still delivers this run (see `owner_alive`)."""
        if is_open:
            _OPEN_HERE.add(self.run_id)
        else:
            _OPEN_HERE.discard(self.run_id)

    def read_meta(self) -> dict:
        return json.loads((self.dir / "run.json").read_text(encoding="utf-8"))

    def owner_alive(self) -> bool:
        """True when the process that wrote this spool still runs on this host."""
        try:
            meta = self.read_meta()
        except (OSError, ValueError):
            return False
        if meta.get("host") != socket.gethostname():
            return False
        if meta.get("pid") == os.getpid():
            return self.run_id in _OPEN_HERE
        try:
            os.kill(int(meta["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            return False
        except PermissionError:
            return True
        return True

    def new_segment_path(self) -> Path:
        """A new ``epochs-`` file name; file-name order is the order written (time, then a
        per-process counter)."""
        return self.dir / f"epochs-{time.time_ns():020d}-{os.getpid()}-{next(_BATCHES):06d}.jsonl"

    def spooled(self) -> list[tuple[Path, list[dict]]]:
        """Every spool file with the epochs it holds, in file-name order (later wins)."""
        if not self.dir.is_dir():
            return []
        paths = [*self.dir.glob("epoch*.json"), *self.dir.glob("epochs-*.jsonl")]
        paths += self.dir.glob(".epoch*.tmp")  # an earlier version's write, cut short by a kill
        out = []
        for path in sorted(paths, key=lambda p: p.name.lstrip(".")):
            try:
                records = _read_records(path)
            except FileNotFoundError:  # another deliverer removed it meanwhile
                continue
            except ValueError:
                if path.suffix == ".tmp":  # incomplete: its writer never finished it
                    continue
                raise
            out.append((path, records))
        return out

    def load_epochs(self, files: list[tuple[Path, list[dict]]] | None = None) -> list[dict]:
        """The spooled epochs (of `files`, default `spooled()`), one record per epoch (the
        latest file's), by epoch."""
        latest: dict[int, dict] = {}
        for _, records in self.spooled() if files is None else files:
            for record in records:
                latest[int(record["epoch"])] = record
        return [latest[k] for k in sorted(latest)]

    def remove_files(self, paths: Iterable[Path]) -> None:
        for path in paths:
            _unlink(path)

    def write_status(self, status: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "status.json", dumps({"status": status}))

    def read_status(self) -> str | None:
        try:
            return json.loads((self.dir / "status.json").read_text(encoding="utf-8"))["status"]
        except (OSError, ValueError, KeyError):
            return None

    def clear_status(self) -> None:
        _unlink(self.dir / "status.json")

    def pending_epochs(self) -> int:
        """How many distinct epochs the spool holds."""
        return len({int(r["epoch"]) for _, records in self.spooled() for r in records})

    def discard(self) -> None:
        """Remove the folder once everything in it was acknowledged."""
        for path in (self.dir / "run.json", self.dir / "status.json"):
            _unlink(path)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # not empty: something new arrived; keep it


def _read_records(path: Path) -> list[dict]:
    """The epochs of one spool file. In an ``epochs-*.jsonl`` segment a line that does not
    parse is the last write of a killed process, cut short (its ``end_epoch()`` never
    returned): skipped."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class EpochJournal:
    """The write-ahead of one run's epochs: `append` on the training thread, `seal` on the
    delivery thread.

    `append` is one ``write`` to the open segment (opened on the first append after a seal);
    `seal` detaches the segment under the lock, then fsyncs and closes it outside it, so the
    training thread never waits for the disk. A segment may be removed once it is sealed and
    every line appended to it has been seen by the deliverer (`complete`)."""

    def __init__(self, spool: RunSpool) -> None:
        self.spool = spool
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._lines: dict[Path, int] = {}  # lines appended to each segment not yet forgotten
        self._pid = os.getpid()

    def append(self, record: dict) -> Path:
        """Write `record` (OSError if the disk refuses); return the segment that holds it."""
        data = (dumps(record) + "\n").encode()
        if self._pid != os.getpid():  # a forked child writes its own segments
            self._lock, self._pid = threading.Lock(), os.getpid()
            self._fd, self._path, self._lines = None, None, {}
        with self._lock:
            if self._fd is None or self._path is None:
                self.spool.dir.mkdir(parents=True, exist_ok=True)
                self._path = self.spool.new_segment_path()
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
                self._fd = os.open(self._path, flags, 0o644)
            path = self._path
            try:
                write_all(self._fd, data)
            except OSError:
                self._close_locked()  # the next append starts a new segment
                raise
            self._lines[path] = self._lines.get(path, 0) + 1
            return path

    def _close_locked(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def seal(self) -> None:
        """Close the open segment with one fsync (OSError if the disk refuses)."""
        with self._lock:
            fd, self._fd, self._path = self._fd, None, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def complete(self, path: Path, seen: int) -> bool:
        """Whether `path` is sealed and holds no line beyond the `seen` ones."""
        with self._lock:
            return path != self._path and self._lines.get(path, 0) <= seen

    def forget(self, path: Path) -> None:
        with self._lock:
            self._lines.pop(path, None)


class LocalRunFile:
    """Append-only JSON-lines record of a run, for `gradwatch import`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @staticmethod
    def line(kind: str, payload: dict) -> str:
        return dumps({"kind": kind, **payload}) + "\n"

    def append(self, kind: str, payload: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(self.line(kind, payload))
            f.flush()

    @staticmethod
    def read(path: Path | str) -> tuple[dict, list[dict], str | None]:
        """Return (run payload, epoch records in file order, last status or None).

        Raises ValueError with the line number when the file is not a gradwatch run file.
        """
        run: dict | None = None
        epochs: dict[int, dict] = {}
        status = None
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    kind = item["kind"]
                    if kind == "run":
                        run = dict(item["run"])
                    elif kind == "epoch":
                        epochs[int(item["record"]["epoch"])] = dict(item["record"])
                    elif kind == "status":
                        status = str(item["status"])
                    elif kind == "scalars":  # client_hook.scalars.read_local reads them
                        continue
                    else:
                        raise ValueError(f"unknown record kind {kind!r}")
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"line {number}: not a gradwatch record ({exc})") from None
        if run is None:
            raise ValueError("no run header line; is this a gradwatch run file?")
        return run, [epochs[k] for k in sorted(epochs)], status
