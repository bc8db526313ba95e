"""Preempted and killed training processes, for real: a training subprocess streaming to a real
`gradwatch serve` is killed with SIGTERM or SIGKILL at a random moment, then `gradwatch sync`
runs; the server must hold every epoch whose `end_epoch()` returned, each once, and the status
must say what happened (`interrupted` after SIGTERM, `crashed` after SIGKILL)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, ServerProcess

DRILLS = 4  # kills per signal

TRAINING = """
import random, sys, time, torch
from client_hook import GradMonitor
from tests.client_hook.hook_support import DualTaskMLP, make_batch, task_losses
random.seed(SEED)
model = DualTaskMLP()
monitor = GradMonitor(model.shared, ["rul", "health"], server_url=URL, spool_dir=SPOOL,
                      sample_every=1, flush_timeout=10)
print(monitor.run_id, flush=True)
for epoch in range(100000):
    for step in range(random.randint(1, 3)):
        losses = task_losses(model, make_batch(torch.Generator().manual_seed(epoch)))
        monitor.observe(losses)
        sum(losses.values()).backward()
    monitor.end_epoch()
    print(epoch, flush=True)  # end_epoch() has returned
    time.sleep(random.uniform(0.0, 0.03))
"""


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def server_knows_interrupted(url: str) -> bool:
    """Whether this server accepts the final status `interrupted` (servers before it answer
    422, and the client then sends `crashed`)."""
    return "interrupted" in json.dumps(get_json(url + "/openapi.json"))


def kill_at_random(server: ServerProcess, spool: Path, sig: int, seed: int) -> tuple[str, int]:
    """Run the training script, kill it with `sig` at a random moment; return (run id, the
    last epoch whose end_epoch() had returned)."""
    script = textwrap.dedent(TRAINING).replace("SEED", str(seed))
    script = script.replace("URL", repr(server.url)).replace("SPOOL", repr(str(spool)))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rng = random.Random(seed)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    last = int(proc.stdout.readline())
    deadline = time.monotonic() + rng.uniform(0.3, 2.0)
    while time.monotonic() < deadline:
        last = int(proc.stdout.readline())
    time.sleep(rng.uniform(0.0, 0.02))  # somewhere inside an epoch, or inside end_epoch()
    proc.send_signal(sig)
    for line in proc.stdout:  # printed before the signal landed
        last = int(line)
    proc.wait(30)
    assert proc.returncode == -sig  # the process ended by the signal, as it would have
    return run_id, last


def sync(spool: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client_hook.cli", "sync", "--spool-dir", str(spool)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_loses_and_doubles_no_epoch(sig: int, tmp_path: Path) -> None:
    with ServerProcess(f"sqlite:///{tmp_path / 'drills.db'}") as server:
        if sig == signal.SIGTERM:
            expected_status = "interrupted" if server_knows_interrupted(server.url) else "crashed"
        else:
            expected_status = "crashed"
        for seed in range(DRILLS):
            spool = tmp_path / f"spool-{seed}"
            run_id, last = kill_at_random(server, spool, sig, seed)
            if sig == signal.SIGTERM:  # the process delivered everything itself
                assert not (spool / run_id).exists()
            done = sync(spool)
            assert done.returncode == 0, done.stderr
            run = get_json(f"{server.url}/api/runs/{run_id}")
            stored = get_json(f"{server.url}/api/runs/{run_id}/metrics")["epochs"]
            # every epoch whose end_epoch() returned; the one being ended may be there too
            assert stored in (list(range(last + 1)), list(range(last + 2))), (last, stored)
            assert run["epoch_count"] == len(stored)
            assert run["status"] == expected_status
            assert not (spool / run_id).exists()
            print(
                f"drill {signal.Signals(sig).name} seed {seed}: {last + 1} epoch(s) returned, "
                f"{len(stored)} stored, 0 lost, 0 duplicated, status {run['status']}"
            )
