"""Domain events over the real broker: broadcast across subscription groups, competing
consumers within one, unroutable events reported, schema-invalid events dead-lettered.
"""

from __future__ import annotations

import aio_pika

from service import Client, Context, Model, Service
from service._protocol.vocabulary import Names
from tests.conftest import AppFactory
from tests.integration.test_async_support import (
    Recorder,
    body_json,
    dead_error,
    dead_reason,
    next_dead_letter,
    queue_depth,
    sample,
)

EVENTS = 40


class OrderCreated(Model):
    """Event: an order was created."""

    order_id: int


def make_listener(name: str, group: str, *recorders: Recorder) -> Service:
    """A service `name` subscribing to `orders.*.created` in `group`, recording order ids."""
    listener = Service(name)

    @listener.subscribe("orders.*.created", group=group, name="on_created")
    async def on_created(event: OrderCreated, ctx: Context) -> None:
        """Record the order id and the event's routing key."""
        for recorder in recorders:
            recorder.add((event.order_id, ctx.routing_key))

    return listener


async def test_groups_broadcast_and_instances_compete(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """Every group gets every event; two instances of one group share them, each getting some."""
    audit, billing, billing_a, billing_b = Recorder(), Recorder(), Recorder(), Recorder()
    # Two Service objects with one name and group stand for two processes of one service.
    first = await start_app(
        make_listener("audit", "audit", audit),
        make_listener("billing", "billing", billing, billing_a),
    )
    second = await start_app(make_listener("billing", "billing", billing, billing_b))

    for i in range(EVENTS):
        assert await client.emit(f"orders.r{i % 3}.created", {"order_id": i}) is True

    await audit.wait_for(EVENTS)
    await billing.wait_for(EVENTS)
    # Stopping settles in-flight work; anything unacked or redelivered would show up below.
    await first.stop()
    await second.stop()

    names = Names(namespace)
    for group in ("audit", "billing"):
        assert await queue_depth(amqp_channel, names.subscription_queue(group, "on_created")) == 0
    assert sorted(order for order, _ in audit.items) == list(range(EVENTS))
    assert sorted(order for order, _ in billing.items) == list(range(EVENTS))
    assert len(billing_a.items) + len(billing_b.items) == EVENTS
    assert billing_a.items
    assert billing_b.items
    assert {key for _, key in audit.items} == {f"orders.r{i}.created" for i in range(3)}


async def test_emit_without_subscriber_returns_false(start_app: AppFactory, client: Client) -> None:
    """An event no queue matches is reported (False) and counted as returned."""
    await start_app(make_listener("audit", "audit", Recorder()))
    returned = sample("burrow_messages_published_total", kind="event", outcome="returned")

    assert await client.emit("payments.eu.refunded", {"order_id": 1}) is False

    after = sample("burrow_messages_published_total", kind="event", outcome="returned")
    assert after == returned + 1
    assert await client.emit("orders.eu.created", {"order_id": 1}) is True


async def test_schema_invalid_event_is_dead_lettered(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """An event failing its subscription's schema is parked (reason invalid), never handled."""
    recorder = Recorder()
    app = await start_app(make_listener("audit", "audit", recorder))
    names = Names(namespace)

    assert await client.emit("orders.eu.created", {"order_id": "not a number"}) is True

    dead = await next_dead_letter(amqp_channel, names.dead_letter_queue("audit"))
    assert dead_reason(dead) == "invalid"
    assert body_json(dead) == {"order_id": "not a number"}
    assert dead_error(dead)["code"] == "INVALID_ARGUMENT"
    await app.stop()
    assert recorder.items == []
    assert await queue_depth(amqp_channel, names.subscription_queue("audit", "on_created")) == 0
    assert await queue_depth(amqp_channel, names.dead_letter_queue("audit")) == 0


async def test_emit_where_no_service_ever_ran_returns_false(client: Client) -> None:
    """An event in a namespace with no exchanges yet is reported unrouted (False), not an error."""
    assert await client.emit("orders.eu.created", {"order_id": 1}) is False
