"""Delivery later over the real broker: delayed casts, events and submits arrive no earlier
than asked and within a bound, and wait meanwhile in the durable queues of the delay ladder.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from service import Client, Context, Model, Service, Settings
from service._protocol.topology import delay_topology
from service._protocol.vocabulary import Names
from tests.conftest import AppFactory
from tests.integration.test_async_support import Recorder, ladder_depth, queue_depth

# How late a delayed message may arrive: TTL expiry is checked at the head of each holding
# queue and the forwarder republishes with a confirm, on a shared 2-core machine.
LATE_BOUND = 1.5

pytestmark = pytest.mark.slow


class Tick(Model):
    """A command or event carrying a label."""

    label: str


class Tock(Model):
    """The label, echoed."""

    label: str


def make_clock(recorder: Recorder) -> Service:
    """A fresh `clock` service: `tick` records commands, `on_tick` records `clock.*` events."""
    clock = Service("clock")

    async def tick(req: Tick, ctx: Context) -> Tock:
        """Record the command and how it arrived."""
        recorder.add(("tick", req.label, ctx.headers.get("x-burrow-kind")))
        return Tock(label=req.label)

    @clock.subscribe("clock.*", name="on_tick")
    async def on_tick(event: Tick) -> None:
        """Record the event."""
        recorder.add(("event", event.label, None))

    clock.add_operation(tick)
    return clock


async def test_delayed_cast_waits_in_ladder_then_arrives(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A cast 3 s ahead sits in the ladder, not the target queue, and runs in [3 s, 3 s + bound)."""
    recorder = Recorder()
    await start_app(make_clock(recorder))
    names = Names(namespace)

    started = time.monotonic()
    await client.cast("clock.tick", {"label": "later"}, delay=3)

    assert await ladder_depth(amqp_channel, namespace) == 1
    # An observation window, not a wait for an event: nothing may happen during it.
    await asyncio.sleep(1.0)
    assert recorder.items == []
    assert await queue_depth(amqp_channel, names.commands_queue("clock")) == 0
    assert await ladder_depth(amqp_channel, namespace) == 1

    await recorder.wait_for(1)
    elapsed = recorder.times[0] - started
    assert recorder.items == [("tick", "later", "cast")]
    assert elapsed >= 3.0
    assert elapsed < 3.0 + LATE_BOUND
    assert await ladder_depth(amqp_channel, namespace) == 0


async def test_ladder_queues_are_durable(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
) -> None:
    """Every holding queue of the ladder, declared by the first delayed cast, is durable with
    the documented arguments (re-declaring it so is accepted)."""
    recorder = Recorder()
    await start_app(make_clock(recorder))
    await client.cast("clock.tick", {"label": "declares"}, delay=0.1)
    await recorder.wait_for(1)
    raw = await amqp_channel.get_underlay_channel()
    queues = delay_topology(settings).queues
    assert len(queues) > 2
    for queue in queues:
        # A passive declare finds it (a missing queue closes the channel) and a non-passive
        # one with other durability or arguments would close the channel.
        await raw.queue_declare(queue.name, passive=True)
        await raw.queue_declare(queue.name, durable=True, arguments=queue.arguments)


async def test_delayed_event_arrives_after_delay(start_app: AppFactory, client: Client) -> None:
    """An event emitted with delay=1 reaches its subscriber in [1 s, 1 s + bound)."""
    recorder = Recorder()
    await start_app(make_clock(recorder))

    started = time.monotonic()
    assert await client.emit("clock.rang", {"label": "ding"}, delay=1) is True

    await recorder.wait_for(1)
    elapsed = recorder.times[0] - started
    assert recorder.items == [("event", "ding", None)]
    assert elapsed >= 1.0
    assert elapsed < 1.0 + LATE_BOUND


async def test_submit_at_runs_no_earlier_than_at(start_app: AppFactory, client: Client) -> None:
    """A submit with `at=` runs at or after that time, within the bound, and its job completes."""
    recorder = Recorder()
    await start_app(make_clock(recorder))
    at = datetime.now(UTC) + timedelta(seconds=2)

    job = await client.submit("clock.tick", {"label": "at"}, at=at)

    assert await job.result(timeout=15) == {"label": "at"}
    assert recorder.items == [("tick", "at", "submit")]
    assert recorder.wall[0] >= at.timestamp()
    assert recorder.wall[0] < at.timestamp() + LATE_BOUND


async def test_at_must_be_timezone_aware(client: Client) -> None:
    """A naive `at` is refused before anything is published."""
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.cast("clock.tick", {"label": "x"}, at=datetime.now())
