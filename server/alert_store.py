"""Alert episodes in the database: the rules of server.alerts run on ingest over the new epochs
(from the open episodes and the trailing streaks as stored), or over a run's whole history
when epochs arrive out of order or its levels change; episodes are written back, and the
run's alert summary kept in step.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import models, webhooks
from server.alerts import AlertState, Episode, EpochView, Hysteresis, evaluate, run_hysteresis
from server.models import utcnow


def _episode(row: models.Alert) -> Episode:
    return Episode(
        row.kind, row.task, row.opened_epoch, row.peak_value, row.message, row.closed_epoch, row.id
    )


def _load_state(session: Session, run_id: uuid.UUID, before: int, h: Hysteresis) -> AlertState:
    """Open episodes and the trailing streaks, as stored before epoch `before`."""
    rows = session.scalars(
        sa.select(models.Alert).where(
            models.Alert.run_id == run_id, models.Alert.closed_epoch.is_(None)
        )
    ).all()
    state = AlertState(open={(r.kind, r.task): _episode(r) for r in rows})
    conflict_open = ("conflict", None) in state.open
    # While a conflict is open, the trailing cosines >= 0 (the clear streak); otherwise the
    # trailing negative ones (the streak that may open one). NaN cosines are skipped, as in
    # `_conflict`, so the walk goes back page by page until a cosine of the other sign.
    for epoch, c in _trailing(session, run_id, before, models.Epoch.min_cosine):
        if (c < 0) == conflict_open:
            break
        if conflict_open:
            state.clear.insert(0, epoch)
        else:
            state.streak.insert(0, (epoch, c))
    # Likewise for the ratio: while an imbalance is open, the trailing ratios under the re-arm
    # level; otherwise the trailing ones above the threshold.
    imbalance_open = ("imbalance", None) in state.open
    for epoch, r in _trailing(session, run_id, before, models.Epoch.grad_norm_ratio):
        if imbalance_open and r < h.rearm_level:
            state.below.insert(0, epoch)
        elif not imbalance_open and r > h.threshold:
            state.above.insert(0, (epoch, r))
        else:
            break
    return state


def _trailing(
    session: Session, run_id: uuid.UUID, before: int, column: Any, page: int = 64
) -> Iterator[tuple[int, float]]:
    """(epoch, value of `column`) of the stored epochs before `before`, newest first, NULL and
    NaN left out."""
    e = models.Epoch
    while True:
        rows = session.execute(
            sa.select(e.epoch, column)
            .where(e.run_id == run_id, e.epoch < before, column.is_not(None))
            .order_by(e.epoch.desc())
            .limit(page)
        ).all()
        for epoch, c in rows:
            if c is not None and not math.isnan(c):
                yield epoch, c
        if len(rows) < page:
            return
        before = rows[-1][0]


def history(session: Session, run_id: uuid.UUID) -> list[EpochView]:
    """Every stored epoch of a run as EpochViews, ascending."""
    e, te, t = models.Epoch, models.TaskEpoch, models.RunTask
    views = {
        ep: EpochView(ep, r, c)
        for ep, r, c in session.execute(
            sa.select(e.epoch, e.grad_norm_ratio, e.min_cosine)
            .where(e.run_id == run_id)
            .order_by(e.epoch)
        )
    }
    rows = session.execute(
        sa.select(te.epoch, t.name, te.grad_norm, te.task_weight)
        .join(t, t.id == te.task_id)
        .where(te.run_id == run_id)
    )
    for ep, name, g, w in rows:
        views[ep].grad_norms[name] = g
        views[ep].weights[name] = w
    return list(views.values())


def _write(session: Session, run_id: uuid.UUID, episodes: list[Episode]) -> tuple[int, int]:
    """Insert new episodes, update stored ones; return (opened, closed) counts."""
    now, opened, closed = utcnow(), 0, 0
    for ep in episodes:
        newly_closed = ep.closed_epoch is not None and (ep.id is None or ep.was_open)
        closed += newly_closed
        if ep.id is None:
            opened += 1
            session.add(
                models.Alert(
                    run_id=run_id,
                    kind=ep.kind,
                    task=ep.task,
                    opened_epoch=ep.opened_epoch,
                    closed_epoch=ep.closed_epoch,
                    peak_value=ep.peak_value,
                    message=ep.message,
                    opened_at=now,
                    closed_at=now if ep.closed_epoch is not None else None,
                )
            )
        else:
            row = session.get(models.Alert, ep.id)
            assert row is not None
            row.closed_epoch, row.peak_value, row.message = (
                ep.closed_epoch,
                ep.peak_value,
                ep.message,
            )
            if ep.closed_epoch is None:
                row.closed_at = None
            elif newly_closed or row.closed_at is None:
                row.closed_at = now
    session.flush()
    webhooks.notify(session, run_id, episodes)  # announced once the transaction commits
    return opened, closed


def apply_new_epochs(session: Session, run: models.Run, views: list[EpochView]) -> tuple[int, int]:
    """Evaluate epochs appended after the last stored one (`views` ascending)."""
    h = run_hysteresis(run)
    state = evaluate(views, _load_state(session, run.id, views[0].epoch, h), h)
    return _write(session, run.id, [*state.closed, *state.open.values()])


def recompute(session: Session, run: models.Run) -> tuple[int, int]:
    """Recompute every episode of a run from its history (out-of-order epochs, new threshold)."""
    state = evaluate(history(session, run.id), AlertState(), run_hysteresis(run))
    stored = {
        (r.kind, r.task, r.opened_epoch): r
        for r in session.scalars(sa.select(models.Alert).where(models.Alert.run_id == run.id))
    }
    episodes = [*state.closed, *state.open.values()]
    for ep in episodes:
        row = stored.pop(ep.key, None)
        if row is not None:
            ep.id, ep.was_open = row.id, row.closed_epoch is None
    for row in stored.values():
        session.delete(row)
    return _write(session, run.id, episodes)


def refresh_run_flags(session: Session, run: models.Run) -> None:
    """Keep run.open_alert_count (every kind) and run.flagged (an IMBALANCE alert was ever
    opened: the red flag means imbalance only) in step."""
    a = models.Alert
    counts = session.execute(
        sa.select(
            sa.func.count().filter(a.kind == "imbalance"),
            sa.func.count().filter(a.closed_epoch.is_(None)),
        ).where(a.run_id == run.id)
    ).one()
    run.flagged = counts[0] > 0
    run.open_alert_count = counts[1]
