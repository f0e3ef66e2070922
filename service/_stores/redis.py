"""The Redis stores (`redis://host:port/db`, `rediss://…` for TLS, `unix://…`): job records and
idempotency keys shared by every instance on any machine.

Redis because SET-if-absent-with-expiry is exactly a claim (and a job's `begin`), a short
script makes "first finished record wins" one atomic step, it is fast enough for the
per-message path, and it expires keys itself. An outage of Redis is a retryable UNAVAILABLE.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, overload

from service._protocol.errors import ConfigError, Unavailable
from service._protocol.jobs import JobRecord
from service._stores.base import Claim, done_value, pending_value, read_claim

if TYPE_CHECKING:
    from redis.asyncio import Redis


def _client(url: str, setting: str) -> Redis:
    """A client of the Redis at `url`; ConfigError naming `setting` when redis is not installed."""
    try:
        import redis.asyncio as redis  # noqa: PLC0415 - optional dependency
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError(f"{setting}=redis://… needs `pip install redis`") from None
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


@overload
def _bytes(value: bytes | str) -> bytes: ...
@overload
def _bytes(value: None) -> None: ...
def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _unavailable(store: str, exc: Exception) -> Unavailable:
    return Unavailable(f"{store} unavailable ({type(exc).__name__})")


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
_JOBS = "job store"


class RedisJobStore:
    """Job records in Redis, shared by every instance on any machine; Redis expires them."""

    def __init__(self, url: str) -> None:
        self._redis = _client(url, "BURROW_JOB_STORE_URL")
        self._finish = self._redis.register_script(_FINISH)

    async def begin(self, key: str, record: JobRecord, ttl: float) -> JobRecord | None:
        """SET NX with expiry; if taken, read what is there."""
        try:
            if await self._redis.set(key, record.encode(), px=_ms(ttl), nx=True):
                return None
            held = await self._redis.get(key)
        except Exception as exc:  # redis raises many types; all mean "not now"
            raise _unavailable(_JOBS, exc) from None
        if held is None:  # expired between the two steps: ours now
            return await self.begin(key, record, ttl)
        return JobRecord.decode(_bytes(held)) or record

    async def finish(self, key: str, record: JobRecord, ttl: float) -> JobRecord:
        """The script above: the first finished record wins."""
        try:
            held = await self._finish(keys=[key], args=[record.encode(), record.owner, _ms(ttl)])
        except Exception as exc:
            raise _unavailable(_JOBS, exc) from None
        return JobRecord.decode(_bytes(held)) or record

    async def get(self, key: str) -> JobRecord | None:
        """GET."""
        try:
            held = await self._redis.get(key)
        except Exception as exc:
            raise _unavailable(_JOBS, exc) from None
        return None if held is None else JobRecord.decode(_bytes(held))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


# Delete the key only if it still holds our claim (compare-and-delete in one step).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
_KEYS = "idempotency store"


class RedisStore:
    """Idempotency keys in Redis, shared by every instance; Redis expires them. An outage of
    Redis is a retryable UNAVAILABLE: the message is retried rather than run without the
    guarantee."""

    def __init__(self, url: str) -> None:
        self._redis = _client(url, "BURROW_IDEMPOTENCY_URL")

    async def claim(self, key: str, lease: float) -> Claim:
        """SET NX with the lease as expiry; if taken, read who has it."""
        token = secrets.token_bytes(8)
        try:
            if await self._redis.set(key, pending_value(token), px=_ms(lease), nx=True):
                return Claim("mine", token=token)
            known = read_claim(_bytes(await self._redis.get(key)))
        except Exception as exc:  # redis raises many types; all mean "not now"
            raise _unavailable(_KEYS, exc) from None
        return known or Claim("busy")  # expired between the two steps: claim again later

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """SET with expiry."""
        try:
            await self._redis.set(key, done_value(answer), px=_ms(ttl))
        except Exception as exc:
            raise _unavailable(_KEYS, exc) from None

    async def release(self, claim: Claim, key: str) -> None:
        """Compare-and-delete; the lease expires anyway if Redis cannot be reached."""
        try:
            await self._redis.eval(_RELEASE, 1, key, pending_value(claim.token))
        except Exception as exc:
            raise _unavailable(_KEYS, exc) from None

    async def get(self, key: str) -> bytes | None:
        """The stored answer, if completed."""
        try:
            known = read_claim(_bytes(await self._redis.get(key)))
        except Exception as exc:
            raise _unavailable(_KEYS, exc) from None
        return known.answer if known is not None and known.state == "done" else None

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
