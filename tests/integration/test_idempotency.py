"""Idempotency: a duplicate delivery (same message id) does not repeat the side effect."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from service import Client, Model, Service
from service.idempotency import MemoryStore, RedisStore, store_from_url
from tests.conftest import AppFactory


class Charge(Model):
    """Charge an account."""

    account: str
    cents: int


def _billing(charged: list[str], settled: asyncio.Event, expected: int) -> Service:
    svc = Service("billing")

    @svc.operation(idempotent=True)
    async def charge(req: Charge) -> Charge:
        charged.append(req.account)
        if len(charged) >= expected:
            settled.set()
        return req

    return svc


async def _publish_twice(
    channel: aio_pika.abc.AbstractChannel, namespace: str, message_id: str
) -> None:
    exchange = await channel.get_exchange(f"{namespace}.commands")
    for _ in range(2):
        await exchange.publish(
            aio_pika.Message(
                b'{"account": "a1", "cents": 100}',
                content_type="application/json",
                message_id=message_id,
                type="billing.charge",
                headers={"x-burrow-kind": "cast"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="billing.charge",
        )


async def test_same_message_id_twice_is_processed_once(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, client: Client
) -> None:
    """C9: the second cast with the same message id is acked without a second charge."""
    charged: list[str] = []
    settled = asyncio.Event()
    app = await start_app(_billing(charged, settled, 1))
    await _publish_twice(amqp_channel, app.settings.namespace, uuid.uuid4().hex)
    await asyncio.wait_for(settled.wait(), 5)
    # A later, distinct cast proves the duplicate was consumed (queues are FIFO per consumer).
    await client.cast("billing.charge", {"account": "b2", "cents": 1})
    for _ in range(100):
        if len(charged) == 2:
            break
        await asyncio.sleep(0.02)
    assert charged == ["a1", "b2"]


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
