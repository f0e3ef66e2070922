"""The delay ladder on the real broker, declared when a delay first needs it (issue 26 item 7):
a fresh namespace with one service holds at most 12 queues, the first delayed cast declares
the 25 holding queues and arrives on time, a ladder deleted under a live client is declared
again, and a pre-provisioned broker (passive topology) works as before."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest

from service import Client, Context, Model, Service, Settings
from service._amqp.transport import AmqpLink
from service._protocol.topology import delay_ladder, service_topology
from service._protocol.vocabulary import LEVELS, Names
from tests.brokers import TEST_BROKER
from tests.conftest import AppFactory, ClientFactory
from tests.integration.test_async_support import Recorder

pytestmark = pytest.mark.slow

MAX_QUEUES = 12  # the bound: one service, no delayed message
LATE_BOUND = 1.5  # as test_async_later: TTL expiry and the forward, on a shared 2-core machine


class Tick(Model):
    """A command carrying a label."""

    label: str


def make_clock(recorder: Recorder) -> Service:
    """A fresh `clock` service whose `tick` records each label."""
    clock = Service("clock")

    async def tick(req: Tick, ctx: Context) -> Tick:
        """Record the label."""
        recorder.add(req.label)
        return req

    clock.add_operation(tick)
    return clock


async def broker_queues(namespace: str) -> list[str]:
    """The queues the broker holds for `namespace`, by its CLI."""
    return await asyncio.to_thread(TEST_BROKER.names, "list_queues", f"{namespace}.")


def ladder(names: Names) -> set[str]:
    """The names of the ladder's holding queues."""
    return {names.delay_queue(level) for level in range(LEVELS)}


async def test_one_service_holds_at_most_twelve_queues_until_a_delayed_cast(
    start_app: AppFactory, client: Client, namespace: str
) -> None:
    """A fresh namespace with one service holds 11 queues (≤ 12), none of the ladder; the
    first delayed cast declares the 25 holding queues and still arrives in [1 s, 1 s + bound)."""
    recorder = Recorder()
    await start_app(make_clock(recorder))
    names = Names(namespace)

    before = await broker_queues(namespace)
    assert len(before) == 11 <= MAX_QUEUES, before
    assert not ladder(names) & set(before)

    started = time.monotonic()
    await client.cast("clock.tick", {"label": "later"}, delay=1)
    await recorder.wait_for(1)
    elapsed = recorder.times[0] - started
    assert recorder.items == ["later"]
    assert 1.0 <= elapsed < 1.0 + LATE_BOUND

    after = await broker_queues(namespace)
    assert set(after) == set(before) | ladder(names)


async def test_ladder_deleted_under_a_live_client_is_declared_again(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
    namespace: str,
) -> None:
    """Queues and exchanges of the ladder deleted while the client stays connected: its next
    delayed cast is refused by the broker, declares the ladder again and arrives once."""
    recorder = Recorder()
    await start_app(make_clock(recorder))
    await client.cast("clock.tick", {"label": "first"}, delay=0.2)
    await recorder.wait_for(1)

    raw = await amqp_channel.get_underlay_channel()
    doomed = delay_ladder(settings)
    for queue in doomed.queues:
        await raw.queue_delete(queue.name)
    for exchange in doomed.exchanges:
        await raw.exchange_delete(exchange.name)
    assert not ladder(Names(namespace)) & set(await broker_queues(namespace))

    await client.cast("clock.tick", {"label": "again"}, delay=0.2)
    await recorder.wait_for(2)
    assert recorder.items == ["first", "again"]
    assert ladder(Names(namespace)) <= set(await broker_queues(namespace))
    await asyncio.sleep(0.5)  # an observation window: a second copy would arrive in it
    assert recorder.items == ["first", "again"]


async def test_passive_topology_finds_the_provisioned_ladder(
    start_app: AppFactory, make_client: ClientFactory, settings: Settings
) -> None:
    """On a broker provisioned from the definitions (the ladder included), a passive App and a
    passive client declare nothing and a delayed cast arrives."""
    recorder = Recorder()
    clock = make_clock(recorder)
    provisioner = AmqpLink("provision", settings, topology=service_topology(clock, settings))
    provisioner.start()
    try:
        await provisioner.wait_ready(30)
    finally:
        await provisioner.close()

    await start_app(clock, passive_topology=True)
    client = await make_client(passive_topology=True)
    await client.cast("clock.tick", {"label": "passive"}, delay=0.3)
    await recorder.wait_for(1)
    assert recorder.items == ["passive"]
