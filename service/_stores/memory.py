"""The in-process stores (`memory://`): job records and idempotency keys of this process only
(tests, the in-memory broker, a single instance), on one data structure, `ExpiringMap`."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Generic, TypeVar

from service._protocol.jobs import JobRecord
from service._stores.base import Claim, done_value, pending_value, read_claim

V = TypeVar("V")


class ExpiringMap(Generic[V]):
    """Values that expire `ttl` seconds after they were set, at most `max_keys` of them (the
    least recently set dropped first)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The live value, or None (an expired one is dropped on the way)."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        return item[1]

    def set(self, key: str, value: V, ttl: float) -> None:
        """Keep `value` for `ttl` seconds, evicting the oldest keys beyond the bound."""
        self._items[key] = (time.monotonic() + ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_keys:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        """Forget `key`."""
        self._items.pop(key, None)


def _resolve(held: JobRecord | None, record: JobRecord) -> JobRecord | None:
    """`finish`'s rule: the record to write, or None to keep `held`."""
    if held is None or (not held.finished and held.owner == record.owner):
        return record
    return None


class MemoryJobStore:
    """Job records in this process only, bounded to `max_keys` (oldest dropped first)."""

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


class MemoryStore:
    """Idempotency keys in this process only, bounded to `max_keys` (oldest dropped first)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._items: ExpiringMap[bytes] = ExpiringMap(max_keys)

    async def claim(self, key: str, lease: float) -> Claim:
        """Atomic within the event loop: no await between the check and the set."""
        known = read_claim(self._items.get(key))
        if known is not None:
            return known
        token = secrets.token_bytes(8)
        self._items.set(key, pending_value(token), lease)
        return Claim("mine", token=token)

    async def put(self, key: str, answer: bytes, ttl: float) -> None:
        """Store, evicting the oldest keys beyond the bound."""
        self._items.set(key, done_value(answer), ttl)

    async def release(self, claim: Claim, key: str) -> None:
        """Drop the claim if it is still ours."""
        if self._items.get(key) == pending_value(claim.token):
            self._items.pop(key)

    async def get(self, key: str) -> bytes | None:
        """The stored answer, if completed and not expired."""
        known = read_claim(self._items.get(key))
        return known.answer if known is not None and known.state == "done" else None

    async def close(self) -> None:
        """Nothing to release."""
