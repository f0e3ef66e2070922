"""submit over the real broker: the completion event, the job handle read from this and from
another connection, failed jobs as structured errors, unknown jobs, and callback routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from service import Client, InvalidArgument, Model, NotFound, Service, Unroutable
from service._protocol.vocabulary import H_JOB_ID, H_STATUS
from tests.brokers import TEST_BROKER
from tests.conftest import AppFactory, ClientFactory
from tests.integration.test_async_support import EventTap, Recorder, body_json


class Number(Model):
    """A number to work on."""

    x: int


class Squared(Model):
    """Its square."""

    square: int


def make_work(recorder: Recorder) -> Service:
    """A fresh `work` service: `square` succeeds, `refuse` rejects negative numbers."""
    work = Service("work")

    async def square(req: Number) -> Squared:
        """Square x."""
        recorder.add(req.x)
        return Squared(square=req.x * req.x)

    async def refuse(req: Number) -> Squared:
        """Refuse negative numbers with INVALID_ARGUMENT."""
        recorder.add(req.x)
        if req.x < 0:
            raise InvalidArgument("x must not be negative", details={"field": "x"})
        return Squared(square=req.x * req.x)

    work.add_operation(square)
    work.add_operation(refuse)
    return work


async def test_submit_completion_event_and_job_result(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A submitted job announces `work.square.completed` with its id and result; result() agrees."""
    recorder = Recorder()
    await start_app(make_work(recorder))
    tap = await EventTap(amqp_channel, namespace).start("work.#")

    job = await client.submit("work.square", {"x": 7})

    event = await tap.next()
    assert event.routing_key == "work.square.completed"
    assert event.headers[H_JOB_ID] == job.id
    assert event.headers[H_STATUS] == "ok"
    assert body_json(event) == {"square": 49}
    assert await job.result(timeout=10) == {"square": 49}
    assert recorder.items == [7]


async def test_job_result_from_another_connection_reads_twice(
    start_app: AppFactory, make_client: ClientFactory
) -> None:
    """Another Client, knowing only the job id, reads the same result, and can read it again."""
    await start_app(make_work(Recorder()))
    submitter, other = await make_client(), await make_client()

    job = await submitter.submit("work.square", {"x": 3})
    assert await job.result(timeout=10) == {"square": 9}

    handle = other.job(job.id)
    assert await handle.result(timeout=10) == {"square": 9}
    assert await handle.result(timeout=10) == {"square": 9}
    assert await job.result(timeout=10) == {"square": 9}


async def test_failed_job_announces_failed_and_raises(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A handler raising InvalidArgument yields `.failed` with the error; result() raises it."""
    await start_app(make_work(Recorder()))
    tap = await EventTap(amqp_channel, namespace).start("work.#")

    job = await client.submit("work.refuse", {"x": -1})

    event = await tap.next()
    assert event.routing_key == "work.refuse.failed"
    assert event.headers[H_JOB_ID] == job.id
    assert event.headers[H_STATUS] == "error"
    assert body_json(event) == {
        "code": "INVALID_ARGUMENT",
        "message": "x must not be negative",
        "details": {"field": "x"},
        "retryable": False,
    }
    with pytest.raises(InvalidArgument) as raised:
        await job.result(timeout=10)
    assert raised.value.details == {"field": "x"}


async def test_unknown_job_id_is_not_found(start_app: AppFactory, client: Client) -> None:
    """Asking for a job nobody submitted raises NotFound at once."""
    await start_app(make_work(Recorder()))
    with pytest.raises(NotFound):
        await client.job("no-such-job").result(timeout=5)


async def test_malformed_job_id_is_refused(client: Client) -> None:
    """A job id that could not name a queue is refused locally with InvalidArgument."""
    with pytest.raises(InvalidArgument):
        client.job("../../etc")


async def test_callback_route_receives_completion(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A submit naming a callback route also publishes its completion under that key."""
    await start_app(make_work(Recorder()))
    tap = await EventTap(amqp_channel, namespace).start("my.callback.key")

    job = await client.submit("work.square", {"x": 4}, callback="my.callback.key")

    event = await tap.next()
    assert event.routing_key == "my.callback.key"
    assert event.headers[H_JOB_ID] == job.id
    assert event.headers[H_STATUS] == "ok"
    assert body_json(event) == {"square": 16}
    assert await job.result(timeout=10) == {"square": 16}


async def test_callback_must_be_a_routing_key(start_app: AppFactory, client: Client) -> None:
    """A callback with wildcards is refused before anything is published."""
    recorder = Recorder()
    await start_app(make_work(recorder))
    with pytest.raises(ValueError, match="routing key"):
        await client.submit("work.square", {"x": 1}, callback="my.#")
    assert recorder.items == []


async def test_unroutable_submit_is_refused_and_forgotten(
    start_app: AppFactory, client: Client
) -> None:
    """A submit no service takes raises Unroutable; no job is left waiting for a push."""
    await start_app(make_work(Recorder()))
    with pytest.raises(Unroutable):
        await client.submit("nowhere.square", {"x": 1})
    assert len(client.rpc.awaiting) == 0


def _queues(namespace: str) -> set[str]:
    return set(TEST_BROKER.names("list_queues", namespace + "."))


async def test_500_jobs_declare_no_queue(
    start_app: AppFactory, client: Client, namespace: str
) -> None:
    """500 submits (64 in flight) all complete, and the broker holds exactly the queues it
    held before: none per job."""
    await start_app(make_work(Recorder()))
    before = await asyncio.to_thread(_queues, namespace)
    window = asyncio.Semaphore(64)

    async def one(x: int) -> Any:
        async with window:
            job = await client.submit("work.square", {"x": x})
        return await job.result(timeout=60)

    results = await asyncio.gather(*(one(x) for x in range(500)))
    assert results == [{"square": x * x} for x in range(500)]
    assert await asyncio.to_thread(_queues, namespace) == before
    assert before  # the service's own queues were seen: the count is real
