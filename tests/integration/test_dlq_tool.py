"""`burrow dlq`: list, show, replay and purge a service's dead letters on the real broker."""

from __future__ import annotations

import asyncio

import aio_pika
import structlog
import structlog.testing

from service import Client, Context, FailedPrecondition, Model, Service
from service._serving.dead_letters import DeadLetterTool
from tests.conftest import AppFactory


class Order(Model):
    """An order to ship."""

    id: int


async def _wait_for(tool: DeadLetterTool, count: int) -> None:
    for _ in range(200):
        if len(await tool.list()) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} dead letters")


async def test_dead_letters_are_listed_shown_replayed_and_purged(
    start_app: AppFactory, client: Client
) -> None:
    """A parked cast is listed with its reason, replayed once the cause is fixed, then gone."""
    shipped: list[int] = []
    broken = True
    svc = Service("shipping")

    @svc.operation()
    async def ship(req: Order) -> Order:
        if broken:
            raise FailedPrecondition("warehouse closed")
        shipped.append(req.id)
        return req

    app = await start_app(svc)
    tool = DeadLetterTool(app.settings, "shipping")
    first = await client.cast("shipping.ship", {"id": 1})
    await client.cast("shipping.ship", {"id": 2})
    await _wait_for(tool, 2)

    letters = await tool.list()
    assert [letter.reason for letter in letters] == ["failed", "failed"]
    assert letters[0].summary()["route"] == "shipping.ship"
    assert letters[0].detail()["error"]["code"] == "FAILED_PRECONDITION"
    assert letters[0].body is None, "list keeps no bodies"
    [shown] = await tool.show([first])
    assert shown.detail()["body"] == {"id": 1}

    broken = False
    report = await tool.replay([first])
    assert (report.replayed, report.skipped, report.missing) == (1, [], [])
    for _ in range(100):
        if shipped:
            break
        await asyncio.sleep(0.05)
    assert shipped == [1]
    assert [letter.summary()["message_id"] for letter in await tool.list()] != [first]
    assert len(await tool.list()) == 1
    assert await tool.purge() == 1
    assert await tool.list() == []


async def test_letters_survive_any_number_of_looks(start_app: AppFactory, client: Client) -> None:
    """A parked letter is still there after 30 `list`s, on every broker (RabbitMQ 4.x drops
    a quorum queue's message after 20 deliveries unless the DLQ lifts its limit)."""
    svc = Service("looked")

    @svc.operation()
    async def ship(req: Order) -> Order:
        raise FailedPrecondition("warehouse closed")

    app = await start_app(svc)
    tool = DeadLetterTool(app.settings, "looked")
    parked = await client.cast("looked.ship", {"id": 1})
    await _wait_for(tool, 1)
    for _ in range(30):
        letters = await tool.list()
        assert [letter.message_id for letter in letters] == [parked]
    looks = letters[0].delivery_count
    assert looks is not None
    assert looks >= 29


async def test_a_dead_letter_queue_declared_the_old_way_is_kept_with_one_warning(
    start_app: AppFactory, client: Client, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """A DLQ declared before Burrow set its delivery limit is kept (no topology conflict), and
    the start warns once, naming the queue and the policy that protects its letters."""
    svc = Service("legacy")

    @svc.operation()
    async def ship(req: Order) -> Order:
        raise FailedPrecondition("warehouse closed")

    namespace = client.settings.namespace
    dlq = f"{namespace}.legacy.dlq"
    await amqp_channel.declare_queue(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    with structlog.testing.capture_logs() as logs:
        app = await start_app(svc)
        await start_app(svc)  # a second instance (or a reconnect) in this process: no repeat
    warned = [e for e in logs if e["event"].startswith("dead-letter queue declared without")]
    assert [e["queue"] for e in warned] == [dlq]
    assert "set_policy burrow-dlq-delivery-limit" in warned[0]["fix"]
    parked = await client.cast("legacy.ship", {"id": 1})
    tool = DeadLetterTool(app.settings, "legacy")
    await _wait_for(tool, 1)
    assert [letter.message_id for letter in await tool.list()] == [parked]


async def test_a_replayed_event_reaches_only_the_subscription_it_failed_in(
    start_app: AppFactory, client: Client
) -> None:
    """Two groups subscribe to one event; one fails and parks it. The replay runs the failed
    group's handler again (the event name still its routing key), and the other group's count
    stays unchanged."""
    seen: dict[str, list[int]] = {"billing": [], "audit": []}
    keys: list[str] = []
    broken = True
    billing, audit = Service("billing"), Service("audit")

    @billing.subscribe("orders.created")
    async def invoice(event: Order, ctx: Context) -> None:
        seen["billing"].append(event.id)
        keys.append(ctx.routing_key)
        if broken:
            raise FailedPrecondition("ledger closed")

    @audit.subscribe("orders.created")
    async def record(event: Order) -> None:
        seen["audit"].append(event.id)

    app = await start_app(billing, audit)
    tool = DeadLetterTool(app.settings, "billing")
    assert await client.emit("orders.created", {"id": 7})
    await _wait_for(tool, 1)
    [letter] = await tool.show(
        [letter.message_id for letter in await tool.list() if letter.message_id]
    )
    assert letter.original_queue == client.names.subscription_queue("billing", "invoice")
    assert letter.summary()["route"] == "orders.created"
    assert seen == {"billing": [7], "audit": [7]}

    broken = False
    report = await tool.replay(None)
    assert (report.replayed, report.skipped, report.missing) == (1, [], [])
    for _ in range(100):
        if len(seen["billing"]) == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # time enough for a copy that reached audit to run
    assert seen == {"billing": [7, 7], "audit": [7]}
    assert keys == ["orders.created", "orders.created"]
    assert await tool.list() == []
    assert await DeadLetterTool(app.settings, "audit").list() == []
