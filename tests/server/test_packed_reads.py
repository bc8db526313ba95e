"""The compact metrics body from each epoch's packed row (server.metrics_packed), against the
same body built from the rows, and the packing's edge cases."""

from __future__ import annotations

import math
import struct
import uuid
from typing import Any
from urllib.parse import parse_qsl

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from server import metrics_packed, models
from server.config import Settings
from server.main import create_app
from server.metrics_wire import decode
from tests.server.conftest import TestClient, epoch, ingest, make_run
from tests.server.test_multiprocess_reads import COMPACT, odd_epochs, same

QUERIES = ["", "?max_points=8", "?epoch_min=5&epoch_max=20&tasks=rul", "?since=3"]


def packable_epochs() -> list[dict]:
    """odd_epochs without the value beyond float32's range (that epoch would get no packed
    row): nulls, NaN, +/-Inf, cosines, per-layer numbers, a constant column, a lone null."""
    out = odd_epochs()
    out[8]["tasks"]["health"]["loss"] = 0.25
    out[11]["step_count"] = None
    out[12]["wall_time"] = None
    del out[13]["cosines"]
    return out


def read_query(query: str) -> dict[str, Any]:
    """The keywords of server.metrics.get_metrics for a query string of QUERIES."""
    out: dict[str, Any] = {}
    for name, value in parse_qsl(query.lstrip("?")):
        out[name] = value.split(",") if name == "tasks" else int(value)
    return out


def packed_body(session: Session, run_id: uuid.UUID, query: dict[str, Any]) -> bytes | None:
    session.rollback()  # a fresh snapshot
    return metrics_packed.packed_body(session, run_id, **query)


def packed_count(session: Session, run_id: str) -> int:
    e = models.Epoch
    stmt = sa.select(sa.func.count()).where(e.run_id == uuid.UUID(run_id), e.packed.is_not(None))
    return int(session.scalar(stmt) or 0)


@pytest.mark.parametrize("query", QUERIES)
def test_packed_rows_give_the_body_the_rows_give(
    client: TestClient, session: Session, settings: Settings, query: str
) -> None:
    run_id = make_run(client)["id"]
    assert ingest(client, run_id, packable_epochs()).status_code == 200
    assert packed_count(session, run_id) == 40
    url = f"/api/runs/{run_id}/metrics{query}"
    packed = client.get(url, headers=COMPACT).content
    args = uuid.UUID(run_id), read_query(query)
    assert packed_body(session, *args) == packed  # (not the rows' path)
    session.execute(sa.update(models.Epoch).values(packed=None))  # as before migration 0007
    session.commit()
    assert packed_body(session, *args) is None
    with TestClient(create_app(settings)) as fresh:  # (a process without the cached body)
        from_rows = fresh.get(url, headers=COMPACT).content
    got, want = decode(packed), decode(from_rows)
    assert same(got, want), (got, want)
    assert same(got, client.get(url).json())
    if not query:
        loss = got["task_metrics"]["rul"]["loss"]
        assert loss[3] is None and loss[7] == -math.inf
        assert math.isnan(got["task_metrics"]["rul"]["grad_norm"][5])
        assert got["epoch_metrics"]["step_count"][11] is None
        assert got["epoch_metrics"]["wall_time"][12] is None
        assert got["cosines"][0]["values"][13] is None


def test_an_epoch_that_cannot_be_packed_sends_its_run_through_the_rows(
    client: TestClient, session: Session
) -> None:
    run_id = make_run(client)["id"]
    ingest(client, run_id, odd_epochs())  # epoch 8 holds 1e300
    assert packed_count(session, run_id) == 39
    got = decode(client.get(f"/api/runs/{run_id}/metrics", headers=COMPACT).content)
    assert got["task_metrics"]["health"]["loss"][8] == 1e300  # as f8, exactly
    assert len(got["epochs"]) == 40


def test_a_run_of_many_tasks_is_read_from_its_rows(client: TestClient, session: Session) -> None:
    tasks = [f"t{i}" for i in range(metrics_packed.MAX_TASKS + 1)]
    run_id = make_run(client, tasks=tasks)["id"]
    ingest(client, run_id, [epoch(e, {t: 1.0 + e for t in tasks}) for e in range(5)])
    assert packed_count(session, run_id) == 0
    got = decode(client.get(f"/api/runs/{run_id}/metrics", headers=COMPACT).content)
    assert got["task_metrics"]["t16"]["grad_norm"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_pack_keeps_null_apart_from_nan() -> None:
    fields = len(models.TASK_FIELDS)
    epoch_values = (2.0, None, math.nan, 1.0, None, 12.5, 7)
    row = metrics_packed.pack(epoch_values, [(1.0,) * fields, None], {(0, 1): -0.5}, True)
    assert row is not None and len(row) == metrics_packed.layout(2).size
    assert struct.unpack_from("<di", row) == (12.5, 7)
    f4 = [row[at : at + 4] for at in range(12, len(row), 4)]
    assert f4[1] == metrics_packed.NULL["f"]  # peak_grad_norm_ratio: None
    assert f4[2] == metrics_packed.FILL["f"]  # min_cosine: NaN, the one NaN
    tasks_at = len(metrics_packed.F4_EPOCH_FIELDS)
    assert f4[tasks_at + fields : tasks_at + 2 * fields] == [metrics_packed.NULL["f"]] * fields
    assert struct.unpack("<f", f4[tasks_at + 2 * fields]) == (-0.5,)  # the pair's cosine


def test_pack_refuses_what_float32_cannot_hold() -> None:
    values = (1e39, None, None, None, None, None, None)
    assert metrics_packed.pack(values, [None, None], {}, False) is None


def test_a_null_marker_straddling_two_values_is_not_a_null() -> None:
    null = metrics_packed.NULL["f"]
    raw = b"\x00\x00" + null + b"\x00\x00" + struct.pack("<f", 1.5)
    _, data, meta = metrics_packed.column(raw, "f")
    assert "nulls" not in meta and data == raw
    _, data, meta = metrics_packed.column(raw + null, "f")
    assert meta["nulls"] == [3] and data is not None and data[12:] == metrics_packed.FILL["f"]
