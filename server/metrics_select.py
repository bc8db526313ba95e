"""Which epochs a metrics read returns: the run's tasks, the epoch filter, and downsampling
that keeps every spike. Shared by the two metrics readers (server.metrics: columns of Python
values; server.metrics_packed: the compact body from the packed rows).

Queries here are driver-native SQL on the DBAPI cursor of the session's connection (plain
tuples, no result objects): the metrics read is the hot path.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import epoch_blocks, models
from server.errors import InvalidInput, RunNotFound


def fetch(conn: sa.Connection, sql: str, params: Sequence[Any], binary: bool = False) -> list[Any]:
    """Driver-native SQL on the DBAPI cursor of the session's connection (same transaction):
    plain tuples, no result objects. Only for the metrics read, the hot path. `binary`: the
    results in PostgreSQL's binary format (bytea as is, not as hex text to decode)."""
    driver: Any = conn.connection.driver_connection
    pg_binary = binary and conn.dialect.name == "postgresql"
    cursor = driver.cursor(binary=True) if pg_binary else driver.cursor()
    try:
        cursor.execute(sql, tuple(params))
        return list(cursor.fetchall())
    finally:
        cursor.close()


@dataclass
class Scope:
    """One metrics read: the connection, its driver's placeholder and run-id form, and the
    filter over the epoch table (run, epoch range, `since`) with its parameters."""

    conn: sa.Connection
    sqlite: bool
    mark: str
    key: Any
    where: str
    params: list[Any]

    def fetch(
        self, sql: str, params: Sequence[Any] | None = None, binary: bool = False
    ) -> list[Any]:
        return fetch(self.conn, sql, self.params if params is None else params, binary)


def ints(values: Any) -> str:
    """An SQL list of integers (ours, from the database: inlined, never user text)."""
    return ",".join(str(int(v)) for v in sorted(values)) or "NULL"


def _scanned_extremes(scope: Scope, size: int, first: int, last: int) -> set[int]:
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


def _stored_extremes(scope: Scope, size: int, first: int, last: int) -> set[int]:
    """The kept epochs of whole buckets `first`..`last`, from `epoch_block` (one range read
    of its primary key, a row per bucket)."""
    m = scope.mark
    rows = scope.fetch(
        f"SELECT first_epoch, min_ratio_epoch, max_ratio_epoch FROM epoch_block WHERE run_id = "
        f"{m} AND block_size = {m} AND block_index BETWEEN {m} AND {m}",
        [scope.key, size, first, last],
    )
    return epoch_blocks.kept_in_blocks(rows)


def bucket_extremes(
    scope: Scope, lo: int, hi: int, n: int, epoch_range: tuple[int | None, int | None], since: bool
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


def forced_epochs(scope: Scope, run_id: uuid.UUID) -> set[int]:
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


@dataclass
class Selection:
    """What one metrics read returns. `epoch_where` selects its epoch rows (on the epoch
    table); `at` selects the same epochs on the per-epoch tables, once they are known.
    `total` and `cursor` are None when they follow from the rows read (no downsampling)."""

    scope: Scope
    task_rows: list[tuple[int, str]]  # (task id, name) of the tasks read, in the run's order
    all_tasks: list[str]  # every task of the run, in order
    downsampled: bool
    epoch_where: str
    total: int | None = None
    cursor: int | None = None

    @property
    def names(self) -> dict[int, str]:
        return dict(self.task_rows)

    def at(self, epochs: Sequence[int]) -> tuple[str, list[int]]:
        """The filter on `epoch` that selects `epochs`, and its parameters. A range is bound,
        not inlined: the live feed reads a new range per epoch, and one SQL text is parsed
        and cached once by the driver (psycopg caches queries by their text: a new text per
        read filled its caches with entries that outlived a crowd of viewers, RSS too)."""
        if self.downsampled:
            return f"epoch IN ({ints(epochs)})", []
        return f"epoch BETWEEN {self.scope.mark} AND {self.scope.mark}", [epochs[0], epochs[-1]]


def select(
    session: Session,
    run_id: uuid.UUID,
    tasks: Sequence[str] | None,
    epoch_min: int | None,
    epoch_max: int | None,
    since: int | None,
    max_points: int | None,
) -> Selection:
    """The selection of a metrics read (see server.metrics.get_metrics); raises RunNotFound,
    or InvalidInput for a task the run does not have.

    Up to `max_points` epochs: every epoch the filter passes. More: count first, then choose
    the kept epochs in the database (`bucket_extremes`, `forced_epochs`): ~2,000 epochs of a
    100,000-epoch run are read, not all of them."""
    conn = session.connection()
    t = models.RunTask
    task_rows = [
        (tid, name)
        for tid, name in conn.execute(
            sa.select(t.id, t.name).where(t.run_id == run_id).order_by(t.position)
        )
    ]
    if not task_rows:
        raise RunNotFound({"run_id": str(run_id)})
    all_tasks = [name for _, name in task_rows]
    if tasks:
        for name in tasks:
            if name not in all_tasks:
                raise InvalidInput("tasks", f"run has no task {name!r}")
        task_rows = [r for r in task_rows if r[1] in set(tasks)]

    sqlite = conn.dialect.name == "sqlite"
    mark = "?" if sqlite else "%s"
    key = run_id.hex if sqlite else run_id  # how each driver receives the Uuid column
    where, params = [f"run_id = {mark}"], list[Any]([key])
    for clause, value in (("epoch >=", epoch_min), ("epoch <=", epoch_max), ("id >", since)):
        if value is not None:
            where.append(f"{clause} {mark}")
            params.append(value)
    scope = Scope(conn, sqlite, mark, key, " AND ".join(where), params)
    sel = Selection(scope, task_rows, all_tasks, False, scope.where)
    if not max_points:
        return sel
    w = scope.where  # count, cursor and epoch range: one pass over the covering index
    total, cursor, lo, hi = scope.fetch(
        f"SELECT count(*), max(id), (SELECT min(epoch) FROM epoch WHERE {w}), "
        f"(SELECT max(epoch) FROM epoch WHERE {w}) FROM epoch WHERE {w}",
        params * 3,
    )[0]
    if total <= max_points:
        return sel
    n = max(1, max_points // 2)
    keep = bucket_extremes(scope, lo, hi, n, (epoch_min, epoch_max), since is not None)
    keep |= forced_epochs(scope, run_id)
    sel.downsampled, sel.total, sel.cursor = True, total, cursor
    sel.epoch_where = f"{scope.where} AND epoch IN ({ints(keep)})"
    return sel
