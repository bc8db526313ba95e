"""epoch_block: kept at ingest, always equal to a scan of the run's epochs."""

from __future__ import annotations

import math
import random
import uuid
from itertools import groupby
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from server import epoch_blocks, models
from server.config import asset_dir
from server.db import create_db_engine
from tests.server.conftest import TestClient, ingest, make_run

NAN, INF = math.nan, math.inf
# A small set of values, so that ties are common; 7.5 (above test_downsampling's threshold),
# NaN, +/-Inf and None are rare.
VALUES: list[Any] = [1.0, 1.5, 2.0, 2.0, 3.0, 0.25] * 8 + [7.5, None, NAN, INF, -INF]


def random_ratios(seed: int, count: int) -> dict[int, Any]:
    """{epoch: ratio} over 0..count-1 with ~10% of the epochs missing."""
    rng = random.Random(seed)
    return {e: rng.choice(VALUES) for e in range(count) if rng.random() > 0.1}


def as_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def comparable(value: Any) -> bool:
    return value is not None and not math.isnan(value)


def scan_block(ratios: dict[int, Any], epochs: list[int]) -> tuple[Any, ...]:
    """What the rule says for one block: first epoch, (min ratio, its epoch), (max, its epoch)."""
    found = [e for e in epochs if comparable(ratios[e])]
    if not found:
        return (min(epochs), None, None, None, None)
    low = min(found, key=lambda e: (ratios[e], e))
    high = max(found, key=lambda e: (ratios[e], -e))
    return (min(epochs), ratios[low], low, ratios[high], high)


def scan_all_blocks(ratios: dict[int, Any]) -> list[tuple[Any, ...]]:
    """Every (block_size, block_index, extremes...) row, from a scan of all the epochs."""
    rows = []
    for size in epoch_blocks.BLOCK_SIZES:
        for index, grp in groupby(sorted(ratios), key=lambda e: e // size):
            rows.append((size, index, *scan_block(ratios, list(grp))))
    return sorted(rows)


def stored_blocks(url: str, run_id: str) -> list[tuple[Any, ...]]:
    b = models.EpochBlock
    engine = create_db_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(b.block_size, b.block_index, b.first_epoch, b.min_ratio,
                      b.min_ratio_epoch, b.max_ratio, b.max_ratio_epoch)
            .where(b.run_id == uuid.UUID(run_id))
        ).all()  # fmt: skip
    engine.dispose()
    return sorted(tuple(r) for r in rows)


def ingest_ratios(client: TestClient, run_id: str, ratios: dict[int, Any], batch: int) -> None:
    items = [{"epoch": e, "grad_norm_ratio": as_json(r)} for e, r in ratios.items()]
    for start in range(0, len(items), batch):
        assert ingest(client, run_id, items[start : start + batch]).status_code == 200


def shuffled(ratios: dict[int, Any], seed: int) -> dict[int, Any]:
    keys = list(ratios)
    random.Random(seed).shuffle(keys)
    return {e: ratios[e] for e in keys}


# ---------------------------------------------------------------- the rule, in Python


def test_blocks_of_match_a_scan_of_each_block() -> None:
    ratios = random_ratios(1, 5000)
    got = epoch_blocks.blocks_of(shuffled(ratios, 2).items())
    rows = sorted((s, i, *x) for s, level in got.items() for i, x in level.items())
    assert rows == scan_all_blocks(ratios)


def test_merging_disjoint_halves_gives_the_blocks_of_the_whole() -> None:
    ratios = random_ratios(3, 3000)
    keys = list(shuffled(ratios, 4))
    left = epoch_blocks.blocks_of((e, ratios[e]) for e in keys[:1400])
    right = epoch_blocks.blocks_of((e, ratios[e]) for e in keys[1400:])
    whole = epoch_blocks.blocks_of(ratios.items())
    for size, level in whole.items():
        for index, x in level.items():
            a, b = left[size].get(index), right[size].get(index)
            merged = a if b is None else b if a is None else epoch_blocks.merge(a, b)
            assert merged == x, (size, index)


# ---------------------------------------------------------------- kept at ingest


def test_ingest_keeps_blocks_equal_to_a_scan_of_all_epochs(
    client: TestClient, migrated_url: str
) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios = random_ratios(5, 4000)
    ingest_ratios(client, run["id"], shuffled(ratios, 6), batch=300)  # out of order
    assert stored_blocks(migrated_url, run["id"]) == scan_all_blocks(ratios)


def test_retried_and_conflicting_batches_leave_the_blocks_as_they_were(
    client: TestClient, migrated_url: str
) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios = random_ratios(7, 1000)
    ingest_ratios(client, run["id"], ratios, batch=1000)
    before = stored_blocks(migrated_url, run["id"])
    ingest_ratios(client, run["id"], ratios, batch=250)  # every epoch a duplicate
    first = min(ratios)
    conflict = [{"epoch": 5000, "grad_norm_ratio": 0.001},  # new, and the lowest ratio
                {"epoch": first, "grad_norm_ratio": 123.0}]  # fmt: skip
    assert ingest(client, run["id"], conflict).status_code == 409
    assert stored_blocks(migrated_url, run["id"]) == before


def test_deleting_a_run_deletes_its_blocks(client: TestClient, migrated_url: str) -> None:
    run = make_run(client)
    ingest_ratios(client, run["id"], random_ratios(8, 200), batch=200)
    assert stored_blocks(migrated_url, run["id"])
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    assert stored_blocks(migrated_url, run["id"]) == []


def _alembic(url: str, action: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(asset_dir("migrations")))
    engine = create_db_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)
    engine.dispose()


def test_migration_fills_the_blocks_of_epochs_stored_before_it(
    client: TestClient, migrated_url: str
) -> None:
    run = make_run(client, ratio_threshold=1e9)
    ratios = random_ratios(9, 3000)
    ingest_ratios(client, run["id"], shuffled(ratios, 10), batch=500)
    kept_by_ingest = stored_blocks(migrated_url, run["id"])
    _alembic(migrated_url, "downgrade", "0002")
    _alembic(migrated_url, "upgrade", "head")
    assert stored_blocks(migrated_url, run["id"]) == kept_by_ingest == scan_all_blocks(ratios)
