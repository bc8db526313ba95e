"""The schema comes from the migrations, and the migrations match the models."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from server.db import create_db_engine, run_migrations
from server.models import Base
from tests.server.conftest import epoch, ingest, make_run


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


def test_0008_drops_the_task_row_foreign_keys_and_keeps_every_row(
    client: TestClient, migrated_url: str
) -> None:
    from alembic import command
    from alembic.config import Config

    from server.config import asset_dir

    run = make_run(client)["id"]
    cosine = {"cosines": [{"a": "rul", "b": "health", "value": -0.5}]}
    assert ingest(client, run, [epoch(0, **cosine), epoch(1, **cosine)]).status_code == 200
    cfg = Config()
    cfg.set_main_option("script_location", str(asset_dir("migrations")))
    engine = create_db_engine(migrated_url)

    def state() -> tuple[int, int, set[str]]:
        with engine.connect() as conn:
            tasks = conn.execute(sa.text("SELECT count(*) FROM task_epoch")).scalar_one()
            pairs = conn.execute(sa.text("SELECT count(*) FROM pair_cosine")).scalar_one()
            inspector = sa.inspect(conn)
            to = {
                f"{table}.{','.join(fk['constrained_columns'])}->{fk['referred_table']}"
                for table in ("task_epoch", "pair_cosine")
                for fk in inspector.get_foreign_keys(table)
            }
        return tasks, pairs, to

    keys = {"task_epoch.run_id,epoch->epoch", "pair_cosine.run_id,epoch->epoch",
            "task_epoch.task_id->run_task", "pair_cosine.task_a_id->run_task",
            "pair_cosine.task_b_id->run_task"}  # fmt: skip
    try:
        assert state() == (4, 2, set())
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0007")
        assert state() == (4, 2, keys)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        assert state() == (4, 2, set())
        other = make_run(client)["id"]
        assert ingest(client, other, [epoch(0, **cosine)]).status_code == 200
        assert client.delete(f"/api/runs/{run}").status_code == 204
        assert state() == (2, 1, set())  # the deleted run's rows went, the other run's stayed
    finally:
        engine.dispose()
