"""Retries: retryable failures of async work wait in holding queues, then park in the DLQ."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from service import Client, Model, Service, Unavailable
from tests.conftest import AppFactory


class Job(Model):
    """A unit of async work."""

    n: int


def _flaky_service(
    fail_times: int, seen: list[int], done: asyncio.Event, retries: int = 3
) -> Service:
    svc = Service("flaky")

    @svc.operation(retries=retries)
    async def work(req: Job) -> Job:
        seen.append(req.n)
        if len(seen) <= fail_times:
            raise Unavailable("database away")
        done.set()
        return req

    return svc


async def test_retryable_cast_is_retried_until_it_succeeds(
    start_app: AppFactory, client: Client
) -> None:
    """A cast failing twice with a retryable error succeeds on the third attempt."""
    seen: list[int] = []
    done = asyncio.Event()
    await start_app(_flaky_service(2, seen, done), retry_base_delay=0.05)
    await client.cast("flaky.work", {"n": 7})
    await asyncio.wait_for(done.wait(), 10)
    assert seen == [7, 7, 7]


@pytest.mark.parametrize("retries", [2, 3])
async def test_exhausted_retries_park_in_the_dlq_with_reason_and_attempts(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    retries: int,
) -> None:
    """After `retries` retries (retries + 1 runs, on every broker) the message lands in the
    DLQ with reason and attempt count."""
    seen: list[int] = []
    app = await start_app(
        _flaky_service(100, seen, asyncio.Event(), retries), retry_base_delay=0.05
    )
    await client.cast("flaky.work", {"n": 1})
    dlq = await amqp_channel.declare_queue(f"{app.settings.namespace}.flaky.dlq", passive=True)
    message = None
    for _ in range(200):
        message = await dlq.get(no_ack=True, fail=False)
        if message is not None:
            break
        await asyncio.sleep(0.05)
    assert message is not None
    assert message.headers["x-burrow-dead-reason"] == "retries_exhausted"
    assert (
        f'"attempts":{retries + 1}'.encode() in str(message.headers["x-burrow-dead-error"]).encode()
    )
    assert message.headers["x-burrow-attempt"] == retries
    assert seen == [1] * (retries + 1)
