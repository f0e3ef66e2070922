"""The outbox and inbox tables: where they live, how they are created, purged and repaired.

`schema.sql` (next to this file, copied to `deploy/postgres/outbox.sql`) is the one definition;
`apply` runs it in a schema of its own (`burrow` unless told otherwise), idempotently.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from service._outbox import db

# Relay partitions: a key's rows go to partition hashtext(key) % PARTITIONS (schema.sql), each
# partition published by one relay at a time. Changing it changes the schema.
PARTITIONS = 16
DEFAULT_SCHEMA = "burrow"
# A schema name that needs no quoting, short enough for the notification channel "<schema>.outbox"
# (63 bytes at most) and the advisory-lock namespace.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
_PURGE_CHUNK = 10_000  # rows deleted per statement: short transactions, no long lock


def sql() -> str:
    """The text of `schema.sql`."""
    return resources.files("service._outbox").joinpath("schema.sql").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Tables:
    """The qualified names of one schema's outbox and inbox, and what goes with them."""

    schema: str = DEFAULT_SCHEMA

    def __post_init__(self) -> None:
        if not _SCHEMA_NAME.match(self.schema):
            raise ValueError(
                f"outbox schema {self.schema[:64]!r} must match {_SCHEMA_NAME.pattern} "
                "(lower-case letters, digits and _, at most 48 characters)"
            )

    @property
    def outbox(self) -> str:
        """`<schema>.outbox`, for SQL."""
        return f'"{self.schema}".outbox'

    @property
    def inbox(self) -> str:
        """`<schema>.inbox`, for SQL."""
        return f'"{self.schema}".inbox'

    @property
    def channel(self) -> str:
        """The NOTIFY channel an insert into the outbox wakes the relays on."""
        return f"{self.schema}.outbox"

    @property
    def lock_space(self) -> int:
        """The first key of this schema's advisory locks (the second: the partition)."""
        return zlib.crc32(f"burrow.outbox:{self.schema}".encode()) & 0x7FFFFFFF


async def apply(conn: Any, tables: Tables) -> None:
    """Create the schema, tables, indexes and trigger if missing (safe to run concurrently:
    one transaction under an advisory lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, -1)", tables.lock_space)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{tables.schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{tables.schema}"')
        await conn.execute(sql())


async def init(dsn: str, schema: str = DEFAULT_SCHEMA, *, timeout: float = 10.0) -> None:
    """`burrow outbox init`: apply the schema on the database at `dsn`.

    Raises:
        ConfigError: asyncpg is not installed.
        ValueError: the schema name is not allowed.
    """
    tables = Tables(schema)
    conn = await db.connect(dsn, timeout=timeout)
    try:
        await apply(conn, tables)
    finally:
        await conn.close()


async def purge(conn: Any, tables: Tables, *, older_than: float) -> tuple[int, int]:
    """Delete sent outbox rows and inbox ids older than `older_than` seconds; how many of each.

    Parked rows stay until an operator retries or deletes them (`retry_parked`).
    """
    sent = await _purge(
        conn,
        f"DELETE FROM {tables.outbox} WHERE id IN (SELECT id FROM {tables.outbox} "
        "WHERE sent_at < now() - make_interval(secs => $1) LIMIT $2)",
        older_than,
    )
    seen = await _purge(
        conn,
        f"DELETE FROM {tables.inbox} WHERE (consumer, message_id) IN (SELECT consumer, "
        f"message_id FROM {tables.inbox} WHERE received_at < now() - make_interval(secs => $1) "
        "LIMIT $2)",
        older_than,
    )
    return sent, seen


async def _purge(conn: Any, statement: str, older_than: float) -> int:
    total = 0
    while True:
        status = await conn.execute(statement, older_than, _PURGE_CHUNK)
        deleted = int(status.rpartition(" ")[2] or 0)
        total += deleted
        if deleted < _PURGE_CHUNK:
            return total


@dataclass(frozen=True, slots=True)
class Parked:
    """An outbox row the relay parked: never published, kept until retried or deleted."""

    id: int
    key: str
    routing_key: str
    message_id: str
    reason: str
    parked_at: datetime
    attempts: int


async def parked(conn: Any, tables: Tables, *, limit: int = 100) -> list[Parked]:
    """The parked rows, oldest first."""
    rows = await conn.fetch(
        f"SELECT id, key, routing_key, message_id, parked_reason, parked_at, attempts "
        f"FROM {tables.outbox} WHERE parked_at IS NOT NULL ORDER BY id LIMIT $1",
        limit,
    )
    return [Parked(*row) for row in rows]


async def retry_parked(conn: Any, tables: Tables, ids: list[int]) -> int:
    """Make parked rows pending again (attempts reset); how many were. Each keeps its place:
    it is published before the rows of its key written after it that are still pending."""
    status = await conn.execute(
        f"UPDATE {tables.outbox} SET parked_at = NULL, parked_reason = NULL, attempts = 0 "
        "WHERE id = ANY($1::bigint[]) AND parked_at IS NOT NULL AND sent_at IS NULL",
        ids,
    )
    return int(status.rpartition(" ")[2] or 0)
