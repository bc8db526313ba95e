"""The compare page's "did balancing help?" table and its CSV: one row per run.

Columns: the run, its balancing method (config `method` as the trainer records it, or
`balancer`), each task's final loss (the last stored epoch's; the task metrics of the
integrations API replace these once it lands), the fraction of measured epochs above the run's
threshold, the epochs in imbalance episodes, and the final gradient-norm ratio. The same rows
feed the HTML table and the CSV, so the download is exactly what is shown.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import models
from server.schemas import RunRead
from server.verdict import method_of


@dataclass
class HelpRow:
    run: RunRead
    method: str
    final_losses: dict[str, float | None]
    fraction_flagged: float | None
    episodes: int
    final_ratio: float | None


def _final_losses(session: Session, run: RunRead) -> dict[str, float | None]:
    if run.last_epoch is None:
        return {}
    te, t = models.TaskEpoch, models.RunTask
    rows = session.execute(
        sa.select(t.name, te.loss)
        .join(t, t.id == te.task_id)
        .where(te.run_id == run.id, te.epoch == run.last_epoch)
    )
    return dict(rows.all())


def _flagged(session: Session, run: RunRead) -> tuple[float | None, int]:
    """(fraction of measured epochs above the threshold, imbalance episodes). NaN ratios are
    not measured (the databases disagree on comparing NaN, so Python decides)."""
    e, a = models.Epoch, models.Alert
    ratios = session.scalars(
        sa.select(e.grad_norm_ratio).where(e.run_id == run.id, e.grad_norm_ratio.is_not(None))
    ).all()
    measured = [r for r in ratios if r is not None and not math.isnan(r)]
    above = sum(r > run.ratio_threshold for r in measured)
    episodes = session.scalar(
        sa.select(sa.func.count()).where(a.run_id == run.id, a.kind == "imbalance")
    )
    return (above / len(measured) if measured else None), episodes or 0


def rows(session: Session, runs: list[RunRead]) -> list[HelpRow]:
    out = []
    for run in runs:
        fraction, episodes = _flagged(session, run)
        out.append(
            HelpRow(
                run=run,
                method=method_of(run),
                final_losses=_final_losses(session, run),
                fraction_flagged=fraction,
                episodes=episodes,
                final_ratio=run.last_grad_norm_ratio,
            )
        )
    return out


def task_columns(table: list[HelpRow]) -> list[str]:
    return list(dict.fromkeys(t for r in table for t in r.run.tasks))


def _cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return "" if v is None else v


def to_csv(table: list[HelpRow]) -> str:
    tasks = task_columns(table)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "run",
            "run_id",
            "method",
            *(f"final_loss_{t}" for t in tasks),
            "fraction_flagged",
            "imbalance_episodes",
            "final_grad_norm_ratio",
        ]  # fmt: skip
    )
    for r in table:
        losses = [_cell(r.final_losses.get(t)) for t in tasks]
        w.writerow(
            [
                r.run.name,
                r.run.id,
                r.method,
                *losses,
                _cell(r.fraction_flagged),
                r.episodes,
                _cell(r.final_ratio),
            ]  # fmt: skip
        )
    return buf.getvalue()
