"""Rows straight to the database driver, for ingest's hot path (server.ingest)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def insert_rows(conn: sa.Connection, table: str, columns: tuple[str, ...], rows: list[Any]) -> None:
    """Straight on the driver, no per-value type processing (values are already in the
    database's form: server.ingest prepares them): a binary COPY on PostgreSQL (one stream of
    rows, not a statement per row: https://www.postgresql.org/docs/current/populate.html),
    executemany on SQLite."""
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        types = _column_types(cursor, table, columns)
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        with cursor.copy(sql) as copy:  # binary: no float -> text -> float on either side
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
        return
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})"
    conn.exec_driver_sql(sql, rows)


_COLUMN_TYPES: dict[tuple[str, tuple[str, ...]], list[int]] = {}


def _column_types(cursor: Any, table: str, columns: tuple[str, ...]) -> list[int]:
    """The PostgreSQL type oids of `columns` (a binary COPY names them), read once."""
    key = (table, columns)
    if key not in _COLUMN_TYPES:
        cursor.execute(
            "SELECT attname, atttypid::int FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0",
            (table,),
        )
        oids = dict(cursor.fetchall())
        _COLUMN_TYPES[key] = [oids[c] for c in columns]
    return _COLUMN_TYPES[key]
