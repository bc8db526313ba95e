"""The schema comes from the migrations, and the migrations match the models."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from server.db import create_db_engine, run_migrations
from server.models import Base


def test_migrations_match_models(migrated_url: str) -> None:
    engine = create_db_engine(migrated_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_migrations_create_every_table(migrated_url: str) -> None:
    engine = create_db_engine(migrated_url)
    tables = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_migrations_run_twice_is_a_no_op(migrated_url: str) -> None:
    run_migrations(migrated_url)
    engine = create_db_engine(migrated_url)
    with engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    engine.dispose()
    assert len(versions) == 1
