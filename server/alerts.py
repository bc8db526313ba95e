"""Imbalance alerts as episodes, computed by the server on ingest.

An episode opens at the first epoch where its rule holds and closes at the first later epoch
where it no longer holds (`closed_epoch` is that epoch); while it stays open nothing new is
created, only its peak is updated. No flood of one alert per epoch.

Rules (a value that is missing, `None`, leaves an episode as it is):
- imbalance: the epoch's grad_norm_ratio (max_i |w_i| G_i / min_i |w_i| G_i, Chen et al. 2018,
  GradNorm) stays above the run's threshold. With hysteresis and a duration, as Prometheus'
  `for:` clause does for alerting rules: an episode opens once the ratio has been above the
  threshold for `open_epochs` consecutive measured epochs (`opened_epoch` is the first of
  them) and closes once it has been below the re-arm level (`rearm_ratio`, under the
  threshold) for `close_epochs` consecutive epochs (`closed_epoch` is the first of those); a
  ratio between the two levels keeps an open episode open and restarts the clear count. The
  defaults (Hysteresis below) were chosen by measurement on the demo runs; every run can
  override them. Peak: the largest ratio. A NaN ratio changes nothing (non_finite covers it).
- non_finite (per task): the task's grad_norm is NaN or +/-Inf. Peak: that value.
- weight_collapse (per task): the task weight is below 1% of the mean of the finite weights
  of the epoch (needs two weights or more). Peak: the smallest weight / mean.
- conflict: min_cosine < 0 for CONFLICT_EPOCHS consecutive epochs (records, in epoch order;
  negative cosines mean the task gradients pull against each other, Yu et al. 2020, PCGrad).
  `opened_epoch` is the first epoch of the streak. Peak: the most negative cosine.
  Hysteresis: cosines that hover around 0 would open and close an episode every few epochs, so
  an open conflict closes only after CONFLICT_CLEAR_EPOCHS consecutive epochs with
  min_cosine >= 0; a negative cosine in between resets that count and the episode stays open.
  `closed_epoch` is the first epoch of that clear streak (where the conflict ended), recorded
  once the streak is complete, i.e. CONFLICT_CLEAR_EPOCHS - 1 epochs later.

The imbalance message shows as many digits as it takes for the ratio to read above the
threshold (10.03x, not 10x).

Out-of-order epochs: episodes are a function of the epoch-ordered history, never of arrival
order. A batch that only appends (every new epoch after the last stored one) is evaluated
incrementally from the open episodes. A batch that lands before the last stored epoch (a
client's spool delivered late) triggers a recomputation of the run's episodes over its whole
history; episodes that come out the same keep their id and opened_at (server.alert_store).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from server import models

CONFLICT_EPOCHS = 3
CONFLICT_CLEAR_EPOCHS = 3
WEIGHT_COLLAPSE_SHARE = 0.01


@dataclass(frozen=True)
class Hysteresis:
    """The imbalance rule's levels. Defaults measured on the demo runs (docs/alerts.md)."""

    threshold: float = 10.0
    open_epochs: int = 3
    close_epochs: int = 3
    rearm_fraction: float = 0.7
    rearm: float | None = None  # absolute re-arm ratio; None: rearm_fraction * threshold

    @property
    def rearm_level(self) -> float:
        return self.rearm if self.rearm is not None else self.rearm_fraction * self.threshold


def run_hysteresis(run: models.Run) -> Hysteresis:
    """The run's imbalance levels: its threshold and overrides over the defaults."""
    d = Hysteresis()
    return Hysteresis(
        threshold=run.ratio_threshold,
        open_epochs=run.alert_open_epochs or d.open_epochs,
        close_epochs=run.alert_close_epochs or d.close_epochs,
        rearm=run.rearm_ratio,
    )


Key = tuple[str, str | None]


@dataclass
class EpochView:
    """What the rules look at in one epoch."""

    epoch: int
    grad_norm_ratio: float | None
    min_cosine: float | None
    grad_norms: dict[str, float | None] = field(default_factory=dict)
    weights: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Episode:
    kind: str
    task: str | None
    opened_epoch: int
    peak_value: float | None
    message: str
    closed_epoch: int | None = None
    id: int | None = None  # the stored row, when there is one
    was_open: bool = True  # as stored before this evaluation

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.kind, self.task, self.opened_epoch)


@dataclass
class AlertState:
    open: dict[Key, Episode] = field(default_factory=dict)
    closed: list[Episode] = field(default_factory=list)
    streak: list[tuple[int, float]] = field(default_factory=list)  # trailing negative cosines
    clear: list[int] = field(default_factory=list)  # epochs of trailing cosines >= 0, while open
    above: list[tuple[int, float]] = field(default_factory=list)  # trailing ratios > threshold
    below: list[int] = field(default_factory=list)  # epochs of trailing ratios < re-arm, open


def _is_num(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def _num(value: float) -> str:
    """The shortest text that reads back as `value` (10, 10.5, 1e+20)."""
    return repr(value).removesuffix(".0") if math.isfinite(value) else str(value)


def _above(value: float, threshold: float) -> str:
    """`value` (> threshold) with 3 significant digits, or more where 3 would make it read as
    the threshold or below: 10.03 over 10 gives "10.03", not "10"."""
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if float(text) > threshold:
            return text
    return _num(value)


def _open(state: AlertState, ep: Episode) -> None:
    ep.was_open = False
    state.open[(ep.kind, ep.task)] = ep


def _close(state: AlertState, key: Key, epoch: int) -> None:
    ep = state.open.pop(key, None)
    if ep is not None:
        ep.closed_epoch = epoch
        state.closed.append(ep)


def _imbalance(state: AlertState, e: EpochView, h: Hysteresis) -> None:
    r, key = e.grad_norm_ratio, ("imbalance", None)
    if r is None or math.isnan(r):
        return
    ep = state.open.get(key)
    if ep is not None:
        if r < h.rearm_level:
            state.below.append(e.epoch)
            if len(state.below) >= h.close_epochs:
                _close(state, key, state.below[0])
                state.below.clear()
            return
        state.below.clear()  # between the levels or above: stays open, clear count restarts
        if ep.peak_value is None or r > ep.peak_value:
            ep.peak_value = r
        return
    if r <= h.threshold:
        state.above.clear()
        return
    state.above.append((e.epoch, r))
    if len(state.above) >= h.open_epochs:
        first, peak = state.above[0][0], max(v for _, v in state.above)
        shown, limit = _above(min(v for _, v in state.above), h.threshold), _num(h.threshold)
        n = len(state.above)
        msg = f"gradient-norm ratio {shown}x above the threshold {limit}x"
        msg += f" for {n} epochs" if n > 1 else ""
        _open(state, Episode("imbalance", None, first, peak, msg))
        state.above.clear()


def _non_finite(state: AlertState, e: EpochView) -> None:
    for task, g in e.grad_norms.items():
        if g is None:
            continue
        key = ("non_finite", task)
        if not math.isfinite(g):
            if key not in state.open:
                msg = f"task {task!r}: gradient norm is {g}"
                _open(state, Episode("non_finite", task, e.epoch, g, msg))
        elif key in state.open:
            _close(state, key, e.epoch)


def _weight_collapse(state: AlertState, e: EpochView) -> None:
    finite = {t: w for t, w in e.weights.items() if w is not None and math.isfinite(w)}
    if len(finite) < 2:
        return
    mean = sum(finite.values()) / len(finite)
    if mean <= 0:
        return
    for task, w in finite.items():
        key, share = ("weight_collapse", task), w / mean
        ep = state.open.get(key)
        if share < WEIGHT_COLLAPSE_SHARE:
            if ep is None:
                msg = f"task {task!r}: weight {w:.3g} is below 1% of the mean weight {mean:.3g}"
                _open(state, Episode("weight_collapse", task, e.epoch, share, msg))
            elif ep.peak_value is None or share < ep.peak_value:
                ep.peak_value = share
        elif ep is not None:
            _close(state, key, e.epoch)


def _conflict(state: AlertState, e: EpochView) -> None:
    c, key = e.min_cosine, ("conflict", None)
    if not _is_num(c):
        return
    assert c is not None
    ep = state.open.get(key)
    if c < 0:
        if ep is not None:
            state.clear.clear()  # hysteresis: the clear streak starts over
            if ep.peak_value is None or c < ep.peak_value:
                ep.peak_value = c
            return
        state.streak.append((e.epoch, c))
        if len(state.streak) >= CONFLICT_EPOCHS:
            first, peak = state.streak[0][0], min(v for _, v in state.streak)
            msg = f"task gradients conflict: min cosine < 0 since epoch {first}"
            _open(state, Episode("conflict", None, first, peak, msg))
            state.streak.clear()
    else:
        state.streak.clear()
        if ep is not None:
            state.clear.append(e.epoch)
            if len(state.clear) >= CONFLICT_CLEAR_EPOCHS:
                _close(state, key, state.clear[0])
                state.clear.clear()


def evaluate(epochs: Iterable[EpochView], state: AlertState, h: Hysteresis) -> AlertState:
    """Run every rule over `epochs` (ascending), updating `state` in place."""
    for e in epochs:
        _imbalance(state, e, h)
        _non_finite(state, e)
        _weight_collapse(state, e)
        _conflict(state, e)
    return state
