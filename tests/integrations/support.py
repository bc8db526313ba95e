"""Shared pieces of the adapter and tracker tests: a small two-task model, the independent
per-task gradient norms (plain ``torch.autograd.grad``), and readers of what a run left behind."""

from __future__ import annotations

import glob
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from client_hook.spool import LocalRunFile

TASKS = ["reg", "cls"]


class TwoTaskNet(nn.Module):
    """8 features -> 16 shared units -> a regression head and a 3-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.reg = nn.Linear(16, 1)
        self.cls = nn.Linear(16, 3)

    def task_losses(self, x: torch.Tensor, y_reg: torch.Tensor, y_cls: torch.Tensor) -> dict:
        h = self.shared(x)
        return {
            "reg": F.mse_loss(self.reg(h).squeeze(-1).float(), y_reg),
            "cls": F.cross_entropy(self.cls(h).float(), y_cls),
        }


def dataset(n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """`n` samples (x, y_reg, y_cls)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y_reg = x[:, 0] * 2 + torch.randn(n, generator=gen) * 0.1
    y_cls = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i], y_reg[i], y_cls[i]) for i in range(n)]


def task_grads(losses: dict, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each task's flat gradient on `params` (the graph is kept for the step's backward)."""
    out = {}
    for task in TASKS:
        grads = torch.autograd.grad(losses[task], list(params), retain_graph=True)
        out[task] = torch.cat([g.reshape(-1).float() for g in grads])
    return out


class StepReference:
    """Independent per-task norms of each optimizer step: the mean of its micro-batches'
    gradients (one micro-batch per step without accumulation)."""

    def __init__(self, accumulation_steps: int = 1) -> None:
        self.accumulation_steps = accumulation_steps
        self.steps: list[dict[str, float]] = []
        self.cosines: list[float] = []
        self._sum: dict[str, torch.Tensor] | None = None
        self._count = 0

    def add(self, losses: dict, params: Sequence[torch.Tensor]) -> None:
        grads = task_grads(losses, params)
        if self._sum is None:
            self._sum = grads
        else:
            self._sum = {t: self._sum[t] + grads[t] for t in TASKS}
        self._count += 1
        if self._count == self.accumulation_steps:
            self.close_step()

    def close_step(self) -> None:
        if self._sum is None:
            return
        mean = {t: g / self._count for t, g in self._sum.items()}
        self.steps.append({t: float(torch.linalg.vector_norm(mean[t])) for t in TASKS})
        self.cosines.append(float(F.cosine_similarity(mean["reg"], mean["cls"], dim=0)))
        self._sum, self._count = None, 0


def read_run(path: Path | str) -> tuple[dict, list[dict], str | None]:
    return LocalRunFile.read(path)


def assert_epoch_norms(record: dict, steps: list[dict[str, float]], rel: float = 1e-4) -> None:
    """The record's per-task grad_norm is the mean of the reference steps' norms."""
    import pytest

    for task in TASKS:
        want = sum(s[task] for s in steps) / len(steps)
        assert record["tasks"][task]["grad_norm"] == pytest.approx(want, rel=rel), task


# --- W&B offline run files: the LevelDB-style log that `wandb sync` reads, each record one of
# W&B's own protobuf `Record`s (wandb 0.31 ships no Python reader of the framing)
_WANDB_BLOCK = 32768
_WANDB_HEADER = 7  # ":W&B", magic (2 bytes), version (1 byte)
_FULL, _LAST = 1, 4


def _wandb_records(path: str) -> Iterator[object]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, chunks = _WANDB_HEADER, []
    while pos + 7 <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        body = data[pos + 7 : pos + 7 + length]
        if len(body) < length:  # still being written
            break
        assert zlib.crc32(bytes([kind]) + body) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        chunks.append(body)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_history(run_dir: Path | str, timeout: float = 60.0) -> list[dict[str, float]]:
    """The history rows of the one offline run under `run_dir` (W&B's ``wandb`` folder).

    W&B's service process writes the file; ``run.finish()`` can return before it has written
    the run's last records, so this waits for the final ``exit`` record."""
    import json
    import time

    (path,) = glob.glob(str(Path(run_dir) / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, "the W&B run file has no exit record"
        time.sleep(0.2)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows
