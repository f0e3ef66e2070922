"""H8: a second submit that reuses a job id in use cannot overwrite or redirect the result."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from service import Client, Model, Service
from service._protocol.codec import decode_json
from service._protocol.vocabulary import H_CALLBACK, H_DEAD_REASON, H_JOB_ID, H_KIND, Names
from tests.conftest import AppFactory

__all__: list[str] = []


class Number(Model):
    """A number to echo."""

    x: int


def _echo(release: asyncio.Event) -> Service:
    svc = Service("echo")

    async def slow(req: Number) -> Number:
        """Wait for the test, then echo x."""
        await release.wait()
        return req

    svc.add_operation(slow)
    return svc


async def _submit_raw(
    channel: aio_pika.abc.AbstractChannel, names: Names, job_id: str, body: bytes, **headers: str
) -> None:
    exchange = await channel.get_exchange(names.commands_exchange, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            message_id="attacker",
            headers={H_KIND: "submit", H_JOB_ID: job_id, **headers},
        ),
        routing_key="echo.slow",
        mandatory=True,
    )


async def _next_dead(
    channel: aio_pika.abc.AbstractChannel, names: Names
) -> aio_pika.abc.AbstractIncomingMessage:
    queue = await channel.declare_queue(names.dead_letter_queue("echo"), passive=True)
    for _ in range(200):
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise AssertionError("nothing dead-lettered")


@pytest.mark.parametrize("redirect", [False, True])
async def test_h8_reused_job_id_cannot_overwrite_or_redirect(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    redirect: bool,
) -> None:
    """A submit reusing a job id in use is parked (job_id_in_use); the victim gets its result."""
    names = Names(namespace)
    release = asyncio.Event()
    await start_app(_echo(release))
    job = await client.submit("echo.slow", {"x": 1})
    extra = {H_CALLBACK: "attacker.inbox"} if redirect else {}
    await _submit_raw(amqp_channel, names, job.id, b'{"x": 666}', **extra)
    dead = await _next_dead(amqp_channel, names)
    assert dead.headers[H_DEAD_REASON] == "job_id_in_use"
    assert dead.message_id == "attacker"
    release.set()
    assert await job.result(timeout=10) == {"x": 1}
    stored = await client.job(job.id, "echo.slow").status()  # the service's record of it
    assert stored.result == {"x": 1}


async def test_h8_redelivered_submit_still_owns_its_job(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """Two copies of one submit (same id, body, message id) both complete, with the one result:
    a redelivery is no attack."""
    names = Names(namespace)
    release = asyncio.Event()
    release.set()
    app = await start_app(_echo(release))
    job_queue = await amqp_channel.declare_queue(
        names.job_queue("job-dup"),
        durable=True,
        arguments={"x-queue-type": "classic", "x-expires": 60000},
    )
    for _ in range(2):
        await _submit_raw(amqp_channel, names, "job-dup", b'{"x": 5}')
    results = []
    for _ in range(200):
        message = await job_queue.get(no_ack=True, fail=False)
        if message is not None:
            results.append(decode_json(message.body))
            if len(results) == 2:
                break
        else:
            await asyncio.sleep(0.05)
    assert results == [{"x": 5}, {"x": 5}]
    assert app.health.ready
    await job_queue.delete(if_unused=False, if_empty=False)
