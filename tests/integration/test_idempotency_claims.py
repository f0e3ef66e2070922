"""Idempotency claims: copies of one message arriving at once run the handler once."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika

from service import Model, Service
from service._protocol.errors import Unavailable
from service._protocol.vocabulary import Names
from service._stores.redis import RedisStore
from tests.conftest import AppFactory
from tests.integration.test_async_support import wait_until
from tests.unit.test_idempotency import check_claim_states_and_lease

REDIS_URL = "redis://127.0.0.1:6379/0"


class Job(Model):
    """A unit of work."""

    ref: str


def _slow_service(runs: list[str], done: list[str], fail_first: bool = False) -> Service:
    svc = Service("ledger")

    @svc.operation(idempotent=True, retries=3)
    async def book(req: Job) -> Job:
        runs.append(req.ref)
        if fail_first and len(runs) == 1:
            raise Unavailable("dependency down")
        await asyncio.sleep(0.4)  # long enough for the second copy to arrive meanwhile
        done.append(req.ref)
        return req

    return svc


async def _publish_copies(
    channel: aio_pika.abc.AbstractChannel, namespace: str, message_id: str, copies: int
) -> None:
    exchange = await channel.get_exchange(f"{namespace}.commands")
    for _ in range(copies):
        await exchange.publish(
            aio_pika.Message(
                b'{"ref": "r1"}',
                content_type="application/json",
                message_id=message_id,
                type="ledger.book",
                headers={"x-burrow-kind": "cast"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="ledger.book",
        )


async def _ready(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    """Messages waiting in `queue` (a passive declare: exact, unlike the management stats)."""
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def test_concurrent_copies_in_one_process_run_once(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """Three copies of one message dispatched together to one App: one run, all acked."""
    runs: list[str] = []
    done: list[str] = []
    app = await start_app(_slow_service(runs, done), prefetch=8)
    await _publish_copies(amqp_channel, app.settings.namespace, uuid.uuid4().hex, 3)
    await wait_until(lambda: done == ["r1"], 10)
    queue = Names(app.settings.namespace).commands_queue("ledger")
    assert await _ready(amqp_channel, queue) == 0
    await asyncio.sleep(0.5)  # a second run would have finished by now
    assert runs == ["r1"], runs


async def test_concurrent_copies_on_two_instances_run_once(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """Two Apps sharing a Redis store each receive a copy at once: one run in total."""
    runs: list[str] = []
    done: list[str] = []
    service = _slow_service(runs, done)
    first = await start_app(service, prefetch=1, idempotency_url=REDIS_URL)
    await start_app(service, prefetch=1, idempotency_url=REDIS_URL)
    await _publish_copies(amqp_channel, first.settings.namespace, uuid.uuid4().hex, 2)
    await wait_until(lambda: done == ["r1"], 10)
    await asyncio.sleep(0.5)
    assert runs == ["r1"], runs
    queue = Names(first.settings.namespace).commands_queue("ledger")
    assert await _ready(amqp_channel, queue) == 0


async def test_failed_run_releases_its_claim(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """A handler that failed retryably gives its key back: the retry runs it, once more."""
    runs: list[str] = []
    done: list[str] = []
    app = await start_app(_slow_service(runs, done, fail_first=True), retry_base_delay=0.05)
    await _publish_copies(amqp_channel, app.settings.namespace, uuid.uuid4().hex, 1)
    await wait_until(lambda: done == ["r1"], 10)
    assert runs == ["r1", "r1"]


async def test_redis_claim_states_and_lease() -> None:
    """The Redis store's claims behave as the in-process store's (tests/unit/test_idempotency.py):
    mine, busy, done, a stranger's release ignored, lease."""
    await check_claim_states_and_lease(RedisStore(REDIS_URL))
