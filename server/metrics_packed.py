"""Each epoch's numbers as the compact body holds them (server.metrics_wire), packed at ingest
into `epoch.packed`, so that a compact metrics read builds its columns from one blob per epoch:
strided byte slices in C, no Python object per value. Reading the rows instead makes ~150,000
Python floats for a 5,000-epoch, 2-task history (~40 ms on SQLite, ~110 ms on PostgreSQL on a
loaded 2-core machine), which no cache helps with on the first read after a server start.

Row layout (little-endian, padded to a multiple of 8 bytes): wall_time f8, step_count i4, the
other EPOCH_FIELDS f4, each task's TASK_FIELDS f4 (tasks in the run's order), then one f4 per
task pair (i, j), i < j, in itertools.combinations order (the cosine). "No value" is a marker
no value has: a NaN with payload 1 (f4, f8) or INT32_MIN (i4; step_count is never negative);
NaN itself is stored as the canonical quiet NaN.

An epoch gets no packed row (NULL) when a value does not fit (finite beyond float32's range:
the compact body sends such a column as f8) or when the run has more than MAX_TASKS tasks (the
pairs would outgrow the row); epochs stored before migration 0007 have none either. A read
that meets one builds the body from the rows (server.metrics) instead: the same columns, but
for a cosine pair that was only ever sent as null, which this path leaves out as never sent.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Sequence
from functools import lru_cache
from itertools import combinations
from typing import Any

from sqlalchemy.orm import Session

from server import metrics, metrics_select, metrics_wire, models

MAX_TASKS = 16
F4_EPOCH_FIELDS = tuple(f for f in models.EPOCH_FIELDS if f not in ("wall_time", "step_count"))
_F4_AT = [models.EPOCH_FIELDS.index(f) for f in F4_EPOCH_FIELDS]
_WALL_AT = models.EPOCH_FIELDS.index("wall_time")
_STEP_AT = models.EPOCH_FIELDS.index("step_count")
_HEAD_UNITS = 3  # wall_time (two 4-byte units), step_count
NULL = {"f": struct.pack("<I", 0x7FC00001), "d": struct.pack("<Q", 0x7FF8000000000001),
        "i": struct.pack("<i", -(2**31))}  # fmt: skip
FILL = {"f": struct.pack("<f", math.nan), "d": struct.pack("<d", math.nan), "i": bytes(4)}
_NO_TASK = (None,) * len(models.TASK_FIELDS)


@lru_cache(maxsize=MAX_TASKS + 1)
def layout(tasks: int) -> struct.Struct:
    """The packed row of a run with `tasks` tasks."""
    floats = len(F4_EPOCH_FIELDS) + tasks * len(models.TASK_FIELDS) + tasks * (tasks - 1) // 2
    return struct.Struct(f"<di{floats}f{-(12 + 4 * floats) % 8}x")


def pack(
    epoch_values: Sequence[Any],
    task_values: Sequence[Sequence[Any] | None],
    cosines: dict[tuple[int, int], Any],
    non_finite: bool,
) -> bytes | None:
    """The packed row of one epoch: `epoch_values` in EPOCH_FIELDS order, `task_values` by task
    position (None: the task was not in the record), `cosines` by (position a, position b),
    a < b. None when it cannot be packed (see the module docstring)."""
    tasks = len(task_values)
    if tasks > MAX_TASKS:
        return None
    floats = [epoch_values[i] for i in _F4_AT]
    for values in task_values:
        floats.extend(_NO_TASK if values is None else values)
    floats.extend(cosines.get(pair) for pair in combinations(range(tasks), 2))
    if non_finite:  # one NaN for all: a payload could otherwise look like the null marker
        floats = [math.nan if v is not None and v != v else v for v in floats]
    nulls = [i for i, v in enumerate(floats) if v is None]
    if nulls:
        floats = [0.0 if v is None else v for v in floats]
    wall, step = epoch_values[_WALL_AT], epoch_values[_STEP_AT]
    try:
        raw = layout(tasks).pack(0.0 if wall is None else wall,
                                 -(2**31) if step is None else step, *floats)  # fmt: skip
    except (OverflowError, struct.error):  # beyond float32 (or int32)
        return None
    if not nulls and wall is not None:
        return raw
    out = bytearray(raw)
    if wall is None:
        out[0:8] = NULL["d"]
    for i in nulls:
        at = 4 * (_HEAD_UNITS + i)
        out[at : at + 4] = NULL["f"]
    return bytes(out)


def column(raw: bytes, code: str) -> metrics_wire.Column:
    """One column's array (None when the header says it all) and header entry, from its
    values as packed (the null marker in place of a missing value)."""
    null = NULL[code]
    size = len(null)
    n = len(raw) // size
    if raw == null * n:
        return {}, None, {"null": True}
    first = raw[:size]
    if raw == first * n:
        (value,) = struct.unpack("<" + code, first)
        if math.isfinite(value):
            return {}, None, {"const": value}
    meta: dict[str, Any] = {"type": metrics_wire.CODES[code]}
    at = raw.find(null)
    if at >= 0:
        nulls, out = [], bytearray(raw)
        while at >= 0:
            if at % size == 0:  # (the marker's bytes may also straddle two values)
                nulls.append(at // size)
                out[at : at + size] = FILL[code]
            at = raw.find(null, at + 1)
        if nulls:
            meta["nulls"] = nulls
            raw = bytes(out)
    return {}, raw, meta


def _named(name: dict[str, Any], col: metrics_wire.Column) -> metrics_wire.Column:
    return name, col[1], col[2]


def compact_body(session: Session, run_id: uuid.UUID, **query: Any) -> bytes:
    """The compact body of a metrics read (`query`: the keywords of
    server.metrics.get_metrics): from the packed rows, or from the rows when some epoch has
    no packed row."""
    body = packed_body(session, run_id, **query)
    if body is not None:
        return body
    return metrics_wire.encode(metrics.metrics_data(session, run_id, **query))


def packed_body(
    session: Session,
    run_id: uuid.UUID,
    *,
    tasks: Sequence[str] | None = None,
    epoch_min: int | None = None,
    epoch_max: int | None = None,
    since: int | None = None,
    max_points: int | None = None,
) -> bytes | None:
    """`compact_body` from the packed rows; None when some epoch read has none (or there is
    no epoch to read: the rows' path says that as well)."""
    with metrics.gc_paused():
        sel = metrics_select.select(session, run_id, tasks, epoch_min, epoch_max, since, max_points)
        return _from_packed(run_id, sel)


def _from_packed(run_id: uuid.UUID, sel: metrics_select.Selection) -> bytes | None:
    count = len(sel.all_tasks)
    if count > MAX_TASKS:
        return None
    rows = sel.scope.fetch(f"SELECT epoch, id, packed, groups_json FROM epoch WHERE "
                           f"{sel.epoch_where} ORDER BY epoch", binary=True)  # fmt: skip
    if not rows:
        return None
    epochs, ids, blobs, group_texts = zip(*rows, strict=True)
    if None in blobs:
        return None
    buf = b"".join(blobs)
    size = layout(count).size
    if len(buf) != size * len(rows):
        return None
    u4, u8 = memoryview(buf).cast("I"), memoryview(buf).cast("Q")
    step4 = size // 4

    def f4(unit: int) -> metrics_wire.Column:
        return column(u4[unit::step4].tobytes(), "f")

    cols: list[metrics_wire.Column] = []
    f4_units = iter(range(_HEAD_UNITS, _HEAD_UNITS + len(F4_EPOCH_FIELDS)))
    for f in models.EPOCH_FIELDS:
        name = {"group": "epoch", "field": f}
        if f == "wall_time":
            cols.append(_named(name, column(u8[0 :: size // 8].tobytes(), "d")))
        elif f == "step_count":
            cols.append(_named(name, column(u4[2::step4].tobytes(), "i")))
        else:
            cols.append(_named(name, f4(next(f4_units))))
    wanted = set(sel.names.values())
    first_task = _HEAD_UNITS + len(F4_EPOCH_FIELDS)
    width = len(models.TASK_FIELDS)
    for pos, task in enumerate(sel.all_tasks):
        if task in wanted:
            at = first_task + pos * width
            cols += [_named({"group": "task", "task": task, "field": f}, f4(at + j))
                     for j, f in enumerate(models.TASK_FIELDS)]  # fmt: skip
    first_pair = first_task + count * width
    for k, (a, b) in enumerate(combinations(sel.all_tasks, 2)):
        if a in wanted and b in wanted:
            col = f4(first_pair + k)
            if not col[2].get("null"):  # a pair never sent (as the rows would have no row)
                cols.append(_named({"group": "pair", "a": a, "b": b}, col))
    epoch_list = list(epochs)
    measured = [(e, text) for e, text in zip(epochs, group_texts, strict=True) if text]
    groups = metrics.group_series(measured, epoch_list, sel.all_tasks, wanted)
    cols += [(name, *metrics_wire.pack_values(v, code)) for name, v, code in
             metrics_wire.group_columns(groups)]  # fmt: skip
    fields = metrics_wire.head(run_id, [name for _, name in sel.task_rows],
                               max(ids) if sel.cursor is None else sel.cursor, sel.downsampled,
                               len(rows) if sel.total is None else sel.total)  # fmt: skip
    return metrics_wire.assemble(fields, epoch_list, cols)
