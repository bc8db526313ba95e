"""On-disk storage of the client: the delivery spool and the local run file.

Spool (``GRADWATCH_SPOOL_DIR``, default ``.gradwatch/spool`` under the working directory)::

    <spool>/<run_id>/run.json             RunCreate payload + server URL, pid and host of the writer
    <spool>/<run_id>/epoch-000000012.json one epoch not yet acknowledged by the server
    <spool>/<run_id>/epochs-<seq>.json    several (a JSON list), written together
    <spool>/<run_id>/status.json          a final status not yet acknowledged

Every epoch is written here *before* it is sent (write-ahead) and its file removed once the
server acknowledged every epoch in it, so a crash of the client or the server at any moment
loses nothing; a resend is harmless because the server skips identical epochs. ``gradwatch
sync`` delivers what is left. The delivery thread writes the epochs it takes in one poll as one
``epochs-`` file (one fsync, not one per epoch: ~0.3 ms of CPU each on a 2-core machine, more
than the rest of an epoch's delivery); the training thread, when the queue is full, writes one
``epoch-`` file per epoch. Where two files hold the same epoch, the later one (in file-name
order: single files first, then batches in the order written) wins.

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

    def _epoch_path(self, epoch: int) -> Path:
        return self.dir / f"epoch-{epoch:09d}.json"

    def write_epoch(self, record: dict) -> Path:
        """One epoch in its own file (replacing an earlier one of the same epoch)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._epoch_path(int(record["epoch"]))
        _atomic_write(path, dumps(record))
        return path

    def write_epochs(self, records: list[dict]) -> Path:
        """Several epochs in one new file, with one fsync."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # time, then a per-process counter: file-name order is the order written
        path = self.dir / f"epochs-{time.time_ns():020d}-{os.getpid()}-{next(_BATCHES):06d}.json"
        _atomic_write(path, dumps(records))
        return path

    def spooled(self) -> list[tuple[Path, list[dict]]]:
        """Every spool file with the epochs it holds, in file-name order (later wins)."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted([*self.dir.glob("epoch-*.json"), *self.dir.glob("epochs-*.json")]):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:  # another deliverer removed it meanwhile
                continue
            out.append((path, data if isinstance(data, list) else [data]))
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
