"""torch.distributed (gloo, CPU, two ranks, DistributedDataParallel) against the real server:
only rank 0 reports by default; with all_ranks=True each rank reports its own tagged run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
import uuid

from tests.support import REPO_ROOT, free_port

WORKER = textwrap.dedent("""
    import os, sys, threading, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from client_hook import GradMonitor
    from tests.client_hook.hook_support import DualTaskMLP, make_batch, task_losses

    url, all_ranks, run_id = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DualTaskMLP()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(dist.get_rank())
    with GradMonitor(model.shared, ["rul", "health"], run_name="ddp", server_url=url,
                     sample_every=2, run_id=run_id, all_ranks=all_ranks,
                     spool_dir=os.environ["SPOOL"]) as monitor:
        for epoch in range(3):
            for step in range(4):
                x, y_rul, y_health = make_batch(gen)
                pred_rul, pred_health = ddp(x)
                losses = {"rul": torch.nn.functional.mse_loss(pred_rul, y_rul),
                          "health": torch.nn.functional.cross_entropy(pred_health, y_health)}
                monitor.observe(losses, weights={"rul": 0.5, "health": 0.5})
                (0.5 * losses["rul"] + 0.5 * losses["health"]).backward()
                opt.step()
                opt.zero_grad()
            monitor.end_epoch()
        # the combined gradient is read from the backward's own pass, before DDP averages it
        assert monitor.measurer.reuse
        assert not monitor.warn.messages, monitor.warn.messages
    # DDP averaged the gradients: both ranks must hold identical parameters
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    other = flat.clone()
    dist.broadcast(other, src=0)
    assert torch.equal(flat, other), "ranks diverged"
    if dist.get_rank() == 0:
        sys.stdin.read()  # rank 0 hosts the TCPStore: up until rank 1 is gone (stdin closes)
    dist.destroy_process_group()
    # The monitor's delivery thread ended in close(); nothing of ours outlives the run.
    assert not [t.name for t in threading.enumerate() if t.name.startswith("gradwatch")]
    # Skip interpreter teardown: torch's gloo/DDP objects abort there now and then
    # ("terminate called without an active exception", ~1 run in 8 under load).
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
""")


def _launch(url: str, all_ranks: bool, run_id: str, spool: str) -> None:
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, "1" if all_ranks else "0", run_id],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **__import__("os").environ,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "SPOOL": spool,
            },
        )
        for rank in (0, 1)
    ]
    errors = [proc.communicate(timeout=180)[1] for proc in reversed(procs)][::-1]
    codes = [proc.returncode for proc in procs]  # rank 1 went first: rank 0 waits for stdin
    assert codes == [0, 0], list(zip(codes, errors, strict=True))


def _runs(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/runs?project=default", timeout=10) as response:
        return json.loads(response.read())["runs"]


def test_two_ranks_report_one_run_without_duplicates(live_server, tmp_path):
    run_id = str(uuid.uuid4())
    _launch(live_server.url, all_ranks=False, run_id=run_id, spool=str(tmp_path / "spool"))
    (run,) = _runs(live_server.url)
    assert run["id"] == run_id and run["status"] == "finished"
    assert run["epoch_count"] == 3 and run["config"] == {}


def test_all_ranks_option_reports_one_tagged_run_per_rank(live_server, tmp_path):
    run_id = str(uuid.uuid4())
    _launch(live_server.url, all_ranks=True, run_id=run_id, spool=str(tmp_path / "spool"))
    runs = sorted(_runs(live_server.url), key=lambda r: r["name"])
    assert [r["name"] for r in runs] == ["ddp-rank0", "ddp-rank1"]
    assert [r["config"] for r in runs] == [
        {"rank": 0, "world_size": 2},
        {"rank": 1, "world_size": 2},
    ]
    assert {r["id"] for r in runs} == {
        str(uuid.uuid5(uuid.UUID(run_id), f"rank{k}")) for k in (0, 1)
    }
    assert all(r["epoch_count"] == 3 for r in runs)
