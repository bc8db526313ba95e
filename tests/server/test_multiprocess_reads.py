"""History reads a shared server serves fast: the compact columnar body, gzip, and the
per-process body cache (never stale, also when another process wrote)."""

from __future__ import annotations

import gzip
import math
import urllib.request
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.metrics_wire import MEDIA_TYPE, decode
from tests.server.conftest import epoch, ingest, make_run
from tests.server.multiprocess_support import ok
from tests.support import ServerProcess

COMPACT = {"Accept": MEDIA_TYPE}


def same(a: Any, b: Any) -> bool:
    """Equal, floats to float32 precision, NaN to NaN, "NaN"/"Infinity" strings to floats."""
    if isinstance(a, str) and isinstance(b, float):
        a = float(a)
    if isinstance(b, str) and isinstance(a, float):
        b = float(b)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def odd_epochs() -> list[dict[str, Any]]:
    """Nulls, NaN, +/-Inf, a value beyond float32's range, a cosine, a constant column."""
    out = [epoch(e, {"rul": 1.0 + e * 0.37, "health": 0.5}, step_count=10) for e in range(40)]
    out[3]["tasks"]["rul"]["loss"] = None
    out[5]["tasks"]["rul"]["grad_norm"] = "NaN"
    out[6]["tasks"]["health"]["grad_norm"] = "Infinity"
    out[7]["tasks"]["rul"]["loss"] = "-Infinity"
    out[8]["tasks"]["health"]["loss"] = 1e300
    out[9]["wall_time"] = 1.7e9 + 0.123456
    for rec in out:
        rec["cosines"] = [{"a": "rul", "b": "health", "value": math.sin(rec["epoch"])}]
    for e in range(0, 40, 3):  # per-layer numbers on some epochs, a NaN among them
        out[e]["groups"] = [
            {"name": "enc", "grad_norm": {"rul": 2.0 + e, "health": "NaN" if e == 9 else 1.0},
             "grad_norm_ratio": 2.0, "min_cosine": -0.25},
            {"name": "dec", "grad_norm": {"rul": 0.5, "health": 1.0}, "grad_norm_ratio": None,
             "min_cosine": math.cos(e)},
        ]  # fmt: skip
    return out


@pytest.mark.parametrize("query", ["", "?max_points=8", "?epoch_min=5&epoch_max=20&tasks=rul"])
def test_compact_body_holds_what_the_json_body_holds(client: TestClient, query: str) -> None:
    run_id = make_run(client)["id"]
    assert ingest(client, run_id, odd_epochs()).status_code == 200
    url = f"/api/runs/{run_id}/metrics{query}"
    js = client.get(url).json()
    r = client.get(url, headers=COMPACT)
    assert r.headers["content-type"] == MEDIA_TYPE
    got = decode(r.content)
    assert same(got, js), (got, js)
    if not query:  # (8 points of ~15 columns: the header outweighs what it saves)
        assert len(r.content) < len(client.get(url).content)
        assert [g["name"] for g in got["groups"]] == ["enc", "dec"]
    if not query:  # beyond float32: sent as float64, exactly
        assert got["task_metrics"]["health"]["loss"][8] == 1e300
        assert got["epoch_metrics"]["wall_time"][9] == 1.7e9 + 0.123456


def test_json_is_gzipped_only_when_the_client_accepts_it(client: TestClient) -> None:
    run_id = make_run(client)["id"]
    ingest(client, run_id, [epoch(e) for e in range(200)])
    url = f"/api/runs/{run_id}/metrics"
    # httpx decodes gzip itself; look at the raw bytes
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    with client.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["content-encoding"] == "gzip"
        assert "Accept-Encoding" in r.headers["vary"]
        raw = b"".join(r.iter_raw())
    assert gzip.decompress(raw) == plain.content
    assert len(raw) < len(plain.content)


def test_cached_body_follows_new_epochs_and_threshold_changes(client: TestClient) -> None:
    run_id = make_run(client)["id"]
    ingest(client, run_id, [epoch(e, {"rul": 5.0, "health": 1.0}) for e in range(64)])
    url = f"/api/runs/{run_id}/metrics?max_points=8"
    first = client.get(url, headers=COMPACT).content
    assert client.get(url, headers=COMPACT).content == first  # served again
    client.patch(f"/api/runs/{run_id}", json={"ratio_threshold": 3.0})  # alert at epoch 0
    after_threshold = decode(client.get(url, headers=COMPACT).content)
    assert same(after_threshold, client.get(url).json())
    ingest(client, run_id, [epoch(64)])
    assert decode(client.get(url, headers=COMPACT).content)["total_epochs"] == 65
    client.delete(f"/api/runs/{run_id}")
    assert client.get(url, headers=COMPACT).status_code == 404


def test_a_process_never_serves_a_body_older_than_another_process_wrote(
    database_url: str,
) -> None:
    with ServerProcess(database_url) as a, ServerProcess(database_url) as b:
        run_id = ok(a.url, "POST", "/api/runs", {"name": "r", "tasks": ["rul", "health"]})["id"]
        for start in (0, 10):
            ok(a.url, "POST", f"/api/runs/{run_id}/epochs",
               {"epochs": [epoch(e) for e in range(start, start + 10)]})  # fmt: skip
            req = urllib.request.Request(f"{b.url}/api/runs/{run_id}/metrics", headers=COMPACT)
            for _ in range(2):  # the second read is the cached one
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert decode(r.read())["epochs"] == list(range(start + 10))
