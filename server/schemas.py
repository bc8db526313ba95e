"""Pydantic schemas of the REST API: the contract between the client hook, the server and the pages.

Floats: NaN and +/-Infinity are real values here (an exploding gradient is data, not an error).
JSON has no literal for them, so the API accepts either JSON numbers or the strings "NaN",
"Infinity" and "-Infinity", and always *emits* those strings for non-finite values.
`None`/missing means "not measured".
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from server.schema_types import (  # noqa: F401  (MAX_INT*, NO_NUL, storable_text: for callers)
    MAX_INT32,
    MAX_INT63,
    NO_NUL,
    EpochNumber,
    Metric,
    TaskName,
    Text,
    storable_text,
    unicode_json,
)


class ApiModel(BaseModel):
    # 'strings' makes NaN/Inf serialise as "NaN"/"Infinity"/"-Infinity" instead of null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class RunStatus(str, Enum):
    running = "running"
    finished = "finished"
    failed = "failed"
    crashed = "crashed"
    interrupted = "interrupted"  # stopped from outside (SIGTERM: preemption, scancel, spot)


class RunAlertSettings(ApiModel):
    """A run's own imbalance alert settings (None: the server's defaults)."""

    ratio_threshold: float | None = Field(
        default=None, gt=1.0, description="Overrides the server default (10)."
    )
    alert_open_epochs: int | None = Field(
        default=None, ge=1, le=10_000, description="Imbalance opens after this many epochs above."
    )
    alert_close_epochs: int | None = Field(
        default=None, ge=1, le=10_000, description="...closes after this many below re-arm."
    )
    rearm_ratio: float | None = Field(
        default=None, gt=0, description="Re-arm level (<= threshold; default 0.7 x threshold)."
    )


class RunCreate(RunAlertSettings):
    """POST /api/runs. With an `id` that already exists the run is resumed (idempotent create)."""

    id: uuid.UUID | None = None
    name: Text
    project: Text = "default"
    tasks: list[TaskName] = Field(
        min_length=1,
        description="Ordered, unique task names.",
        json_schema_extra={"uniqueItems": True},
    )
    config: Annotated[dict[str, Any], AfterValidator(unicode_json)] = Field(
        default_factory=dict, description="Any JSON object (valid Unicode: no lone surrogates)."
    )


class RunUpdate(RunAlertSettings):
    """PATCH /api/runs/{id}: mark finished/failed/crashed/interrupted, or change the threshold."""

    status: RunStatus | None = None


class RunRead(ApiModel):
    id: uuid.UUID
    name: str
    project: str
    status: RunStatus
    lost: bool = Field(
        False,
        description="Running, but its client has not been heard from (epochs, heartbeats) for "
        "GRADWATCH_LOST_AFTER seconds: the process probably died without a word.",
    )
    tasks: list[str]
    config: dict[str, Any]
    ratio_threshold: float
    alert_open_epochs: int = 1
    alert_close_epochs: int = 1
    rearm_ratio: float | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_seen_at: datetime | None = None
    epoch_count: int = 0
    last_epoch: int | None = None
    last_grad_norm_ratio: Metric = None
    flagged: bool = Field(False, description="An imbalance alert is open or was ever opened.")
    open_alerts: int = Field(0, description="Open alerts of every kind.")
    open_alert_kinds: dict[str, int] = Field(
        default_factory=dict, description="Open alerts by kind (the flag: imbalance only)."
    )


class RunList(ApiModel):
    runs: list[RunRead]
    total: int
    limit: int
    offset: int


class TaskEpoch(ApiModel):
    """One task's numbers for one epoch (aggregated over the epoch's sampled steps)."""

    grad_norm: Metric = Field(None, description="||grad_W L_i||_2 over the shared parameters W.")
    weighted_grad_norm: Metric = Field(None, description="||grad_W (w_i L_i)||_2.")
    loss: Metric = None
    loss_ratio: Metric = Field(None, description="L_i(t) / L_i(0), the inverse training rate.")
    relative_inverse_rate: Metric = Field(
        None, description="r_i = loss_ratio_i / mean_j loss_ratio_j"
    )
    task_weight: Metric = None
    contribution_share: Metric = Field(
        None, description="Share of the combined gradient: ||w_i g_i|| / sum_j ||w_j g_j||."
    )
    target_grad_norm: Metric = Field(None, description="GradNorm's target G_bar * r_i^alpha.")


class PairCosine(ApiModel):
    """Cosine of two different tasks' gradients (`a` != `b`; each pair once per epoch)."""

    a: TaskName
    b: TaskName = Field(description="A task other than `a`.")
    value: Metric

    @model_validator(mode="after")
    def _two_tasks(self) -> PairCosine:
        if self.a == self.b:
            raise ValueError("a cosine pair names two different tasks")
        return self


MAX_GROUPS = 64


class GroupEpoch(ApiModel):
    """One parameter group's (a layer's) numbers for one epoch: where in the network a task
    dominates or the tasks conflict."""

    name: Text
    grad_norm: dict[TaskName, Metric] = Field(
        description="Every task of the run: ||grad_Wg L_i||_2 over the group's parameters Wg."
    )
    grad_norm_ratio: Metric = Field(None, description="max_i / min_i of |w_i| grad_norm_i.")
    min_cosine: Metric = Field(None, description="Smallest pairwise cosine within the group.")


class EpochRecord(ApiModel):
    epoch: EpochNumber
    tasks: dict[TaskName, TaskEpoch] = Field(
        default_factory=dict, description="Keyed by task name; every key must be a task of the run."
    )
    cosines: list[PairCosine] = Field(
        default_factory=list, description="Each unordered pair of two different tasks once."
    )
    grad_norm_ratio: Metric = Field(
        None,
        description="max_i / min_i of the weighted gradient norms |w_i| G_i (the imbalance the "
        "optimiser follows). When missing, the server computes it from the tasks' "
        "weighted_grad_norm if every task has one, else from grad_norm.",
    )
    peak_grad_norm_ratio: Metric = Field(None, description="Largest per-step ratio in the epoch.")
    min_cosine: Metric = Field(None, description="Computed from `cosines` when missing.")
    total_loss: Metric = None
    balancer_loss: Metric = Field(None, description="E.g. GradNorm's L_grad.")
    wall_time: Metric = Field(None, description="Seconds the epoch took.")
    step_count: EpochNumber | None = None
    groups: list[GroupEpoch] | None = Field(
        None,
        max_length=MAX_GROUPS,
        description=f"Per-parameter-group numbers (unique names, at most {MAX_GROUPS}).",
    )


class EpochBatch(ApiModel):
    """POST /api/runs/{id}/epochs. Stored in one transaction: all or nothing.

    Idempotent: an epoch already stored with identical values is counted as a duplicate and
    skipped. An epoch already stored with *different* values is a conflict: the whole batch is
    refused with 409 and nothing is stored (acknowledged data is never overwritten).
    """

    epochs: list[EpochRecord] = Field(min_length=1)


class IngestResult(ApiModel):
    accepted: int
    duplicates: int
    alerts_opened: int = 0
    alerts_closed: int = 0
    cursor: int = Field(description="Ingestion cursor after this batch (see metrics `since`).")


class AlertKind(str, Enum):
    imbalance = "imbalance"  # grad_norm_ratio above the run's threshold
    non_finite = "non_finite"  # a NaN/Inf gradient norm
    weight_collapse = "weight_collapse"  # a task weight below 1% of the mean weight
    conflict = "conflict"  # min_cosine < 0 for several consecutive epochs


class AlertRead(ApiModel):
    id: int
    run_id: uuid.UUID
    run_name: str | None = None
    kind: AlertKind
    task: str | None = None
    opened_epoch: int
    closed_epoch: int | None = None
    peak_value: Metric = None
    message: str
    opened_at: datetime
    closed_at: datetime | None = None


class AlertList(ApiModel):
    alerts: list[AlertRead]


class PairSeries(ApiModel):
    a: str
    b: str
    values: list[Metric]


class GroupSeries(ApiModel):
    """One parameter group's columns, aligned with `MetricsRead.epochs` (None: not measured)."""

    name: str
    grad_norm: dict[str, list[Metric]]
    grad_norm_ratio: list[Metric]
    min_cosine: list[Metric]


class MetricsRead(ApiModel):
    """Columnar metrics: every list is aligned with `epochs` (ascending)."""

    run_id: uuid.UUID
    tasks: list[str]
    epochs: list[int]
    epoch_metrics: dict[str, list[Metric]] = Field(
        description="grad_norm_ratio, peak_grad_norm_ratio, min_cosine, total_loss, "
        "balancer_loss, wall_time, step_count"
    )
    task_metrics: dict[str, dict[str, list[Metric]]] = Field(
        description="task name -> TaskEpoch field -> values"
    )
    cosines: list[PairSeries]
    groups: list[GroupSeries] = Field(
        default_factory=list, description="Per-parameter-group columns, in first-seen order."
    )
    cursor: int = Field(
        description="Pass as `since` to receive only epochs stored after this read."
    )
    downsampled: bool = False
    total_epochs: int = Field(description="Epochs matching the filter before downsampling.")


class VerdictItem(ApiModel):
    key: str = Field(description="dominance, imbalance, conflict or weight_collapse")
    level: str = Field(description="ok, warn or bad")
    chart: str = Field(description="Id of the run-page chart it summarises (#chart-<id>).")
    text: str


class Verdict(ApiModel):
    """GET /api/runs/{id}/verdict: computed from every stored epoch (server.verdict)."""

    run_id: uuid.UUID
    headline: str
    items: list[VerdictItem]
    suggestion: str = ""
    numbers: dict[str, Any] = Field(description="The numbers the sentences are made of.")


class ErrorBody(ApiModel):
    error: str
    detail: Any = None


class Health(ApiModel):
    status: str
    database: str
    version: str
    webhooks: dict[str, Any] | None = Field(
        None, description="Alert webhook delivery figures; absent when none is configured."
    )


# ---------------------------------------------------------------- scalars (server.scalars)

ScalarName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:/-]+$")
]


class ScalarRecord(ApiModel):
    epoch: int = Field(ge=0, le=2**31 - 1)
    values: dict[ScalarName, float] = Field(
        min_length=1,
        max_length=64,
        description="Name -> value. Names: letters, digits and `_ . : / -`, at most 100.",
    )


class ScalarBatch(ApiModel):
    """POST /api/runs/{id}/scalars: named scalars per epoch (evaluation metrics), stored in one
    transaction. Idempotent: a value already stored identically is a duplicate; a different
    value for a stored (epoch, name) is a conflict (409, nothing stored)."""

    records: list[ScalarRecord] = Field(min_length=1, max_length=10_000)


class ScalarIngestResult(ApiModel):
    accepted: int
    duplicates: int


class ScalarSeries(ApiModel):
    name: str
    epochs: list[int]
    values: list[float | None]


class ScalarsRead(ApiModel):
    run_id: uuid.UUID
    series: list[ScalarSeries] = Field(description="One per name, names sorted; epochs ascending.")
