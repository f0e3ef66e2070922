"""Idempotency stores without Redis or a broker: the in-process store is bounded, the store is
chosen by URL, and a claim's life (the check the Redis store runs too, in
tests/integration/test_idempotency_claims.py)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from service import ConfigError
from service._stores.base import IdempotencyStore
from service._stores.memory import MemoryStore
from service._stores.registry import idempotency_store_from_url

__all__: list[str] = []


async def test_memory_store_is_bounded() -> None:
    """The in-process store drops its oldest keys beyond its bound."""
    store = MemoryStore(max_keys=2)
    for key in ("a", "b", "c"):
        await store.put(key, b"x", ttl=60)
    assert await store.get("a") is None
    assert await store.get("c") == b"x"


def test_unknown_store_scheme_is_a_config_error() -> None:
    """BURROW_IDEMPOTENCY_URL with an unknown scheme fails clearly."""
    with pytest.raises(ConfigError, match="unsupported store"):
        idempotency_store_from_url("etcd://x")


async def check_claim_states_and_lease(store: IdempotencyStore) -> None:
    """claim -> mine, again -> busy, release by another token is ignored, put -> done; an
    unreleased claim expires with its lease. Closes `store`."""
    key, other = f"burrow-test:{uuid.uuid4().hex}", f"burrow-test:{uuid.uuid4().hex}"
    try:
        mine = await store.claim(key, lease=5)
        assert mine.state == "mine"
        assert (await store.claim(key, lease=5)).state == "busy"
        assert await store.get(key) is None
        stranger = await store.claim(other, lease=5)
        await store.release(stranger, key)  # not its key: ignored
        assert (await store.claim(key, lease=5)).state == "busy"
        await store.put(key, b'{"ok":1}', ttl=5)
        assert await store.claim(key, lease=5) == type(mine)("done", b'{"ok":1}')
        assert await store.get(key) == b'{"ok":1}'
        await store.release(mine, key)  # completed keys are not released
        assert await store.get(key) == b'{"ok":1}'
        assert (await store.claim(other, lease=5)).state == "busy"
        await store.release(stranger, other)
        assert (await store.claim(other, lease=0.2)).state == "mine"
        await asyncio.sleep(0.35)  # a lease runs out on the clock: there is no event to await
        assert (await store.claim(other, lease=5)).state == "mine"  # the lease ran out
    finally:
        await store.close()


async def test_memory_claim_states_and_lease() -> None:
    """The in-process store's claims: mine, busy, done, a stranger's release ignored, lease."""
    await check_claim_states_and_lease(MemoryStore())
