"""`gradwatch serve --workers N`: N server processes sharing one listening socket.

The parent binds the socket, forks the workers (each builds its own app, database pool and
live-feed hub: server.livefeed, so they are stateless replicas of each other on the database)
and supervises them: a worker that dies is replaced, SIGTERM/SIGINT stop them all. The kernel
hands each new connection to one of the workers waiting on the socket.

We do not use uvicorn's own `--workers`: it re-creates the listening socket from its file
descriptor in each worker with protocol number 0, and asyncio only turns Nagle's algorithm off
(TCP_NODELAY) on sockets whose protocol is IPPROTO_TCP, so every small response waited for a
delayed ACK, ~40 ms on loopback (uvicorn issue #3149). Our socket is made with IPPROTO_TCP and
carries TCP_NODELAY itself (see server.serve._bind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable

RESTART_DELAY_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 15.0


def _fork(work: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = 1
        try:
            code = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def supervise(count: int, work: Callable[[], int]) -> int:
    """Run `work` in `count` forked processes until SIGTERM/SIGINT; replace any that dies."""
    stopping: list[int] = []
    workers: set[int] = set()

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for pid in list(workers):  # they exit, and so our waitpid below returns
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers.update(_fork(work) for _ in range(count))
    while not stopping:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid not in workers:
            continue
        workers.discard(pid)
        if not stopping:
            print(
                f"gradwatch serve: worker {pid} exited ({_describe(status)}); starting another",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(RESTART_DELAY_SECONDS)
            if not stopping:
                workers.add(_fork(work))
    return _stop_all(workers)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def _stop_all(workers: set[int]) -> int:
    """SIGTERM each worker (uvicorn's graceful shutdown), then SIGKILL what is left."""
    for pid in workers:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while workers and time.monotonic() < deadline:
        for pid in list(workers):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                workers.discard(pid)
        time.sleep(0.05)
    for pid in workers:
        _signal(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return 0


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
