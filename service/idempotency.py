"""Idempotency stores: a handler runs once per key; duplicates get the stored answer.

A key is *claimed* before its handler runs (a lease, so a crashed owner does not hold it for
ever), *completed* with the answer afterwards, or *released* when the handler failed. Two copies
of one message arriving at once (a publisher's retry after an unknown outcome, two instances)
therefore run the handler once: the second copy waits for the first and gets its answer.

`memory://` keeps keys in this process (one instance); `redis://host:port/db` shares them
across every instance of a service — Redis because SET-if-absent-with-expiry is exactly the
claim, it is fast enough for the per-message path, and it expires keys itself.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

from service.errors import ConfigError, Unavailable
from service.expiring import ExpiringMap

__all__ = ["Claim", "IdempotencyStore", "MemoryStore", "RedisStore", "store_from_url"]

# Stored values: DONE + answer once completed, PENDING + owner token while claimed.
_DONE, _PENDING = b"\x01", b"\x00"


@dataclass(frozen=True, slots=True)
class Claim:
    """The state of a key after `claim`: `mine` (run the handler), `done` (answer stored) or
    `busy` (another copy holds the lease: wait and claim again)."""

    state: Literal["mine", "done", "busy"]
    answer: bytes | None = None
    token: bytes = b""


def _read(value: bytes | None) -> Claim | None:
    if value is None:
        return None
    if value.startswith(_DONE):
        return Claim("done", value[1:])
    return Claim("busy")


class IdempotencyStore(Protocol):
    """Where claims and completed keys (with their answers) are kept."""

    async def claim(self, key: str, lease: float) -> Claim:
        """Claim `key` for `lease` seconds unless it is completed or claimed by someone else."""
        ...

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """Record that `key` completed with `answer`, kept `ttl` seconds."""
        ...

    async def release(self, claim: Claim, key: str) -> None:
        """Drop our claim (the handler failed), so a retry can run it."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The stored answer for `key`, or None if it was never completed (or expired)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """Keys in this process only, bounded to `max_keys` (oldest dropped first)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._items: ExpiringMap[bytes] = ExpiringMap(max_keys)

    async def claim(self, key: str, lease: float) -> Claim:
        """Atomic within the event loop: no await between the check and the set."""
        known = _read(self._items.get(key))
        if known is not None:
            return known
        token = secrets.token_bytes(8)
        self._items.set(key, _PENDING + token, lease)
        return Claim("mine", token=token)

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """Store, evicting the oldest keys beyond the bound."""
        self._items.set(key, _DONE + answer, ttl)

    async def release(self, claim: Claim, key: str) -> None:
        """Drop the claim if it is still ours."""
        if self._items.get(key) == _PENDING + claim.token:
            self._items.pop(key)

    async def get(self, key: str) -> bytes | None:
        """The stored answer, if completed and not expired."""
        known = _read(self._items.get(key))
        return known.answer if known is not None and known.state == "done" else None

    async def close(self) -> None:
        """Nothing to release."""


# Delete the key only if it still holds our claim (compare-and-delete in one step).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


class RedisStore:
    """Keys in Redis, shared by every instance; Redis expires them. An outage of Redis is a
    retryable UNAVAILABLE: the message is retried rather than run without the guarantee."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as redis  # noqa: PLC0415 - optional dependency
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError(
                "BURROW_IDEMPOTENCY_URL=redis://… needs `pip install redis`"
            ) from None
        self._redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def claim(self, key: str, lease: float) -> Claim:
        """SET NX with the lease as expiry; if taken, read who has it."""
        token = secrets.token_bytes(8)
        try:
            if await self._redis.set(key, _PENDING + token, px=_ms(lease), nx=True):
                return Claim("mine", token=token)
            known = _read(_bytes(await self._redis.get(key)))
        except Exception as exc:  # redis raises many types; all mean "not now"
            raise _unavailable(exc) from None
        return known or Claim("busy")  # expired between the two steps: claim again later

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """SET with expiry."""
        try:
            await self._redis.set(key, _DONE + answer, px=_ms(ttl))
        except Exception as exc:
            raise _unavailable(exc) from None

    async def release(self, claim: Claim, key: str) -> None:
        """Compare-and-delete; the lease expires anyway if Redis cannot be reached."""
        try:
            await self._redis.eval(_RELEASE, 1, key, _PENDING + claim.token)
        except Exception as exc:
            raise _unavailable(exc) from None

    async def get(self, key: str) -> bytes | None:
        """The stored answer, if completed."""
        try:
            known = _read(_bytes(await self._redis.get(key)))
        except Exception as exc:
            raise _unavailable(exc) from None
        return known.answer if known is not None and known.state == "done" else None

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _unavailable(exc: Exception) -> Unavailable:
    return Unavailable(f"idempotency store unavailable ({type(exc).__name__})")


def store_from_url(url: str) -> IdempotencyStore:
    """`memory://` or `redis://…` (also `rediss://` for TLS)."""
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    raise ConfigError(f"BURROW_IDEMPOTENCY_URL: unsupported store {url.split(':', 1)[0]!r}")
