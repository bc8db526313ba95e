"""The compact body of `GET /api/runs/{id}/metrics` (`Accept: application/x-gradwatch-columns`),
and gzip for the JSON one.

A 5,000-epoch, 2-task history is ~120,000 numbers: 2.2 MB as JSON text, which gzip only halves
(measurement noise does not compress) at a cost of tens of milliseconds. The compact body
sends each column as a little-endian array instead, float32 for the gradient statistics
(7 significant digits: what a chart or a table shows), float64 for `wall_time` (seconds since
some epoch need more), int32 for `step_count`; a column whose values are all equal is sent
once, an all-null one not at all, contiguous epochs as their first one. ~0.48 MB, no
compression step.

Layout: `uint32` length H of a JSON header, the header (UTF-8, padded with spaces so the
arrays start 8-byte aligned), then the arrays. Header: `run_id`, `tasks`, `cursor`,
`downsampled`, `total_epochs`, `count` (epochs), `epochs` (`{"start": e}` for e, e+1, ... or an
array column), `columns`: `{"group": "epoch"|"task"|"pair", "field"|"task"+"field"|"a"+"b",
...}` plus one of `"null": true`, `"const": value`, or `"type": "f4"|"f8"|"i4"`,
`"offset"` (bytes from the start of the body) and, when some values are null, `"nulls"`
(their positions; the array holds NaN there). NaN and +/-Inf are IEEE values in the arrays.
`decode` below reads it back (Python); a browser reads it with DataView/Float32Array.
"""

from __future__ import annotations

import gzip
import math
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import orjson

from server.metrics import MetricsData

MEDIA_TYPE = "application/x-gradwatch-columns"
GZIP_MIN_BYTES = 1024
GZIP_LEVEL = 1  # speed over ratio: the body is measured in milliseconds
TYPES = {"wall_time": "d", "step_count": "i"}
CODES = {"f": "f4", "d": "f8", "i": "i4"}


def wants(header: str | None, token: str) -> bool:
    """Whether an Accept/Accept-Encoding header lists `token` (without q=0)."""
    for part in (header or "").lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() == token and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return True
    return False


def maybe_gzip(body: bytes, accept_encoding: str | None) -> tuple[bytes, dict[str, str]]:
    """`body` gzipped (level 1) when the client accepts it and it is worth it, with headers."""
    headers = {"Vary": "Accept-Encoding"}
    if len(body) >= GZIP_MIN_BYTES and wants(accept_encoding, "gzip"):
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body, GZIP_LEVEL, mtime=0), headers
    return body, headers


def pack_values(values: list[Any], code: str) -> tuple[bytes | None, dict[str, Any]]:
    """One column: (array bytes or None, its header entry without the offset)."""
    n = len(values)
    first = values[0] if n else None
    if values.count(first) == n and (first is None or math.isfinite(first)):
        return None, ({"null": True} if first is None else {"const": first})
    meta: dict[str, Any] = {"type": CODES[code]}
    try:
        data = array(code, values)
    except TypeError:  # None among the values
        meta["nulls"] = [i for i, v in enumerate(values) if v is None]
        fill = math.nan if code != "i" else 0
        values = [fill if v is None else v for v in values]
        data = array(code, values)
    raw = data.tobytes()
    if code == "f" and (_INF in raw or _MINUS_INF in raw):  # (or bytes that look like one)
        if _infinities(data) != _infinities(values):  # a finite value beyond float32's range
            return array("d", values).tobytes(), {**meta, "type": "f8"}
    return raw, meta


_INF, _MINUS_INF = struct.pack("<f", math.inf), struct.pack("<f", -math.inf)


def _infinities(values: Any) -> int:
    return int(values.count(math.inf) + values.count(-math.inf))


Named = tuple[dict[str, Any], list[Any], str]  # (column name, values, type code)
Column = tuple[dict[str, Any], bytes | None, dict[str, Any]]  # (name, array or None, meta)


def group_columns(groups: list[dict[str, Any]]) -> list[Named]:
    """Per parameter group: each task's norm, the ratio, the minimum cosine."""
    cols: list[Named] = []
    for g in groups:
        layer = {"group": "layer", "name": g["name"]}
        cols += [({**layer, "task": t, "field": "grad_norm"}, v, "f")
                 for t, v in g["grad_norm"].items()]  # fmt: skip
        cols += [({**layer, "field": f}, g[f], "f") for f in ("grad_norm_ratio", "min_cosine")]
    return cols


def _columns(d: MetricsData) -> list[Named]:
    cols = [({"group": "epoch", "field": f}, v, TYPES.get(f, "f"))
            for f, v in d.epoch_metrics.items()]  # fmt: skip
    for task, fields in d.task_metrics.items():
        cols += [({"group": "task", "task": task, "field": f}, v, "f") for f, v in fields.items()]
    cols += [({"group": "pair", "a": a, "b": b}, v, "f") for a, b, v in d.cosines]
    return cols + group_columns(d.groups)


def head(run_id: Any, tasks: list[str], cursor: int, downsampled: bool, total_epochs: int
         ) -> dict[str, Any]:  # fmt: skip
    """The header fields a body starts with."""
    return {"run_id": str(run_id), "tasks": tasks, "cursor": cursor, "downsampled": downsampled,
            "total_epochs": total_epochs}  # fmt: skip


def encode(d: MetricsData) -> bytes:
    """The compact body of `d` (see the module docstring)."""
    fields = head(d.run_id, d.tasks, d.cursor, d.downsampled, d.total_epochs)
    cols = [(name, *pack_values(v, code)) for name, v, code in _columns(d)]
    return assemble(fields, d.epochs, cols)


def assemble(fields: dict[str, Any], epochs: list[int], columns: list[Column]) -> bytes:
    """A compact body: the header `fields`, the epochs, then the packed `columns` in order."""
    n = len(epochs)
    entries: list[tuple[dict[str, Any], bytes]] = []  # in the order of the arrays
    if n == 0 or epochs[-1] - epochs[0] == n - 1:
        epochs_meta: dict[str, Any] = {"start": epochs[0] if n else 0}
    else:
        data, epochs_meta = pack_values(epochs, "i")
        entries.append((epochs_meta, data or b""))
    metas = []
    for name, data, meta in columns:
        metas.append({**name, **meta})
        entries.append((metas[-1], data or b""))
    header = {**fields, "count": n, "epochs": epochs_meta, "columns": metas}
    # The offsets' digits change the header's length: reserve room for them, then pad.
    start = (4 + len(orjson.dumps(header)) + 24 * len(entries) + 7) // 8 * 8
    offset = start
    for meta, data in entries:
        if data:
            meta["offset"] = offset
            offset += (len(data) + 7) // 8 * 8
    text = orjson.dumps(header)
    out = [struct.pack("<I", start - 4), text, b" " * (start - 4 - len(text))]
    for _, data in entries:
        if data:
            out += [data, b"\0" * (-len(data) % 8)]
    return b"".join(out)


def decode(body: bytes) -> dict[str, Any]:
    """A compact body back to the JSON body's shape (MetricsRead, floats as Python floats)."""
    (length,) = struct.unpack_from("<I", body)
    header = orjson.loads(body[4 : 4 + length])
    n = header["count"]

    def values(meta: dict[str, Any]) -> list[Any]:
        if meta.get("null"):
            return [None] * n
        if "const" in meta:
            return [meta["const"]] * n
        code = {v: k for k, v in CODES.items()}[meta["type"]]
        size = array(code).itemsize
        out: list[Any] = array(code, body[meta["offset"] : meta["offset"] + n * size]).tolist()
        for i in meta.get("nulls", []):
            out[i] = None
        return out

    epochs = header["epochs"]
    out: dict[str, Any] = {
        k: header[k] for k in ("run_id", "tasks", "cursor", "downsampled", "total_epochs")
    }
    out["epochs"] = list(range(epochs["start"], epochs["start"] + n)) if "start" in epochs \
        else values(epochs)  # fmt: skip
    out["epoch_metrics"], out["task_metrics"], out["cosines"] = {}, {}, []
    layers: dict[str, dict[str, Any]] = {}
    for meta in header["columns"]:
        if meta["group"] == "epoch":
            out["epoch_metrics"][meta["field"]] = values(meta)
        elif meta["group"] == "task":
            out["task_metrics"].setdefault(meta["task"], {})[meta["field"]] = values(meta)
        elif meta["group"] == "pair":
            out["cosines"].append({"a": meta["a"], "b": meta["b"], "values": values(meta)})
        elif meta["group"] == "layer":
            layer = layers.setdefault(meta["name"], {"name": meta["name"], "grad_norm": {}})
            if "task" in meta:
                layer["grad_norm"][meta["task"]] = values(meta)
            else:
                layer[meta["field"]] = values(meta)
    out["groups"] = list(layers.values())
    for task in header["tasks"]:
        out["task_metrics"].setdefault(task, {})
    return out


class BodyCache:
    """Recent metrics bodies of this process, keyed by what they were read from: the run's
    `updated_at` and latest epoch id move with every change that can alter a metrics read
    (new epochs; a threshold change re-opening alerts, which downsampling keeps), and stored
    epochs never change, so a hit is exactly what a new read would return. Bounded in bytes,
    least recently used out first."""

    def __init__(self, max_bytes: int = 32 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.items: OrderedDict[Hashable, tuple[bytes, dict[str, str]]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bytes, dict[str, str]] | None:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
            return hit

    def put(self, key: Hashable, body: bytes, headers: dict[str, str]) -> None:
        if len(body) > self.max_bytes // 4:
            return
        with self.lock:
            if key in self.items:
                return
            self.items[key] = (body, headers)
            self.size += len(body)
            while self.size > self.max_bytes:
                _, (old, _) = self.items.popitem(last=False)
                self.size -= len(old)
