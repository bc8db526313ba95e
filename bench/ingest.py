"""Ingest speed: gradwatch (SQLite, PostgreSQL) against MLflow's `log_batch`, over loopback HTTP.

    .venv/bin/python bench/ingest.py            # full workloads, 3 repetitions, median
    .venv/bin/python bench/ingest.py --quick    # short smoke run (smaller workloads, 1 repetition)

Workloads (the same scalars go to both systems):
  A. 2 tasks x 5,000 epochs: per task grad_norm, weighted_grad_norm, loss, loss_ratio,
     relative_inverse_rate, task_weight, contribution_share, target_grad_norm; per epoch
     grad_norm_ratio, peak_grad_norm_ratio, min_cosine, total_loss, balancer_loss, wall_time,
     step_count; one cosine pair. 24 values an epoch.
  B. 10 tasks x 1,000 epochs, the same fields, no cosine pairs: 87 values an epoch.

gradwatch: a real `gradwatch serve` subprocess (one uvicorn worker) on 127.0.0.1; the client
serialises each batch with the stdlib `json` and POSTs it on one keep-alive connection
(`--batch` epochs a request, default 500). MLflow: `mlflow server` with a SQLite backend store,
installed only in bench/.venv-mlflow (created on first use: `python -m venv` + `pip install
mlflow`); `MlflowClient.log_batch` with its maximum of 1,000 metrics a call, metric
`<task>.<field>` at step = epoch. Figures are scalar values stored per second, median of the
repetitions, with the spread (slowest-fastest repetition). "pg 2 clients": two clients at
once, each streaming the workload into its own run, through one server process or through two
processes on the same PostgreSQL database (aggregate values/s).
The read figures: GET /api/runs/{id}/metrics for the 5,000-epoch run over HTTP, body fully
read, on each database, for the JSON body, JSON with gzip, and the compact columnar body
(server/metrics_wire.py, from the packed rows of server/metrics_packed.py): uncached reads
(from the database; median, min, max), cached ones (the process's body cache, valid while the
run does not change), the first request of a freshly started server process, and the bytes
on the wire.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from server import models  # noqa: E402
from server.models import TASK_FIELDS  # noqa: E402
from tests.support import ServerProcess, create_pg_database, drop_pg_database  # noqa: E402

# step_count is an integer and is sent on its own
EPOCH_FIELDS = tuple(f for f in models.EPOCH_FIELDS if f != "step_count")
MLFLOW_VENV = HERE / ".venv-mlflow"
MLFLOW_MAX_METRICS = 1000


def workload(tasks: int, epochs: int, cosine: bool, seed: int = 0) -> list[dict[str, Any]]:
    """Epoch records with every field set (random but reproducible values)."""
    rng = random.Random(seed)
    names = [f"task{i}" for i in range(tasks)]
    records = []
    for e in range(epochs):
        rec: dict[str, Any] = {
            "epoch": e,
            "tasks": {n: {f: rng.uniform(0.1, 3.0) for f in TASK_FIELDS} for n in names},
            **{f: rng.uniform(0.1, 3.0) for f in EPOCH_FIELDS},
            "step_count": 100,
        }
        if cosine:
            rec["cosines"] = [{"a": names[0], "b": names[1], "value": rng.uniform(-1, 1)}]
        records.append(rec)
    return records


def count_values(records: list[dict[str, Any]]) -> int:
    per = [
        len(r["tasks"]) * len(TASK_FIELDS) + len(EPOCH_FIELDS) + 1 + len(r.get("cosines", []))
        for r in records
    ]
    return sum(per)


# ---------------------------------------------------------------- gradwatch


class Http:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        status, data = self.request(
            method, path, None if payload is None else json.dumps(payload).encode()
        )
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)


def gradwatch_ingest(url: str, records: list[dict[str, Any]], batch: int) -> tuple[float, str]:
    """Seconds to create a run and stream `records` in batches; returns (seconds, run_id)."""
    client = Http(url)
    tasks = list(records[0]["tasks"])
    started = time.perf_counter()
    run = client.json("POST", "/api/runs", {"name": "bench", "tasks": tasks})
    for i in range(0, len(records), batch):
        body = json.dumps({"epochs": records[i : i + batch]}).encode()
        status, data = client.request("POST", f"/api/runs/{run['id']}/epochs", body)
        if status != 200:
            raise RuntimeError(f"ingest failed: {status} {data[:300]!r}")
    return time.perf_counter() - started, run["id"]


def per_epoch_latency(url: str, records: list[dict[str, Any]]) -> float:
    """Median ms of one-epoch POSTs (the live-training case: one request per epoch)."""
    client = Http(url)
    run = client.json("POST", "/api/runs", {"name": "latency", "tasks": list(records[0]["tasks"])})
    times = []
    for rec in records:
        body = json.dumps({"epochs": [rec]}).encode()
        t0 = time.perf_counter()
        client.request("POST", f"/api/runs/{run['id']}/epochs", body)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


READS = {
    "JSON": {},
    "JSON, gzip": {"Accept-Encoding": "gzip"},
    "compact": {"Accept": "application/x-gradwatch-columns", "Accept-Encoding": "gzip"},
}


def _get(client: Http, path: str, headers: dict[str, str]) -> tuple[float, int]:
    """ms of one GET, body fully read, and the bytes on the wire."""
    t0 = time.perf_counter()
    client.conn.request("GET", path, headers=headers)
    r = client.conn.getresponse()
    data = r.read()
    assert r.status == 200, data[:200]
    return (time.perf_counter() - t0) * 1000, len(data)


def read_times(
    url: str, run_id: str, repeats: int
) -> dict[str, tuple[list[float], list[float], int]]:
    """Per body kind: (uncached reads ms, cached reads ms, bytes on the wire) of GET metrics
    (the whole history, body fully read). An uncached read asks for `epoch_max` beyond the
    last epoch, a different value each time: the same body, read from the database, as the
    first read after any change of the run is. A cached one repeats a request: the process's
    body cache serves it while the run does not change."""
    client = Http(url)
    out = {}
    path = f"/api/runs/{run_id}/metrics"
    for name, headers in READS.items():
        uncached = [_get(client, f"{path}?epoch_max={10**6 + i}", headers)[0]
                    for i in range(repeats)]  # fmt: skip
        cached, size = [], 0
        for _ in range(repeats + 1):
            ms, size = _get(client, path, headers)
            cached.append(ms)
        out[name] = (uncached, cached[1:], size)
    return out


def first_reads(database_url: str, run_id: str) -> dict[str, float]:
    """Per body kind: ms of the first request a freshly started server process answers."""
    out = {}
    for name, headers in READS.items():
        with ServerProcess(database_url) as server:
            out[name] = _get(Http(server.url), f"/api/runs/{run_id}/metrics", headers)[0]
    return out


def concurrent_ingest(urls: list[str], records: list[dict[str, Any]], batch: int) -> float:
    """Seconds for one client per URL, at once, each streaming `records` into its own run."""
    import threading

    seconds: list[float] = []
    threads = [threading.Thread(target=lambda u=u: seconds.append(gradwatch_ingest(u, records,
                                batch)[0])) for u in urls]  # fmt: skip
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seconds) == len(urls)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- MLflow

MLFLOW_CLIENT = r"""
import json, sys, time
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

uri, path, max_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
records = json.load(open(path))
client = MlflowClient(tracking_uri=uri)
t0 = time.perf_counter()
exp = client.create_experiment(f"bench-{time.time_ns()}")
run = client.create_run(exp)
metrics, ts = [], int(time.time() * 1000)
for rec in records:
    e = rec["epoch"]
    for task, fields in rec["tasks"].items():
        metrics += [Metric(f"{task}.{k}", v, ts, e) for k, v in fields.items()]
    for k, v in rec.items():
        if k not in ("epoch", "tasks", "cosines"):
            metrics.append(Metric(k, float(v), ts, e))
    for c in rec.get("cosines", []):
        metrics.append(Metric(f"cos.{c['a']}.{c['b']}", c["value"], ts, e))
for i in range(0, len(metrics), max_batch):
    client.log_batch(run.info.run_id, metrics=metrics[i : i + max_batch])
print(json.dumps({"seconds": time.perf_counter() - t0, "values": len(metrics)}))
"""


def ensure_mlflow() -> Path:
    python = MLFLOW_VENV / "bin" / "python"
    if not (MLFLOW_VENV / "bin" / "mlflow").exists():
        print("creating bench/.venv-mlflow (python -m venv + pip install mlflow) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mlflow"], check=True)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MlflowServer:
        cmd = [
            str(MLFLOW_VENV / "bin" / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--default-artifact-root",
            str(self.workdir / "artifacts"),
        ]
        log = open(self.workdir / "mlflow-server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.workdir}/mlflow-server.log")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in 180 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def mlflow_ingest(python: Path, url: str, records_path: Path) -> tuple[float, int]:
    out = subprocess.run(
        [str(python), "-c", MLFLOW_CLIENT, url, str(records_path), str(MLFLOW_MAX_METRICS)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), int(result["values"])


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, one repetition")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--batch", type=int, default=500, help="epochs per gradwatch request")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow baseline")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    scale = 5 if args.quick else 1
    workloads = {
        f"A: 2 tasks x {5000 // scale} epochs": workload(2, 5000 // scale, cosine=True),
        f"B: 10 tasks x {1000 // scale} epochs": workload(10, 1000 // scale, cosine=False),
    }
    rates: dict[tuple[str, str], float] = {}
    spreads: dict[tuple[str, str], str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="gradwatch-bench-"))
    pg_url = create_pg_database("gradwatch_bench")
    reads: dict[str, Any] = {}
    firsts: dict[str, dict[str, float]] = {}
    latency_ms = None

    def note(name: str, system: str, n: int, secs: list[float]) -> None:
        rates[(name, system)] = n / statistics.median(secs)
        spreads[(name, system)] = f"{n / max(secs):,.0f}-{n / min(secs):,.0f}"

    try:
        for db, url in (("sqlite", f"sqlite:///{tmp / 'bench.db'}"), ("postgresql", pg_url)):
            with ServerProcess(url) as server:
                for name, records in workloads.items():
                    secs = []
                    for _ in range(repeats):
                        s, run_id = gradwatch_ingest(server.url, records, args.batch)
                        secs.append(s)
                    note(name, f"gradwatch {db}", count_values(records), secs)
                    if name.startswith("A"):
                        reads[db] = read_times(server.url, run_id, 10 if args.quick else 30)
                        firsts[db] = first_reads(url, run_id)
                    if db == "sqlite" and name.startswith("A"):
                        latency_ms = per_epoch_latency(server.url, records[:200])
                if db == "postgresql":  # two clients at once: one process, then two
                    with ServerProcess(url) as second:
                        for name, records in workloads.items():
                            for system, urls in (("pg 2 clients, 1 proc", [server.url] * 2),
                                                 ("pg 2 clients, 2 procs",
                                                  [server.url, second.url])):  # fmt: skip
                                secs = [concurrent_ingest(urls, records, args.batch)
                                        for _ in range(repeats)]  # fmt: skip
                                note(name, system, 2 * count_values(records), secs)
        if not args.no_mlflow:
            python = ensure_mlflow()
            with MlflowServer(tmp) as mlflow_server:
                for name, records in workloads.items():
                    path = tmp / "records.json"
                    path.write_text(json.dumps(records))
                    secs, values = [], 0
                    for _ in range(repeats):
                        s, values = mlflow_ingest(python, mlflow_server.url, path)
                        secs.append(s)
                    note(name, "mlflow log_batch", values, secs)
    finally:
        drop_pg_database(pg_url)
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\ningest over loopback HTTP, median of {repeats}; gradwatch batch = {args.batch} "
        f"epochs/request, MLflow batch = {MLFLOW_MAX_METRICS} metrics/call"
    )
    systems = ("gradwatch sqlite", "gradwatch postgresql", "pg 2 clients, 1 proc",
               "pg 2 clients, 2 procs", "mlflow log_batch")  # fmt: skip
    print(f"{'workload':<28}{'system':<24}{'values/s':>12}{'spread':>22}{'vs MLflow':>11}")
    for name in workloads:
        base = rates.get((name, "mlflow log_batch"))
        for system in systems:
            rate = rates.get((name, system))
            if rate is None:
                continue
            ratio = f"{rate / base:.1f}x" if base else "-"
            spread = spreads.get((name, system), "")
            print(f"{name:<28}{system:<24}{rate:>12,.0f}{spread:>22}{ratio:>11}")
    for db, kinds in reads.items():
        print(
            f"\nread back the {5000 // scale}-epoch, 2-task history (GET metrics, {db}, HTTP), ms:"
        )
        for kind, (uncached, cached, size) in kinds.items():
            print(
                f"  {kind:<11} uncached median {statistics.median(uncached):6.1f}"
                f" (min {min(uncached):5.1f}, max {max(uncached):6.1f});"
                f" cached median {statistics.median(cached):5.1f};"
                f" first after a server start {firsts[db][kind]:6.1f}; {size / 1e6:.2f} MB"
            )
    if latency_ms is not None:
        print(f"one-epoch POST (live training, one request an epoch): median {latency_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    os.environ.pop("GRADWATCH_TOKEN", None)
    sys.exit(main())
