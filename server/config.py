"""Server settings: one `Settings` object, every field overridable by a `GRADWATCH_*` variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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
