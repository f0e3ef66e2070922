"""Unit tests of the in-memory broker's own rules: routing, acks, dead-lettering, limits, links.

The App/Client level behaviour is proven against RabbitMQ by the fidelity scenarios.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service import (
    App,
    Client,
    ConnectionLost,
    DeadlineExceeded,
    MessageTooLarge,
    NotFound,
    PublishFailed,
    QueueFull,
    Settings,
    TopologyError,
    Unroutable,
)
from service._amqp.link import (
    PUBLISH_OUTCOMES,
    ConsumerSpec,
    LinkFactory,
    PublishOutcome,
    record_publish,
)
from service._amqp.transport import AmqpLink
from service._observe import metrics
from service._protocol.topology import BindingDecl, QueueDecl, Topology
from service._protocol.types import Delivery, Outgoing
from service._protocol.vocabulary import DIRECT_REPLY_TO, Names
from service.example import calc
from service.testing import InMemoryBroker, MemoryLink, topic_matches

__all__: list[str] = []


def out(exchange: str, key: str, body: bytes = b"{}", **kw: Any) -> Outgoing:
    """An outgoing message with a fixed id."""
    return Outgoing(exchange=exchange, routing_key=key, body=body, message_id="m", **kw)


async def started(broker: InMemoryBroker, settings: Settings, **kw: Any) -> MemoryLink:
    """A ready link on `broker`."""
    link = broker.link_factory("test", settings, **kw)
    link.start()
    await link.wait_ready(1)
    return link


class Sink:
    """A consumer callback collecting deliveries; settles them as told."""

    def __init__(self, settle: str | None = None) -> None:
        self.got: asyncio.Queue[Delivery] = asyncio.Queue()
        self.settle = settle

    async def __call__(self, delivery: Delivery) -> None:
        """Record, then settle."""
        self.got.put_nowait(delivery)
        if self.settle == "ack":
            await delivery.ack()
        elif self.settle == "reject":
            await delivery.reject()

    async def next(self) -> Delivery:
        """The next delivery (bounded wait)."""
        async with asyncio.timeout(5):
            return await self.got.get()


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.#", "a", True),
        ("a.#", "ab", False),
        ("#", "", True),
        ("*", "", False),
        ("#.c", "c", True),
        ("#.c", "a.b.c.d", False),
        ("a.#.c", "a.c", True),
        ("#.#", "a.b", True),
        ("*.*", "a", False),
        ("a..b", "a..b", True),
        ("", "", True),
        ("", "a", False),
    ],
)
def test_topic_matching_follows_rabbitmq(pattern: str, key: str, matches: bool) -> None:
    """`*` is exactly one word, `#` zero or more; an empty key has no words."""
    assert topic_matches(pattern, key) is matches


async def test_exchange_to_exchange_bindings_route_through(settings: Settings) -> None:
    """A message follows exchange-to-exchange bindings, reaching each queue once."""
    broker = InMemoryBroker()
    broker.declare_exchange("up", "topic")
    broker.declare_exchange("down", "direct")
    broker.declare_queue("q")
    broker.bind("up", "down", "#", "exchange")
    broker.bind("down", "q", "k")
    broker.bind("up", "q", "k")
    broker.bind("down", "up", "k", "exchange")  # a cycle must not loop
    assert broker.routes("up", "k") == ["q"]
    assert broker.routes("up", "other") == []
    assert broker.routes("", "q") == ["q"]


async def test_ack_reject_requeue_and_prefetch(settings: Settings) -> None:
    """Prefetch bounds unacked deliveries; requeue redelivers flagged; reject dead-letters."""
    broker = InMemoryBroker()
    broker.declare_exchange("dlx", "direct")
    broker.declare_queue("dead")
    broker.bind("dlx", "dead", "q")
    broker.declare_queue("q", {"x-dead-letter-exchange": "dlx"})
    sink = Sink()
    link = broker.link_factory("c", settings, prefetch=1)
    link.add_consumer(ConsumerSpec("q", sink))
    link.start()
    pub = await started(broker, settings)
    await pub.publish(out("", "q", b"1"), kind="command", mandatory=True)
    await pub.publish(out("", "q", b"2"), kind="command", mandatory=True)
    first = await sink.next()
    assert first.body == b"1"
    assert not first.redelivered
    assert sink.got.empty()
    assert [m.body for m in broker.queue("q").messages] == [b"2"]
    await first.requeue()
    again = await sink.next()
    assert (again.body, again.redelivered) == (b"1", True)
    await again.reject()
    second = await sink.next()
    assert second.body == b"2"
    await second.ack()
    await broker.settled()
    [dead] = broker.queue("dead").messages
    assert dead.body == b"1"
    assert dead.headers["x-death"][0]["reason"] == "rejected"


async def test_competing_consumers_take_turns(settings: Settings) -> None:
    """Two consumers on one queue receive messages round-robin."""
    broker = InMemoryBroker()
    broker.declare_queue("q")
    sinks = [Sink("ack"), Sink("ack")]
    for sink in sinks:
        link = broker.link_factory("c", settings, prefetch=10)
        link.add_consumer(ConsumerSpec("q", sink))
        link.start()
    pub = await started(broker, settings)
    for n in range(4):
        await pub.publish(out("", "q", str(n).encode()), kind="command", mandatory=True)
    await broker.drain()
    assert [sink.got.qsize() for sink in sinks] == [2, 2]


async def test_ttl_expiry_dead_letters_with_routing_key(settings: Settings) -> None:
    """Queue TTL and per-message expiration dead-letter through x-dead-letter-routing-key."""
    broker = InMemoryBroker()
    broker.declare_queue("ready")
    broker.declare_queue(
        "wait",
        {"x-message-ttl": 50, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "ready"},
    )
    pub = await started(broker, settings)
    await pub.publish(out("", "wait", b"q"), kind="scheduled", mandatory=True)
    await pub.publish(out("", "wait", b"m", expiration_ms=10), kind="scheduled", mandatory=True)
    assert len(broker.queue("wait")) == 2
    await broker.drain()
    moved = broker.queue("ready").messages
    assert [m.body for m in moved] == [b"q", b"m"]
    assert moved[1].expiration is None
    assert moved[1].headers["x-death"][0]["original-expiration"] == "10"
    assert moved[0].headers["x-first-death-reason"] == "expired"


async def test_reject_publish_nacks_and_drop_head_drops(settings: Settings) -> None:
    """reject-publish refuses at the limit (QueueFull); the default drop-head dead-letters."""
    broker = InMemoryBroker()
    broker.declare_queue("bounded", {"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.declare_queue("dropped")
    broker.declare_queue(
        "rolling",
        {"x-max-length": 1, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dropped"},
    )
    pub = await started(broker, settings)
    await pub.publish(out("", "bounded", b"1"), kind="request", mandatory=True)
    with pytest.raises(QueueFull):
        await pub.publish(out("", "bounded", b"2"), kind="request", mandatory=True)
    assert broker.published[-1].outcome == "nacked"
    await pub.publish(out("", "rolling", b"1"), kind="request", mandatory=True)
    await pub.publish(out("", "rolling", b"2"), kind="request", mandatory=True)
    assert [m.body for m in broker.queue("rolling").messages] == [b"2"]
    assert broker.queue("dropped").messages[0].headers["x-death"][0]["reason"] == "maxlen"


async def test_publish_errors_match_link(settings: Settings) -> None:
    """Unroutable on return and on a missing exchange, MessageTooLarge above the limit."""
    broker = InMemoryBroker()
    broker.declare_exchange("ex", "topic")
    pub = await started(broker, settings)
    with pytest.raises(Unroutable):
        await pub.publish(out("ex", "nobody"), kind="event", mandatory=True)
    await pub.publish(out("ex", "nobody"), kind="event", mandatory=False)
    assert [p.outcome for p in broker.published] == ["returned", "confirmed"]
    big = out("ex", "k", b"x" * (settings.max_body_bytes + 1))
    with pytest.raises(MessageTooLarge):
        await pub.publish(big, kind="event", mandatory=False)
    await pub.publish(big, kind="event", mandatory=False, check_size=False)
    lost: list[BaseException] = []
    pub.on_lost(lost.append)
    with pytest.raises(Unroutable, match="no exchange 'missing'"):
        await pub.publish(out("missing", "k"), kind="event", mandatory=False)
    # As on RabbitMQ the channel was closed (pending calls fail); the link is back at once.
    assert [type(reason) for reason in lost] == [ConnectionLost]
    assert pub.ready.is_set()
    await pub.publish(out("ex", "k"), kind="event", mandatory=False)


async def test_blocked_broker_times_publishes_out(settings: Settings) -> None:
    """While blocked, a publish gets no confirm and fails with PublishFailed."""
    broker = InMemoryBroker()
    broker.declare_queue("q")
    pub = await started(broker, settings)
    broker.set_blocked(True)
    assert pub.blocked
    with pytest.raises(PublishFailed):
        await pub.publish(out("", "q"), kind="command", mandatory=True, timeout=0.05)
    broker.set_blocked(False)
    await pub.publish(out("", "q"), kind="command", mandatory=True)
    assert len(broker.queue("q")) == 1


async def test_direct_reply_to_reaches_only_its_link(settings: Settings) -> None:
    """reply_to is rewritten to the link's own address; replies reach that link only."""
    broker = InMemoryBroker()
    broker.declare_queue("requests")
    replies, others = Sink(), Sink()
    caller = broker.link_factory("caller", settings)
    caller.add_consumer(ConsumerSpec(DIRECT_REPLY_TO, replies, no_ack=True))
    caller.start()
    other = broker.link_factory("other", settings)
    other.add_consumer(ConsumerSpec(DIRECT_REPLY_TO, others, no_ack=True))
    other.start()
    plain = await started(broker, settings)
    await caller.publish(
        out("", "requests", reply_to=DIRECT_REPLY_TO), kind="request", mandatory=True
    )
    [request] = broker.queue("requests").messages
    assert request.reply_to == caller.reply_address
    assert request.reply_to != other.reply_address
    assert request.reply_to is not None
    assert request.reply_to.startswith(DIRECT_REPLY_TO + ".")
    await plain.publish(out("", request.reply_to, b"answer"), kind="reply", mandatory=True)
    assert (await replies.next()).body == b"answer"
    assert others.got.empty()
    with pytest.raises(ConnectionLost):
        await plain.publish(
            out("", "requests", reply_to=DIRECT_REPLY_TO), kind="request", mandatory=True
        )
    await caller.close()
    with pytest.raises(Unroutable):
        await plain.publish(out("", request.reply_to), kind="reply", mandatory=True)


async def test_closing_a_link_returns_unacked_and_fails_waiters(settings: Settings) -> None:
    """Close requeues unacked deliveries (redelivered), ignores late settles, tells on_lost."""
    broker = InMemoryBroker()
    broker.declare_queue("q")
    sink = Sink()
    link = broker.link_factory("c", settings)
    link.add_consumer(ConsumerSpec("q", sink))
    lost: list[BaseException] = []
    link.on_lost(lost.append)
    link.start()
    pub = await started(broker, settings)
    await pub.publish(out("", "q"), kind="command", mandatory=True)
    delivery = await sink.next()
    await link.close()
    await delivery.ack()  # stale: ignored
    assert isinstance(lost[0], ConnectionLost)
    [back] = broker.queue("q").messages
    assert back.redelivered
    assert not link.ready.is_set()


async def test_conflicting_topology_is_fatal(settings: Settings) -> None:
    """Redeclaring a queue with other arguments fails the link with TopologyError."""
    broker = InMemoryBroker()
    broker.declare_queue("q", {"x-queue-type": "quorum"})
    link = broker.link_factory("c", settings, topology=Topology(queues=[QueueDecl("q")]))
    link.start()
    with pytest.raises(TopologyError):
        await link.wait_ready(1)
    pub = await started(broker, settings)
    with pytest.raises(ConnectionLost):
        await pub.declare_queue(QueueDecl("q", {"x-queue-type": "classic"}))


async def test_dead_letter_strategy_is_compared_on_redeclare(settings: Settings) -> None:
    """As RabbitMQ does, a different `x-dead-letter-strategy` is a topology conflict."""
    broker = InMemoryBroker()
    args = {"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once"}
    broker.declare_queue("q", args)
    pub = await started(broker, settings)
    await pub.declare_queue(QueueDecl("q", dict(args)))  # the same arguments: fine
    with pytest.raises(ConnectionLost):
        await pub.declare_queue(QueueDecl("q", {"x-queue-type": "quorum"}))


async def test_peek_leaves_the_message(settings: Settings) -> None:
    """peek waits for the first message and leaves it; NotFound and DeadlineExceeded otherwise."""
    broker = InMemoryBroker()
    pub = await started(broker, settings)
    with pytest.raises(NotFound):
        await pub.peek("nope", 0.1)
    await pub.declare_queue(QueueDecl("job"))
    with pytest.raises(DeadlineExceeded):
        await pub.peek("job", 0.01)
    waiting = asyncio.ensure_future(pub.peek("job", 5))
    await asyncio.sleep(0)  # let the peek start waiting before the message exists
    await pub.publish(out("", "job", b"done", headers={"h": 1}), kind="completion", mandatory=True)
    first = await waiting
    assert (first.body, first.headers) == (b"done", {"h": 1})
    assert (await pub.peek("job", 1)).body == b"done"
    assert len(broker.queue("job")) == 1


async def test_quorum_delivery_limit_dead_letters(settings: Settings) -> None:
    """A quorum queue counts redeliveries and dead-letters past x-delivery-limit."""
    broker = InMemoryBroker()
    broker.declare_queue("dead")
    broker.declare_queue(
        "q",
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dead",
        },
    )
    sink = Sink()
    link = broker.link_factory("c", settings)
    link.add_consumer(ConsumerSpec("q", sink))
    link.start()
    pub = await started(broker, settings)
    await pub.publish(out("", "q"), kind="command", mandatory=True)
    await (await sink.next()).requeue()
    second = await sink.next()
    assert second.headers["x-delivery-count"] == 1
    await second.requeue()
    await broker.settled()
    assert broker.queue("dead").messages[0].headers["x-death"][0]["reason"] == "delivery_limit"


async def test_app_and_client_run_unchanged(settings: Settings) -> None:
    """The documented usage: App and Client on the broker, published messages captured."""
    broker = InMemoryBroker()
    app = App(calc, settings=settings, http=False, link_factory=broker.link_factory)
    client = Client(settings, link_factory=broker.link_factory)
    await app.start()
    await app.wait_ready(1)
    await client.start()
    try:
        assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}
        await broker.drain()
        request, reply = broker.published
        assert (request.exchange, request.routing_key, request.kind) == (
            f"{settings.namespace}.rpc",
            "calc.add",
            "request",
        )
        assert reply.json() == {"sum": 3}
        assert reply.headers["x-status"] == "ok"
    finally:
        await client.close()
        await app.stop()


async def test_drain_times_out_with_a_description(settings: Settings) -> None:
    """drain raises TimeoutError naming what is still busy."""
    broker = InMemoryBroker()
    broker.declare_queue("q")
    link = broker.link_factory("c", settings)
    link.add_consumer(ConsumerSpec("q", Sink()))  # never settles
    link.start()
    pub = await started(broker, settings)
    await pub.publish(out("", "q"), kind="command", mandatory=True)
    with pytest.raises(TimeoutError, match="'q'"):
        await broker.drain(0.05)


async def test_delete_queue_deletes_messages_bindings_and_consumers(settings: Settings) -> None:
    """delete_queue removes the queue, its messages and bindings; its consumers' links rebuild
    (re-declaring what their topology holds), as on RabbitMQ's consumer cancel."""
    broker = InMemoryBroker()
    broker.declare_exchange("ex", "topic")
    topology = Topology(queues=[QueueDecl("q")], bindings=[BindingDecl("ex", "q", "k")])
    sink = Sink()
    consumer = broker.link_factory("c", settings, topology=topology)
    consumer.add_consumer(ConsumerSpec("q", sink))
    lost: list[BaseException] = []
    consumer.on_lost(lost.append)
    consumer.start()
    pub = await started(broker, settings)
    await pub.declare_queue(QueueDecl("job"))
    await pub.publish(out("", "job", b"result"), kind="completion", mandatory=True)
    await pub.delete_queue("job")
    assert "job" not in broker.queues
    with pytest.raises(NotFound):
        await pub.peek("job", 0.1)
    with pytest.raises(Unroutable):
        await pub.publish(out("", "job"), kind="completion", mandatory=True)
    await pub.delete_queue("job")  # gone already: nothing happens

    await pub.publish(out("ex", "k", b"held"), kind="event", mandatory=True)
    held = await sink.next()
    broker.delete_queue("q")
    await held.ack()  # its channel is gone: ignored
    assert [type(reason) for reason in lost] == [ConnectionLost]
    assert consumer.ready.is_set()  # re-declared "q" and its binding, consumer re-attached
    assert broker.queue("q").messages == []
    assert broker.queue("q").consumer_count == 1
    await pub.publish(out("ex", "k", b"after"), kind="event", mandatory=True)
    assert (await sink.next()).body == b"after"


async def test_delete_queue_if_unused_and_if_empty(settings: Settings) -> None:
    """With if_unused / if_empty a queue with a consumer / a ready message is kept (False);
    once unused and empty it is deleted (True)."""
    broker = InMemoryBroker()
    sink = Sink()
    consumer = broker.link_factory("c", settings, topology=Topology(queues=[QueueDecl("q")]))
    consumer.add_consumer(ConsumerSpec("q", sink))
    consumer.start()
    pub = await started(broker, settings)
    await pub.declare_queue(QueueDecl("idle"))
    await pub.publish(out("", "idle", b"waiting"), kind="command", mandatory=True)
    assert await pub.delete_queue("idle", if_empty=True) is False
    assert await pub.delete_queue("idle", if_unused=True) is True
    assert await pub.delete_queue("idle", if_unused=True) is False  # gone already

    await pub.publish(out("", "q", b"held"), kind="command", mandatory=True)
    held = await sink.next()
    assert await pub.delete_queue("q", if_unused=True) is False  # a consumer is attached
    await consumer.cancel_consumers()
    await held.ack()
    assert await pub.delete_queue("q", if_unused=True, if_empty=True) is True
    assert "q" not in broker.queues


async def test_app_stop_deletes_its_request_queue_but_not_a_shared_one(
    settings: Settings,
) -> None:
    """Stopping the last App of a service deletes its request queue (calls then Unroutable);
    while another instance consumes it, the queue stays. The commands queue always stays."""
    broker = InMemoryBroker()
    names = Names(settings.namespace)
    apps = [App(calc, settings=settings, http=False, link_factory=broker.link_factory)]
    apps.append(App(calc, settings=settings, http=False, link_factory=broker.link_factory))
    for app in apps:
        await app.start()
        await app.wait_ready(5)
    client = Client(settings, link_factory=broker.link_factory)
    await client.start()
    try:
        await apps[0].stop()
        assert names.request_queue("calc") in broker.queues
        assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}
        await apps[1].stop()
        assert names.request_queue("calc") not in broker.queues
        assert names.commands_queue("calc") in broker.queues
        with pytest.raises(Unroutable):
            await client.call("calc.add", {"a": 1, "b": 2}, timeout=5)
    finally:
        await client.close()


async def test_bindings_of_a_deleted_queue_do_not_come_back(settings: Settings) -> None:
    """A queue declared again after a delete has no bindings until they are declared again."""
    broker = InMemoryBroker()
    broker.declare_exchange("ex", "topic")
    broker.declare_queue("q")
    broker.bind("ex", "q", "k")
    assert broker.delete_queue("q") == 0
    broker.declare_queue("q")
    assert broker.routes("ex", "k") == []


def test_memory_link_is_no_amqp_link() -> None:
    """The two links meet at the `Link` Protocol only: neither inherits from the other."""
    assert not issubclass(MemoryLink, AmqpLink)
    assert not issubclass(AmqpLink, MemoryLink)


def test_both_link_factories_make_links(settings: Settings) -> None:
    """AmqpLink and the broker's factory are `LinkFactory`s (mypy checks the signatures)."""
    factories: list[LinkFactory] = [AmqpLink, InMemoryBroker().link_factory]
    assert len(factories) == 2


def test_every_publish_outcome_has_a_known_metric_label() -> None:
    """Each outcome's label is one of the label values created at zero; failures raise."""
    for outcome, rule in PUBLISH_OUTCOMES.items():
        assert rule.label is None or rule.label in metrics.PUBLISH_OUTCOMES, outcome
        assert (rule.error is None) is (outcome is PublishOutcome.CONFIRMED), outcome
    assert set(PUBLISH_OUTCOMES) == set(PublishOutcome)


@pytest.mark.parametrize(
    ("outcome", "error", "text"),
    [
        (PublishOutcome.RETURNED, Unroutable, "no queue is bound for 'k' on 'ex'"),
        (PublishOutcome.NO_EXCHANGE, Unroutable, "no exchange 'ex'"),
        (PublishOutcome.NACKED, QueueFull, "refused"),
        (PublishOutcome.NO_CONFIRM, PublishFailed, "within 1.5s"),
        (PublishOutcome.LOST, ConnectionLost, "publishing: gone"),
        (PublishOutcome.TOO_LARGE, MessageTooLarge, "event body of 2 bytes exceeds .* 1$"),
    ],
)
def test_record_publish_raises_what_the_table_says(
    outcome: PublishOutcome, error: type[Exception], text: str
) -> None:
    """One table maps each broker outcome to its Burrow error, for both links."""
    with pytest.raises(error, match=text):
        record_publish(outcome, out("ex", "k"), kind="event", timeout=1.5, detail="gone", limit=1)


async def test_lost_publish_is_counted_as_lost(settings: Settings) -> None:
    """A publish that loses its channel is ConnectionLost, counted `lost` (not `timeout`)."""
    broker = InMemoryBroker()
    broker.declare_queue("requests")
    pub = await started(broker, settings)

    def lost() -> float:
        sample = REGISTRY.get_sample_value(
            "burrow_messages_published_total", {"kind": "request", "outcome": "lost"}
        )
        return sample or 0.0

    before = lost()
    with pytest.raises(ConnectionLost, match="fast reply consumer does not exist"):
        await pub.publish(
            out("", "requests", reply_to=DIRECT_REPLY_TO), kind="request", mandatory=True
        )
    assert lost() == before + 1


async def test_a_long_route_is_published_whole(settings: Settings) -> None:
    """The client bounds a route's metric label at 128 characters, never the route itself."""
    broker = InMemoryBroker()
    client = Client(settings, link_factory=broker.link_factory)
    await client.start()
    route = "svc." + "o" * 200
    try:
        with pytest.raises(Unroutable):
            await client.call(route, {})
    finally:
        await client.close()
    assert broker.published[-1].routing_key == route
    label = {"operation": route[:128], "outcome": "NOT_FOUND"}
    assert REGISTRY.get_sample_value("burrow_rpc_client_calls_total", label) == 1
