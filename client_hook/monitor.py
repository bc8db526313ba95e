"""`GradMonitor`: per-task gradient statistics of any multi-task PyTorch run, streamed to gradwatch.

Cost model: ``observe`` on a step that is not sampled is a few integer operations (no tensor op,
no hook left registered but FSDP2's forward pre-hooks, `client_hook.engine.ParamGroups`). A
sampled step computes T-1 task gradients (the T-th is read from the step's own backward) and
keeps one small tensor per step; ``end_epoch`` turns the epoch's samples into one record (one
host read per epoch) and hands it to the delivery thread.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from client_hook import gradstats, signals
from client_hook.api import TOKEN_ENV, URL_ENV, ApiClient, RunUploader, check_url
from client_hook.distributed import global_batch_reducer
from client_hook.engine import ParamGroups, StepSample
from client_hook.measure import StepMeasurer, per_task_report
from client_hook.run_info import rank_and_world, run_header
from client_hook.scalars import ScalarsItem
from client_hook.spool import RunSpool, default_spool_dir
from client_hook.transport import DeliveryReport, FileSink, HttpSink, WarnOnce
from client_hook.worker import DeliveryWorker

EPOCH_VALUES = frozenset({"total_loss", "balancer_loss", "wall_time"})
Number = float | int | torch.Tensor
Shared = torch.nn.Module | torch.Tensor | Iterable[torch.Tensor] | Mapping[str, Any]


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


class GradMonitor:
    """Measure per-task gradients on the shared parameters and stream one record per epoch.

    Args:
        shared: the shared trunk: a module (its trainable parameters, grouped by direct child
            module for the per-layer view), a mapping ``{group name: module or parameters}``,
            or a list of parameters (one group), e.g. the last shared layer's (GradNorm).
        tasks: ordered, unique task names; ``observe`` takes one loss per name.
        run_name, project, config: shown on the dashboard (config must be JSON-serialisable;
            anything else is stored as its ``str``).
        server_url, token: default to ``GRADWATCH_URL`` / ``GRADWATCH_TOKEN``. With no URL at all
            the run is written to ``local_path`` (default ``.gradwatch/runs/<run_id>.jsonl``) for
            ``gradwatch import FILE --server URL``.
        sample_every: measure the first optimizer step of each epoch, then every `sample_every`.
        accumulation_steps: how many ``observe()`` calls (micro-batches) make one optimizer
            step; the numbers then describe the step's whole batch (the mean of the
            micro-batches' per-task gradients).
        run_id: a UUID; pass the id of an earlier run to resume it. Default: a new random UUID.
        initial_losses: ``L_i(0)`` per task for the loss ratio (e.g. ``{"health": math.log(3)}``);
            tasks left out use their first observed loss.
        ratio_threshold: per-run imbalance alert threshold (server default 10).
        spool_dir: where undelivered epochs wait (``GRADWATCH_SPOOL_DIR``, ``.gradwatch/spool``).
        all_ranks: under torch.distributed only rank 0 reports by default; with True every rank
            reports its own run named ``<run_name>-rank<r>`` with ``config["rank"]`` and
            ``config["world_size"]`` set, its id derived as ``uuid5(run_id, "rank<r>")``.
        flush_timeout: the longest `close` waits for delivery.
        heartbeat_interval: seconds between "still alive" requests to the server when no epoch
            was acknowledged meanwhile (None: none), so that a killed job shows as lost.
        request_timeout: seconds before one HTTP request to a hanging server is given up.
        reuse_backward: read the combined gradient from the training step's own ``backward()``
            so that only T-1 task gradients are computed (`client_hook.engine`; verified, falls
            back by itself). False: always compute all T.
        forward_to: trackers that also get each epoch's numbers, on the delivery thread:
            ``"tensorboard"``, ``"mlflow"`` (the active run), ``"wandb"`` (the active run) or
            objects from `client_hook.integrations.trackers` (metric names documented there).
    """

    def __init__(
        self,
        shared: Shared,
        tasks: Sequence[str],
        run_name: str | None = None,
        project: str = "default",
        server_url: str | None = None,
        token: str | None = None,
        sample_every: int = 50,
        config: Mapping[str, Any] | None = None,
        run_id: str | uuid.UUID | None = None,
        *,
        accumulation_steps: int = 1,
        initial_losses: Mapping[str, float] | None = None,
        ratio_threshold: float | None = None,
        spool_dir: str | Path | None = None,
        local_path: str | Path | None = None,
        all_ranks: bool = False,
        flush_timeout: float = 10.0,
        request_timeout: float = 5.0,
        reuse_backward: bool = True,
        heartbeat_interval: float | None = 30.0,
        forward_to: Sequence[Any] = (),
    ) -> None:
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError("`tasks` must be a non-empty list of unique names")
        if sample_every < 1 or accumulation_steps < 1:
            raise ValueError("`sample_every` and `accumulation_steps` must be >= 1")
        groups = ParamGroups(shared)
        self.group_names = groups.names
        self.sample_every = int(sample_every)
        self.accumulation_steps = int(accumulation_steps)
        self.flush_timeout = flush_timeout
        self.request_timeout = request_timeout
        self.heartbeat_interval = heartbeat_interval
        self.warn = WarnOnce()
        reduce = global_batch_reducer(all_ranks)
        self.measurer = StepMeasurer(
            len(self.tasks), groups, reuse_backward=reuse_backward, warn=self.warn, reduce=reduce
        )
        self.initial_losses = dict(initial_losses or {})
        self._initial: list[float] | None = None
        self.rank, world_size = rank_and_world()
        self.active = all_ranks or self.rank == 0  # sends records
        # measures: every rank takes part in the global numbers (`client_hook.distributed`)
        self.measuring = self.active or reduce is not None
        self.run = run_header(
            self.tasks, run_name, project, config, run_id, all_ranks, self.rank, world_size
        )
        self.run_id = self.run["id"]
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
        self.last_record: dict | None = None
        self._samples: list[StepSample] = []
        self._weights: Mapping[str, Any] = {}  # of the last measured micro-batch
        self._step_in_epoch = 0  # optimizer steps begun in this epoch
        self._micro = 0  # micro-batches observed in the current optimizer step
        self._sampled = False  # the current optimizer step is measured
        self._epoch_started_at: float | None = None
        self._closed = False
        self.report: DeliveryReport | None = None
        atexit.register(self._at_exit)
        if self._worker is not None:
            signals.watch(self)  # SIGTERM: close as `interrupted`, then the previous handler

    def _make_sink(self, token: str | None, spool_dir: Any, local_path: Any) -> FileSink | HttpSink:
        if self.server_url:
            client = ApiClient(
                check_url(self.server_url), token or os.environ.get(TOKEN_ENV), self.request_timeout
            )
            spool = RunSpool(Path(spool_dir) if spool_dir else default_spool_dir(), self.run_id)
            uploader = RunUploader(client, self.run)
            return HttpSink(
                uploader,
                spool,
                client.base_url,
                self.warn,
                heartbeat_interval=self.heartbeat_interval,
            )
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
        """Record one micro-batch (one step without accumulation). Call BEFORE its ``backward()``.

        ``weights`` are the w_i of the combined loss ``sum_i w_i L_i`` (default 1). ``extras``
        from a balancer: ``{"target_grad_norm": {task: t}, "balancer_loss": t,
        "task_weight": {task: t}}``; what a balancer only knows after the backward goes to
        `note`.
        """
        micro = self._micro
        if micro >= self.accumulation_steps:  # the previous optimizer step is complete
            micro = 0
            if self._sampled:
                self._catch_up(end_step=True)
        elif self.measurer.pending is not None:
            self._catch_up()  # the previous micro-batch's backward has run
        if not micro:
            step = self._step_in_epoch
            if not step:
                self._epoch_started_at = time.perf_counter()
            self._step_in_epoch = step + 1
            self._sampled = not step % self.sample_every and self.measuring and not self._closed
        self._micro = micro + 1
        if self._sampled and not self.measurer.failed:
            self._measure(losses, weights or {}, extras or {})

    def _measure(
        self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, Any], extras: Mapping
    ) -> None:
        try:
            loss_list = [losses[t] for t in self.tasks]
        except KeyError:
            missing = [t for t in self.tasks if t not in losses]
            raise ValueError(f"observe() is missing the loss of task(s) {missing}") from None
        if not all(loss.requires_grad for loss in loss_list):
            self.warn(
                "no_grad",
                "gradwatch: observe() got losses without a graph (under torch.no_grad()?); "
                "those steps are not measured",
            )
            self.measurer.fail()
            return
        by_task = per_task_report(self.tasks, extras, weights)
        try:
            self.measurer.observe(loss_list, [weights.get(t, 1.0) for t in self.tasks], by_task)
            self._weights = weights
        except Exception as exc:  # noqa: BLE001 - statistics must never break training
            self.measurer.fail()
            self.warn(
                "sample",
                f"gradwatch: could not measure a step ({exc!r}); steps like it are skipped "
                "and training continues",
            )

    def note(self, extras: Mapping[str, Any]) -> None:
        """Add what a balancer reported after the step's backward (``balancer.report()``:
        GradNorm's targets and ``L_grad``) to the step just observed; ignored when that step is
        not measured. Same keys as ``observe``'s ``extras`` except ``task_weight``: the weights
        of the step are those given to ``observe`` (a balancer may have stepped them since)."""
        if self._sampled and self.measurer.pending is not None:
            computed = {k: v for k, v in extras.items() if k != "task_weight"}
            self.measurer.note(per_task_report(self.tasks, computed, self._weights))

    def _catch_up(self, end_step: bool = False) -> None:
        """Settle the pending micro-batch; with `end_step`, close the optimizer step (a sampled
        step is closed even if its measurement failed: under data parallelism every rank
        takes part in the step's collective, `client_hook.distributed.global_mean`)."""
        try:
            self.measurer.settle()
        except Exception as exc:  # noqa: BLE001 - statistics must never break training
            self.measurer.fail()
            self.warn("sample", f"gradwatch: could not measure a step ({exc!r}); skipped")
        if not end_step:
            return
        self._micro = 0
        if not self._sampled:
            return
        try:
            sample = self.measurer.finish_step()
        except Exception as exc:  # noqa: BLE001 - statistics must never break training
            self.measurer.discard()
            self.warn("sample", f"gradwatch: could not measure a step ({exc!r}); skipped")
            return
        if sample is not None:
            self._samples.append(sample)

    def end_epoch(self, epoch: int | None = None, **epoch_values: Number | None) -> int:
        """Close the epoch and queue its record. Returns the epoch's index (from 0).

        ``epoch_values``: ``total_loss``, ``balancer_loss``, ``wall_time`` (floats or tensors).
        ``epoch`` sets the index explicitly (e.g. when resuming). The record is also kept as
        `last_record` (what the dashboard will show for this epoch).
        """
        unknown = set(epoch_values) - EPOCH_VALUES
        if unknown:
            raise TypeError(
                f"end_epoch() got unknown value(s) {sorted(unknown)}; "
                f"accepted: {sorted(EPOCH_VALUES)}"
            )
        if self._micro:
            self._catch_up(end_step=True)  # an epoch also ends an unfinished accumulation
        index = self.epoch if epoch is None else int(epoch)
        started = self._epoch_started_at
        record = self._record(index)
        record["step_count"] = self._step_in_epoch
        record["wall_time"] = time.perf_counter() - started if started is not None else 0.0
        for key, value in epoch_values.items():
            record[key] = _to_float(value)
        self.last_record = record
        self._step_in_epoch, self._epoch_started_at = 0, None
        self.epoch = index + 1
        if self._worker is not None and not self._closed:
            self._worker.submit(record)
        return index

    def log_metrics(self, values: Mapping[str, Number], epoch: int | None = None) -> None:
        """Record evaluation metrics of an epoch (e.g. ``{"test_rmse": 17.2}``; floats or
        tensors), shown on the dashboard next to the gradient balance. ``epoch`` defaults to
        the last ended one. Delivered like epochs (spooled, retried, never twice); never blocks."""
        if self._worker is None or self._closed:
            return
        index = max(self.epoch - 1, 0) if epoch is None else int(epoch)
        self._worker.submit(ScalarsItem(index, dict(values), self.warn))

    def _record(self, index: int) -> dict:
        samples, self._samples = self._samples, []
        try:
            steps = [self._numbers(s) for s in samples]
            return gradstats.epoch_record(index, self.tasks, self.group_names, steps)
        except Exception as exc:  # noqa: BLE001 - statistics must never break training
            self.warn("record", f"gradwatch: could not compute an epoch's numbers ({exc!r})")
            return {"epoch": index}

    def _numbers(self, sample: StepSample) -> gradstats.StepNumbers:
        values = sample.numbers(len(self.group_names), len(self.tasks))
        if self._initial is None:
            self._initial = [
                float(self.initial_losses.get(t, loss))
                for t, loss in zip(self.tasks, values["losses"], strict=True)
            ]
        return gradstats.StepNumbers(initial_losses=self._initial, **values)

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
        self.measurer.close()
        atexit.unregister(self._at_exit)
        signals.unwatch(self)
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
