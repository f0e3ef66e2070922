"""The registry of store URL schemes: a user's own store joins as the built-in ones do, is what
the settings' URL gives the App and the Client, and a scheme is refused when unknown or taken."""

from __future__ import annotations

import pytest

from service import ConfigError, Model, Service
from service._protocol.jobs import JobRecord, JobState
from service._stores import registry
from service._stores.base import IdempotencyStore, JobStore
from service._stores.memory import MemoryJobStore, MemoryStore
from service._stores.registry import (
    idempotency_store_from_url,
    job_store_from_url,
    register_store,
)
from service.testing import serve

__all__: list[str] = []


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers into a copy of the registry: what it adds is gone afterwards."""
    monkeypatch.setattr(registry, "_JOB_STORES", dict(registry._JOB_STORES))
    monkeypatch.setattr(registry, "_IDEMPOTENCY_STORES", dict(registry._IDEMPOTENCY_STORES))


class DictJobStore:
    """A user's own job store: a dict (no expiry), keeping the JobStore rules."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.closed = 0

    async def begin(self, key: str, record: JobRecord, ttl: float) -> JobRecord | None:
        """Keep `record` unless the key holds one (no await between check and set)."""
        held = self.records.get(key)
        if held is None:
            self.records[key] = record
        return held

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """The first finished record wins; another owner's running record stays."""
        held = self.records.get(key)
        if held is None or (not held.finished and held.owner == record.owner):
            self.records[key] = record
            return record
        return held

    async def get(self, key: str) -> JobRecord | None:
        """The record, if any."""
        return self.records.get(key)

    async def close(self) -> None:
        """Count the closes."""
        self.closed += 1


class Num(Model):
    """A number."""

    n: int


def test_a_registered_scheme_is_what_the_from_url_functions_return() -> None:
    """Each factory is called with the whole URL and its store is returned, per kind."""
    urls: list[str] = []
    jobs, keys = DictJobStore(), MemoryStore()

    def make_jobs(url: str) -> JobStore:
        urls.append(url)
        return jobs

    def make_keys(url: str) -> IdempotencyStore:
        urls.append(url)
        return keys

    register_store("dict", jobs=make_jobs, idempotency=make_keys)
    assert job_store_from_url("dict://host/jobs") is jobs
    assert idempotency_store_from_url("dict://host/keys") is keys
    assert urls == ["dict://host/jobs", "dict://host/keys"]


async def test_a_submit_records_its_job_in_a_registered_store() -> None:
    """On the in-memory broker, settings naming a registered scheme put the job's record in
    that store, and the App's idempotency store is the registered one too."""
    shared, keys = DictJobStore(), MemoryStore()
    register_store("dict", jobs=lambda url: shared, idempotency=lambda url: keys)
    double = Service("double")

    @double.operation()
    async def twice(req: Num) -> Num:
        """Twice n."""
        return Num(n=2 * req.n)

    async with serve(
        double, backend="memory", job_store_url="dict://", idempotency_url="dict://"
    ) as served:
        assert (served.app.jobs, served.app.store) == (shared, keys)
        job = await served.client.submit("double.twice", {"n": 4})
        assert await job.result(timeout=5) == {"n": 8}
        record = shared.records[served.client.names.job_key(job.id)]
        assert (record.state, record.route, record.body) == (
            JobState.COMPLETED,
            "double.twice",
            b'{"n":8}',
        )
        assert await served.client.job(job.id).result(timeout=1) == {"n": 8}  # read there too
    assert shared.closed >= 1


def test_an_unknown_scheme_is_a_config_error_naming_the_registered_ones() -> None:
    """An unregistered scheme (or one registered for the other kind only) is a ConfigError that
    names the setting, the scheme and the schemes registered for that kind."""
    register_store("dict", jobs=lambda url: DictJobStore())
    with pytest.raises(ConfigError) as jobs_error:
        job_store_from_url("etcd://x")
    assert str(jobs_error.value) == (
        "BURROW_JOB_STORE_URL: unsupported store 'etcd'"
        " (registered: dict, memory, redis, rediss, sqlite, unix)"
    )
    with pytest.raises(ConfigError) as keys_error:
        idempotency_store_from_url("sqlite://")
    assert str(keys_error.value) == (
        "BURROW_IDEMPOTENCY_URL: unsupported store 'sqlite'"
        " (registered: memory, redis, rediss, unix)"
    )
    with pytest.raises(ConfigError, match="unsupported store 'memory'"):
        job_store_from_url("memory:")  # a scheme without `//` names no store


def test_a_scheme_registered_twice_is_refused() -> None:
    """A second factory for a scheme and kind (a built-in one included) is a ValueError and
    changes nothing; a kind the scheme lacks can still be added."""
    first = DictJobStore()
    register_store("dict", jobs=lambda url: first)
    with pytest.raises(ValueError, match="'dict' is already registered for jobs"):
        register_store(
            "dict", jobs=lambda url: DictJobStore(), idempotency=lambda url: MemoryStore()
        )
    with pytest.raises(ValueError, match="'memory' is already registered for jobs and idemp"):
        register_store("memory", jobs=lambda url: first, idempotency=lambda url: MemoryStore())
    assert job_store_from_url("dict://") is first
    assert isinstance(job_store_from_url("memory://"), MemoryJobStore)
    with pytest.raises(ConfigError):
        idempotency_store_from_url("dict://")  # the refused call registered no half of itself
    register_store("sqlite", idempotency=lambda url: MemoryStore())
    assert isinstance(idempotency_store_from_url("sqlite://"), MemoryStore)


@pytest.mark.parametrize("scheme", ["", "Dict", "dict://", "1dict", "di ct"])
def test_a_scheme_must_be_a_lowercase_url_scheme(scheme: str) -> None:
    """A scheme that could not start a URL the lookup matches is refused at registration."""
    with pytest.raises(ValueError, match="store scheme"):
        register_store(scheme, jobs=lambda url: DictJobStore())


def test_a_registration_names_a_factory() -> None:
    """register_store with neither jobs= nor idempotency= is refused."""
    with pytest.raises(ValueError, match="give jobs=, idempotency= or both"):
        register_store("dict")
