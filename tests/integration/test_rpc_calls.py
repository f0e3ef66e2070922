"""Integration tests of calls on the real broker: errors, deadlines, stray replies (D1-D11).

The clocks here are the shared machine's: durations are compared with generous bounds, and
what the service did is proven by side-effect records and metrics, not by timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from pamqp.commands import Basic

from service import (
    Client,
    DeadlineExceeded,
    Internal,
    NotFound,
    ServiceError,
    Unavailable,
    Unroutable,
)
from service.codec import encode
from service.example import calc
from service.topology import Names
from tests.conftest import AMQP_URL, AppFactory, ClientFactory
from tests.integration.test_rpc_support import (
    DIRECT_REPLY_TO,
    H_STATUS,
    Collector,
    RawCaller,
    dead_reason,
    make_lab,
    queue_depth,
    raw_channel,
    sample,
    stop_and_count,
    wait_until,
)

__all__: list[str] = []

LATE = "burrow_rpc_late_replies_total"
HANDLED = "burrow_messages_handled_total"
SLACK = 1.5  # seconds of scheduling noise allowed on a shared 2-core machine


async def timed(call: Awaitable[Any]) -> tuple[BaseException | None, float]:
    """Await `call`; return what it raised (or None) and how long it took."""
    started = time.perf_counter()
    try:
        await call
    except Exception as exc:
        return exc, time.perf_counter() - started
    return None, time.perf_counter() - started


def counted(name: str, before: float, delta: float, **labels: str) -> Callable[[], bool]:
    """A predicate: the sample has grown by at least `delta` since `before`."""
    return lambda: sample(name, **labels) >= before + delta


async def test_unknown_operation_is_not_found_at_once(
    start_app: AppFactory, client: Client, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """D1: an unknown operation of a live service → NOT_FOUND long before the deadline, acked."""
    app = await start_app(calc)
    error, elapsed = await timed(client.call("calc.nope", {}, timeout=10))
    assert isinstance(error, NotFound)
    assert not isinstance(error, Unroutable)
    assert "calc.nope" in error.message
    assert elapsed < 1.0 + SLACK
    raw = await raw_channel(amqp_channel)
    assert (
        await stop_and_count(app, raw, Names(client.settings.namespace).request_queue("calc")) == 0
    )


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


async def test_unknown_operation_cast_dead_lettered(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    """D1: an unknown operation with nobody to answer is parked as `unknown_operation`."""
    app = await start_app(calc)
    names = Names(namespace)
    raw = await raw_channel(amqp_channel)
    dlq = await Collector().attach(raw, names.dead_letter_queue("calc"))
    await RawCaller(raw, namespace).publish("calc.nope", encode({}), reply_to=None)
    parked = await dlq.next()
    assert dead_reason(parked) == "unknown_operation"
    assert await stop_and_count(app, raw, names.request_queue("calc")) == 0


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


async def test_slow_handler_deadline_and_late_reply_counted(
    start_app: AppFactory, client: Client
) -> None:
    """D2: slow handler → DeadlineExceeded at the deadline, late reply counted."""
    lab = make_lab()
    await start_app(lab.service)
    late_before = sample(LATE)
    timeout = 1.0
    error, elapsed = await timed(
        client.call(lab.route("stubborn"), {"seconds": 30, "linger": 1.0}, timeout=timeout)
    )
    assert isinstance(error, DeadlineExceeded)
    assert error.retryable is True
    assert timeout * 0.9 <= elapsed < timeout + SLACK
    assert client.rpc.pending == {}
    async with asyncio.timeout(10):
        await lab.finished.wait()
    await wait_until(counted(LATE, late_before, 1))
    assert lab.calls == ["stubborn"]
    assert await client.call(lab.route("echo"), {"text": "after"}, timeout=5) == {"text": "after"}


async def test_expired_request_not_executed_and_counted(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    """D2: requests whose x-deadline has already passed are not executed, counted as expired."""
    lab = make_lab()
    app = await start_app(lab.service)
    labels = {"service": "lab", "operation": lab.route("echo"), "outcome": "expired"}
    before = sample(HANDLED, **labels)
    raw = await raw_channel(amqp_channel)
    caller = await RawCaller(raw, namespace).start()
    body = encode({"text": "too late"})
    await caller.publish(lab.route("echo"), body, deadline_in=-1.0, reply_to=None)
    await caller.publish(lab.route("echo"), body, deadline_in=-1.0)
    await wait_until(counted(HANDLED, before, 2, **labels))
    assert lab.calls == []
    assert await stop_and_count(app, raw, Names(namespace).request_queue("lab")) == 0
    assert lab.calls == []


async def test_caller_gone_before_reply(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """D3: the caller's connection closes before the reply: no crash, no loop, queue drains."""
    lab = make_lab()
    app = await start_app(lab.service)
    server = app.servers[0]
    connection = await aio_pika.connect(AMQP_URL)
    try:
        gone = await RawCaller(await raw_channel(await connection.channel()), namespace).start()
        await gone.publish(lab.route("gate"), encode({"text": "gone"}))
        async with asyncio.timeout(10):
            await lab.entered.wait()
    finally:
        await connection.close()
    lab.release.set()
    async with asyncio.timeout(10):
        await server.idle.wait()
    assert await client.call(lab.route("echo"), {"text": "after"}, timeout=5) == {"text": "after"}
    assert all(link.ready.is_set() for link in app.transport.links)
    raw = await raw_channel(amqp_channel)
    assert await stop_and_count(app, raw, Names(namespace).request_queue("lab")) == 0
    assert lab.calls == ["gone", "after"]


async def test_stray_replies_discarded_and_counted(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """D4/D5: unknown, missing and duplicate correlation ids are discarded, counted, harmless."""
    lab = make_lab()
    await start_app(lab.service)
    names = Names(namespace)
    raw = await raw_channel(amqp_channel)
    # A test-owned queue takes `spy.*` requests, so the client's reply_to can be read off one.
    spy = f"{namespace}.spy"
    await raw.queue_declare(spy, exclusive=True)
    await raw.queue_bind(spy, names.rpc_exchange, routing_key="spy.*")
    requests = await Collector().attach(raw, spy)
    call = asyncio.ensure_future(client.call("spy.ask", {"q": 1}, timeout=15))
    request = await requests.next()
    props = request.header.properties
    assert props.reply_to is not None
    assert props.reply_to.startswith(DIRECT_REPLY_TO + ".")
    assert props.correlation_id in client.rpc.pending

    async def reply(correlation_id: str | None, body: dict[str, Any]) -> None:
        await raw.basic_publish(
            encode(body),
            routing_key=props.reply_to or "",
            properties=Basic.Properties(
                content_type="application/json",
                correlation_id=correlation_id,
                headers={H_STATUS: "ok"},
            ),
        )

    before = sample(LATE)
    await reply("not-a-pending-call", {"answer": "unknown"})
    await reply(None, {"answer": "missing"})
    await wait_until(counted(LATE, before, 2))
    assert not call.done()
    assert list(client.rpc.pending) == [props.correlation_id]

    await reply(props.correlation_id, {"answer": "first"})
    async with asyncio.timeout(10):
        assert await call == {"answer": "first"}
    await reply(props.correlation_id, {"answer": "second"})
    await wait_until(counted(LATE, before, 3))
    assert client.rpc.pending == {}
    assert await client.call(lab.route("echo"), {"text": "still fine"}, timeout=5) == {
        "text": "still fine"
    }


@pytest.mark.slow
async def test_thousand_concurrent_calls_from_ten_clients_correlate(
    start_app: AppFactory, make_client: ClientFactory
) -> None:
    """D9: 1,000 concurrent calls over 10 clients each get their own reply; nothing leaks."""
    await start_app(calc)
    clients = [await make_client() for _ in range(10)]

    async def one(i: int) -> tuple[int, Any]:
        client = clients[i % len(clients)]
        return i, await client.call("calc.add", {"a": i, "b": 7 * i + 1}, timeout=60)

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert len(results) == 1000
    mismatched = [i for i, reply in results if reply != {"sum": 8 * i + 1}]
    assert mismatched == []
    for client in clients:
        assert client.rpc.pending == {}


async def test_handler_exception_is_internal_without_secrets(
    start_app: AppFactory, client: Client
) -> None:
    """D11: a handler raising Exception('secret /etc/path') → INTERNAL, no secret, no trace."""
    lab = make_lab()
    await start_app(lab.service)
    with pytest.raises(Internal) as info:
        await client.call(lab.route("boom"), {"text": "x"}, timeout=5)
    wire = str(info.value.to_wire())
    for leak in ("secret", "/etc/path", "Traceback", 'File "', ".py"):
        assert leak not in wire
    assert info.value.retryable is False
    assert lab.calls == ["x"]
    assert await client.call(lab.route("echo"), {"text": "ok"}, timeout=5) == {"text": "ok"}


async def test_down_service_deadline_then_request_never_runs(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A call to a stopped service ends at its deadline; on restart that request is not run."""
    lab = make_lab()
    first = await start_app(lab.service)
    await first.stop()
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
    assert await stop_and_count(second, raw, Names(namespace).request_queue("lab")) == 0
    assert lab.calls == ["fresh"]
    assert await queue_depth(raw, Names(namespace).request_queue("lab")) == 0


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
