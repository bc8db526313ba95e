"""Server settings: one `Settings` object, every field overridable by a `GRADWATCH_*` variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
AlertKindName = Literal["imbalance", "non_finite", "weight_collapse", "conflict"]
ALERT_KINDS: list[AlertKindName] = ["imbalance", "non_finite", "weight_collapse", "conflict"]


class WebhookTarget(BaseModel):
    """One alert webhook (see server.webhooks)."""

    url: str = Field(pattern=r"^https?://")
    format: Literal["slack", "json"] = "json"
    """`slack`: `{"text": ...}` (Slack, Mattermost, Teams workflows); `json`: every field."""
    kinds: list[AlertKindName] = ALERT_KINDS
    """The alert kinds sent to this URL."""


class Settings(BaseSettings):
    """Every setting, its environment variable (`GRADWATCH_` + upper-case name) and its default."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", extra="ignore")

    database_url: str = "sqlite:///./gradwatch.db"
    """SQLAlchemy URL; SQLite by default, `postgresql+psycopg://user@host/db` for teams."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """When set, every write needs `Authorization: Bearer <token>`."""
    protect_reads: bool = False
    """When true (and a token is set), reads need the token too."""
    allow_insecure_bind: bool = False
    """Allow listening on a non-loopback address without a token."""
    ratio_threshold: float = 10.0
    """Max/min gradient-norm ratio above which an imbalance alert opens (per-run override)."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Request bodies larger than this are refused with 413."""
    max_tasks: int = 64
    """Runs with more tasks than this are refused with 422."""
    max_points: int = 2000
    """Default and upper bound of points per trace the dashboard asks for."""
    webhooks: list[WebhookTarget] = []
    """Alert webhooks, as JSON: `[{"url": "https://...", "format": "slack", "kinds": [...]}]`."""
    webhook_min_epochs: int = Field(default=1, ge=1)
    """An alert episode is announced once it has lasted this many epochs (shorter: never)."""
    webhook_cooldown_s: float = Field(default=600.0, ge=0)
    """After announcing an episode, a new one of the same run, kind and task within this many
    seconds is not announced (nor its close): a ratio flapping around the threshold is quiet."""
    webhook_queue_size: int = Field(default=1000, ge=1)
    """Announcements waiting for delivery; beyond it new ones are dropped (logged, counted)."""
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=5, ge=1)
    """Attempts per announcement and URL (capped exponential backoff between them)."""
    webhook_backoff_s: float = Field(default=1.0, gt=0)
    webhook_backoff_cap_s: float = Field(default=60.0, gt=0)
    public_url: str | None = None
    """The server's address as users reach it, for links in announcements (default from
    host and port)."""
    lost_after: Annotated[float, Field(gt=0)] = 120.0
    """A running run not heard from (epochs or heartbeats) for this many seconds shows as lost."""
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host names (Host header, port ignored) accepted besides the loopback names and the bind
    address; comma-separated in GRADWATCH_ALLOWED_HOSTS, `*` accepts any host."""
    db_retry_after: Annotated[int, Field(ge=1)] = 5
    """Seconds in the Retry-After header of the 503 answered while the database is down."""
    body_timeout: Annotated[float, Field(gt=0)] = 30.0
    """Seconds a request may take to send its declared body before the connection is closed."""

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    def host_names(self) -> frozenset[str]:
        """Every Host name this server answers to (lower case, no port)."""
        return LOOPBACK_HOSTS | {self.host.lower(), *(h.lower() for h in self.allowed_hosts)}


@lru_cache
def get_settings() -> Settings:
    return Settings()


def asset_dir(name: str) -> Path:
    """Locate `templates`, `static` or `migrations`: inside the wheel, else at the repo root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_assets" / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gradwatch asset folder {name!r} not found next to {here}")
