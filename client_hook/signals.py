"""SIGTERM (what Slurm, Kubernetes and spot instances send before killing a job) closes every
open monitor with the status ``interrupted``, then lets the signal do what it would have done.

One handler per process, installed with the first monitor created on the main thread (Python
runs signal handlers there only; a monitor created elsewhere installs nothing). What was
installed before is chained to, never swallowed:

- a Python callable (the user's, or a framework's): called after the monitors are closed;
- ``SIG_DFL``: the default is restored and the signal raised again with ``os.kill``, so the
  process terminates by SIGTERM exactly as it would have (exit status -15 / 143);
- ``SIG_IGN``, or a handler installed outside Python (``getsignal`` gives None): nothing is
  installed at all, since SIGTERM would not end the process (or we could not hand it on).

The monitors are closed on a helper thread that the handler waits for, at most their
``flush_timeout`` (plus a margin): the handler runs on the main thread between two bytecodes,
possibly while the training code holds a lock the close needs, and must not hang there.
A forked child (e.g. a DataLoader worker) inherits the handler but not the monitors' runs:
there the handler only chains.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Protocol


class Closable(Protocol):
    flush_timeout: float

    def close(self, status: str | None = None, timeout: float | None = None) -> Any: ...


_monitors: dict[int, Closable] = {}  # id -> open monitor watched by the handler
_previous: Any = None  # the disposition before ours
_installed_in: int | None = None  # the pid that installed the handler


def watch(monitor: Closable) -> None:
    """Close `monitor` with status ``interrupted`` on SIGTERM (when a handler can be installed)."""
    if _install():
        _monitors[id(monitor)] = monitor


def unwatch(monitor: Closable) -> None:
    """`monitor` was closed: forget it; the last one restores the previous handler if ours is
    still the one installed (a handler installed after ours is left alone)."""
    if _monitors.pop(id(monitor), None) is None or _monitors:
        return
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, _previous)
        except (ValueError, OSError, TypeError):
            pass


def _install() -> bool:
    global _previous, _installed_in
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm:
            if _installed_in != os.getpid():  # a forked child: the parent's monitors are not ours
                _monitors.clear()
                _installed_in = os.getpid()
            return True
        if current is None or current == signal.SIG_IGN:
            return False
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        return False
    _previous, _installed_in = current, os.getpid()
    return True


def _close_all(monitors: list[Closable]) -> None:
    for monitor in monitors:
        try:
            monitor.close("interrupted")
        except Exception:  # noqa: BLE001, S110 - the signal must be handed on whatever happens
            pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if os.getpid() == _installed_in and _monitors:
        monitors = list(_monitors.values())
        closing = threading.Thread(
            target=_close_all, args=(monitors,), name="gradwatch-sigterm", daemon=True
        )
        closing.start()
        closing.join(sum(m.flush_timeout for m in monitors) + 1.0)
    previous = _previous
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
