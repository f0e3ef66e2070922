"""The HTTP port of a running App: /metrics move with real traffic, /readyz follows the links.

Traffic goes through the real broker; metrics are read by scraping /metrics over HTTP.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiohttp
import pytest
from pamqp import commands as spec
from prometheus_client.parser import text_string_to_metric_families

from service import App, Client, Service
from service._amqp.transport import AmqpLink
from service._protocol.codec import Model
from service._protocol.errors import InvalidArgument, NotFound, ServiceError
from service._protocol.types import Outcome
from service._protocol.vocabulary import H_DEADLINE, H_KIND, Names
from service.example import calc
from tests.conftest import AppFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

gate = Service("gate", description="Holds a call until the test lets it go.")
_entered = asyncio.Event()
_release = asyncio.Event()


class HoldRequest(Model):
    """Nothing to say."""

    tag: str = ""


class HoldReply(Model):
    """Released."""

    tag: str


@gate.operation()
async def hold(req: HoldRequest) -> HoldReply:
    """Signal entry, then wait until released."""
    _entered.set()
    await _release.wait()
    return HoldReply(tag=req.tag)


async def http_get(app: App, path: str) -> tuple[int, str]:
    """GET a path of the app's HTTP port."""
    assert app.http is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.http.port}{path}") as response,
    ):
        return response.status, await response.text()


async def scrape(app: App) -> Samples:
    """Every sample /metrics exposes, keyed by name and labels."""
    status, text = await http_get(app, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing sample fails the test with its name."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exposed"
    return samples[key]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait (bounded) until `check` holds; for effects no event announces, like a scrape."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


async def _publish_raw(
    channel: aio_pika.abc.AbstractChannel, namespace: str, route: str, headers: dict[str, Any]
) -> None:
    exchange = await channel.get_exchange(f"{namespace}.rpc", ensure=False)
    await exchange.publish(
        aio_pika.Message(
            b'{"a": 1, "b": 2}',
            content_type="application/json",
            message_id=uuid.uuid4().hex,
            type=route,
            headers=headers,
        ),
        routing_key=route,
    )


async def test_metrics_move_with_traffic(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """Calls, errors, unknown operations, expired and dead-lettered messages show in /metrics."""
    _entered.clear()
    _release.clear()
    app = await start_app(calc, gate)
    before = await scrape(app)

    # Label sets known at start are exposed at zero before any traffic.
    for outcome in Outcome:
        value(before, "burrow_messages_handled_total", service="calc", operation="calc.add",
              outcome=outcome.value)  # fmt: skip
    for published in ("confirmed", "returned", "nacked", "timeout"):
        value(before, "burrow_messages_published_total", kind="request", outcome=published)
    value(before, "burrow_dead_lettered_total", service="calc", reason="unknown_operation")
    # Counters are process-wide: earlier tests may have reconnected; the delta is checked below.
    value(before, "burrow_amqp_reconnects_total", link="consumer")
    assert value(before, "burrow_amqp_connection_blocked", link="consumer") == 0
    assert value(before, "burrow_rpc_late_replies_total") >= 0

    for i in range(3):
        assert await client.call("calc.add", {"a": i, "b": 1}) == {"sum": i + 1}
    assert await client.call("calc.divide", {"a": 1, "b": 2}) == {"quotient": 0.5}
    with pytest.raises(InvalidArgument):
        await client.call("calc.divide", {"a": 1, "b": 0})
    with pytest.raises(NotFound):
        await client.call("calc.nope", {})
    with pytest.raises(ServiceError) as unroutable:
        await client.call("nosuch.op", {})

    # Hand-made requests: one past its deadline, one call nobody can be answered for.
    past = int((time.time() - 60) * 1000)
    await _publish_raw(amqp_channel, namespace, "calc.add", {H_DEADLINE: past, H_KIND: "call"})
    await _publish_raw(amqp_channel, namespace, "calc.divide", {H_KIND: "call"})

    # A call the caller abandons: its reply arrives late.
    call = asyncio.ensure_future(client.call("gate.hold", {"tag": "x"}, timeout=10))
    async with asyncio.timeout(10):
        await _entered.wait()
    during = await scrape(app)
    assert value(during, "burrow_handler_in_progress", service="gate") == 1
    assert value(during, "burrow_rpc_client_pending") == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    _release.set()

    async def settled() -> bool:
        now = await scrape(app)
        return (
            now[("burrow_rpc_late_replies_total", frozenset())]
            > before[("burrow_rpc_late_replies_total", frozenset())]
            and now[_key("burrow_dead_lettered_total", service="calc", reason="missing_reply_to")]
            > 0
            and now[
                _key(
                    "burrow_messages_handled_total",
                    service="calc",
                    operation="calc.add",
                    outcome="expired",
                )
            ]
            > 0
        )

    await eventually(settled)
    after = await scrape(app)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get(_key(name, **labels), 0.0)

    handled = "burrow_messages_handled_total"
    assert delta("burrow_messages_received_total", service="calc", operation="calc.add") == 4
    assert delta(handled, service="calc", operation="calc.add", outcome="ok") == 3
    assert delta(handled, service="calc", operation="calc.add", outcome="expired") == 1
    assert delta(handled, service="calc", operation="calc.divide", outcome="ok") == 1
    assert delta(handled, service="calc", operation="calc.divide", outcome="error") == 1
    assert delta(handled, service="calc", operation="calc.divide", outcome="dead_lettered") == 1
    assert delta(handled, service="calc", operation="unknown", outcome="rejected") == 1
    assert delta(handled, service="gate", operation="gate.hold", outcome="ok") == 1
    assert delta(handled, service="calc", operation="calc.add", outcome="retried") == 0
    assert delta("burrow_handler_duration_seconds_count", service="calc", operation="calc.add") == 4
    assert delta("burrow_handler_duration_seconds_sum", service="calc", operation="calc.add") > 0
    assert value(after, "burrow_handler_in_progress", service="gate") == 0
    assert delta("burrow_dead_lettered_total", service="calc", reason="missing_reply_to") == 1

    assert delta("burrow_messages_published_total", kind="request", outcome="confirmed") == 7
    assert delta("burrow_messages_published_total", kind="request", outcome="returned") == 1
    assert delta("burrow_messages_published_total", kind="reply", outcome="confirmed") == 7
    assert delta("burrow_messages_published_total", kind="dead_letter", outcome="confirmed") == 1
    assert delta("burrow_messages_published_total", kind="request", outcome="nacked") == 0

    calls = "burrow_rpc_client_calls_total"
    assert delta(calls, operation="calc.add", outcome="ok") == 3
    assert delta(calls, operation="calc.divide", outcome="INVALID_ARGUMENT") == 1
    assert delta(calls, operation="calc.nope", outcome="NOT_FOUND") == 1
    assert delta(calls, operation="nosuch.op", outcome=unroutable.value.code.value) == 1
    assert delta("burrow_rpc_client_duration_seconds_count", operation="calc.add") == 3
    assert value(after, "burrow_rpc_client_pending") == 0
    assert delta("burrow_rpc_late_replies_total") == 1

    consumer = app.transport.consumer
    assert value(after, "burrow_consumers_attached", link="consumer") == len(consumer.consumers)
    assert value(after, "burrow_consumers_attached", link="client") == 1
    assert delta("burrow_amqp_reconnects_total", link="consumer") == 0


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


async def test_readyz_follows_consumers(
    start_app: AppFactory, client: Client, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """/readyz is 503 while the request queue's consumer is gone and 200 once it is back."""
    # A slow first reconnect keeps the not-ready window open long enough to observe.
    app = await start_app(calc, reconnect_min_delay=1.0, reconnect_max_delay=2.0)
    assert await http_get(app, "/healthz") == (200, '{"status": "alive"}')
    status, _ = await http_get(app, "/readyz")
    assert status == 200
    before = await scrape(app)

    consumer = app.transport.consumer
    lost = asyncio.Event()
    consumer.on_lost(lambda _reason: lost.set())
    await amqp_channel.queue_delete(Names(app.settings.namespace).request_queue(calc.name))
    async with asyncio.timeout(10):
        await lost.wait()

    status, body = await http_get(app, "/readyz")
    assert status == 503
    assert "consumer" in body
    assert (await http_get(app, "/healthz"))[0] == 200
    assert value(await scrape(app), "burrow_consumers_attached", link="consumer") == 0

    # The link rebuilds itself: queue re-declared, consumer re-attached, ready again.
    await consumer.wait_ready(10)
    status, _ = await http_get(app, "/readyz")
    assert status == 200
    after = await scrape(app)
    assert value(after, "burrow_consumers_attached", link="consumer") == len(consumer.consumers)
    reconnects = value(after, "burrow_amqp_reconnects_total", link="consumer")
    assert reconnects == value(before, "burrow_amqp_reconnects_total", link="consumer") + 1
    assert await client.call("calc.add", {"a": 2, "b": 2}) == {"sum": 4}


async def test_blocked_gauge_follows_the_connection(start_app: AppFactory) -> None:
    """A Connection.Blocked frame sets burrow_amqp_connection_blocked and fails /readyz."""
    app = await start_app(calc)
    link = app.transport.publisher
    assert isinstance(link, AmqpLink)
    connection = link._underlay_connection()
    assert connection is not None
    # Feed aiormq the frames the broker sends on a resource alarm (never alarm the shared node).
    await connection._Connection__handle_connection_blocked(  # type: ignore[attr-defined]
        spec.Connection.Blocked(reason="low on memory")
    )
    try:
        samples = await scrape(app)
        assert value(samples, "burrow_amqp_connection_blocked", link="publisher") == 1
        assert value(samples, "burrow_amqp_connection_blocked", link="consumer") == 0
        status, body = await http_get(app, "/readyz")
        assert status == 503
        assert "blocked" in body
    finally:
        await connection._Connection__handle_connection_unblocked(  # type: ignore[attr-defined]
            spec.Connection.Unblocked()
        )
    assert value(await scrape(app), "burrow_amqp_connection_blocked", link="publisher") == 0
    assert (await http_get(app, "/readyz"))[0] == 200
