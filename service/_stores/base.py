"""What a store is: the two Protocols every job store and idempotency store keeps, and `Claim`.

A **job store** keeps one record per job id. A service records a job when it first reads its
submit (`begin`: *running*, with the digest of the submit that owns the id) and its outcome
before it publishes any completion (`finish`: *completed* or *failed*, with the body). The
first finished record wins: a redelivered or duplicated submit finds it and answers with it,
so a job never has two results, and a submit with another digest never touches it (the job id
is in use).

An **idempotency store** runs a handler once per key; duplicates get the stored answer. A key
is *claimed* before its handler runs (a lease, so a crashed owner does not hold it for ever),
*completed* with the answer afterwards (`put`), or *released* when the handler failed. Two
copies of one message arriving at once (a publisher's retry after an unknown outcome, two
instances) therefore run the handler once: the second copy waits for the first and gets its
answer.

Both kinds raise `Unavailable` when the store cannot be reached: the message is retried rather
than run without the guarantee, and a `result` call answers `UNAVAILABLE`. The built-in stores
are in `memory.py`, `sqlite.py` and `redis.py`; `registry.py` chooses one by its URL's scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from service._protocol.jobs import JobRecord


class JobStore(Protocol):
    """Where job records are kept; every method raises `Unavailable` when the store is away.

    `begin` and `finish` are each one atomic step for every process sharing the store (check
    and write, never a read and a later write another process can slip between): that is what
    makes the first finished record win.
    """

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


@dataclass(frozen=True, slots=True)
class Claim:
    """The state of a key after `claim`: `mine` (run the handler), `done` (answer stored) or
    `busy` (another copy holds the lease: wait and claim again)."""

    state: Literal["mine", "done", "busy"]
    answer: bytes | None = None
    token: bytes = b""


class IdempotencyStore(Protocol):
    """Where claims and completed keys (with their answers) are kept; every method raises
    `Unavailable` when the store is away.

    `claim` is one atomic step for every instance sharing the store (set-if-absent with the
    lease as expiry): two copies of a message never both get `mine`.
    """

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


# What the built-in idempotency stores keep under a key: DONE + answer once completed,
# PENDING + owner token while claimed.
_DONE, _PENDING = b"\x01", b"\x00"


def done_value(answer: bytes) -> bytes:
    """The stored value of a key completed with `answer`."""
    return _DONE + answer


def pending_value(token: bytes) -> bytes:
    """The stored value of a key claimed by the owner of `token`."""
    return _PENDING + token


def read_claim(value: bytes | None) -> Claim | None:
    """What a stored value says to a new claimer: None (nothing stored), `done` with the answer,
    or `busy` (someone holds the lease)."""
    if value is None:
        return None
    if value.startswith(_DONE):
        return Claim("done", value[1:])
    return Claim("busy")
