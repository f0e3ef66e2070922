"""The job result stores: one rule ("first finished record wins, owners never mix") in each."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service._protocol.errors import Unavailable
from service._protocol.jobs import JobRecord, JobState, owner_digest
from service._stores.base import JobStore
from service._stores.memory import ExpiringMap, MemoryJobStore
from service._stores.redis import RedisJobStore
from service._stores.registry import job_store_from_url
from service._stores.sqlite import SqliteJobStore

__all__: list[str] = []

REDIS_URL = os.environ.get("BURROW_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
MINE = owner_digest("calc.add", None, "m-1", b'{"a": 1}')
THEIRS = owner_digest("calc.add", None, "m-2", b'{"a": 1}')
RUNNING = JobRecord(JobState.RUNNING, MINE, "calc.add")
DONE = JobRecord(JobState.COMPLETED, MINE, "calc.add", b'{"sum": 3}')


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """Each store kind, empty."""
    found: JobStore
    if request.param == "memory":
        found = MemoryJobStore()
    elif request.param == "sqlite":
        found = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        found = RedisJobStore(REDIS_URL)
        try:
            await found.get("probe")
        except Unavailable:
            await found.close()
            pytest.skip(f"no Redis at {REDIS_URL}")
    yield found
    await found.close()


@pytest.fixture
def key() -> str:
    """A key no other test or run uses."""
    return f"test-results:{uuid.uuid4().hex}"


def test_records_round_trip_and_foreign_values_are_none() -> None:
    """encode/decode keep state, owner, route and body; a value not written by a store is None."""
    for record in (RUNNING, DONE, JobRecord(JobState.FAILED, THEIRS, "a.b", b'{"code":"X"}')):
        assert JobRecord.decode(record.encode()) == record
    for foreign in (b"", b"x" * 40, b"c" + MINE, b"q" + MINE + b"calc.add\n{}"):
        assert JobRecord.decode(foreign) is None


def test_owner_digest_tells_apart_every_field() -> None:
    """Route, callback, message id and body each change the digest; the same submit does not."""
    base = ("calc.add", "inbox", "m-1", b"{}")
    assert owner_digest(*base) == owner_digest(*base)
    for changed in (("calc.sub", "inbox", "m-1", b"{}"), ("calc.add", None, "m-1", b"{}")):
        assert owner_digest(*changed) != owner_digest(*base)
    assert owner_digest("calc.add", "inbox", "m-2", b"{}") != owner_digest(*base)
    assert owner_digest("calc.add", "inbox", "m-1", b"[]") != owner_digest(*base)


async def test_begin_records_once_then_returns_what_is_held(store: JobStore, key: str) -> None:
    """The first begin stores its record (None); any later one gets the held record back."""
    assert await store.begin(key, RUNNING, 60) is None
    assert await store.begin(key, JobRecord(JobState.RUNNING, THEIRS, "calc.add"), 60) == RUNNING
    assert await store.get(key) == RUNNING


async def test_the_first_finished_record_wins(store: JobStore, key: str) -> None:
    """finish replaces its own running record; a second finish gets the first result back."""
    await store.begin(key, RUNNING, 60)
    assert await store.finish(key, DONE, 60) == DONE
    other = JobRecord(JobState.FAILED, MINE, "calc.add", b'{"code": "INTERNAL"}')
    assert await store.finish(key, other, 60) == DONE
    assert await store.get(key) == DONE


async def test_another_owner_never_finishes_a_job(store: JobStore, key: str) -> None:
    """A finish by another submit's digest leaves the owner's running record untouched."""
    await store.begin(key, RUNNING, 60)
    theirs = JobRecord(JobState.COMPLETED, THEIRS, "calc.add", b'{"sum": 666}')
    assert await store.finish(key, theirs, 60) == RUNNING
    assert await store.get(key) == RUNNING


async def test_finish_without_begin_records_the_result(store: JobStore, key: str) -> None:
    """A running record that expired during a long handler does not lose the result."""
    assert await store.finish(key, DONE, 60) == DONE
    assert await store.get(key) == DONE


async def test_records_expire(store: JobStore, key: str) -> None:
    """After its TTL a record is gone: get is None and the id can begin again."""
    await store.begin(key, RUNNING, 0.05)
    await asyncio.sleep(0.15)
    assert await store.get(key) is None
    assert await store.begin(key, DONE, 60) is None


async def test_sqlite_file_is_shared_and_survives_reopening(tmp_path: Path, key: str) -> None:
    """Two stores on one file see each other's records; a new one reads them after a close."""
    path = tmp_path / "state" / "jobs.sqlite3"
    first, second = SqliteJobStore(path), SqliteJobStore(path)
    try:
        assert await first.begin(key, RUNNING, 60) is None
        assert await second.begin(key, RUNNING, 60) == RUNNING
        assert await second.finish(key, DONE, 60) == DONE
    finally:
        await first.close()
        await second.close()
    reopened = SqliteJobStore(path)
    try:
        assert await reopened.get(key) == DONE
    finally:
        await reopened.close()


async def test_sqlite_store_that_cannot_open_is_unavailable(tmp_path: Path) -> None:
    """A path that cannot hold the file is a retryable UNAVAILABLE, not a crash."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SqliteJobStore(blocker / "jobs.sqlite3")
    with pytest.raises(Unavailable):
        await store.get("k")
    await store.close()


def test_store_urls(tmp_path: Path) -> None:
    """sqlite:// (default file or a path), memory:// and redis:// pick their store."""
    default = job_store_from_url("sqlite://")
    assert isinstance(default, SqliteJobStore)
    assert default.path.name == "jobs.sqlite3"
    chosen = job_store_from_url(f"sqlite://{tmp_path}/j.db")
    assert isinstance(chosen, SqliteJobStore)
    assert chosen.path == tmp_path / "j.db"
    assert isinstance(job_store_from_url("memory://"), MemoryJobStore)
    assert isinstance(job_store_from_url("redis://127.0.0.1:6379/15"), RedisJobStore)


def test_expiring_map_bounds_and_expires() -> None:
    """The in-process map keeps at most max_keys (oldest set dropped) and forgets expired keys."""
    found: ExpiringMap[int] = ExpiringMap(max_keys=2)
    found.set("a", 1, 60)
    found.set("b", 2, 60)
    found.set("a", 3, 60)  # a is now the newest
    found.set("c", 4, 60)
    assert (found.get("a"), found.get("b"), found.get("c")) == (3, None, 4)
    found.set("d", 5, -1)  # pushes a out, and is expired itself
    assert found.get("d") is None
    assert (len(found), found.get("c")) == (1, 4)
