"""Idempotency stores on Redis: shared between instances.

The in-process store and the choice by URL are tested in tests/unit/test_idempotency.py; the
duplicate-delivery scenario itself (C9) is in tests/faults/test_bad_input.py.
"""

from __future__ import annotations

import asyncio
import uuid

from service._stores.redis import RedisStore
from service._stores.registry import idempotency_store_from_url


async def test_redis_store_is_shared_between_instances() -> None:
    """Two RedisStores (two instances) see each other's completed keys; keys expire."""
    key = f"burrow-test:{uuid.uuid4().hex}"
    first, second = (
        idempotency_store_from_url("redis://127.0.0.1:6379/0"),
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
