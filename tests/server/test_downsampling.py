"""Downsampled metrics reads: aligned buckets, their extremes from epoch_block or a scan, the
same epochs either way as a straightforward computation over every stored epoch."""

from __future__ import annotations

import math
from itertools import groupby
from typing import Any

import pytest

from server import epoch_blocks
from tests.server.conftest import TestClient, make_run
from tests.server.test_epoch_blocks import ingest_ratios, random_ratios, scan_block, shuffled


def reference_kept(ratios: dict[int, Any], max_points: int, forced: set[int]) -> list[int]:
    """The downsampled epochs, straightforwardly: aligned buckets of the smallest power-of-two
    size that makes at most max_points // 2 of them, each bucket's extremes, forced epochs."""
    epochs = sorted(ratios)
    n, size = max(1, max_points // 2), 1
    while epochs[-1] // size - epochs[0] // size + 1 > n:
        size *= 2
    keep = {e for e in forced if e in ratios}
    for _, grp in groupby(epochs, key=lambda e: e // size):
        first, _, low, _, high = scan_block(ratios, list(grp))
        keep.update([first] if low is None else [low, high])
    return sorted(keep)


def test_bucket_size_is_the_smallest_power_of_two_that_fits() -> None:
    assert epoch_blocks.bucket_size(0, 99_999, 1000) == 128  # 782 buckets
    assert epoch_blocks.bucket_size(0, 99, 5) == 32
    assert epoch_blocks.bucket_size(5, 5, 1) == 1
    assert epoch_blocks.bucket_size(63, 64, 1) == 128  # 63 and 64 straddle every block below


def _kept(client: TestClient, run_id: str, **params: Any) -> list[int]:
    r = client.get(f"/api/runs/{run_id}/metrics", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["downsampled"] is True
    return list(body["epochs"])


def _forced(client: TestClient, run_id: str, ratios: dict[int, Any]) -> set[int]:
    """Alert open/close epochs and non-finite epochs: kept whatever the buckets say."""
    alerts = client.get(f"/api/runs/{run_id}/alerts").json()["alerts"]
    keep = {e for a in alerts for e in (a["opened_epoch"], a["closed_epoch"]) if e is not None}
    return keep | {e for e, r in ratios.items() if r is not None and not math.isfinite(r)}


@pytest.mark.parametrize("from_blocks", [True, False], ids=["epoch_block", "scanned"])
@pytest.mark.parametrize(
    ("max_points", "epoch_min", "epoch_max"),
    [(100, None, None), (100, 317, 2450), (100, 1024, 2047), (40, 5, None), (1000, None, None)],
    ids=[
        "whole-run",
        "range-cuts-buckets",
        "range-on-block-edges",
        "range-from-5",
        "small-buckets",
    ],
)
def test_downsampled_read_keeps_what_a_scan_of_every_epoch_keeps(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    from_blocks: bool,
    max_points: int,
    epoch_min: int | None,
    epoch_max: int | None,
) -> None:
    run = make_run(client, ratio_threshold=5.0)  # 7.5 and Inf open alerts
    ratios = random_ratios(11, 3000)
    ingest_ratios(client, run["id"], shuffled(ratios, 12), batch=600)
    if not from_blocks:
        monkeypatch.setattr(epoch_blocks, "BLOCK_SIZES", ())
    lo, hi = epoch_min or 0, 10**9 if epoch_max is None else epoch_max
    in_range = {e: r for e, r in ratios.items() if lo <= e <= hi}
    params = {"max_points": max_points, "epoch_min": epoch_min, "epoch_max": epoch_max}
    got = _kept(client, run["id"], **{k: v for k, v in params.items() if v is not None})
    assert got == reference_kept(in_range, max_points, _forced(client, run["id"], ratios))


def test_downsampled_read_since_a_cursor_keeps_what_a_scan_of_the_later_epochs_keeps(
    client: TestClient,
) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios = random_ratios(13, 3000)
    early = {e: r for e, r in ratios.items() if e < 1000}
    later = {e: r for e, r in ratios.items() if e >= 1000}
    ingest_ratios(client, run["id"], early, batch=1000)
    cursor = client.get(f"/api/runs/{run['id']}/metrics", params={"max_points": 10}).json()
    ingest_ratios(client, run["id"], later, batch=1000)
    got = _kept(client, run["id"], since=cursor["cursor"], max_points=100)
    assert got == reference_kept(later, 100, _forced(client, run["id"], later))


def test_downsampled_read_keeps_a_lone_spike_and_every_alert_epoch(client: TestClient) -> None:
    run = make_run(
        client, ratio_threshold=10.0, alert_open_epochs=1, alert_close_epochs=1, rearm_ratio=10.0
    )  # no hysteresis
    ratios: dict[int, Any] = {e: 2.0 for e in range(50_000)}
    ratios[31_337] = 400.0  # one spike: opens an alert, the next epoch closes it
    ratios[40_000] = 0.01  # one dip
    ingest_ratios(client, run["id"], ratios, batch=10_000)
    got = _kept(client, run["id"], max_points=200)
    assert {31_337, 31_338, 40_000} <= set(got)
    assert len(got) <= 200
