"""Job results: where a submit's outcome is kept, readable from any process, until it expires.

A service records a job when it first reads its submit (`begin`: *running*, with the digest of
the submit that owns the id) and its outcome before it publishes any completion (`finish`:
*completed* or *failed*, with the body). The first finished record wins: a redelivered or
duplicated submit finds it and answers with it, so a job never has two results, and a submit
with another digest never touches it (the job id is in use).

Stores, by `BURROW_JOB_STORE_URL`:
- `sqlite:///path` (the default, `sqlite://` alone: a file in the user's state directory):
  embedded, shared by every process on one machine, kept across restarts;
- `redis://host:port/db`: shared by every instance on any machine; SET with expiry is the
  record, a short script makes "first result wins" one atomic step;
- `memory://`: this process only (tests, the in-memory broker).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from service.errors import ConfigError, Unavailable
from service.expiring import ExpiringMap

T = TypeVar("T")

__all__ = [
    "JobState",
    "JobRecord",
    "JobStore",
    "MemoryJobStore",
    "SqliteJobStore",
    "RedisJobStore",
    "job_store_from_url",
    "owner_digest",
    "default_sqlite_path",
]


class JobState(StrEnum):
    """Where a job stands in the store."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


_CODE = {JobState.RUNNING: b"r", JobState.COMPLETED: b"c", JobState.FAILED: b"f"}
_STATE = {code: state for state, code in _CODE.items()}
_OWNER = 32  # bytes of a sha256 digest


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job: its state, the digest of the submit that owns its id, its route, and (once
    finished) the completion body: the reply JSON, or an error body."""

    state: JobState
    owner: bytes
    route: str
    body: bytes = b""

    @property
    def finished(self) -> bool:
        """Completed or failed: the record is final."""
        return self.state is not JobState.RUNNING

    def encode(self) -> bytes:
        """State code, owner digest, route, a newline, the body."""
        return _CODE[self.state] + self.owner + self.route.encode() + b"\n" + self.body

    @classmethod
    def decode(cls, value: bytes) -> JobRecord | None:
        """The record, or None when `value` is not one (another program's key)."""
        state = _STATE.get(value[:1])
        route, newline, body = value[1 + _OWNER :].partition(b"\n")
        if state is None or len(value) < 1 + _OWNER or not newline:
            return None
        return cls(state, value[1 : 1 + _OWNER], route.decode("utf-8", "replace"), body)


def owner_digest(
    route: str,
    callback: str | None,
    message_id: str | None,
    body: bytes,
    callback_data: str | None = None,
) -> bytes:
    """What makes two deliveries the same submit: route, callback (and its data), message id
    and body."""
    digest = hashlib.sha256()
    parts = [route, callback or "", message_id or ""]
    if callback_data is not None:  # absent: the same digest as before callback data existed
        parts.append(callback_data)
    for part in parts:
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    digest.update(body)
    return digest.digest()


class JobStore(Protocol):
    """Where job records are kept; every method raises `Unavailable` when the store is away."""

    async def begin(self, key: str, record: JobRecord, ttl: float) -> JobRecord | None:
        """Keep `record` (running) for `ttl` seconds unless `key` holds one; return that one,
        or None when `record` was stored."""
        ...

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """Keep the finished `record` for `ttl` seconds unless `key` already holds a finished
        one or another owner's; return what `key` holds afterwards."""
        ...

    async def get(self, key: str) -> JobRecord | None:
        """The record under `key`, or None (never recorded, or expired)."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


def _resolve(held: JobRecord | None, record: JobRecord) -> JobRecord | None:
    """`finish`'s rule: the record to write, or None to keep `held`."""
    if held is None or (not held.finished and held.owner == record.owner):
        return record
    return None


class MemoryJobStore:
    """Records in this process only, bounded to `max_keys` (oldest dropped first)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._items: ExpiringMap[JobRecord] = ExpiringMap(max_keys)

    async def begin(self, key: str, record: JobRecord, ttl: float) -> JobRecord | None:
        """Atomic within the event loop: no await between the check and the set."""
        held = self._items.get(key)
        if held is None:
            self._items.set(key, record, ttl)
        return held

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """First finished record wins."""
        held = self._items.get(key)
        write = _resolve(held, record)
        if write is None:
            assert held is not None
            return held
        self._items.set(key, write, ttl)
        return write

    async def get(self, key: str) -> JobRecord | None:
        """The record, unless expired."""
        return self._items.get(key)

    async def close(self) -> None:
        """Nothing to release."""


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


# finish in one step: keep a finished record or another owner's, else write ours.
# KEYS[1] = key; ARGV[1] = the record, ARGV[2] = its owner-prefix (code excluded), ARGV[3] = ttl ms
_FINISH = """
local held = redis.call('get', KEYS[1])
if held and (string.sub(held, 1, 1) ~= 'r' or string.sub(held, 2, 33) ~= ARGV[2]) then
  return held
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[3])
return ARGV[1]
"""


class RedisJobStore:
    """Records in Redis, shared by every instance on any machine; Redis expires them."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as redis  # noqa: PLC0415 - optional dependency
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("BURROW_JOB_STORE_URL=redis://… needs `pip install redis`") from None
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._finish = self._redis.register_script(_FINISH)

    async def begin(self, key: str, record: JobRecord, ttl: float) -> JobRecord | None:
        """SET NX with expiry; if taken, read what is there."""
        try:
            if await self._redis.set(key, record.encode(), px=_ms(ttl), nx=True):
                return None
            held = await self._redis.get(key)
        except Exception as exc:  # redis raises many types; all mean "not now"
            raise _unavailable(exc) from None
        if held is None:  # expired between the two steps: ours now
            return await self.begin(key, record, ttl)
        return JobRecord.decode(_bytes(held)) or record

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """The script above: the first finished record wins."""
        try:
            held = await self._finish(keys=[key], args=[record.encode(), record.owner, _ms(ttl)])
        except Exception as exc:
            raise _unavailable(exc) from None
        return JobRecord.decode(_bytes(held)) or record

    async def get(self, key: str) -> JobRecord | None:
        """GET."""
        try:
            held = await self._redis.get(key)
        except Exception as exc:
            raise _unavailable(exc) from None
        return None if held is None else JobRecord.decode(_bytes(held))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _unavailable(exc: Exception) -> Unavailable:
    return Unavailable(f"job store unavailable ({type(exc).__name__})")


def job_store_from_url(url: str) -> JobStore:
    """`sqlite://` (default file), `sqlite:///abs/path`, `memory://` or `redis://…`."""
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        return SqliteJobStore(Path(path) if path else default_sqlite_path())
    if url.startswith("memory://"):
        return MemoryJobStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisJobStore(url)
    raise ConfigError(f"BURROW_JOB_STORE_URL: unsupported store {url.split(':', 1)[0]!r}")
