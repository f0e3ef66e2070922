"""Idempotency stores: shared between instances, bounded, chosen by URL.

The duplicate-delivery scenario itself (C9) is in tests/faults/test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from service.idempotency import MemoryStore, RedisStore, store_from_url


async def test_redis_store_is_shared_between_instances() -> None:
    """Two RedisStores (two instances) see each other's completed keys; keys expire."""
    key = f"burrow-test:{uuid.uuid4().hex}"
    first, second = (
        store_from_url("redis://127.0.0.1:6379/0"),
        RedisStore("redis://127.0.0.1:6379/0"),
    )
    try:
        assert await second.get(key) is None
        await first.put(key, b'{"ok":true}', ttl=0.5)
        assert await second.get(key) == b'{"ok":true}'
        await asyncio.sleep(0.7)
        assert await second.get(key) is None
    finally:
        await first.close()
        await second.close()


async def test_memory_store_is_bounded() -> None:
    """The in-process store drops its oldest keys beyond its bound."""
    store = MemoryStore(max_keys=2)
    for key in ("a", "b", "c"):
        await store.put(key, b"x", ttl=60)
    assert await store.get("a") is None
    assert await store.get("c") == b"x"


def test_unknown_store_scheme_is_a_config_error() -> None:
    """BURROW_IDEMPOTENCY_URL with an unknown scheme fails clearly."""
    from service import ConfigError

    with pytest.raises(ConfigError, match="unsupported store"):
        store_from_url("etcd://x")
