"""Idempotency stores: a handler runs once per key; duplicates get the stored answer.

`memory://` keeps keys in this process (one instance); `redis://host:port/db` shares them
across every instance of a service — Redis because its SET-with-expiry is exactly the
operation needed, it is fast enough for the per-message path, and it expires keys itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from service.errors import ConfigError, Unavailable

__all__ = ["IdempotencyStore", "MemoryStore", "RedisStore", "store_from_url"]


class IdempotencyStore(Protocol):
    """Where completed keys and their answers are kept for `ttl` seconds."""

    async def get(self, key: str) -> bytes | None:
        """The stored answer for `key`, or None if it was never completed (or expired)."""
        ...

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """Record that `key` completed with `answer`."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """Keys in this process only, bounded to `max_keys` (oldest dropped first)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        """The stored answer, if not expired."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        return item[1]

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """Store, evicting the oldest keys beyond the bound."""
        self._items[key] = (time.monotonic() + ttl, answer)
        self._items.move_to_end(key)
        while len(self._items) > self.max_keys:
            self._items.popitem(last=False)

    async def close(self) -> None:
        """Nothing to release."""


class RedisStore:
    """Keys in Redis, shared by every instance; Redis expires them."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as redis  # noqa: PLC0415 - optional dependency
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError(
                "BURROW_IDEMPOTENCY_URL=redis://… needs `pip install redis`"
            ) from None
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def get(self, key: str) -> bytes | None:
        """The stored answer; a Redis outage is a retryable UNAVAILABLE."""
        try:
            value = await self._redis.get(key)
        except Exception as exc:  # redis raises many types; all mean "not now"
            raise Unavailable(f"idempotency store unavailable ({type(exc).__name__})") from None
        if value is None:
            return None
        return value.encode() if isinstance(value, str) else bytes(value)

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """SET with expiry."""
        try:
            await self._redis.set(key, answer, px=max(1, int(ttl * 1000)))
        except Exception as exc:
            raise Unavailable(f"idempotency store unavailable ({type(exc).__name__})") from None

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def store_from_url(url: str) -> IdempotencyStore:
    """`memory://` or `redis://…` (also `rediss://` for TLS)."""
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    raise ConfigError(f"BURROW_IDEMPOTENCY_URL: unsupported store {url.split(':', 1)[0]!r}")
