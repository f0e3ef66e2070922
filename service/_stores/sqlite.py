"""The SQLite job store (`sqlite://`, the default): job records in one file, embedded, shared by
every process on one machine and kept across restarts."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from service._protocol.errors import Unavailable
from service._protocol.jobs import JobRecord

T = TypeVar("T")


def default_sqlite_path() -> Path:
    """`$XDG_STATE_HOME/burrow/jobs.sqlite3` (`~/.local/state/…` when unset)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "burrow" / "jobs.sqlite3"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS burrow_jobs (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS burrow_jobs_expires ON burrow_jobs (expires);
"""
# begin: insert, or replace an expired row. finish: also replace the owner's running row
# (state code "r", then the 32-byte owner digest). A finished or another owner's live row stays.
_UPSERT = (
    "INSERT INTO burrow_jobs (key, value, expires) VALUES (?1, ?2, ?3) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires "
    "WHERE burrow_jobs.expires < ?4"
)
_BEGIN_SQL = _UPSERT
_FINISH_SQL = (
    _UPSERT
    + " OR (substr(burrow_jobs.value, 1, 1) = X'72' AND substr(burrow_jobs.value, 2, 32) = ?5)"
)
_PURGE_EVERY = 60.0  # seconds between deletions of expired records


class SqliteJobStore:
    """Records in one SQLite file (WAL), shared by every process on this machine.

    Operations run on the store's own thread, so the event loop never waits on the file (or
    on another process holding its lock). Those that arrive while a batch is being written
    are written together as the next batch, in one transaction (group commit): under load
    the thread hops and commits are shared by many jobs, and each operation still sees every
    earlier one. A committed record survives a crash of the process (WAL with
    `synchronous=NORMAL` loses only what an operating-system crash catches unsynced). Expiry
    is by wall clock, so every process agrees; expired rows are deleted once a minute by
    whichever process writes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="burrow-jobs")
        self._db: sqlite3.Connection | None = None  # used on that thread only
        self._purged = 0.0
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._batch.append((op, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_batches())
        return await future

    async def _write_batches(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    results = await loop.run_in_executor(
                        self._thread, self._transaction, [op for op, _ in batch]
                    )
                except Exception as exc:  # every waiter hears of it; none is left hanging
                    failure: Exception = exc
                    if isinstance(exc, (OSError, sqlite3.Error)):
                        failure = Unavailable(f"job store {self.path} unavailable: {exc}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._writer = None

    def _transaction(self, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """Run `ops` in order in one transaction (on the store's thread)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            results = [op(db) for op in ops]
            now = time.time()
            if now - self._purged > _PURGE_EVERY:
                self._purged = now
                db.execute("DELETE FROM burrow_jobs WHERE expires < ?", (now,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return results

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    @staticmethod
    def _write(db: sqlite3.Connection, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """begin (a running `record`: only where nothing live is held) or finish (also over
        its own owner's running record): one upsert, and a read only when it did not write.
        Returns what `key` holds afterwards."""
        now = time.time()
        value = record.encode()
        if record.finished:
            written = db.execute(_FINISH_SQL, (key, value, now + ttl, now, record.owner))
        else:
            written = db.execute(_BEGIN_SQL, (key, value, now + ttl, now))
        if written.rowcount == 1:
            return record
        held = _select(db, key, now)
        assert held is not None  # a live row made the upsert a no-op
        return held

    async def begin(self, key: str, record: JobRecord, ttl: float) -> JobRecord | None:
        """Insert unless a live record exists."""
        held = await self._run(lambda db: self._write(db, key, record, ttl))
        return None if held is record else held

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """First finished record wins."""
        return await self._run(lambda db: self._write(db, key, record, ttl))

    async def get(self, key: str) -> JobRecord | None:
        """The live record, if any."""
        return await self._run(lambda db: _select(db, key, time.time()))

    async def close(self) -> None:
        """Close the file and stop the thread (after the batch being written)."""

        def shut() -> None:
            db, self._db = self._db, None
            if db is not None:
                db.close()

        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=False)


def _select(db: sqlite3.Connection, key: str, now: float) -> JobRecord | None:
    row = db.execute(
        "SELECT value FROM burrow_jobs WHERE key = ? AND expires >= ?", (key, now)
    ).fetchone()
    return None if row is None else JobRecord.decode(bytes(row[0]))
