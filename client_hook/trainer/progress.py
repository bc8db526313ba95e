"""The trainer's terminal output: a dependency-free progress bar on stderr (silent when stderr is
not a terminal) and the per-epoch summary line."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO


class ProgressBar:
    """`update()` once per step; redraws at most 10 times a second; `close()` clears the line."""

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done = max(total, 1), label, 0
        self._drawn_at = 0.0

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn_at >= 0.1 or self.done >= self.total:
            self._drawn_at = now
            filled = int(30 * min(self.done, self.total) / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _fmt(values: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def summary_line(
    epoch: int,
    epochs: int,
    losses: Mapping[str, float],
    weights: Mapping[str, float],
    metrics: Mapping[str, float],
    grad_norm_ratio: float | None,
    seconds: float,
) -> str:
    """One epoch's terminal line. Epochs are numbered as the dashboard numbers them (from 0, the
    epoch index the monitor reports), with the 1-based count beside: `epoch   0 (1/150)`."""
    ratio = "-" if grad_norm_ratio is None else f"{grad_norm_ratio:.3g}x"
    return (
        f"epoch {epoch:>3} ({epoch + 1}/{epochs})  loss {_fmt(losses)}  w {_fmt(weights)}  "
        f"{_fmt(metrics)}  grad ratio {ratio}  {seconds:.1f}s"
    )
