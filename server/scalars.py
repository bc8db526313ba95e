"""Named scalars per epoch that the training script logs itself (`GradMonitor.log_metrics`):
evaluation metrics such as test RMSE or accuracy, shown next to the gradient balance so that
the run and compare pages can answer "did balancing help?".

Stored one row per (run, name, epoch). Idempotent like epochs: a value re-sent identically is a
duplicate; a different value for a stored (epoch, name) is a conflict and the whole batch is
refused (409), so an acknowledged value is never overwritten. NaN and +/-Inf are values.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import models, schemas
from server.errors import EpochConflict, InvalidInput

SCALAR_CONFLICT = "scalar already stored with a different value"
MAX_NAMES_PER_RUN = 64


def _same(a: float | None, b: float | None) -> bool:
    """Bitwise equality, so that NaN equals NaN (a resent NaN is a duplicate)."""
    if a is None or b is None:
        return a is b
    return struct.pack("<d", a) == struct.pack("<d", b)


def ingest(
    session: Session, run: models.Run, batch: schemas.ScalarBatch
) -> schemas.ScalarIngestResult:
    """Store a batch for `run` (locked by the caller's lookup) in one transaction."""
    incoming: dict[tuple[str, int], float] = {}
    conflicts: set[tuple[str, int]] = set()
    for rec in batch.records:
        for name, value in rec.values.items():
            key = (name, rec.epoch)
            if key in incoming and not _same(incoming[key], value):
                conflicts.add(key)
            incoming.setdefault(key, value)
    s = models.EpochScalar
    epochs = [e for _, e in incoming]
    stored = {
        (name, epoch): value
        for name, epoch, value in session.execute(
            sa.select(s.name, s.epoch, s.value).where(
                s.run_id == run.id, s.epoch.between(min(epochs), max(epochs))
            )
        )
    }
    conflicts |= {k for k, v in incoming.items() if k in stored and not _same(stored[k], v)}
    if conflicts:
        shown = [{"name": n, "epoch": e} for n, e in sorted(conflicts)[:100]]
        raise EpochConflict({"scalars": shown, "count": len(conflicts)}, error=SCALAR_CONFLICT)
    new = [(k, v) for k, v in incoming.items() if k not in stored]
    _check_name_count(session, run.id, {name for (name, _), _ in new})
    if new:
        session.execute(
            sa.insert(s),
            [{"run_id": run.id, "name": n, "epoch": e, "value": v} for (n, e), v in new],
        )
        run.updated_at = models.utcnow()
    session.commit()
    return schemas.ScalarIngestResult(accepted=len(new), duplicates=len(incoming) - len(new))


def _check_name_count(session: Session, run_id: uuid.UUID, names: set[str]) -> None:
    if not names:
        return
    s = models.EpochScalar
    known = set(session.scalars(sa.select(s.name).where(s.run_id == run_id).distinct()))
    if len(known | names) > MAX_NAMES_PER_RUN:
        raise InvalidInput("records", f"at most {MAX_NAMES_PER_RUN} scalar names per run")


def series(session: Session, run_id: uuid.UUID) -> list[schemas.ScalarSeries]:
    """Every scalar of a run, one series per name (names sorted, epochs ascending)."""
    s = models.EpochScalar
    out: dict[str, schemas.ScalarSeries] = {}
    rows = session.execute(
        sa.select(s.name, s.epoch, s.value).where(s.run_id == run_id).order_by(s.name, s.epoch)
    )
    for name, epoch, value in rows:
        one = out.setdefault(name, schemas.ScalarSeries(name=name, epochs=[], values=[]))
        one.epochs.append(epoch)
        one.values.append(value)
    return list(out.values())


# ---------------------------------------------------------------- for the pages


@dataclass
class Summary:
    """One name of one run as the pages show it: the last value, the range, a sparkline."""

    name: str
    last_epoch: int
    last_value: float | None
    low: float | None
    high: float | None
    points: str  # SVG polyline points in a 100 x 24 box; "" when fewer than two finite values


def _sparkline(epochs: Sequence[int], values: Sequence[float | None]) -> str:
    pts = [
        (e, v) for e, v in zip(epochs, values, strict=True) if v is not None and math.isfinite(v)
    ]
    if len(pts) < 2:
        return ""
    e0, e1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    xs = [(e - e0) / ((e1 - e0) or 1) * 100 for e, _ in pts]
    ys = [22 - (v - lo) / ((hi - lo) or 1) * 20 for _, v in pts]
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))


def summarise(one: schemas.ScalarSeries) -> Summary:
    finite = [v for v in one.values if v is not None and math.isfinite(v)]
    return Summary(
        one.name,
        one.epochs[-1],
        one.values[-1],
        min(finite) if finite else None,
        max(finite) if finite else None,
        _sparkline(one.epochs, one.values),
    )


def summaries(session: Session, run_id: uuid.UUID) -> list[Summary]:
    return [summarise(one) for one in series(session, run_id)]


def compare_table(
    session: Session, run_ids: Sequence[uuid.UUID]
) -> tuple[list[str], dict[str, list[Summary | None]]]:
    """(names, {name: [that run's summary or None, in the order of `run_ids`]})."""
    per_run = [{s.name: s for s in summaries(session, rid)} for rid in run_ids]
    names = sorted({n for run in per_run for n in run})
    return names, {n: [run.get(n) for run in per_run] for n in names}


def fmt_scalar(value: float | None) -> str:
    """4 significant digits (17.23, 0.8312, 1.2e+04); "–" for none (the pages' `scalar` filter)."""
    return "–" if value is None else f"{value:.4g}"
