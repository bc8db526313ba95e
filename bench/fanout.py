"""Live-view fan-out: N concurrent SSE viewers of live runs while epochs keep arriving.

    .venv/bin/python bench/fanout.py              # 200 and 1,000 viewers; 1 and 2 processes
    .venv/bin/python bench/fanout.py --viewers 200 --processes 1 --seconds 8   # one case

Per case (PostgreSQL by default; `--database sqlite` for the one-machine set-up): a real
`gradwatch serve --workers P` on 127.0.0.1, `--runs` live runs, each getting one epoch every
`--interval` seconds through the API while `--viewers` SSE connections (spread evenly over
the runs) follow them. Printed: GET /health p50/p99 (a new connection each probe, so both
workers are sampled) idle and under load, delivery lag p50/p99 (POST sent -> event read by
the viewer), epochs missed or duplicated, server RSS (all processes) fresh, idle (after a
first crowd of 20 viewers came and went), peak, and after the viewers left, database
transactions per second (pg_stat_database) idle and under load.
Targets (issue): /health p99 under 1,000 viewers <= 5x idle, lag p99 < 1.5 s, RSS back within
20% of idle. Bounded: every phase has a fixed length; loopback only; stops by itself.
The viewers run in this process: on a small machine they compete with the server for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import create_pg_database, drop_pg_database, free_port, wait_healthy  # noqa: E402

TASKS = ["rul", "health"]


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its children (the workers), MiB."""
    total, pids = 0.0, [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its children (the workers) so far."""
    total, pids = 0.0, [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def transactions(url: str) -> int | None:
    """Committed + rolled-back transactions of the database so far (PostgreSQL only)."""
    if not url.startswith("postgresql"):
        return None
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.replace("+psycopg", "").rsplit("/", 1)[0] + "/postgres") as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = %s", (name,)).fetchone()  # fmt: skip
    return int(row[0]) if row else None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def post(port: int, method: str, path: str, body: Any) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    assert r.status < 300, (r.status, data[:200])
    return json.loads(data) if data else None


def record(e: int) -> dict[str, Any]:
    return {"epoch": e, "tasks": {"rul": {"grad_norm": 1.0 + e % 7}, "health": {"grad_norm": 1.0}}}


# ---------------------------------------------------------------- load


def probe_health(port: int, seconds: float, gap: float = 0.05) -> list[float]:
    """ms of GET /health on a new connection each time, for `seconds`, measured in a process
    of its own: no event loop or other thread of ours (the ingest loops) adds its delays."""
    mine, theirs = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=_probe, args=(port, seconds, gap, theirs))
    proc.start()
    out: list[float] = mine.recv()
    proc.join(10)
    return out


def _probe(port: int, seconds: float, gap: float, conn: Any) -> None:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(gap)
    conn.send(out)


class Viewer:
    """One SSE connection to a run's stream; records when each epoch arrives."""

    def __init__(self, port: int, run_id: str) -> None:
        self.port, self.run_id = port, run_id
        self.arrivals: dict[int, float] = {}
        self.duplicates = 0
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def follow(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**22)
        writer.write(f"GET /api/runs/{self.run_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())  # fmt: skip
        try:
            event = ""
            while True:
                line = await reader.readline()
                if not line:
                    return
                text = line.decode().rstrip("\r\n")
                if text.startswith("event: "):
                    event = text[7:]
                elif text.startswith("data: ") and event == "run":
                    self.ready.set()
                elif text.startswith("data: ") and event == "metrics":
                    now = time.monotonic()
                    for e in orjson.loads(text[6:])["epochs"]:  # (a browser parses in C too)
                        self.duplicates += e in self.arrivals
                        self.arrivals.setdefault(e, now)
        finally:
            writer.close()


def warm_up(port: int, runs: list[str], viewers: int) -> None:
    """A first small crowd (`viewers` streams for ~3 s, then gone) that sees two epochs of
    every run arrive, so that "idle" is a server that has served live pages before, as a real
    one has (threads, lazily built state, the caches of every query on the way)."""
    socks = []
    for i in range(viewers):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"GET /api/runs/{runs[i % len(runs)]}/stream HTTP/1.1\r\n"
                     "Host: 127.0.0.1\r\n\r\n".encode())  # fmt: skip
        socks.append(sock)
    time.sleep(1.0)
    for e in (1, 2):  # after epoch 0, before the load's 3, 4, ...
        for run_id in runs:
            post(port, "POST", f"/api/runs/{run_id}/epochs", {"epochs": [record(e)]})
        time.sleep(1.0)
    for sock in socks:
        sock.close()


def crowd_process(port: int, run_ids: list[str], conn: Any) -> None:
    """A share of the viewers, in their own process (the viewers must not slow down the
    probes or each other's event loop more than a browser would); reports over `conn`."""

    async def main() -> None:
        crowd = [Viewer(port, r) for r in run_ids]
        for i, v in enumerate(crowd):
            v.task = asyncio.create_task(v.follow())
            if i % 50 == 49:
                await asyncio.sleep(0.05)  # a crowd arriving, not one burst
        await asyncio.wait_for(asyncio.gather(*(v.ready.wait() for v in crowd)), 120)
        conn.send("ready")
        await asyncio.to_thread(conn.recv)  # "stop"
        conn.send([(v.run_id, v.arrivals, v.duplicates) for v in crowd])
        for v in crowd:
            v.task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*(v.task for v in crowd), return_exceptions=True)  # type: ignore[misc]

    asyncio.run(main())
    conn.send("closed")


async def ingest_loop(port: int, run_id: str, start: int, interval: float, until: float,
                      sent: dict[tuple[str, int], float], delay: float) -> None:  # fmt: skip
    """One epoch every `interval` seconds into `run_id` (a blocking POST in a thread), the
    first after `delay` seconds."""
    await asyncio.sleep(delay)
    e = start
    while time.monotonic() < until:
        sent[(run_id, e)] = time.monotonic()
        await asyncio.to_thread(post, port, "POST", f"/api/runs/{run_id}/epochs",
                                {"epochs": [record(e)]})  # fmt: skip
        e += 1
        await asyncio.sleep(max(0.0, sent[(run_id, e - 1)] + interval - time.monotonic()))


async def case(url: str, port: int, pid: int, viewers: int, args: argparse.Namespace) -> dict:
    runs = [post(port, "POST", "/api/runs", {"name": f"live{i}", "tasks": TASKS})["id"]
            for i in range(args.runs)]  # fmt: skip
    for run_id in runs:
        post(port, "POST", f"/api/runs/{run_id}/epochs", {"epochs": [record(0)]})
    await asyncio.sleep(1.0)
    out: dict[str, Any] = {"rss_cold": rss_mib(pid)}
    await asyncio.to_thread(warm_up, port, runs, 20)
    await asyncio.sleep(args.settle_seconds)
    out["rss_idle"] = rss_mib(pid)
    tx0, t0 = transactions(url), time.monotonic()
    out["health_idle"] = await asyncio.to_thread(probe_health, port, args.idle_seconds)
    tx1 = transactions(url)
    out["tps_idle"] = None if tx0 is None else (tx1 - tx0) / (time.monotonic() - t0)

    pipes, procs = [], []
    share = [runs[i % len(runs)] for i in range(viewers)]
    for k in range(args.viewer_processes):
        mine, theirs = multiprocessing.Pipe()
        mine_share = share[k :: args.viewer_processes]
        proc = multiprocessing.Process(target=crowd_process, args=(port, mine_share, theirs))
        proc.start()
        pipes.append(mine)
        procs.append(proc)
    for pipe in pipes:
        assert pipe.poll(150) and pipe.recv() == "ready"
    sent: dict[tuple[str, int], float] = {}
    until = time.monotonic() + args.seconds
    tx0, t0, cpu0 = transactions(url), time.monotonic(), cpu_seconds(pid)
    crowd0 = sum(cpu_seconds(p.pid) for p in procs)
    gap = 0.0 if args.lockstep else args.interval / len(runs)  # out of phase, as real runs are
    loops = [ingest_loop(port, r, 3, args.interval, until, sent, i * gap)
             for i, r in enumerate(runs)]  # fmt: skip
    peak = [0.0]

    async def sample_rss() -> None:
        while time.monotonic() < until:
            peak[0] = max(peak[0], rss_mib(pid))
            await asyncio.sleep(0.5)

    results = await asyncio.gather(asyncio.to_thread(probe_health, port, args.seconds),
                                   sample_rss(), *loops)  # fmt: skip
    out["health_load"] = results[0]
    out["cpu_load"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    out["cpu_viewers"] = (sum(cpu_seconds(p.pid) for p in procs) - crowd0) / (time.monotonic() - t0)
    await asyncio.sleep(2.0)  # the last epochs reach the viewers
    tx1 = transactions(url)
    out["tps_load"] = None if tx0 is None else (tx1 - tx0) / (time.monotonic() - t0)
    for pipe in pipes:
        pipe.send("stop")
    seen = [row for pipe in pipes for row in pipe.recv()]
    lags, missed = [], 0
    for run_id, arrivals, _ in seen:
        for (sent_run, e), at in sent.items():
            if sent_run != run_id:
                continue
            if e in arrivals:
                lags.append(arrivals[e] - at)
            else:
                missed += 1
    out.update(lags=lags, missed=missed, duplicates=sum(d for _, _, d in seen))
    out["rss_peak"] = max(peak[0], rss_mib(pid))
    for pipe, proc in zip(pipes, procs, strict=True):
        assert pipe.poll(60) and pipe.recv() == "closed"
        proc.join(10)
    await asyncio.sleep(args.settle_seconds)
    out["rss_after"] = rss_mib(pid)
    out["epochs_sent"] = len(sent)
    return out


def serve(url: str, processes: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
           "--workers", str(processes), "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "GRADWATCH_DATABASE_URL": url}
    env.pop("GRADWATCH_TOKEN", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    wait_healthy(proc, f"http://127.0.0.1:{port}", 60)
    time.sleep(0.5 * processes)  # every worker up
    return proc, port


def report(processes: int, viewers: int, r: dict[str, Any]) -> None:
    idle50, idle99 = pct(r["health_idle"], 0.5), pct(r["health_idle"], 0.99)
    load50, load99 = pct(r["health_load"], 0.5), pct(r["health_load"], 0.99)
    lag50, lag99 = pct(r["lags"], 0.5), pct(r["lags"], 0.99)
    tps = ("-" if r["tps_idle"] is None
           else f"{r['tps_idle']:.0f} idle -> {r['tps_load']:.0f} under load")  # fmt: skip
    print(f"\n{processes} process(es), {viewers} viewers, {r['epochs_sent']} epochs sent")
    print(
        f"  /health ms   idle p50 {idle50:.1f} p99 {idle99:.1f} (n={len(r['health_idle'])});"
        f" load p50 {load50:.1f} p99 {load99:.1f} (n={len(r['health_load'])});"
        f" p99 ratio {load99 / idle99:.1f}x (target <= 5x)"
    )
    print(
        f"  delivery lag s  p50 {lag50:.3f} p99 {lag99:.3f} (target < 1.5);"
        f" missed {r['missed']}, duplicated {r['duplicates']}"
    )
    print(
        f"  server RSS MiB  fresh {r['rss_cold']:.0f}, idle (warm) {r['rss_idle']:.0f},"
        f" peak {r['rss_peak']:.0f}, after"
        f" {r['rss_after']:.0f} ({100 * (r['rss_after'] / r['rss_idle'] - 1):+.0f}%,"
        f" target within 20%)"
    )
    print(
        f"  database transactions/s  {tps}; server CPU under load"
        f" {100 * r['cpu_load']:.0f}% of one core, the viewers' {100 * r['cpu_viewers']:.0f}%"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", default="200,1000", help="comma-separated (200,1000)")
    parser.add_argument("--processes", default="1,2", help="comma-separated (1,2)")
    parser.add_argument("--runs", type=int, default=10, help="live runs (10)")
    parser.add_argument("--interval", type=float, default=1.0, help="s between epochs of a run")
    parser.add_argument("--seconds", type=float, default=15.0, help="load phase length (15)")
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="every run posts at the same instant (worst case; default: spread)",
    )
    parser.add_argument("--idle-seconds", type=float, default=4.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0)
    parser.add_argument("--viewer-processes", type=int, default=2, help="client processes (2)")
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    for processes in map(int, args.processes.split(",")):
        for viewers in map(int, args.viewers.split(",")):
            tmp = Path(tempfile.mkdtemp(prefix="gradwatch-fanout-"))
            url = (create_pg_database("gradwatch_fanout") if args.database == "postgresql"
                   else f"sqlite:///{tmp / 'fanout.db'}")  # fmt: skip
            proc, port = serve(url, processes)
            try:
                report(processes, viewers, asyncio.run(case(url, port, proc.pid, viewers, args)))
            finally:
                proc.terminate()
                proc.wait(30)
                if args.database == "postgresql":
                    drop_pg_database(url)
                shutil.rmtree(tmp, ignore_errors=True)
    print("\n(medians over the samples above; one run of each case; the viewers share the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
