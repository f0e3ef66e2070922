"""One registry of store URL schemes: which store `BURROW_JOB_STORE_URL` and
`BURROW_IDEMPOTENCY_URL` name.

A scheme maps, per kind, to a factory: a callable that takes the whole URL and returns the
store. The built-in schemes are registered at the end of this module through `register_store`,
the same call that adds a user's own store:

- `memory://`: both kinds, in this process only (tests, the in-memory broker);
- `sqlite://` (a file in the user's state directory) or `sqlite:///abs/path`: job records only,
  shared by every process on one machine and kept across restarts;
- `redis://host:port/db`, `rediss://…` (TLS), `unix://…`: both kinds, shared by every instance
  on any machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from service._protocol.errors import ConfigError
from service._stores.base import IdempotencyStore, JobStore
from service._stores.memory import MemoryJobStore, MemoryStore
from service._stores.redis import RedisJobStore, RedisStore
from service._stores.sqlite import SqliteJobStore, default_sqlite_path

JobStoreFactory = Callable[[str], JobStore]
IdempotencyStoreFactory = Callable[[str], IdempotencyStore]
F = TypeVar("F", JobStoreFactory, IdempotencyStoreFactory)

_JOB_STORES: dict[str, JobStoreFactory] = {}
_IDEMPOTENCY_STORES: dict[str, IdempotencyStoreFactory] = {}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def register_store(
    scheme: str,
    *,
    jobs: JobStoreFactory | None = None,
    idempotency: IdempotencyStoreFactory | None = None,
) -> None:
    """Make `scheme://…` name a job store (`jobs`), an idempotency store (`idempotency`), or
    both.

    Each factory is called with the whole URL, once per App or Client whose settings name it,
    and returns a store keeping the `JobStore` or `IdempotencyStore` contract. Register before
    the App or Client is made (at import time of the module defining the store).

    Raises:
        ValueError: `scheme` is not a lowercase URL scheme (`etcd`, `my+store`), neither
            factory is given, or `scheme` already has a factory of a kind given (a built-in one
            included). A scheme is registered once per kind, never silently replaced; nothing
            is registered when the call is refused.
    """
    if not _SCHEME.fullmatch(scheme):
        raise ValueError(
            f"store scheme {scheme!r}: a lowercase letter, then letters, digits, '+', '-' or '.'"
        )
    if jobs is None and idempotency is None:
        raise ValueError(f"register_store({scheme!r}): give jobs=, idempotency= or both")
    taken = [
        kind
        for kind, factory, table in (
            ("jobs", jobs, _JOB_STORES),
            ("idempotency", idempotency, _IDEMPOTENCY_STORES),
        )
        if factory is not None and scheme in table
    ]
    if taken:
        raise ValueError(f"store scheme {scheme!r} is already registered for {' and '.join(taken)}")
    if jobs is not None:
        _JOB_STORES[scheme] = jobs
    if idempotency is not None:
        _IDEMPOTENCY_STORES[scheme] = idempotency


def _factory(table: dict[str, F], url: str, setting: str) -> F:
    """The factory `url`'s scheme is registered with in `table`; ConfigError naming `setting`
    (and the registered schemes) when there is none."""
    scheme, separator, _ = url.partition("://")
    factory = table.get(scheme) if separator else None
    if factory is None:
        raise ConfigError(
            f"{setting}: unsupported store {url.split(':', 1)[0]!r}"
            f" (registered: {', '.join(sorted(table))})"
        )
    return factory


def job_store_from_url(url: str) -> JobStore:
    """The job store `url` (`BURROW_JOB_STORE_URL`) names, by its scheme."""
    return _factory(_JOB_STORES, url, "BURROW_JOB_STORE_URL")(url)


def idempotency_store_from_url(url: str) -> IdempotencyStore:
    """The idempotency store `url` (`BURROW_IDEMPOTENCY_URL`) names, by its scheme."""
    return _factory(_IDEMPOTENCY_STORES, url, "BURROW_IDEMPOTENCY_URL")(url)


def _memory_jobs(url: str) -> JobStore:
    """`memory://`: this process's job records."""
    return MemoryJobStore()


def _memory_keys(url: str) -> IdempotencyStore:
    """`memory://`: this process's idempotency keys."""
    return MemoryStore()


def _sqlite_jobs(url: str) -> JobStore:
    """`sqlite://` (the default file) or `sqlite:///abs/path`."""
    path = url.removeprefix("sqlite://")
    return SqliteJobStore(Path(path) if path else default_sqlite_path())


register_store("memory", jobs=_memory_jobs, idempotency=_memory_keys)
register_store("sqlite", jobs=_sqlite_jobs)
register_store("redis", jobs=RedisJobStore, idempotency=RedisStore)
register_store("rediss", jobs=RedisJobStore, idempotency=RedisStore)
register_store("unix", jobs=RedisJobStore, idempotency=RedisStore)
