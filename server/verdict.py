"""The run's verdict: a few exact sentences computed from its stored epochs, and a next step.

Read side only; the numbers come from the whole history, never from a downsampled read:
- dominance: each task's share of the shared update, |w_i| G_i / sum_j |w_j| G_j (the
  `contribution_share` the client reports, derived from the weighted norms when it does not),
  averaged over the last TAIL_EPOCHS epochs;
- imbalance: the fraction of measured epochs whose grad_norm_ratio is above the threshold, the
  first such epoch, and the trend: the median ratio of the last quarter of the run against the
  quarter before it (improving when it fell by IMPROVING_FACTOR or more; Chen et al. 2018 for
  the ratio);
- conflict: the fraction of epochs with a negative min_cosine and the pair most often negative
  (Yu et al. 2020, PCGrad);
- weight collapse: the tasks whose weight-collapse alert (server.alerts) is still open.
The suggestion follows the first of these that is wrong, in that order of severity.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from client_hook import gradstats
from server import models, schemas

TAIL_EPOCHS = 10
IMPROVING_FACTOR = 1.5
MAJOR_FRACTION = 0.25  # above this fraction of epochs flagged, imbalance is the headline
CONFLICT_FRACTION = 0.25


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.995 or x == 1 else f"{100 * x:.2f}%"


def _ratios(session: Session, run_id: uuid.UUID) -> list[tuple[int, float | None, float | None]]:
    e = models.Epoch
    stmt = (
        sa.select(e.epoch, e.grad_norm_ratio, e.min_cosine)
        .where(e.run_id == run_id)
        .order_by(e.epoch)
    )
    return [tuple(r) for r in session.execute(stmt)]  # type: ignore[misc]


def _shares(session: Session, run_id: uuid.UUID, last: int) -> dict[str, float]:
    """Mean share of the shared update per task over the epochs from `last` on."""
    te, t = models.TaskEpoch, models.RunTask
    rows = session.execute(
        sa.select(te.epoch, t.name, te.contribution_share, te.weighted_grad_norm, te.grad_norm)
        .join(t, t.id == te.task_id)
        .where(te.run_id == run_id, te.epoch >= last)
    ).all()
    by_epoch: dict[int, dict[str, float]] = {}
    for epoch, name, share, weighted, raw in rows:
        value = share if share is not None else (weighted if weighted is not None else raw)
        if value is not None and math.isfinite(value):
            by_epoch.setdefault(epoch, {})[name] = value
    totals: Counter[str] = Counter()
    for values in by_epoch.values():
        if sum(values.values()) > 0:
            totals.update(dict(zip(values, gradstats.shares(list(values.values())), strict=True)))
    n = len(by_epoch)
    return {k: v / n for k, v in totals.items()} if n else {}


def _conflict_pair(session: Session, run_id: uuid.UUID) -> tuple[str, str, int] | None:
    pc, a, b = models.PairCosine, sa.orm.aliased(models.RunTask), sa.orm.aliased(models.RunTask)
    row = session.execute(
        sa.select(a.name, b.name, sa.func.count())
        .select_from(pc)
        .join(a, a.id == pc.task_a_id)
        .join(b, b.id == pc.task_b_id)
        .where(pc.run_id == run_id, pc.value < 0)
        .group_by(a.name, b.name)
        .order_by(sa.func.count().desc(), a.name, b.name)
        .limit(1)
    ).first()
    return (row[0], row[1], row[2]) if row else None


def _collapsed(session: Session, run_id: uuid.UUID) -> list[tuple[str, int]]:
    al = models.Alert
    rows = session.execute(
        sa.select(al.task, al.opened_epoch).where(
            al.run_id == run_id, al.kind == "weight_collapse", al.closed_epoch.is_(None)
        )
    )
    return sorted((task or "?", opened) for task, opened in rows)


def _trend(ratios: list[float]) -> tuple[str, float | None, float | None]:
    """('improving' | 'worsening' | 'flat' | 'too short', earlier median, recent median)."""
    q = len(ratios) // 4
    if q < 2:
        return "too short", None, None
    before, recent = statistics.median(ratios[-2 * q : -q]), statistics.median(ratios[-q:])
    if recent * IMPROVING_FACTOR <= before:
        return "improving", before, recent
    if recent >= before * IMPROVING_FACTOR:
        return "worsening", before, recent
    return "flat", before, recent


def compute(
    session: Session, run: schemas.RunRead, whole: schemas.MetricsRead | None = None
) -> schemas.Verdict:
    """The verdict of `run` from every stored epoch. `whole`: a metrics read of the same run
    that holds every stored epoch (not downsampled, no range), e.g. the run page's, whose ratio
    and minimum-cosine columns then stand in for a second read of them."""
    if whole is not None and not whole.downsampled and whole.total_epochs == len(whole.epochs):
        cols = whole.epoch_metrics
        rows = list(zip(whole.epochs, cols["grad_norm_ratio"], cols["min_cosine"], strict=True))
    else:
        rows = _ratios(session, run.id)
    threshold = run.ratio_threshold
    measured = [(ep, r) for ep, r, _ in rows if r is not None and not math.isnan(r)]
    above = [ep for ep, r in measured if r > threshold]
    cosines = [c for _, _, c in rows if c is not None and not math.isnan(c)]
    negative = sum(c < 0 for c in cosines)
    n: dict[str, Any] = {
        "epochs": len(rows),
        "fraction_above": len(above) / len(measured) if measured else None,
        "first_above_epoch": above[0] if above else None,
        "conflict_fraction": negative / len(cosines) if cosines else None,
    }
    trend, before, recent = _trend([r for _, r in measured if math.isfinite(r)])
    n.update(trend=trend, earlier_median_ratio=before, recent_median_ratio=recent)
    shares = _shares(session, run.id, rows[-TAIL_EPOCHS][0] if len(rows) >= TAIL_EPOCHS else 0)
    if shares:
        dominant = max(shares, key=lambda k: shares[k])
        n.update(dominant_task=dominant, dominant_share=shares[dominant])
    pair = _conflict_pair(session, run.id) if negative else None
    if pair:
        n.update(conflict_pair=f"{pair[0]} · {pair[1]}")
    collapsed = _collapsed(session, run.id)
    n["collapsed_tasks"] = ", ".join(t for t, _ in collapsed) or None
    return _sentences(run, n, collapsed)


def _sentences(
    run: schemas.RunRead, n: dict[str, Any], collapsed: list[tuple[str, int]]
) -> schemas.Verdict:
    items: list[schemas.VerdictItem] = []
    item = schemas.VerdictItem
    total, frac = n["epochs"], n["fraction_above"]
    if total == 0:
        return schemas.Verdict(run_id=run.id, headline="No epochs yet.", items=[], numbers=n)
    if "dominant_task" in n:
        share = n["dominant_share"]
        level = "bad" if share >= 0.9 else ("warn" if share >= 0.7 else "ok")
        text = f"{n['dominant_task']} drives {_pct(share)} of the shared update"
        items.append(item(key="dominance", level=level, chart="weighted_norm", text=text))
    if frac is not None:
        level = "bad" if frac >= MAJOR_FRACTION else ("warn" if frac > 0 else "ok")
        text = f"{_pct(frac)} of epochs above the {run.ratio_threshold:g}× threshold"
        if n["first_above_epoch"] is not None:
            text += f", first at epoch {n['first_above_epoch']} of {total}"
        if n["trend"] != "too short":
            b, r = n["earlier_median_ratio"], n["recent_median_ratio"]
            text += f"; median ratio {b:.3g}× → {r:.3g}× over the last half: {n['trend']}"
        items.append(item(key="imbalance", level=level, chart="ratio", text=text))
    if n["conflict_fraction"] is not None:
        c = n["conflict_fraction"]
        level = "bad" if c >= CONFLICT_FRACTION else ("warn" if c > 0 else "ok")
        text = f"gradients conflict (min cosine < 0) in {_pct(c)} of epochs"
        if n.get("conflict_pair"):
            text += f", most often {n['conflict_pair']}"
        items.append(item(key="conflict", level=level, chart="cosine", text=text))
    for task, opened in collapsed:
        text = f"weight of {task} collapsed (below 1% of the mean) since epoch {opened}"
        items.append(item(key="weight_collapse", level="bad", chart="weight", text=text))
    return schemas.Verdict(
        run_id=run.id,
        headline=_headline(n),
        items=items,
        suggestion=_suggestion(run, n, collapsed),
        numbers=n,
    )


def _headline(n: dict[str, Any]) -> str:
    frac = n["fraction_above"] or 0
    if frac >= MAJOR_FRACTION:
        return f"Imbalanced: {n.get('dominant_task', 'one task')} dominates the shared layers."
    if (n["conflict_fraction"] or 0) >= CONFLICT_FRACTION:
        return "Conflicting: the task gradients often pull against each other."
    if n["collapsed_tasks"]:
        return "Balanced only by silencing a task: a weight collapsed."
    return "Balanced: no task dominates the shared update."


def method_of(run: schemas.RunRead) -> str:
    """The balancing method a run records in its config (`method`, or `balancer`), or "–"."""
    config = run.config or {}
    return str(config.get("method") or config.get("balancer") or "–")


def _suggestion(run: schemas.RunRead, n: dict[str, Any], collapsed: list[tuple[str, int]]) -> str:
    method = method_of(run)
    alpha = run.config.get("alpha") if run.config else None
    if collapsed and method == "gradnorm":
        lower = f" (now {alpha:g})" if isinstance(alpha, int | float) else ""
        return (
            f"{collapsed[0][0]}'s weight sits at its floor: lower GradNorm's alpha{lower} "
            "or try the inverse-gradient balancer (--method inverse-grad)."
        )
    if collapsed:
        return f"{collapsed[0][0]}'s weight collapsed: raise its weight floor or the balancer's."
    if (n["fraction_above"] or 0) >= MAJOR_FRACTION:
        if n["trend"] == "improving":
            return "The ratio is falling: keep training and watch whether it stays below."
        if method in ("–", "equal"):
            return (
                "Balance the losses: an inverse-gradient (--method inverse-grad) or GradNorm "
                "(--method gradnorm) balancer scales the dominant task down."
            )
        return f"The {method} balancer does not remove the imbalance: try another one."
    if (n["conflict_fraction"] or 0) >= CONFLICT_FRACTION:
        return "Try PCGrad (--method pcgrad), which projects out the conflicting components."
    return "Nothing to change."
