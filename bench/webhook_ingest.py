"""Ingest latency with alert webhooks off and on: the webhooks must never slow ingest.

    .venv/bin/python bench/webhook_ingest.py [--epochs 200] [--repeats 3]

A real `gradwatch serve` (SQLite, one uvicorn worker) on loopback; one-epoch POSTs whose
gradient-norm ratio alternates 40x / 2x around the threshold 10x, so that EVERY request opens
or closes an alert episode (cooldown 0: every one is announced, the worst case). Setups:
  off      no webhook configured
  fast     one receiver on loopback answering 200 at once
  bad      a receiver that takes 2 s per request, one answering 500, one that is down
Prints the median and the interquartile range of the per-request latency (ms), per setup,
pooled over the repetitions (a fresh server and database each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import Http  # noqa: E402
from tests.support import ServerProcess, free_port  # noqa: E402


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            time.sleep(2.0)
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def record(n: int) -> dict[str, Any]:
    rul = 40.0 if n % 2 == 0 else 2.0
    tasks = {t: {"grad_norm": g, "task_weight": 1.0} for t, g in (("rul", rul), ("health", 1.0))}
    return {"epoch": n, "tasks": tasks, "total_loss": 1.0}


def latencies(env: dict[str, str], epochs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(f"sqlite:///{tmp}/b.db", env) as s:
        client = Http(s.url)
        run = client.json("POST", "/api/runs", {"name": "bench", "tasks": ["rul", "health"]})
        times = []
        for n in range(epochs):
            body = json.dumps({"epochs": [record(n)]}).encode()
            t0 = time.perf_counter()
            status, _ = client.request("POST", f"/api/runs/{run['id']}/epochs", body)
            times.append((time.perf_counter() - t0) * 1000)
            assert status == 200
        health = client.json("GET", "/health")["webhooks"]
        if health:
            print(f"    /health webhooks: {health}")
        return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{receiver.server_address[1]}"
    down = f"http://127.0.0.1:{free_port()}/down"
    common = {"GRADWATCH_WEBHOOK_COOLDOWN_S": "0", "GRADWATCH_WEBHOOK_BACKOFF_S": "0.2"}
    setups = {
        "off": {},
        "fast": {**common, "GRADWATCH_WEBHOOKS": json.dumps([{"url": f"{base}/ok"}])},
        "bad": {
            **common,
            "GRADWATCH_WEBHOOKS": json.dumps(
                [{"url": f"{base}/slow"}, {"url": f"{base}/fail"}, {"url": down}]
            ),
        },
    }
    print(f"one-epoch POSTs, each opening or closing an alert; {args.epochs} x {args.repeats}")
    for name, env in setups.items():
        times = [t for _ in range(args.repeats) for t in latencies(env, args.epochs)]
        q1, med, q3 = statistics.quantiles(times, n=4)
        print(f"{name:5s} median {med:6.2f} ms   IQR {q1:6.2f} - {q3:6.2f} ms   n={len(times)}")
    receiver.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
