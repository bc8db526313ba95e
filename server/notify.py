"""Change notices for live views: `NOTIFY gradwatch_runs, '<run id>'` sent inside a write.

PostgreSQL delivers a notification when (and only if) the transaction that sent it commits,
to every session LISTENing on the channel, in every server process (see server.livefeed).
SQLite has no such thing: there each process polls (server.livefeed), and this is a no-op.
https://www.postgresql.org/docs/current/sql-notify.html
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

CHANNEL = "gradwatch_runs"
_SEND = sa.text(f"SELECT pg_notify('{CHANNEL}', :payload)")


def run_changed(session: Session, run_id: uuid.UUID) -> None:
    """Tell every server process, at commit, that this run (epochs, summary, alerts) changed."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_SEND, {"payload": str(run_id)})
