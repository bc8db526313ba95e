"""Who this run is: its header for the server, and this process's rank."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_header(
    tasks: list[str],
    run_name: str | None,
    project: str,
    config: Mapping[str, Any] | None,
    run_id: str | uuid.UUID | None,
    all_ranks: bool,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """The run as the server's ``POST /api/runs`` takes it."""
    base_id = uuid.UUID(str(run_id)) if run_id else uuid.uuid4()
    settings = dict(config or {})
    name = run_name or f"{Path(sys.argv[0] or 'python').stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if all_ranks and world_size > 1:
        base_id = uuid.uuid5(base_id, f"rank{rank}")
        name = f"{name}-rank{rank}"
        settings.update(rank=rank, world_size=world_size)
    return {
        "id": str(base_id),
        "name": name,
        "project": project,
        "tasks": tasks,
        "config": json.loads(json.dumps(settings, default=str)),
    }
