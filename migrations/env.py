"""Alembic environment: runs on the connection `server.db.run_migrations` hands over, or on
`sqlalchemy.url` / GRADWATCH_DATABASE_URL when called from the `alembic` command line."""

from __future__ import annotations

import os

from alembic import context

from server.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from server.db import create_db_engine

    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "GRADWATCH_DATABASE_URL", "sqlite:///./gradwatch.db"
    )
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("gradwatch migrations run online only (use `alembic upgrade head`)")
run_online()
