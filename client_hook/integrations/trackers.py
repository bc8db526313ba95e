"""Each epoch's balance numbers in the tracker a run already uses: TensorBoard, MLflow, W&B.

``GradMonitor(..., forward_to=["tensorboard", "mlflow", "wandb"])`` (or tracker objects made
here) writes, on the delivery thread, one value per metric per epoch under one naming:

    gradwatch/grad_norm_ratio, gradwatch/peak_grad_norm_ratio, gradwatch/min_cosine,
    gradwatch/total_loss, gradwatch/balancer_loss        (when the epoch has them)
    gradwatch/<field>/<task>     field: grad_norm, weighted_grad_norm, loss, loss_ratio,
                                 relative_inverse_rate, task_weight, contribution_share,
                                 target_grad_norm
    gradwatch/cosine/<a>__<b>    mean cosine between the gradients of tasks a and b
    gradwatch/group/<group>/grad_norm_ratio, .../min_cosine   (per-layer view, when measured)

The step is the epoch index (W&B: the metric ``gradwatch/epoch``, declared the step of
``gradwatch/*`` so that W&B's own step counter is left alone). Characters a tracker does not
take in a name (anything but letters, digits, ``_ - . space``) become ``_``. Each library is
imported when its tracker is made, never by the base package.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

PREFIX = "gradwatch"
EPOCH_METRIC = f"{PREFIX}/epoch"
_RUN_SCALARS = (
    "grad_norm_ratio",
    "peak_grad_norm_ratio",
    "min_cosine",
    "total_loss",
    "balancer_loss",
)
_GROUP_SCALARS = ("grad_norm_ratio", "min_cosine")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def _part(name: Any) -> str:
    return _UNSAFE.sub("_", str(name))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics(record: dict) -> dict[str, float]:
    """The tracker metrics of one epoch record (see the module docstring); absent numbers
    (None: not measured) are left out."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if _number(value):
            out[f"{PREFIX}/{name}"] = float(value)

    for key in _RUN_SCALARS:
        put(key, record.get(key))
    for task, fields in (record.get("tasks") or {}).items():
        for field, value in fields.items():
            put(f"{_part(field)}/{_part(task)}", value)
    for pair in record.get("cosines") or []:
        put(f"cosine/{_part(pair['a'])}__{_part(pair['b'])}", pair.get("value"))
    for group in record.get("groups") or []:
        for key in _GROUP_SCALARS:
            put(f"group/{_part(group.get('name'))}/{key}", group.get(key))
    return out


def _import(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"gradwatch: forwarding to {extra} needs `pip install {extra}`") from exc


class TensorBoardTracker:
    """Scalars in TensorBoard event files: a ``SummaryWriter`` of your own (e.g. Lightning's
    ``TensorBoardLogger.experiment``, the HF Trainer's), or a new one in `log_dir` (default
    ``runs/...`` as ``SummaryWriter`` picks; closed with the monitor)."""

    def __init__(self, log_dir: str | None = None, writer: Any = None) -> None:
        self._owned = writer is None
        if writer is None:
            _import("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer

    def write(self, records: Sequence[dict]) -> None:
        for record in records:
            for name, value in metrics(record).items():
                self.writer.add_scalar(name, value, global_step=int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()


class MLflowTracker:
    """Metrics of an MLflow run: `run_id`, default the run active when this is made (MLflow's
    active run belongs to the thread that started it, so it is looked up here, not on the
    delivery thread). `client`: an ``MlflowClient`` (default: one for the current tracking URI)."""

    BATCH = 1000  # MLflow's limit of metrics per `log_batch`

    def __init__(self, run_id: str | None = None, client: Any = None) -> None:
        mlflow = _import("mlflow", "mlflow")
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise ValueError(
                    "gradwatch: no active MLflow run to forward to; call mlflow.start_run() "
                    "before creating the monitor, or pass MLflowTracker(run_id=...)"
                )
            run_id = active.info.run_id
        self.run_id = run_id
        self.client = client or mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        self._metric = mlflow.entities.Metric

    def write(self, records: Sequence[dict]) -> None:
        now = int(time.time() * 1000)
        rows = [
            self._metric(name, value, now, int(record["epoch"]))
            for record in records
            for name, value in metrics(record).items()
        ]
        for start in range(0, len(rows), self.BATCH):
            self.client.log_batch(self.run_id, metrics=rows[start : start + self.BATCH])


class WandbTracker:
    """History rows of a W&B run: `run`, default the active one (``wandb.run``) when this is made.
    The run is left open (its owner finishes it)."""

    def __init__(self, run: Any = None) -> None:
        wandb = _import("wandb", "wandb")
        run = run if run is not None else wandb.run
        if run is None:
            raise ValueError(
                "gradwatch: no active W&B run to forward to; call wandb.init() before "
                "creating the monitor, or pass WandbTracker(run=...)"
            )
        self.run = run
        run.define_metric(EPOCH_METRIC)
        run.define_metric(f"{PREFIX}/*", step_metric=EPOCH_METRIC)

    def write(self, records: Sequence[dict]) -> None:
        for record in records:
            self.run.log({**metrics(record), EPOCH_METRIC: int(record["epoch"])})


_BY_NAME = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def make_trackers(forward_to: Iterable[Any]) -> list[Any]:
    """Trackers from names (``"tensorboard"``, ``"mlflow"``, ``"wandb"``) or objects with
    ``write(records)`` (passed through)."""
    out = []
    for item in forward_to:
        if isinstance(item, str):
            if item not in _BY_NAME:
                raise ValueError(
                    f"gradwatch: unknown tracker {item!r}; accepted: {sorted(_BY_NAME)} "
                    "or an object with write(records)"
                )
            item = _BY_NAME[item]()
        elif not callable(getattr(item, "write", None)):
            raise TypeError(f"gradwatch: {item!r} has no write(records) method")
        out.append(item)
    return out
