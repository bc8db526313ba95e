"""Per-parameter-group ("per-layer") epoch numbers: validation, storage form and columnar read.

A record's `groups` (schemas.GroupEpoch) are stored with their epoch row, as one JSON text in
`epoch.groups_json` (NULL: no group numbers): a group's values are only ever read with their
epoch, so a table of their own would cost a join and a row per (epoch, group, task) for nothing.
The text is canonical (tasks in the run's order, compact JSON, NaN/+-Infinity as the API's
strings), so it takes part in the epoch's digest as is: an identical resend is a duplicate, a
different one a conflict. Downsampled reads keep the epochs chosen for the ratio, and the group
columns come from exactly those epochs (server.metrics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson

from server import schemas
from server.errors import InvalidInput


def _out(v: float | None) -> float | str | None:
    """A float as the API writes it: NaN/+-Infinity as strings (JSON has no literal for them)."""
    if v is None or math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _in(v: Any) -> float | None:
    return float(v) if isinstance(v, str) else v


def canonical(
    where: str, groups: Sequence[schemas.GroupEpoch], tasks: Sequence[str]
) -> tuple[str, bool]:
    """(the JSON text stored for `groups`, whether any value is NaN/Inf). `tasks`: the run's
    task names in order. Raises InvalidInput (422) naming the first problem."""
    known, seen, out, non_finite = set(tasks), set(), [], False
    for j, g in enumerate(groups):
        at = f"{where}.groups[{j}]"
        if g.name in seen:
            raise InvalidInput(f"{at}.name", f"duplicate group name {g.name!r}")
        seen.add(g.name)
        for name in g.grad_norm:
            if name not in known:
                raise InvalidInput(f"{at}.grad_norm.{name}", f"run has no task {name!r}")
        missing = [t for t in tasks if t not in g.grad_norm]
        if missing:
            raise InvalidInput(f"{at}.grad_norm", f"missing tasks {missing}")
        norms = [g.grad_norm[t] for t in tasks]
        values = [*norms, g.grad_norm_ratio, g.min_cosine]
        non_finite = non_finite or any(v is not None and not math.isfinite(v) for v in values)
        out.append([g.name, [_out(v) for v in norms], _out(g.grad_norm_ratio), _out(g.min_cosine)])
    return orjson.dumps(out).decode(), non_finite


def columns(
    rows: Sequence[tuple[int, str]], epochs: Sequence[int], tasks: Sequence[str]
) -> list[dict[str, Any]]:
    """GroupSeries-shaped dicts (floats may be NaN/Inf) from (epoch, groups_json) rows,
    aligned with `epochs`; groups in first-seen order, None where a group was not measured."""
    pos = {ep: i for i, ep in enumerate(epochs)}
    n = len(epochs)
    found: dict[str, Any] = {}
    cols: dict[str, Any] = {}
    for epoch, text in rows:
        p = pos.get(epoch)
        if p is None or not text:
            continue
        exact = "NaN" in text or "Infinity" in text  # the API's strings: only then convert
        for name, norms, ratio, cos in orjson.loads(text):
            g = found.get(name)
            if g is None:
                g = found[name] = {
                    "name": name,
                    "grad_norm": {t: [None] * n for t in tasks},
                    "grad_norm_ratio": [None] * n,
                    "min_cosine": [None] * n,
                }
                cols[name] = [*g["grad_norm"].values(), g["grad_norm_ratio"], g["min_cosine"]]
            values = [*norms, ratio, cos]
            for col, v in zip(cols[name], map(_in, values) if exact else values, strict=False):
                col[p] = v
    return list(found.values())


def for_json(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`columns` output with NaN/+-Infinity as the API's strings."""
    return [
        {
            "name": g["name"],
            "grad_norm": {t: [_out(v) for v in col] for t, col in g["grad_norm"].items()},
            "grad_norm_ratio": [_out(v) for v in g["grad_norm_ratio"]],
            "min_cosine": [_out(v) for v in g["min_cosine"]],
        }
        for g in groups
    ]
