"""JSON API of named per-epoch scalars (evaluation metrics): ingest and read (server.scalars)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from server import scalars, schemas
from server.db import SessionDep
from server.routes.api import COMMON, RUN, WRITE, RunDep, _err
from server.security import require_read, require_write

router = APIRouter()
reads = APIRouter(dependencies=[Depends(require_read)], responses=COMMON)
writes = APIRouter(dependencies=[Depends(require_write)], responses=WRITE)


@writes.post(
    "/api/runs/{run_id}/scalars",
    response_model=schemas.ScalarIngestResult,
    tags=["scalars"],
    responses={**RUN, 409: _err("A (name, epoch) is stored with a different value")},
)
def ingest_scalars(body: schemas.ScalarBatch, run: RunDep, session: SessionDep) -> Any:
    """Store named scalars per epoch (e.g. `test_rmse`), all or nothing; resends are
    duplicates, a different value for a stored (name, epoch) is a 409."""
    return scalars.ingest(session, run, body)


@reads.get(
    "/api/runs/{run_id}/scalars",
    response_model=schemas.ScalarsRead,
    tags=["scalars"],
    responses=RUN,
)
def read_scalars(run: RunDep, session: SessionDep) -> schemas.ScalarsRead:
    """Every logged scalar of the run, one series per name."""
    return schemas.ScalarsRead(run_id=run.id, series=scalars.series(session, run.id))


router.include_router(reads)
router.include_router(writes)
