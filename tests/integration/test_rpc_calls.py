"""Integration tests of calls on the real broker that are not fault scenarios: undeployed
services, a deleted exchange, a stopped service, what a handler's Context carries.

The RPC scenarios of RELIABILITY.md (D1-D11) are in tests/faults/test_rpc.py. The clocks here
are the shared machine's: durations are compared with generous bounds, and what the service did
is proven by side-effect records, not by timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import AbstractChannel

from service import (
    Client,
    Context,
    DeadlineExceeded,
    Model,
    NotFound,
    Service,
    ServiceError,
    Unavailable,
    Unroutable,
)
from service._protocol.vocabulary import Names
from service.example import calc
from tests.conftest import AppFactory

__all__: list[str] = []

SLACK = 1.5  # seconds of scheduling noise allowed on a shared 2-core machine


class Text(Model):
    """A request or reply carrying some text."""

    text: str


@dataclass
class Lab:
    """A small service whose handler records what ran, for tests that must prove a non-run."""

    service: Service
    calls: list[str] = field(default_factory=list)
    contexts: list[Context] = field(default_factory=list)

    def route(self, operation: str) -> str:
        """`<service>.<operation>`."""
        return f"{self.service.name}.{operation}"


def make_lab(name: str = "lab") -> Lab:
    """A fresh `lab` service with its own records (one per test)."""
    lab = Lab(Service(name))

    async def echo(req: Text, ctx: Context) -> Text:
        """Record and return the text."""
        lab.calls.append(req.text)
        lab.contexts.append(ctx)
        return req

    lab.service.add_operation(echo)
    return lab


async def raw_channel(channel: aio_pika.abc.AbstractChannel) -> AbstractChannel:
    """The aiormq channel under an aio-pika channel."""
    return await channel.get_underlay_channel()


async def queue_depth(raw: AbstractChannel, queue: str) -> int:
    """Ready messages in `queue` (passive declare: never creates it)."""
    declared = await raw.queue_declare(queue, passive=True)
    assert declared is not None
    return int(declared.message_count or 0)


async def timed(call: Awaitable[Any]) -> tuple[BaseException | None, float]:
    """Await `call`; return what it raised (or None) and how long it took."""
    started = time.perf_counter()
    try:
        await call
    except Exception as exc:
        return exc, time.perf_counter() - started
    return None, time.perf_counter() - started


async def test_undeployed_service_is_unroutable_at_once(
    start_app: AppFactory, client: Client
) -> None:
    """A call to a service never deployed (`ghost.op`) → Unroutable (NOT_FOUND) within a second."""
    await start_app(calc)
    error, elapsed = await timed(client.call("ghost.op", {}, timeout=10))
    assert isinstance(error, Unroutable)
    assert isinstance(error, NotFound)
    assert elapsed < 1.0 + SLACK
    assert client.rpc.pending == {}
    assert await client.call("calc.add", {"a": 1, "b": 1}, timeout=5) == {"sum": 2}


async def test_undeployed_service_in_empty_namespace_is_not_found(
    start_app: AppFactory, client: Client
) -> None:
    """With nothing deployed in the namespace yet, `ghost.op` is NOT_FOUND at once, twice."""
    for _ in range(2):
        error, elapsed = await timed(client.call("ghost.op", {}, timeout=5))
        assert isinstance(error, NotFound), repr(error)
        assert elapsed < 1.0 + SLACK
    assert client.rpc.pending == {}
    await start_app(calc)
    assert await client.call("calc.add", {"a": 1, "b": 1}, timeout=5) == {"sum": 2}


async def test_calls_after_a_channel_error_raise_only_service_errors(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """After the broker closes the client's channel (exchange deleted), calls raise ServiceError."""
    await start_app(calc)
    assert await client.call("calc.add", {"a": 1, "b": 1}, timeout=5) == {"sum": 2}
    # An operator deletes the RPC exchange: the next publish closes the client's channel.
    await amqp_channel.exchange_delete(Names(namespace).rpc_exchange)
    seen: list[str] = []
    async with asyncio.timeout(30):  # bounds the link's reconnect, not a latency claim
        while True:
            error, _ = await timed(client.call("calc.add", {"a": 1, "b": 1}, timeout=2))
            seen.append(type(error).__name__)
            assert isinstance(error, ServiceError), seen
            if not isinstance(error, Unavailable):
                break  # recovered: the client re-declared the exchange; calc's binding is gone
    assert isinstance(error, Unroutable), seen
    assert client.rpc.pending == {}


async def queue_exists(raw: AbstractChannel, queue: str) -> bool:
    """Whether `queue` exists (asked on a throwaway channel: a miss closes it)."""
    probe = await raw.connection.channel()
    try:
        await probe.queue_declare(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not probe.is_closed:
            await probe.close()
    return True


async def test_stopped_service_is_unroutable_at_once_and_served_after_a_start(
    start_app: AppFactory, client: Client, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """A call to a service that ran and was stopped → Unroutable within a second (not at its
    deadline): the last instance out deleted its request queue; the next start declares it
    again and serves calls."""
    lab = make_lab()
    first = await start_app(lab.service)
    assert await client.call(lab.route("echo"), {"text": "up"}, timeout=5) == {"text": "up"}
    await first.stop()
    queue = Names(client.settings.namespace).request_queue("lab")
    assert not await queue_exists(await raw_channel(amqp_channel), queue)
    error, elapsed = await timed(client.call(lab.route("echo"), {"text": "down"}, timeout=10))
    assert isinstance(error, Unroutable), repr(error)
    assert elapsed < 1.0 + SLACK
    assert client.rpc.pending == {}

    await start_app(lab.service)
    assert await client.call(lab.route("echo"), {"text": "back"}, timeout=5) == {"text": "back"}
    assert lab.calls == ["up", "back"]


async def test_stopping_one_of_two_instances_keeps_calls_served(
    start_app: AppFactory, client: Client
) -> None:
    """With two instances, stopping one leaves the request queue (the other consumes it):
    calls are still answered; stopping the last makes them Unroutable."""
    lab = make_lab()
    first = await start_app(lab.service)
    second = await start_app(lab.service)
    await first.stop()
    for n in range(5):
        text = f"still {n}"
        assert await client.call(lab.route("echo"), {"text": text}, timeout=5) == {"text": text}
    await second.stop()
    error, elapsed = await timed(client.call(lab.route("echo"), {"text": "down"}, timeout=10))
    assert isinstance(error, Unroutable), repr(error)
    assert elapsed < 1.0 + SLACK


async def test_casts_keep_queueing_while_the_service_is_stopped(
    start_app: AppFactory, client: Client
) -> None:
    """A cast sent while the service is stopped is accepted (its commands queue stays) and
    runs once the service starts again."""
    lab = make_lab()
    first = await start_app(lab.service)
    await first.stop()
    await client.cast(lab.route("echo"), {"text": "queued"})
    await start_app(lab.service)
    for _ in range(200):
        if lab.calls:
            break
        await asyncio.sleep(0.05)
    assert lab.calls == ["queued"]


async def test_crashed_service_deadline_then_request_never_runs(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A service that died without stopping (its connection just closed, as on SIGKILL) leaves
    its request queue: a call then ends at its deadline; on restart that request is not run."""
    lab = make_lab()
    first = await start_app(lab.service)
    await first.transport.close()  # no graceful stop: the queue stays, nobody consumes it
    timeout = 1.0
    error, elapsed = await timed(
        client.call(lab.route("echo"), {"text": "while down"}, timeout=timeout)
    )
    assert isinstance(error, DeadlineExceeded)
    assert timeout * 0.9 <= elapsed < timeout + SLACK
    assert client.rpc.pending == {}

    second = await start_app(lab.service)
    assert await client.call(lab.route("echo"), {"text": "fresh"}, timeout=5) == {"text": "fresh"}
    raw = await raw_channel(amqp_channel)
    queue = Names(namespace).request_queue("lab")
    assert await queue_depth(raw, queue) == 0  # the expired request was dropped, not run
    await second.stop()
    assert lab.calls == ["fresh"]
    assert not await queue_exists(raw, queue)  # a graceful stop deletes it


async def test_context_carries_ids_and_deadline(start_app: AppFactory, client: Client) -> None:
    """A handler taking a Context sees the call's correlation id and a future deadline."""
    lab = make_lab()
    await start_app(lab.service)
    started = time.time()
    assert await client.call(lab.route("echo"), {"text": "ctx"}, timeout=5) == {"text": "ctx"}
    (ctx,) = lab.contexts
    assert ctx.operation == lab.route("echo")
    assert ctx.correlation_id is not None
    assert ctx.message_id == ctx.correlation_id
    assert ctx.deadline is not None
    assert started < ctx.deadline < started + 5 + SLACK
    assert ctx.headers.get("x-burrow-kind") == "call"
    assert ctx.redelivered is False
