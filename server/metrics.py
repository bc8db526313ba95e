"""Metrics reads: columnar, with downsampling that keeps every spike. Used by the API and pages.

Metrics are read with driver-native selects straight into columns (no ORM objects, no result
objects, no per-value type processing): 5,000 epochs x 2 tasks is ~20,000 rows. NaN can only
appear in epochs flagged `has_non_finite` at ingest, so only those rows get a second look (on
SQLite NaN comes back as the text sentinel, see models.FloatNaN).
"""

from __future__ import annotations

import gc
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import epoch_blocks, groups, models, schemas
from server.errors import InvalidInput, RunNotFound


@dataclass
class MetricsData:
    """Columnar metrics as plain Python lists (floats may be NaN/Inf)."""

    run_id: uuid.UUID
    tasks: list[str]
    epochs: list[int]
    epoch_metrics: dict[str, list[Any]]
    task_metrics: dict[str, dict[str, list[Any]]]
    cosines: list[tuple[str, str, list[Any]]]
    cursor: int
    downsampled: bool
    total_epochs: int
    non_finite_rows: list[int] = field(default_factory=list)
    """Positions in `epochs` whose values may be NaN/Inf (the only ones that need care)."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Per-parameter-group columns (server.groups.columns), aligned with `epochs`."""


def _align(rows: list[Any], epochs: tuple[int, ...], width: int, first: int = 0) -> list[list[Any]]:
    """Columns of `rows` (the epoch at index `first`, then `width` values) aligned with
    `epochs`; epochs without a row get None."""
    cols = list(zip(*rows, strict=True))
    if cols and cols[first] == epochs:  # the usual case: a row for every epoch, all in C
        return [list(c) for c in cols[first + 1 :]]
    pos = {ep: i for i, ep in enumerate(epochs)}
    out: list[list[Any]] = [[None] * len(epochs) for _ in range(width)]
    for r in rows:
        p = pos.get(r[first])
        if p is not None:
            for i in range(width):
                out[i][p] = r[first + 1 + i]
    return out


def _fetch(conn: sa.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """Driver-native SQL on the DBAPI cursor of the session's connection (same transaction):
    plain tuples, no result objects. Only for the metrics read, the hot path."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


EPOCH_COLUMNS = f"epoch, {', '.join(models.EPOCH_FIELDS)}, has_non_finite, id"
TASK_COLUMNS = ", ".join(models.TASK_FIELDS)


@dataclass
class _Scope:
    """One metrics read: the connection, its driver's placeholder and run-id form, and the
    filter over the epoch table (run, epoch range, `since`) with its parameters."""

    conn: sa.Connection
    sqlite: bool
    mark: str
    key: Any
    where: str
    params: list[Any]

    def fetch(self, sql: str, params: Sequence[Any] | None = None) -> list[Any]:
        return _fetch(self.conn, sql, self.params if params is None else params)


def _ints(values: Any) -> str:
    """An SQL list of integers (ours, from the database: inlined, never user text)."""
    return ",".join(str(int(v)) for v in sorted(values)) or "NULL"


def _scanned_extremes(scope: _Scope, size: int, first: int, last: int) -> set[int]:
    """The kept epochs of buckets `first`..`last` (of `size` epochs, see server.epoch_blocks),
    chosen in the database from the epochs themselves: two index-only range scans per
    bucket, no rows to Python. For what `epoch_block` cannot answer: a `since` filter, buckets
    cut by the epoch range, sizes it does not hold. NaN is text on SQLite and sorts above +Inf
    on PostgreSQL; both fail `<= +Inf`, as NULL does."""
    w = f"{scope.where} AND epoch >= b.lo AND epoch < b.hi"
    comparable = "grad_norm_ratio <= " + ("9e999" if scope.sqlite else "'Infinity'::float8")
    sql = f"""WITH RECURSIVE k(i) AS (SELECT CAST({first} AS BIGINT) UNION ALL
        SELECT i + 1 FROM k WHERE i < {last}),
      b(lo, hi) AS (SELECT i * {size}, (i + 1) * {size} FROM k)
    SELECT COALESCE(
      (SELECT epoch FROM epoch WHERE {w} AND {comparable} ORDER BY grad_norm_ratio, epoch
       LIMIT 1),
      (SELECT min(epoch) FROM epoch WHERE {w})),
      (SELECT epoch FROM epoch WHERE {w} AND {comparable} ORDER BY grad_norm_ratio DESC, epoch
       LIMIT 1)
    FROM b"""
    rows = scope.fetch(sql, scope.params * 3)
    return {e for row in rows for e in row if e is not None}


def _stored_extremes(scope: _Scope, size: int, first: int, last: int) -> set[int]:
    """The kept epochs of whole buckets `first`..`last`, from `epoch_block` (one range read
    of its primary key, a row per bucket)."""
    rows = scope.fetch(
        f"SELECT first_epoch, min_ratio_epoch, max_ratio_epoch FROM epoch_block WHERE run_id = "
        f"{scope.mark} AND block_size = {size} AND block_index BETWEEN {first} AND {last}",
        [scope.key],
    )
    return epoch_blocks.kept_in_blocks(rows)


def _bucket_extremes(
    scope: _Scope, lo: int, hi: int, n: int, epoch_range: tuple[int | None, int | None], since: bool
) -> set[int]:
    """Per aligned bucket over lo..hi (at most `n` of them), the epochs with the smallest and
    the largest comparable grad_norm_ratio, or the bucket's first epoch (server.epoch_blocks).
    Whole buckets come from `epoch_block`; a bucket the epoch range cuts is scanned."""
    size = epoch_blocks.bucket_size(lo, hi, n)
    first, last = lo // size, hi // size
    if since or size not in epoch_blocks.BLOCK_SIZES:
        return _scanned_extremes(scope, size, first, last)
    epoch_min, epoch_max = epoch_range
    inner_first = first + (epoch_min is not None and epoch_min > first * size)
    inner_last = last - (epoch_max is not None and epoch_max < (last + 1) * size - 1)
    if inner_first > inner_last:
        return _scanned_extremes(scope, size, first, last)
    keep = _stored_extremes(scope, size, inner_first, inner_last)
    if inner_first > first:
        keep |= _scanned_extremes(scope, size, first, first)
    if inner_last < last:
        keep |= _scanned_extremes(scope, size, last, last)
    return keep


def _forced_epochs(scope: _Scope, run_id: uuid.UUID) -> set[int]:
    """Epochs downsampling always keeps: an alert opened or closed there, or it holds NaN/Inf
    (a partial index holds those)."""
    a = models.Alert
    keep = {e for row in scope.fetch(f"SELECT epoch FROM epoch WHERE {scope.where} AND "
                                     "has_non_finite") for e in row}  # fmt: skip
    for pair in scope.conn.execute(
        sa.select(a.opened_epoch, a.closed_epoch).where(a.run_id == run_id)
    ):
        keep.update(e for e in pair if e is not None)
    return keep


def _group(rows: list[Any], n_key: int) -> dict[Any, list[Any]]:
    """`rows` (key columns, then the epoch, ...) by key, each group in the scan's order.
    Epoch-major rows where every epoch holds the same keys in the same order are split by
    striding (all in C); anything else by a stable sort."""
    key = itemgetter(*range(n_key))
    k = 0
    while k < len(rows) and rows[k][n_key] == rows[0][n_key]:
        k += 1  # rows of the first epoch
    if k and len(rows) % k == 0:
        groups = [rows[i::k] for i in range(k)]
        keys = [key(g[0]) for g in groups]
        if len(set(keys)) == k and all(len(set(map(key, g))) == 1 for g in groups):
            return dict(zip(keys, groups, strict=True))
    rows.sort(key=key)
    return {k: list(grp) for k, grp in groupby(rows, key=key)}


def _task_columns(
    scope: _Scope, at: str, task_ids: list[int], epochs: tuple[int, ...]
) -> dict[int, list[list[Any]]]:
    """Every task's columns at the epochs `at` selects, in one pass over the (run_id, epoch)
    index (a run's task rows for one epoch lie together)."""
    rows = scope.fetch(
        f"SELECT task_id, epoch, {TASK_COLUMNS} FROM task_epoch WHERE run_id = {scope.mark} "
        f"AND {at}",
        [scope.key],
    )
    by_task = _group(rows, 1)
    width = len(models.TASK_FIELDS)
    return {tid: _align(by_task.get(tid, []), epochs, width, first=1) for tid in task_ids}


def _cosine_columns(
    scope: _Scope, at: str, epochs: tuple[int, ...]
) -> list[tuple[int, int, list[Any]]]:
    """(a, b, values) for every task pair with a value at the epochs `at` selects, ordered by
    task ids."""
    rows = scope.fetch(
        f"SELECT task_a_id, task_b_id, epoch, value FROM pair_cosine WHERE run_id = "
        f"{scope.mark} AND {at}",
        [scope.key],
    )
    found = _group(rows, 2)
    return [(a, b, _align(found.get((a, b), []), epochs, 1, first=2)[0])
            for a, b in sorted(found)]  # fmt: skip


_gc_lock = threading.Lock()
_gc_pause = {"readers": 0, "was_enabled": True}


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold off CPython's cyclic garbage collector while a metrics read runs. The read
    allocates ~100,000 row tuples (no cycles: reference counting frees them all), which
    would trigger collections over the whole heap: ~40% of a large read's CPU (measured).
    Concurrent reads share one pause; the last one out restores the collector's state."""
    with _gc_lock:
        if _gc_pause["readers"] == 0:
            _gc_pause["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_pause["readers"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pause["readers"] -= 1
            if _gc_pause["readers"] == 0 and _gc_pause["was_enabled"]:
                gc.enable()


def _fix_sentinels(columns: list[list[Any]], rows: list[int]) -> None:
    for col in columns:
        for p in rows:
            if isinstance(col[p], str):
                col[p] = float(col[p])


def metrics_data(
    session: Session,
    run_id: uuid.UUID,
    *,
    tasks: Sequence[str] | None = None,
    epoch_min: int | None = None,
    epoch_max: int | None = None,
    since: int | None = None,
    max_points: int | None = None,
) -> MetricsData:
    """Read a run's metrics into columns; see `get_metrics`.

    Up to `max_points` epochs: the epoch rows in one range read, then each table's rows over
    that epoch range. More: count first, choose the kept epochs in the database
    (`_bucket_extremes`, `_forced_epochs`), then read only those epochs' rows (IN lists on
    the (run_id, epoch) indexes): ~2,000 epochs of a 100,000-epoch run, not all of them.
    """
    with _gc_paused():
        return _metrics_data(session, run_id, tasks, epoch_min, epoch_max, since, max_points)


def _metrics_data(
    session: Session,
    run_id: uuid.UUID,
    tasks: Sequence[str] | None,
    epoch_min: int | None,
    epoch_max: int | None,
    since: int | None,
    max_points: int | None,
) -> MetricsData:
    conn = session.connection()
    t = models.RunTask
    task_rows = conn.execute(
        sa.select(t.id, t.name).where(t.run_id == run_id).order_by(t.position)
    ).all()
    if not task_rows:
        raise RunNotFound({"run_id": str(run_id)})
    all_names = [name for _, name in task_rows]
    if tasks:
        known = {name for _, name in task_rows}
        for name in tasks:
            if name not in known:
                raise InvalidInput("tasks", f"run has no task {name!r}")
        task_rows = [r for r in task_rows if r[1] in set(tasks)]
    names = {tid: name for tid, name in task_rows}

    sqlite = conn.dialect.name == "sqlite"
    mark = "?" if sqlite else "%s"
    key = run_id.hex if sqlite else run_id  # how each driver receives the Uuid column
    where, params = [f"run_id = {mark}"], list[Any]([key])
    for clause, value in (("epoch >=", epoch_min), ("epoch <=", epoch_max), ("id >", since)):
        if value is not None:
            where.append(f"{clause} {mark}")
            params.append(value)
    scope = _Scope(conn, sqlite, mark, key, " AND ".join(where), params)

    downsampled = False
    if max_points:  # count, cursor and epoch range: one pass over the covering index
        w = scope.where
        total, cursor, lo, hi = scope.fetch(
            f"SELECT count(*), max(id), (SELECT min(epoch) FROM epoch WHERE {w}), "
            f"(SELECT max(epoch) FROM epoch WHERE {w}) FROM epoch WHERE {w}",
            params * 3,
        )[0]
        downsampled = total > max_points
    if downsampled and max_points:
        n = max(1, max_points // 2)
        keep = _bucket_extremes(scope, lo, hi, n, (epoch_min, epoch_max), since is not None)
        keep |= _forced_epochs(scope, run_id)
        rows = scope.fetch(
            f"SELECT {EPOCH_COLUMNS} FROM epoch WHERE {scope.where} AND epoch IN "
            f"({_ints(keep)}) ORDER BY epoch"
        )
    else:
        rows = scope.fetch(f"SELECT {EPOCH_COLUMNS} FROM epoch WHERE {scope.where} ORDER BY epoch")
        total = len(rows)
        cursor = max((r[-1] for r in rows), default=since or 0)

    width = len(models.EPOCH_FIELDS)
    cols = list(zip(*rows, strict=True)) if rows else [()] * (width + 3)
    epochs_t: tuple[int, ...] = cols[0]
    epochs = list(epochs_t)
    non_finite = [i for i, flag in enumerate(cols[width + 1]) if flag]
    epoch_cols = [list(c) for c in cols[1 : width + 1]]
    all_cols: list[list[Any]] = list(epoch_cols)
    task_metrics: dict[str, dict[str, list[Any]]] = {}
    cosines: list[tuple[str, str, list[Any]]] = []
    if epochs:
        if downsampled:
            at = f"epoch IN ({_ints(epochs)})"
        else:
            at = f"epoch BETWEEN {epochs[0]} AND {epochs[-1]}"
        by_task = _task_columns(scope, at, list(names), epochs_t)
        for tid, name in task_rows:
            task_metrics[name] = dict(zip(models.TASK_FIELDS, by_task[tid], strict=True))
            all_cols.extend(by_task[tid])
        for a_id, b_id, vals in _cosine_columns(scope, at, epochs_t):
            if a_id in names and b_id in names:
                cosines.append((names[a_id], names[b_id], vals))
                all_cols.append(vals)
        group_cols = _group_columns(scope, at, epochs, all_names, set(names.values()))
    else:
        group_cols = []
        for _, name in task_rows:
            task_metrics[name] = {f: [] for f in models.TASK_FIELDS}
    if non_finite:
        _fix_sentinels(all_cols, non_finite)
    return MetricsData(
        run_id=run_id,
        tasks=[name for _, name in task_rows],
        epochs=epochs,
        epoch_metrics=dict(zip(models.EPOCH_FIELDS, epoch_cols, strict=True)),
        task_metrics=task_metrics,
        cosines=cosines,
        cursor=cursor,
        downsampled=downsampled,
        total_epochs=total,
        non_finite_rows=non_finite,
        groups=group_cols,
    )


def _group_columns(
    scope: _Scope, at: str, epochs: list[int], all_tasks: list[str], wanted: set[str]
) -> list[dict[str, Any]]:
    """The per-group columns at the epochs `at` selects (the same epochs as every other
    column: downsampling keeps the group numbers of the epochs it keeps)."""
    rows = scope.fetch(
        f"SELECT epoch, groups_json FROM epoch WHERE {scope.where} AND {at} "
        "AND groups_json IS NOT NULL"
    )
    found = groups.columns(rows, epochs, all_tasks)
    for g in found:
        g["grad_norm"] = {t: v for t, v in g["grad_norm"].items() if t in wanted}
    return found


def get_metrics(
    session: Session,
    run_id: uuid.UUID,
    *,
    tasks: Sequence[str] | None = None,
    epoch_min: int | None = None,
    epoch_max: int | None = None,
    since: int | None = None,
    max_points: int | None = None,
) -> schemas.MetricsRead:
    """Columnar metrics of a run (raises RunNotFound).

    `since`: only epochs stored after that ingestion cursor. `max_points`: keep, per bucket of
    epochs, the epochs with the smallest and largest grad_norm_ratio, plus every epoch where an
    alert opened or closed and every epoch holding a NaN/Inf, so spikes never disappear (the
    result may hold slightly more than `max_points` epochs because of those). Buckets are
    aligned blocks of a power-of-two number of epochs, between max_points/4 and max_points/2
    of them for a dense run (see server.epoch_blocks).
    """
    d = metrics_data(
        session,
        run_id,
        tasks=tasks,
        epoch_min=epoch_min,
        epoch_max=epoch_max,
        since=since,
        max_points=max_points,
    )
    return schemas.MetricsRead.model_construct(
        run_id=d.run_id,
        tasks=d.tasks,
        epochs=d.epochs,
        epoch_metrics=d.epoch_metrics,
        task_metrics=d.task_metrics,
        cosines=[schemas.PairSeries.model_construct(a=a, b=b, values=v) for a, b, v in d.cosines],
        groups=[schemas.GroupSeries.model_construct(**g) for g in d.groups],
        cursor=d.cursor,
        downsampled=d.downsampled,
        total_epochs=d.total_epochs,
    )
