"""Scenarios written once and run on both brokers: the in-memory one and RabbitMQ.

Holds no tests itself: `tests/unit/test_testing_fidelity.py` runs each on `service.testing`,
`tests/integration/test_fidelity.py` on the real broker; both assert the same outcomes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from service import (
    App,
    Client,
    Context,
    InvalidArgument,
    Model,
    NotFound,
    QueueFull,
    Service,
    Settings,
    Unroutable,
)
from service._amqp.link import ConsumerSpec, Link, LinkFactory
from service._protocol.codec import decode_json, decode_model, encode
from service._protocol.topology import BindingDecl, ExchangeDecl, QueueDecl, Topology
from service._protocol.types import Delivery, Outgoing
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_DEAD_REASON,
    H_DUE,
    H_JOB_ID,
    H_ORIGINAL_ROUTING_KEY,
    H_TARGET_EXCHANGE,
    H_TARGET_KEY,
    Names,
)
from service.example import AddRequest, calc

__all__ = [
    "WAIT",
    "Capture",
    "Env",
    "FidState",
    "Thing",
    "make_fid",
    "SCENARIOS",
]

WAIT = 10.0  # bound on any single wait; never reached when things work


class Thing(Model):
    """A payload with a number, for the scenario service."""

    n: int


@dataclass
class FidState:
    """What one instance of the scenario service saw; handlers feed it, scenarios read it."""

    instance: str = "a"
    records: asyncio.Queue[tuple[int, bool, dict[str, Any], float]] = field(
        default_factory=asyncio.Queue
    )
    events: asyncio.Queue[tuple[str, str, int]] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def make_fid(state: FidState, *, groups: bool = False) -> Service:
    """A fresh `fid` service whose handlers report into `state` (one per app instance)."""
    fid = Service("fid")

    async def record(req: Thing, ctx: Context) -> Thing:
        state.records.put_nowait((req.n, ctx.redelivered, dict(ctx.headers), time.time()))
        return req

    async def boom(req: Thing) -> Thing:
        raise RuntimeError("boom")

    async def hold(req: Thing) -> Thing:
        state.started.set()
        await state.release.wait()
        return req

    for handler in (record, boom, hold):
        fid.add_operation(handler)
    if groups:
        for group in ("audit", "mail"):
            fid.subscribe("fid.thing.*", group=group, name=f"on_{group}")(_subscriber(state, group))
    return fid


def _subscriber(state: FidState, group: str) -> Callable[[Thing, Context], Awaitable[None]]:
    async def on_thing(event: Thing, ctx: Context) -> None:
        state.events.put_nowait((group, state.instance, event.n))

    return on_thing


class Capture:
    """Consumes one queue (no-ack) through a `Link` of the backend under test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_delivery(self, delivery: Delivery) -> None:
        """Keep the delivery for `next`."""
        self.received.put_nowait(delivery)

    async def next(self, timeout: float = WAIT) -> Delivery:
        """The next delivery, waiting at most `timeout` seconds."""
        async with asyncio.timeout(timeout):
            return await self.received.get()


@dataclass
class Env:
    """One backend: how to start apps and clients, open links, and read queue depths."""

    backend: str
    settings: Settings
    start_app: Callable[..., Awaitable[App]]
    make_client: Callable[..., Awaitable[Client]]
    link_factory: LinkFactory
    depth: Callable[[str], Awaitable[int]]
    links: list[Link] = field(default_factory=list)

    @property
    def names(self) -> Names:
        """Entity names of this test's namespace."""
        return Names(self.settings.namespace)

    async def capture(self, exchange: str, pattern: str) -> Capture:
        """A fresh queue bound to topic `exchange` with `pattern`, consumed into a `Capture`."""
        name = f"{self.settings.namespace}.capture.{uuid.uuid4().hex[:8]}"
        topology = Topology(
            exchanges=[ExchangeDecl(exchange, "topic")],
            queues=[QueueDecl(name, {"x-queue-type": "classic"})],
            bindings=[BindingDecl(exchange, name, pattern)],
        )
        return await self._consume(name, topology)

    async def consume(self, queue: str) -> Capture:
        """Consume an existing queue (a DLQ, say) into a `Capture`."""
        return await self._consume(queue, Topology())

    async def _consume(self, queue: str, topology: Topology) -> Capture:
        capture = Capture(queue)
        link = self.link_factory("capture", self.settings, topology=topology)
        link.add_consumer(ConsumerSpec(queue, capture.on_delivery, no_ack=True))
        self.links.append(link)
        link.start()
        await link.wait_ready(WAIT)
        return capture

    async def close(self) -> None:
        """Close the links this environment opened."""
        for link in self.links:
            await link.close()


async def _calls(env: Env) -> Client:
    await env.start_app(calc)
    return await env.make_client()


async def call_ok(env: Env) -> None:
    """calc.add answers the sum."""
    client = await _calls(env)
    assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}


async def unknown_operation(env: Env) -> None:
    """An unknown operation of a live service is NOT_FOUND, not Unroutable."""
    client = await _calls(env)
    with pytest.raises(NotFound) as caught:
        await client.call("calc.nope", {})
    assert not isinstance(caught.value, Unroutable)
    assert "calc.nope" in caught.value.message


async def invalid_payload(env: Env) -> None:
    """A payload that fails validation is INVALID_ARGUMENT with the codec's exact details."""
    client = await _calls(env)
    payload = {"a": "x"}
    with pytest.raises(InvalidArgument) as expected:
        decode_model(AddRequest, encode(payload))
    with pytest.raises(InvalidArgument) as caught:
        await client.call("calc.add", payload)
    assert caught.value.details == expected.value.details
    assert caught.value.details["reason"] == "schema"


async def unroutable_call(env: Env) -> None:
    """A call to a service nobody runs is Unroutable at once."""
    client = await _calls(env)
    with pytest.raises(Unroutable):
        await client.call("ghost.op", {}, timeout=WAIT)


async def missing_exchange(env: Env) -> None:
    """A publish to an exchange that does not exist is Unroutable (RabbitMQ closes the channel);
    the link heals by itself and the next call goes through."""
    client = await _calls(env)
    with pytest.raises(Unroutable, match="no exchange"):
        await client.link.publish(
            Outgoing(
                exchange=f"{env.settings.namespace}.nowhere",
                routing_key="k",
                body=b"{}",
                message_id="lost",
            ),
            kind="event",
            mandatory=False,
        )
    assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}


async def deleted_queue(env: Env) -> None:
    """A queue deleted through the link is gone with its messages: peek finds nothing and a
    mandatory publish to it is Unroutable; deleting it again is harmless."""
    client = await env.make_client()
    name = f"{env.settings.namespace}.scratch.{uuid.uuid4().hex[:8]}"
    await client.link.declare_queue(QueueDecl(name, {"x-queue-type": "classic"}))
    message = Outgoing(exchange="", routing_key=name, body=b'{"n": 1}', message_id="kept")
    await client.link.publish(message, kind="completion", mandatory=True)
    assert (await client.link.peek(name, WAIT)).message_id == "kept"
    await client.link.delete_queue(name)
    with pytest.raises(NotFound):
        await client.link.peek(name, WAIT)
    with pytest.raises(Unroutable):
        await client.link.publish(message, kind="completion", mandatory=True)
    await client.link.delete_queue(name)


async def cast_once(env: Env) -> None:
    """Casts are processed once each, in order, never redelivered."""
    state = FidState()
    await env.start_app(make_fid(state), prefetch=1)
    client = await env.make_client()
    await client.cast("fid.record", {"n": 1})
    await client.cast("fid.record", {"n": 2})
    seen: list[int] = []
    while len(seen) < 2:
        n, redelivered, headers, _ = await _get(state.records)
        seen.append(n)
        assert not redelivered
        assert headers["x-burrow-kind"] == "cast"
    assert seen == [1, 2]
    assert await env.depth(env.names.commands_queue("fid")) == 0
    assert state.records.empty()


async def submit_result(env: Env) -> None:
    """A submit's result is read from its job, and announced as `<route>.completed`."""
    completed = await env.capture(env.names.events_exchange, "calc.add.completed")
    client = await _calls(env)
    job = await client.submit("calc.add", {"a": 2, "b": 5})
    assert await job.result(timeout=WAIT) == {"sum": 7}
    assert await job.result(timeout=WAIT) == {"sum": 7}  # readable again
    event = await completed.next()
    assert event.routing_key == "calc.add.completed"
    assert event.exchange == env.names.events_exchange
    assert event.type == "calc.add.completed"
    assert event.correlation_id == job.id
    assert event.headers[H_JOB_ID] == job.id
    assert event.headers["x-status"] == "ok"
    assert decode_json(event.body) == {"sum": 7}


async def event_groups(env: Env) -> None:
    """Every group gets every event once; the instances of a group share them."""
    first, second = FidState(instance="a"), FidState(instance="b")
    await env.start_app(make_fid(first, groups=True))
    await env.start_app(make_fid(second, groups=True))
    client = await env.make_client()
    for n in range(6):
        assert await client.emit("fid.thing.made", {"n": n})
    got: dict[str, list[int]] = {"audit": [], "mail": []}
    instances: set[str] = set()
    merged: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()

    async def pump(source: asyncio.Queue[tuple[str, str, int]]) -> None:
        while True:
            merged.put_nowait(await source.get())

    pumps = [asyncio.create_task(pump(s.events)) for s in (first, second)]
    try:
        while sum(len(v) for v in got.values()) < 12:
            group, instance, n = await _get(merged)
            got[group].append(n)
            instances.add(instance)
    finally:
        for task in pumps:
            task.cancel()
    assert sorted(got["audit"]) == list(range(6))
    assert sorted(got["mail"]) == list(range(6))
    assert instances == {"a", "b"}  # both instances took part
    assert not await client.emit("fid.other", {"n": 0})  # no group matches: not routed


TOPIC_KEYS = ["a.b.c", "a.c", "a", "a.b.b.c", "x.c", "c", "x", "a.b", "b.a.c"]
TOPIC_EXPECTED = {
    "a.*.c": ["a.b.c"],
    "a.#": ["a.b.c", "a.c", "a", "a.b.b.c", "a.b"],
    "#": TOPIC_KEYS,
    "#.c": ["a.b.c", "a.c", "a.b.b.c", "x.c", "c", "b.a.c"],
    "*": ["a", "c", "x"],
    "a.#.c": ["a.b.c", "a.c", "a.b.b.c"],
    "*.a.#": ["b.a.c"],
}


async def topic_patterns(env: Env) -> None:
    """Topic bindings match as RabbitMQ does: `*` one word, `#` zero or more."""
    captures = {
        pattern: await env.capture(env.names.events_exchange, pattern) for pattern in TOPIC_EXPECTED
    }
    client = await env.make_client()
    for key in TOPIC_KEYS:
        assert await client.emit(key, {"n": 0})
    for capture in captures.values():
        # Same publisher, same queue: the end marker arrives after every matched event.
        await client.link.publish(
            Outgoing(exchange="", routing_key=capture.name, body=b"{}", message_id="end"),
            kind="event",
            mandatory=True,
        )
    for pattern, capture in captures.items():
        keys = []
        while (delivery := await capture.next()).message_id != "end":
            keys.append(delivery.routing_key)
        assert keys == TOPIC_EXPECTED[pattern], pattern


async def dead_letter_failed_cast(env: Env) -> None:
    """A cast whose handler raises is parked in the service's DLQ with the reason."""
    await env.start_app(make_fid(FidState()))
    dlq = await env.consume(env.names.dead_letter_queue("fid"))
    client = await env.make_client()
    message_id = await client.cast("fid.boom", {"n": 4})
    parked = await dlq.next()
    assert parked.headers[H_DEAD_REASON] == "failed"
    assert parked.headers[H_ORIGINAL_ROUTING_KEY] == "fid.boom"
    assert parked.message_id == message_id
    assert decode_json(parked.body) == {"n": 4}
    assert not parked.redelivered


async def broker_dead_letter_on_reject(env: Env) -> None:
    """A message a consumer rejects is dead-lettered by the broker, with x-death."""
    names = env.names
    await env.start_app(calc)  # declares the dead-letter exchange and the scheduler's DLQ
    dlq = await env.consume(names.scheduler_dead_letter_queue)
    source = f"{env.settings.namespace}.rejecting"
    args = {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-routing-key": names.scheduler_dead_letter_queue,
    }

    async def reject(delivery: Delivery) -> None:
        await delivery.reject()

    link = env.link_factory(
        "rejecter", env.settings, topology=Topology(queues=[QueueDecl(source, args)])
    )
    link.add_consumer(ConsumerSpec(source, reject))
    env.links.append(link)
    link.start()
    await link.wait_ready(WAIT)
    client = await env.make_client()
    await client.link.publish(
        Outgoing(exchange="", routing_key=source, body=b'{"n": 1}', message_id="foreign"),
        kind="scheduled",
        mandatory=True,
    )
    dead = await dlq.next()
    assert dead.message_id == "foreign"
    assert dead.exchange == names.dead_letter_exchange
    assert dead.routing_key == names.scheduler_dead_letter_queue
    death = dead.headers["x-death"][0]
    assert death["reason"] == "rejected"
    assert death["queue"] == source
    assert death["count"] == 1
    assert dead.headers["x-first-death-reason"] == "rejected"


async def queue_full(env: Env, queue_type: str) -> None:
    """A bounded request queue nacks publishes: classic at the limit, quorum once above it."""
    state = FidState()
    await env.start_app(make_fid(state), prefetch=1, max_queue_length=1, queue_type=queue_type)
    client = await env.make_client()
    accepted = 0
    try:
        for attempt in range(6):
            try:
                await client.link.publish(
                    Outgoing(
                        exchange=env.names.rpc_exchange,
                        routing_key="fid.hold",
                        body=b'{"n": 0}',
                        message_id=uuid.uuid4().hex,
                        correlation_id=uuid.uuid4().hex,
                        reply_to=DIRECT_REPLY_TO,
                        type="fid.hold",
                        headers={"x-burrow-kind": "call"},
                    ),
                    kind="request",
                    mandatory=True,
                )
            except QueueFull:
                break
            accepted += 1
            if attempt == 0:
                async with asyncio.timeout(WAIT):
                    await state.started.wait()  # the first is taken: it no longer counts
    finally:
        state.release.set()
    assert accepted == {"classic": 2, "quorum": 3}[queue_type]


async def delayed_cast(env: Env) -> None:
    """A cast with delay=0.5 goes through the delay ladder and never arrives early."""
    state = FidState()
    await env.start_app(make_fid(state))
    client = await env.make_client()
    before = time.time()
    await client.cast("fid.record", {"n": 9}, delay=0.5)
    n, _, headers, arrived = await _get(state.records)
    assert n == 9
    assert arrived >= before + 0.5
    assert not {H_DUE, H_TARGET_KEY, H_TARGET_EXCHANGE, "x-death"} & set(headers)


async def _get(queue: asyncio.Queue[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        return await queue.get()


SCENARIOS: dict[str, Callable[[Env], Awaitable[None]]] = {
    "call_ok": call_ok,
    "unknown_operation": unknown_operation,
    "invalid_payload": invalid_payload,
    "unroutable_call": unroutable_call,
    "missing_exchange": missing_exchange,
    "deleted_queue": deleted_queue,
    "cast_once": cast_once,
    "submit_result": submit_result,
    "event_groups": event_groups,
    "topic_patterns": topic_patterns,
    "dead_letter_failed_cast": dead_letter_failed_cast,
    "broker_dead_letter_on_reject": broker_dead_letter_on_reject,
    "queue_full_classic": lambda env: queue_full(env, "classic"),
    "queue_full_quorum": lambda env: queue_full(env, "quorum"),
    "delayed_cast": delayed_cast,
}
