"""Dashboard speed: server-side render times and payload sizes of the pages at scale.

    .venv/bin/python bench/dashboard.py          # 100 runs x 1,000 epochs x 10 tasks + 1 x 100,000
    .venv/bin/python bench/dashboard.py --quick  # 10 runs x 200 epochs + 1 x 10,000 (a smoke run)
    .venv/bin/python bench/dashboard.py --diagnosis  # one 1,000-epoch, 10-task, 6-group run:
                                                     # its run page cold (verdict, heatmaps too),
                                                     # CPU by stage, the epoch picker's API

Seeding goes through the server's own ingest code (`server.ingest.ingest_batch`, in-process,
1,000-epoch batches, no HTTP), so the stored rows and run summaries are exactly what the API
would store. The seeded SQLite file is kept (bench/.dashboard-<scale>.db, git-ignored) and reused.
Each epoch carries 10 tasks and `--pairs` cosine pairs (default 9: the first task against each
other one; pass 45 for every pair, seeding then takes ~3x longer).

Times are medians of `--repeat` requests through the ASGI app in-process (routing, queries, charts,
template, JSON; no network). Printed, never asserted. Wall time follows the machine's load; the
process CPU time beside it much less, and the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import re
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what we have
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from server import charts, ingest, queries, schemas, verdict
from server.config import Settings
from server.db import create_db_engine, make_session_factory, run_migrations, write_session
from server.main import create_app
from server.routes.pages import json_bytes_for_script

HERE = Path(__file__).resolve().parent


GROUPS = ["embed", "conv1", "conv2", "lstm", "dense", "head"]


def group_numbers(rng: random.Random, tasks: list[str]) -> list[dict]:
    """Per-layer numbers of one epoch (the `groups` of an EpochRecord)."""
    out = []
    for depth, name in enumerate(GROUPS):
        norms = {t: (1.0 + depth if i == 0 else 1.0) * (1 + 0.1 * rng.random())
                 for i, t in enumerate(tasks)}  # fmt: skip
        ratio = max(norms.values()) / min(norms.values())
        out.append({"name": name, "grad_norm": norms, "grad_norm_ratio": ratio,
                    "min_cosine": rng.uniform(-0.3, 0.6)})  # fmt: skip
    return out


def epoch_record(
    rng: random.Random, e: int, tasks: list[str], pairs: list[tuple[str, str]]
) -> dict:
    spike = 40.0 if e % 997 == 500 else 1.0  # a rare imbalance spike the downsampling must keep
    return {
        "epoch": e,
        "tasks": {
            t: {
                "grad_norm": (5.0 * spike if i == 0 else 1.0) * (1 + 0.1 * rng.random()),
                "loss": 1.0 / (1 + e * 0.01) * (1 + 0.05 * rng.random()),
                "loss_ratio": 1.0 / (1 + e * 0.01), "relative_inverse_rate": 1.0,
                "task_weight": 1.0,
            }
            for i, t in enumerate(tasks)
        },
        "cosines": [{"a": a, "b": b, "value": rng.uniform(0.05, 0.6)} for a, b in pairs],
    }  # fmt: skip


def seed(url: str, runs: int, epochs: int, long_epochs: int, n_tasks: int, n_pairs: int) -> None:
    run_migrations(url)
    factory = make_session_factory(create_db_engine(url))
    settings = Settings(database_url=url)
    tasks = [f"task{i}" for i in range(n_tasks)]
    pairs = list(itertools.combinations(tasks, 2))
    pairs = [p for p in pairs if p[0] == tasks[0]][:n_pairs] + [
        p for p in pairs if p[0] != tasks[0]
    ][: max(0, n_pairs - (n_tasks - 1))]
    rng = random.Random(0)
    plan = [(f"bench-{i:03d}", epochs) for i in range(runs)] + [("bench-long", long_epochs)]
    started = time.perf_counter()
    for name, count in plan:
        with write_session(factory) as session:
            body = schemas.RunCreate(name=name, project=f"p{hash(name) % 4}", tasks=tasks)
            run, _ = ingest.create_or_resume_run(session, body, settings)
            run_id = run.id
        for start in range(0, count, 1000):
            recs = [
                epoch_record(rng, e, tasks, pairs) for e in range(start, min(count, start + 1000))
            ]
            batch = schemas.EpochBatch.model_validate({"epochs": recs})
            with write_session(factory) as session:
                ingest.ingest_batch(session, ingest.lock_run(session, run_id), batch)
        print(
            f"  seeded {name}: {count} epochs ({time.perf_counter() - started:.0f} s)", flush=True
        )


def median_ms(client: TestClient, path: str, repeat: int, cold: bool = False) -> tuple[float, Any]:
    """Median request time; `cold` empties the pages' metrics cache before each request."""
    client.get(path)  # warm templates, the SQLite page cache
    times, response = [], None
    for _ in range(repeat):
        if cold:
            client.app.state.metrics_cache.clear()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    return statistics.median(times), response


def max_points_per_trace(html: str) -> int:
    m = re.search(r'id="run-data">(.*?)</script>', html, re.S)
    assert m
    figures = json.loads(m.group(1))["figures"]
    return max(len(t["x"]) for f in figures.values() for t in f["data"])


def breakdown(url: str, run_id: uuid.UUID, repeat: int) -> dict[str, float]:
    """Where a run page's time goes: the metrics query vs building the figures."""
    factory = make_session_factory(create_db_engine(url))
    q, c = [], []
    for _ in range(repeat):
        with factory() as session:
            t0 = time.perf_counter()
            m = queries.get_metrics(session, run_id, max_points=2000)
            t1 = time.perf_counter()
            charts.run_figures(m, 10.0)
            t2 = time.perf_counter()
        q.append((t1 - t0) * 1000)
        c.append((t2 - t1) * 1000)
    return {"query": statistics.median(q), "charts": statistics.median(c)}


def diagnosis(repeat: int, reseed: bool) -> int:
    """The run page of one 1,000-epoch, 10-task (45 pairs), 6-group run, cold: metrics read,
    every chart (per-layer heatmaps and the cosine matrix included), the verdict, the page."""
    db = HERE / ".dashboard-diagnosis.db"
    url = f"sqlite:///{db}"
    if reseed or not db.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        run_migrations(url)
        factory = make_session_factory(create_db_engine(url))
        tasks = [f"task{i}" for i in range(10)]
        pairs = list(itertools.combinations(tasks, 2))
        rng = random.Random(0)
        with write_session(factory) as session:
            body = schemas.RunCreate(name="diagnosis", tasks=tasks)
            run, _ = ingest.create_or_resume_run(session, body, Settings(database_url=url))
        recs = [{**epoch_record(rng, e, tasks, pairs), "groups": group_numbers(rng, tasks)}
                for e in range(1000)]  # fmt: skip
        with write_session(factory) as session:
            batch = schemas.EpochBatch.model_validate({"epochs": recs})
            ingest.ingest_batch(session, ingest.lock_run(session, run.id), batch)
    run_migrations(url)
    with TestClient(create_app(Settings(database_url=url)), base_url="http://127.0.0.1") as client:
        run_id = client.get("/api/runs").json()["runs"][0]["id"]
        client.get(f"/runs/{run_id}")  # templates, imports, SQLite page cache
        times, cpu, r = [], [], None
        for _ in range(repeat):
            client.app.state.metrics_cache.clear()  # type: ignore[attr-defined]
            t0, c0 = time.perf_counter(), time.process_time()
            r = client.get(f"/runs/{run_id}")
            times.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
        assert r is not None and "chart-group_ratio" in r.text and "chart-cosine_matrix" in r.text
        q = statistics.quantiles(times, n=4)
        print(f"run page, 1,000 epochs x 10 tasks x 6 groups, cold ({repeat} requests): "
              f"median {statistics.median(times):.1f} ms, IQR {q[0]:.1f}-{q[2]:.1f} ms, "
              f"min {min(times):.1f}, max {max(times):.1f}; "
              f"{len(r.content) / 1024:.0f} KiB")  # fmt: skip
        qc = statistics.quantiles(cpu, n=4)
        print(f"  process CPU per request (less sensitive to a busy machine): median "
              f"{statistics.median(cpu):.1f} ms, IQR {qc[0]:.1f}-{qc[2]:.1f} ms")  # fmt: skip
        stages = page_stages(url, uuid.UUID(run_id), repeat)
        rest = statistics.median(cpu) - sum(stages.values())
        print("  CPU by stage (medians): " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items())
              + f"; routing, alerts, template, ASGI {max(rest, 0.0):.1f} ms")  # fmt: skip
        matrix = []
        for epoch in range(0, 1000, 1000 // repeat):
            c0 = time.process_time()
            got = client.get(f"/api/runs/{run_id}/cosine-matrix?epoch={epoch}")
            matrix.append((time.process_time() - c0) * 1000)
            assert got.status_code == 200 and got.json()["figure"] is not None
        print(f"  picking an epoch (cosine-matrix API, CPU): {statistics.median(matrix):.1f} ms")
    print(f"  load average while measuring: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def page_stages(url: str, run_id: uuid.UUID, repeat: int) -> dict[str, float]:
    """CPU per stage of a cold run page, in the route's order (server.routes.run_page)."""
    factory = make_session_factory(create_db_engine(url))
    out: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        c0 = time.process_time()
        result = fn(*args, **kwargs)
        out.setdefault(name, []).append((time.process_time() - c0) * 1000)
        return result

    for _ in range(repeat):
        with factory() as session:
            run = timed("run", queries.get_run, session, run_id)
            m = timed("metrics read", queries.get_metrics, session, run_id, max_points=2000)
            figures = timed("figures", charts.run_figures, m, run.ratio_threshold)
            timed("verdict", verdict.compute, session, run, whole=m)  # as the route does
            timed("figure JSON", json_bytes_for_script, {"figures": figures})
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 runs x 200 epochs + 1 x 10,000")
    p.add_argument("--pairs", type=int, default=9, help="cosine pairs per epoch (<= 45)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--cold-repeat", type=int, default=3, help="repeats of the uncached renders")
    p.add_argument("--reseed", action="store_true", help="rebuild the database")
    p.add_argument("--diagnosis", action="store_true", help="the 10-task, 6-group run page only")
    args = p.parse_args()
    if args.diagnosis:
        return diagnosis(args.repeat, args.reseed)
    runs, epochs, long_epochs = (10, 200, 10_000) if args.quick else (100, 1000, 100_000)
    db = HERE / f".dashboard-{runs}x{epochs}-{long_epochs}-p{args.pairs}.db"
    url = f"sqlite:///{db}"
    if args.reseed or not db.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        print(f"seeding {runs} runs x {epochs} epochs + 1 x {long_epochs} (10 tasks, "
              f"{args.pairs} cosine pairs) through server.ingest into {db.name}")  # fmt: skip
        t0 = time.perf_counter()
        seed(url, runs, epochs, long_epochs, 10, args.pairs)
        print(f"seeded in {time.perf_counter() - t0:.0f} s")
    run_migrations(url)  # a seed cached by an older version gains the newer tables
    app = create_app(Settings(database_url=url))
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a name the server answers to
        listing = client.get("/api/runs?limit=200").json()["runs"]
        long_id = next(r["id"] for r in listing if r["name"] == "bench-long")
        short_id = next(r["id"] for r in listing if r["name"] != "bench-long")
        print(
            f"\nmedian server-side render ({args.repeat} requests, {args.cold_repeat} when cold;"
            " in-process ASGI, SQLite):"
        )
        rows = [
            ("runs page /", "/", False),
            (f"run page, {epochs} epochs, cold", f"/runs/{short_id}", True),
            (f"run page, {epochs} epochs, cached metrics", f"/runs/{short_id}", False),
            (f"run page, {long_epochs} epochs, cold", f"/runs/{long_id}", True),
            (f"run page, {long_epochs} epochs, cached metrics", f"/runs/{long_id}", False),
            ("compare page, 2 runs, cold", f"/compare?runs={short_id},{long_id}", True),
            ("alerts page", "/alerts", False),
            (f"  alt: /api metrics JSON, {long_epochs} epochs",
             f"/api/runs/{long_id}/metrics?max_points=2000", True),
        ]  # fmt: skip
        for label, path, cold in rows:
            ms, r = median_ms(client, path, args.cold_repeat if cold else args.repeat, cold)
            size = len(r.content)
            packed = len(gzip.compress(r.content, 6))
            extra = ""
            if path.startswith("/runs/"):
                extra = f"  max points/trace {max_points_per_trace(r.text)}"
            kib = f"{size / 1024:8.0f} KiB ({packed / 1024:5.0f} KiB gz)"
            print(f"  {label:<46} {ms:8.1f} ms  {kib}{extra}")
        split = breakdown(url, uuid.UUID(long_id), args.cold_repeat)
        print(f"\n  run page {long_epochs} epochs: get_metrics {split['query']:.1f} ms, "
              f"charts.run_figures {split['charts']:.1f} ms (medians)")  # fmt: skip
        base = f"/api/runs/{long_id}/metrics?since="
        cursor = client.get(f"/api/runs/{long_id}/metrics?max_points=10").json()["cursor"]
        ms, _ = median_ms(client, base + str(cursor), args.repeat)
        print(f"  live poll, nothing new (metrics since=cursor), {long_epochs} epochs: {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
