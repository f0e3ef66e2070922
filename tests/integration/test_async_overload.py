"""Overload over the real broker: a full bounded request queue answers a call with QueueFull at
once, and `call(..., fallback_to_submit=True)` completes through the commands queue instead.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aio_pika
import pytest

from service import Client, Context, Model, QueueFull, ResourceExhausted, Service
from service._protocol.vocabulary import Names
from tests.conftest import AppFactory
from tests.integration.test_async_support import Recorder, queue_depth


class Job(Model):
    """Some work, labelled."""

    label: str


class Finished(Model):
    """The label of the finished work."""

    label: str


@dataclass
class Gate:
    """A `busy` service whose handler holds every request until the test opens the gate."""

    service: Service
    recorder: Recorder = field(default_factory=Recorder)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def make_busy() -> Gate:
    """A fresh `busy` service with its gate."""
    gate = Gate(Service("busy"))

    async def hold(req: Job, ctx: Context) -> Finished:
        """Record the request and how it arrived, then wait for the gate."""
        gate.recorder.add((req.label, ctx.headers.get("x-burrow-kind")))
        await gate.release.wait()
        return Finished(label=req.label)

    gate.service.add_operation(hold)
    return gate


async def fill(
    client: Client, channel: aio_pika.abc.AbstractChannel, queue: str
) -> list[asyncio.Task[object]]:
    """Queue calls to `busy.hold` until the broker refuses one; the accepted calls' tasks."""
    accepted: list[asyncio.Task[object]] = []
    for i in range(5):
        task = asyncio.create_task(client.call("busy.hold", {"label": f"queued{i}"}, timeout=30))
        async with asyncio.timeout(10):
            # A queued message has no event to await; a nack ends the task. Poll, bounded.
            while not task.done() and await queue_depth(channel, queue) <= i:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        if task.done():
            with pytest.raises(QueueFull):
                await task
            return accepted
        accepted.append(task)
    raise AssertionError(f"{queue} accepted {len(accepted)} messages; it is not bounded")


async def test_full_queue_fails_fast_and_fallback_submits(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """With the request queue full a call fails with QueueFull at once; the fallback completes."""
    gate = make_busy()
    await start_app(gate.service, max_queue_length=1, prefetch=1)
    requests = Names(namespace).request_queue("busy")

    running = asyncio.create_task(client.call("busy.hold", {"label": "running"}, timeout=30))
    await gate.recorder.wait_for(1)
    queued = await fill(client, amqp_channel, requests)
    assert 1 <= len(queued) <= 2  # quorum queues on 3.10 take one message past x-max-length

    started = time.monotonic()
    with pytest.raises(QueueFull) as raised:
        await client.call("busy.hold", {"label": "refused"}, timeout=20)
    assert time.monotonic() - started < 1.0  # at once, not at the 20 s deadline
    assert isinstance(raised.value, ResourceExhausted)
    assert raised.value.retryable

    fallback = asyncio.create_task(
        # The overloads of Client.call omit fallback_to_submit (reported); the call itself is fine.
        client.call("busy.hold", {"label": "fallback"}, timeout=30, fallback_to_submit=True)
    )
    # The commands queue has its own consumer, so the submitted job starts while the gate holds.
    await gate.recorder.wait_for(2)
    assert gate.recorder.items[1] == ("fallback", "submit")
    assert not fallback.done()

    gate.release.set()
    async with asyncio.timeout(15):
        results = await asyncio.gather(running, fallback, *queued)
    assert results[:2] == [{"label": "running"}, {"label": "fallback"}]
    assert results[2:] == [{"label": f"queued{i}"} for i in range(len(queued))]
    kinds = sorted(kind for _, kind in gate.recorder.items)
    assert kinds == sorted(["call", "submit"] + ["call"] * len(queued))
