"""Metrics reads: columnar, with downsampling that keeps every spike. Used by the API and pages.

Which epochs a read returns is chosen in server.metrics_select; the compact body is built from
each epoch's packed row instead when it can be (server.metrics_packed). Here metrics are read
with driver-native selects straight into columns (no ORM objects, no result objects, no per-
value type processing): 5,000 epochs x 2 tasks is ~20,000 rows. NaN can only appear in epochs
flagged `has_non_finite` at ingest, so only those rows get a second look (on SQLite NaN comes
back as the text sentinel, see models.FloatNaN).
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

from sqlalchemy.orm import Session

from server import groups, metrics_select, models, schemas


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


EPOCH_COLUMNS = f"epoch, {', '.join(models.EPOCH_FIELDS)}, has_non_finite, id"
TASK_COLUMNS = ", ".join(models.TASK_FIELDS)


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
    scope: metrics_select.Scope,
    at: tuple[str, list[int]],
    task_ids: list[int],
    epochs: tuple[int, ...],
) -> dict[int, list[list[Any]]]:
    """Every task's columns at the epochs `at` selects, in one pass over the (run_id, epoch)
    index (a run's task rows for one epoch lie together)."""
    rows = scope.fetch(
        f"SELECT task_id, epoch, {TASK_COLUMNS} FROM task_epoch WHERE run_id = {scope.mark} "
        f"AND {at[0]}",
        [scope.key, *at[1]],
    )
    by_task = _group(rows, 1)
    width = len(models.TASK_FIELDS)
    return {tid: _align(by_task.get(tid, []), epochs, width, first=1) for tid in task_ids}


def _cosine_columns(
    scope: metrics_select.Scope, at: tuple[str, list[int]], epochs: tuple[int, ...]
) -> list[tuple[int, int, list[Any]]]:
    """(a, b, values) for every task pair with a value at the epochs `at` selects, ordered by
    task ids."""
    rows = scope.fetch(
        f"SELECT task_a_id, task_b_id, epoch, value FROM pair_cosine WHERE run_id = "
        f"{scope.mark} AND {at[0]}",
        [scope.key, *at[1]],
    )
    found = _group(rows, 2)
    return [(a, b, _align(found.get((a, b), []), epochs, 1, first=2)[0])
            for a, b in sorted(found)]  # fmt: skip


_gc_lock = threading.Lock()
_gc_pause = {"readers": 0, "was_enabled": True}


@contextmanager
def gc_paused() -> Iterator[None]:
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
    with gc_paused():
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
    sel = metrics_select.select(session, run_id, tasks, epoch_min, epoch_max, since, max_points)
    scope, task_rows, names = sel.scope, sel.task_rows, sel.names
    rows = scope.fetch(f"SELECT {EPOCH_COLUMNS} FROM epoch WHERE {sel.epoch_where} ORDER BY epoch")
    total = len(rows) if sel.total is None else sel.total
    cursor = max((r[-1] for r in rows), default=since or 0) if sel.cursor is None else sel.cursor

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
        at = sel.at(epochs)
        by_task = _task_columns(scope, at, list(names), epochs_t)
        for tid, name in task_rows:
            task_metrics[name] = dict(zip(models.TASK_FIELDS, by_task[tid], strict=True))
            all_cols.extend(by_task[tid])
        for a_id, b_id, vals in _cosine_columns(scope, at, epochs_t):
            if a_id in names and b_id in names:
                cosines.append((names[a_id], names[b_id], vals))
                all_cols.append(vals)
        group_cols = group_columns(scope, at, epochs, sel.all_tasks, set(names.values()))
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
        downsampled=sel.downsampled,
        total_epochs=total,
        non_finite_rows=non_finite,
        groups=group_cols,
    )


def group_columns(
    scope: metrics_select.Scope,
    at: tuple[str, list[int]],
    epochs: list[int],
    all_tasks: list[str],
    wanted: set[str],
) -> list[dict[str, Any]]:
    """The per-group columns at the epochs `at` selects (the same epochs as every other
    column: downsampling keeps the group numbers of the epochs it keeps)."""
    rows = scope.fetch(
        f"SELECT epoch, groups_json FROM epoch WHERE {scope.where} AND {at[0]} "
        "AND groups_json IS NOT NULL",
        [*scope.params, *at[1]],
    )
    return group_series(rows, epochs, all_tasks, wanted)


def group_series(
    rows: list[Any], epochs: list[int], all_tasks: list[str], wanted: set[str]
) -> list[dict[str, Any]]:
    """`groups.columns` of (epoch, groups_json) rows, for the tasks `wanted` only."""
    if not rows:
        return []
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
