"""`GradMonitor`: per-task gradient statistics of any multi-task PyTorch run, streamed to gradwatch.

Cost model: ``observe`` on a non-sampled step is a few Python integer operations (no tensor op, no
hook left registered). On a sampled step (the first step of every epoch, then every
``sample_every`` steps) the per-task gradients come from T-1 extra backward passes (the T-th is
read from the step's own backward; see `client_hook.sampler`), or from ONE vectorised backward for
all T; on an accelerator every number is packed into one small tensor and copied off the device
without waiting for it (on the CPU the few small result tensors are kept as they are); the
delivery thread turns them into Python floats. The training thread never calls ``.item()`` (a
verification step, one in 64 sampled steps, reads a few numbers once).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from client_hook.api import TOKEN_ENV, URL_ENV, ApiClient, RunUploader, check_url
from client_hook.sampler import SampledStep, StepBlock, StepSampler, epoch_record, epoch_records
from client_hook.spool import RunSpool, default_spool_dir
from client_hook.transport import DeliveryReport, DeliveryWorker, FileSink, HttpSink, WarnOnce

EPOCH_VALUES = frozenset({"total_loss", "balancer_loss", "wall_time"})
Number = float | int | torch.Tensor


def _as_params(
    shared: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor],
) -> list[torch.Tensor]:
    params: list[torch.Tensor]
    if isinstance(shared, torch.nn.Module):
        params = [p for p in shared.parameters() if p.requires_grad]
    elif isinstance(shared, torch.Tensor):
        params = [shared]
    else:
        params = list(shared)
    if not params:
        raise ValueError("`shared` has no trainable parameters to monitor")
    return params


def _rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _trackers(forward_to: Sequence[Any]) -> list[Any]:
    # imported only when asked for: the trackers' libraries are optional
    from client_hook.integrations.trackers import make_trackers

    return make_trackers(forward_to)


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(()).cpu().item())
    return float(value)


class _Epoch:
    """An epoch waiting for the delivery thread (`to_record` runs there)."""

    def __init__(
        self,
        epoch: int,
        tasks: list[str],
        steps: list[SampledStep | StepBlock],
        values: dict[str, Any],
        step_count: int,
        wall_time: float,
    ) -> None:
        self.epoch, self.tasks, self.steps = epoch, tasks, steps
        self.values, self.step_count, self.wall_time = values, step_count, wall_time

    def to_record(self) -> dict:
        return self._finish(epoch_record(self.epoch, self.tasks, self.steps))

    @staticmethod
    def to_records(items: list[_Epoch]) -> list[dict]:
        """`to_record` of several epochs of one run, their steps computed together (the
        delivery thread converts whatever queued up since its last poll in one go)."""
        records = epoch_records(items[0].tasks, [(i.epoch, i.steps) for i in items])
        return [item._finish(record) for item, record in zip(items, records, strict=True)]

    def _finish(self, record: dict) -> dict:
        record["step_count"] = self.step_count
        record["wall_time"] = self.wall_time
        for key, value in self.values.items():
            record[key] = _to_float(value)
        return record


class GradMonitor:
    """Measure per-task gradients on the shared parameters and stream one record per epoch.

    Args:
        shared: the shared trunk (all its trainable parameters are monitored) or a list of
            parameters, e.g. ``model.shared[-2].parameters()`` for the last shared layer (GradNorm).
        tasks: ordered, unique task names; ``observe`` takes one loss per name.
        run_name, project, config: shown on the dashboard (config must be JSON-serialisable;
            anything else is stored as its ``str``).
        server_url, token: default to ``GRADWATCH_URL`` / ``GRADWATCH_TOKEN``. With no URL at all
            the run is written to ``local_path`` (default ``.gradwatch/runs/<run_id>.jsonl``) for
            ``gradwatch import FILE --server URL``.
        sample_every: measure the first step of each epoch and then every `sample_every` steps.
        run_id: a UUID; pass the id of an earlier run to resume it. Default: a new random UUID.
        initial_losses: ``L_i(0)`` per task for the loss ratio (e.g. ``{"health": math.log(3)}``);
            tasks left out use their first observed loss.
        ratio_threshold: per-run imbalance alert threshold (server default 10).
        spool_dir: where undelivered epochs wait (``GRADWATCH_SPOOL_DIR``, ``.gradwatch/spool``).
        all_ranks: under torch.distributed only rank 0 reports by default; with True every rank
            reports its own run named ``<run_name>-rank<r>`` with ``config["rank"]`` and
            ``config["world_size"]`` set, its id derived as ``uuid5(run_id, "rank<r>")``.
        flush_timeout: the longest `close` waits for delivery.
        request_timeout: seconds before one HTTP request to a hanging server is given up.
        batched: how several task gradients of one step are computed: True, in ONE vectorised
            call (``autograd.grad(..., is_grads_batched=True)``, vmap over the backward); False,
            one ``autograd.grad`` per task; None (default), vectorised on accelerators, where it
            folds T kernel launches into one, and one call per task on the CPU, where vmap saves
            no arithmetic and adds its own overhead (measured with 2 tasks, 1 thread, batch 256:
            0.34 vs 0.20 ms on the seeds' DualTaskMLP, 4.3 vs 3.8 ms on a 3x256 trunk, equal
            within noise on 4x1024). A model vmap cannot run falls back to one call per task.
        reuse_backward: read the combined gradient from the training step's own ``backward()``
            so that only T-1 task gradients are computed (see `client_hook.sampler`; verified
            against a full measurement, falls back by itself). False: always measure all T.
        forward_to: trackers that also get each epoch's numbers, on the delivery thread:
            ``"tensorboard"``, ``"mlflow"`` (the active run), ``"wandb"`` (the active run) or
            objects from `client_hook.integrations.trackers` (metric names documented there).
    """

    def __init__(
        self,
        shared: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor],
        tasks: Sequence[str],
        run_name: str | None = None,
        project: str = "default",
        server_url: str | None = None,
        token: str | None = None,
        sample_every: int = 50,
        config: Mapping[str, Any] | None = None,
        run_id: str | uuid.UUID | None = None,
        *,
        initial_losses: Mapping[str, float] | None = None,
        ratio_threshold: float | None = None,
        spool_dir: str | Path | None = None,
        local_path: str | Path | None = None,
        all_ranks: bool = False,
        flush_timeout: float = 10.0,
        request_timeout: float = 5.0,
        batched: bool | None = None,
        reuse_backward: bool = True,
        forward_to: Sequence[Any] = (),
    ) -> None:
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError("`tasks` must be a non-empty list of unique names")
        if sample_every < 1:
            raise ValueError("`sample_every` must be >= 1")
        self.params = _as_params(shared)
        self.sample_every = int(sample_every)
        self.flush_timeout = flush_timeout
        self.request_timeout = request_timeout
        self.warn = WarnOnce()
        self.sampler = StepSampler(
            self.tasks,
            self.params,
            initial_losses=initial_losses or {},
            batched=batched,
            reuse_backward=reuse_backward,
            warn=self.warn,
        )
        self.rank, world_size = _rank()
        self.active = all_ranks or self.rank == 0
        base_id = uuid.UUID(str(run_id)) if run_id else uuid.uuid4()
        config = dict(config or {})
        name = run_name or f"{Path(sys.argv[0] or 'python').stem}-{datetime.now():%Y%m%d-%H%M%S}"
        if all_ranks and world_size > 1:
            base_id = uuid.uuid5(base_id, f"rank{self.rank}")
            name = f"{name}-rank{self.rank}"
            config.update(rank=self.rank, world_size=world_size)
        self.run_id = str(base_id)
        self.run: dict[str, Any] = {
            "id": self.run_id,
            "name": name,
            "project": project,
            "tasks": self.tasks,
            "config": json.loads(json.dumps(config, default=str)),
        }
        if ratio_threshold is not None:
            self.run["ratio_threshold"] = ratio_threshold
        self.server_url = server_url or os.environ.get(URL_ENV) or None
        self.local_path: Path | None = None
        self._worker: DeliveryWorker | None = None
        if self.active:
            writers = _trackers(forward_to) if forward_to else []
            sink = self._make_sink(token, spool_dir, local_path)
            self._worker = DeliveryWorker(sink, self.warn, writers=writers)
        self.epoch = 0
        self._step_in_epoch = 0
        self._epoch_started_at: float | None = None
        self._closed = False
        self.report: DeliveryReport | None = None
        atexit.register(self._at_exit)

    def _make_sink(self, token: str | None, spool_dir: Any, local_path: Any) -> FileSink | HttpSink:
        if self.server_url:
            client = ApiClient(
                check_url(self.server_url), token or os.environ.get(TOKEN_ENV), self.request_timeout
            )
            spool = RunSpool(Path(spool_dir) if spool_dir else default_spool_dir(), self.run_id)
            return HttpSink(RunUploader(client, self.run), spool, client.base_url, self.warn)
        default = Path.cwd() / ".gradwatch" / "runs" / f"{self.run_id}.jsonl"
        self.local_path = Path(local_path) if local_path else default
        return FileSink(self.local_path, self.run, self.warn)

    # ------------------------------------------------------------------ training-thread API
    def observe(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, Number] | None = None,
        *,
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one step. Call BEFORE ``backward()`` (the graph is retained for it).

        ``weights`` are the w_i of the combined loss ``sum_i w_i L_i`` (default 1). ``extras``
        from a balancer: ``{"target_grad_norm": {task: t}, "balancer_loss": t,
        "task_weight": {task: t}}``.
        """
        step = self._step_in_epoch
        self._step_in_epoch = step + 1
        if step == 0:
            self._epoch_started_at = time.perf_counter()
        sampled = not step % self.sample_every and self.active and not self._closed
        if self.sampler.hooked:
            # the previous sampled step's hooks have done their work (the parameters' hooks
            # stay registered if this step is sampled too)
            self.sampler.settle(next_sampled=sampled)
        if not sampled:
            return
        try:
            loss_list = [losses[t] for t in self.tasks]
        except KeyError:
            missing = [t for t in self.tasks if t not in losses]
            raise ValueError(f"observe() is missing the loss of task(s) {missing}") from None
        for loss in loss_list:
            if not loss.requires_grad:
                self.warn(
                    "no_grad",
                    "gradwatch: observe() got losses without a graph (under "
                    "torch.no_grad()?); those steps are not measured",
                )
                return
        try:
            self.sampler.measure(loss_list, weights, extras)
        except Exception as exc:  # noqa: BLE001 - statistics must never break training
            self.warn(
                "sample",
                f"gradwatch: could not measure a step ({exc!r}); steps like it "
                "are skipped and training continues",
            )

    def end_epoch(self, epoch: int | None = None, **epoch_values: Number | None) -> int:
        """Close the epoch and queue its record (never blocks). Returns the epoch's index.

        ``epoch_values``: ``total_loss``, ``balancer_loss``, ``wall_time`` (floats or tensors; read
        on the delivery thread). ``epoch`` sets the index explicitly (e.g. when resuming).
        """
        unknown = set(epoch_values) - EPOCH_VALUES
        if unknown:
            raise TypeError(
                f"end_epoch() got unknown value(s) {sorted(unknown)}; "
                f"accepted: {sorted(EPOCH_VALUES)}"
            )
        index = self.epoch if epoch is None else int(epoch)
        started = self._epoch_started_at
        wall = time.perf_counter() - started if started is not None else 0.0
        values = {
            k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in epoch_values.items()
        }
        item = _Epoch(index, self.tasks, self.sampler.take(), values, self._step_in_epoch, wall)
        self._step_in_epoch, self._epoch_started_at = 0, None
        self.epoch = index + 1
        if self._worker is not None and not self._closed:
            self._worker.submit(item)
        return index

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every ended epoch has been handed on by the delivery thread: written to
        the local run file, or spooled to disk for sending (the HTTP requests themselves go on
        in the background). Waits at most `timeout` seconds (default `flush_timeout`); returns
        True if nothing is left waiting. Never raises; training does not need to call it."""
        if self._worker is None:
            return True
        return self._worker.wait_idle(self.flush_timeout if timeout is None else timeout)

    def close(
        self, status: str | None = None, timeout: float | None = None
    ) -> DeliveryReport | None:
        """Mark the run finished/failed/crashed and flush for at most `timeout` seconds.

        Whatever is not delivered by then stays in the spool (sent by the next run or
        `gradwatch sync`); a warning says how much. Idempotent.
        """
        if self._closed:
            return self.report
        status = status or "finished"
        if status == "finished" and self._step_in_epoch:
            self.end_epoch()  # the last epoch was never closed: send what was measured
        self._closed = True
        self.sampler.discard()
        atexit.unregister(self._at_exit)
        if self._worker is None:
            return None
        self._worker.submit(status)
        wait = self.flush_timeout if timeout is None else timeout
        self.report = report = self._worker.close(wait)
        if not report.complete:
            what = f"{report.pending_epochs} epoch(s)" + (
                " and the final status" if report.status_pending else ""
            )
            self.warn(
                "pending",
                f"gradwatch: {what} of run {self.run_id} not delivered within "
                f"{wait:g}s; kept in {report.location} (sent by the next run "
                "or `gradwatch sync`)",
            )
        elif self.local_path is not None:
            print(
                f"gradwatch: run written to {self.local_path}; upload it with "
                f"`gradwatch import {self.local_path} --server URL`",
                file=sys.stderr,
            )
        return report

    def _at_exit(self) -> None:
        # An uncaught exception leaves sys.last_value set before atexit handlers run.
        exc = getattr(sys, "last_value", None)
        failed = exc is not None and not isinstance(exc, KeyboardInterrupt)
        self.close("failed" if failed else "crashed")

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("crashed")
        else:
            self.close("failed")
