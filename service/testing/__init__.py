"""An in-memory broker for unit tests of handlers and clients: `App` and `Client` run unchanged.

It plugs in at the `link_factory` seam and follows RabbitMQ's rules where Burrow relies on them.

Example:
    broker = InMemoryBroker()
    app = App(calc, settings=settings, http=False, link_factory=broker.link_factory)
    client = Client(settings, link_factory=broker.link_factory)
    await app.start()
    await app.wait_ready()
    await client.start()
    assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}
    await broker.drain()
    assert broker.published[0].routing_key == "calc.add"

Modelled: the default, direct, fanout and topic exchanges (RabbitMQ's `*`/`#` rules), bindings
between exchanges, FIFO queues with per-consumer prefetch, manual ack/reject/requeue with the
redelivered flag, round-robin between competing consumers, dead-lettering (`x-dead-letter-*`) on
reject, on `x-message-ttl` / per-message `expiration` expiry (real loop timers, checked at the
head of the queue as RabbitMQ does), on `x-max-length` overflow and on a quorum queue's
`x-delivery-limit`; `x-overflow: reject-publish` (publisher nack: classic queues refuse at the
limit, quorum queues once above it, as RabbitMQ 3.10 does); mandatory returns; direct reply-to;
queue deletion (consumers cancelled); the channel closing (and the link rebuilding) on a
publish to a missing exchange or a reply-to without a reply consumer.
Not modelled: `x-expires` (queues never expire), priorities, headers exchanges, persistence,
transactions, per-connection flow control (`set_blocked` only holds publishes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from service._amqp.link import (
    PUBLISH_OUTCOMES,
    ConsumerSpec,
    LinkFactory,
    LinkState,
    Outbound,
    PublishOutcome,
    check_body_size,
    record_publish,
)
from service._amqp.tools import delete_queues_and_exchanges
from service._amqp.transport import AmqpLink
from service._calling.client import Client
from service._observe.log import get_logger
from service._protocol.config import Settings, load_settings
from service._protocol.errors import ConnectionLost, DeadlineExceeded, NotFound, TopologyError
from service._protocol.registry import Lifespan, Service
from service._protocol.topology import QueueDecl, Topology
from service._protocol.types import Delivery, Outgoing, Settle
from service._protocol.vocabulary import (
    ARG_DEAD_LETTER_EXCHANGE,
    ARG_DEAD_LETTER_ROUTING_KEY,
    ARG_DEAD_LETTER_STRATEGY,
    ARG_DELIVERY_LIMIT,
    ARG_EXPIRES,
    ARG_MAX_LENGTH,
    ARG_MAX_LENGTH_BYTES,
    ARG_MESSAGE_TTL,
    ARG_OVERFLOW,
    ARG_QUEUE_TYPE,
    DIRECT_REPLY_TO,
    H_DEATH,
    H_DELIVERY_COUNT,
    H_FIRST_DEATH_EXCHANGE,
    H_FIRST_DEATH_QUEUE,
    H_FIRST_DEATH_REASON,
)
from service._runtime.app import App
from service._serving.middleware import Middleware

__all__ = [
    "InMemoryBroker",
    "MemoryChannel",
    "MemoryLink",
    "MemoryQueue",
    "MemoryExchange",
    "Message",
    "PublishedMessage",
    "topic_matches",
    "serve",
    "Served",
    "BACKEND_VARIABLE",
    "URL_VARIABLE",
    "delete_topology",
    "delete_entities",
]

_log = get_logger("burrow.testing")

_REPLY_PREFIX = DIRECT_REPLY_TO + "."
# Queue arguments RabbitMQ compares when a queue is declared again (others are ignored).
_EQUIVALENT_ARGS = (
    ARG_QUEUE_TYPE,
    ARG_MESSAGE_TTL,
    ARG_EXPIRES,
    ARG_MAX_LENGTH,
    ARG_MAX_LENGTH_BYTES,
    ARG_OVERFLOW,
    ARG_DEAD_LETTER_EXCHANGE,
    ARG_DEAD_LETTER_ROUTING_KEY,
    ARG_DEAD_LETTER_STRATEGY,
    ARG_DELIVERY_LIMIT,
)
_SOFT_LIMIT = 0.8  # a quorum queue accepts publishes again below 80% of x-max-length


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding key matches a routing key, by RabbitMQ's rules.

    Words are separated by dots; `*` matches exactly one word, `#` zero or more. An empty key
    has no words (so `#` matches it and `*` does not).
    """
    return _match(tuple(pattern.split(".")) if pattern else (), _words(routing_key))


def _words(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()


@lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


@dataclass(eq=False)
class Message:
    """One message held by the broker, with the properties Burrow uses."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    content_encoding: str | None = None
    expiration: str | None = None
    persistent: bool = True
    redelivered: bool = False
    delivery_count: int = 0
    expires_at: float | None = None  # loop time; None: never

    def json(self) -> Any:
        """The body decoded as JSON."""
        return orjson.loads(self.body)

    def copy(self) -> Message:
        """An independent copy (headers deep-copied) for another queue."""
        clone = copy.copy(self)
        clone.headers = copy.deepcopy(self.headers)
        return clone


@dataclass(frozen=True)
class PublishedMessage:
    """What a link published, as captured by the broker, and what became of it."""

    link: str
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    type: str | None
    content_type: str | None
    expiration: str | None
    persistent: bool
    mandatory: bool
    kind: str
    queues: tuple[str, ...]  # where it was routed (a direct reply-to address counts)
    outcome: str  # confirmed | returned | nacked

    def json(self) -> Any:
        """The body decoded as JSON."""
        return orjson.loads(self.body)


@dataclass
class MemoryExchange:
    """An exchange and its outgoing bindings `(destination, key, destination_type)`."""

    name: str
    type: str
    bindings: list[tuple[str, str, str]] = field(default_factory=list)

    def matches(self, binding_key: str, routing_key: str) -> bool:
        """Whether a binding with `binding_key` takes a message keyed `routing_key`."""
        if self.type == "fanout":
            return True
        if self.type == "topic":
            return topic_matches(binding_key, routing_key)
        if self.type == "direct":
            return binding_key == routing_key
        return False  # headers exchanges are not modelled


class _Consumer:
    """One attached consumer: a channel's spec on a queue, with its prefetch window."""

    def __init__(self, channel: MemoryChannel, spec: ConsumerSpec, prefetch: int | None) -> None:
        self.channel = channel
        self.spec = spec
        self.prefetch = None if spec.no_ack else prefetch
        self.unacked = 0

    @property
    def has_room(self) -> bool:
        return self.prefetch is None or self.unacked < self.prefetch


class MemoryQueue:
    """A queue: ready messages in FIFO order, unacked deliveries, consumers taking turns."""

    def __init__(self, broker: InMemoryBroker, name: str, arguments: dict[str, Any]) -> None:
        self.broker = broker
        self.name = name
        self.arguments = dict(arguments)
        self._ready: deque[Message] = deque()
        self._unacked: dict[int, tuple[Message, _Consumer]] = {}
        self._consumers: list[_Consumer] = []
        self._turn = 0
        self._timer: asyncio.TimerHandle | None = None
        self._rejecting = False
        self._peekers: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._ready)

    def __repr__(self) -> str:
        return f"MemoryQueue({self.name!r}, ready={len(self._ready)}, unacked={self.unacked})"

    @property
    def messages(self) -> list[Message]:
        """The ready messages, head first (unacked ones are not included)."""
        return list(self._ready)

    @property
    def unacked(self) -> int:
        """How many deliveries are waiting for an ack."""
        return len(self._unacked)

    @property
    def consumer_count(self) -> int:
        """How many consumers are attached."""
        return len(self._consumers)

    @property
    def quorum(self) -> bool:
        """Whether declared as a quorum queue."""
        return self.arguments.get(ARG_QUEUE_TYPE) == "quorum"

    def purge(self) -> int:
        """Drop every ready message; return how many there were."""
        count = len(self._ready)
        self._ready.clear()
        self._reschedule()
        self.broker._changed()
        return count

    async def peek(self) -> Delivery:
        """The head message as a peeking consumer sees it: waits for one, leaves it queued
        (marked redelivered, as a delivered-then-requeued message is)."""
        while not self._ready:
            arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._peekers.append(arrived)
            try:
                await arrived
            finally:
                if arrived in self._peekers:
                    self._peekers.remove(arrived)
        message = self._ready[0]
        delivery = _delivery(message, 0, None)
        message.redelivered = True
        return delivery

    # -- internals -----------------------------------------------------------------------------

    def _ttl_ms(self, message: Message) -> int | None:
        ttls: list[int] = []
        queue_ttl = self.arguments.get(ARG_MESSAGE_TTL)
        if isinstance(queue_ttl, int):
            ttls.append(queue_ttl)
        if message.expiration is not None:
            with contextlib.suppress(ValueError):
                ttls.append(int(message.expiration))
        return min(ttls) if ttls else None

    def _accepts(self) -> bool:
        limit = self.arguments.get(ARG_MAX_LENGTH)
        if not isinstance(limit, int) or self.arguments.get(ARG_OVERFLOW) not in (
            "reject-publish",
            "reject-publish-dlx",
        ):
            return True
        if self.quorum:
            return not self._rejecting
        return len(self._ready) < limit

    def _enqueue(self, message: Message) -> None:
        ttl = self._ttl_ms(message)
        loop = asyncio.get_running_loop()
        message.expires_at = None if ttl is None else loop.time() + ttl / 1000
        self._ready.append(message)
        for peeker in self._peekers:
            if not peeker.done():
                peeker.set_result(None)
        self._peekers.clear()
        self._enforce_length()
        self._dispatch()
        self._reschedule()

    def _enforce_length(self) -> None:
        limit = self.arguments.get(ARG_MAX_LENGTH)
        if not isinstance(limit, int):
            return
        overflow = self.arguments.get(ARG_OVERFLOW, "drop-head")
        if overflow == "drop-head":
            while len(self._ready) > limit:
                self._dead_letter(self._ready.popleft(), "maxlen")
        elif self.quorum and len(self._ready) > limit:
            self._rejecting = True

    def _update_soft_limit(self) -> None:
        limit = self.arguments.get(ARG_MAX_LENGTH)
        if self._rejecting and isinstance(limit, int) and len(self._ready) < limit * _SOFT_LIMIT:
            self._rejecting = False

    def _attach(self, consumer: _Consumer) -> None:
        self._consumers.append(consumer)
        self._dispatch()

    def _detach(self, channel: MemoryChannel) -> None:
        self._consumers = [c for c in self._consumers if c.channel is not channel]

    def _return_unacked(self, channel: MemoryChannel) -> None:
        mine = [tag for tag, (_, c) in self._unacked.items() if c.channel is channel]
        # Reversed so that, pushed back to the head one by one, they keep their order.
        for tag in reversed(mine):
            message, consumer = self._unacked.pop(tag)
            consumer.unacked -= 1
            self._return(message)
        if mine:
            self._dispatch()
            self._reschedule()

    def _delete(self) -> set[MemoryChannel]:
        """Drop every message; return the channels that consumed from this queue."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        channels = {c.channel for c in self._consumers}
        channels.update(c.channel for _, c in self._unacked.values())
        for _, consumer in self._unacked.values():
            consumer.unacked -= 1
        self._ready.clear()
        self._unacked.clear()
        self._consumers.clear()
        return channels

    def _next_consumer(self) -> _Consumer | None:
        count = len(self._consumers)
        for step in range(count):
            consumer = self._consumers[(self._turn + step) % count]
            if consumer.has_room:
                self._turn = (self._turn + step + 1) % count
                return consumer
        return None

    def _dispatch(self) -> None:
        now = asyncio.get_running_loop().time()
        while self._ready:
            head = self._ready[0]
            if head.expires_at is not None and head.expires_at < now:
                self._dead_letter(self._ready.popleft(), "expired")
                continue
            consumer = self._next_consumer()
            if consumer is None:
                break
            self._ready.popleft()
            self.broker._deliver(self, consumer, head)
        self._update_soft_limit()

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ready and self._ready[0].expires_at is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._ready[0].expires_at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        while self._ready:
            expires_at = self._ready[0].expires_at
            if expires_at is None or expires_at > now:
                break
            self._dead_letter(self._ready.popleft(), "expired")
        self._update_soft_limit()
        self._dispatch()
        self._reschedule()
        self.broker._changed()

    def _settle(self, tag: int, how: Settle) -> None:
        entry = self._unacked.pop(tag, None)
        if entry is None:
            return
        message, consumer = entry
        consumer.unacked -= 1
        if how is Settle.REJECT:
            self._dead_letter(message, "rejected")
        elif how is Settle.REQUEUE:
            self._return(message)
        self._dispatch()
        self._reschedule()
        self.broker._changed()

    def _return(self, message: Message) -> None:
        message.redelivered = True
        message.delivery_count += 1
        limit = self.arguments.get(ARG_DELIVERY_LIMIT)
        if self.quorum and isinstance(limit, int) and message.delivery_count > limit:
            self._dead_letter(message, "delivery_limit")
            return
        # Returned messages go back to the head, before those never delivered.
        self._ready.appendleft(message)

    def _dead_letter(self, message: Message, reason: str) -> None:
        exchange = self.arguments.get(ARG_DEAD_LETTER_EXCHANGE)
        if not isinstance(exchange, str):
            return
        key = self.arguments.get(ARG_DEAD_LETTER_ROUTING_KEY, message.routing_key)
        dead = message.copy()
        deaths = [d for d in dead.headers.get(H_DEATH, []) if isinstance(d, dict)]
        entry: dict[str, Any] | None = None
        for death in deaths:
            if death.get("queue") == self.name and death.get("reason") == reason:
                entry = death
                deaths.remove(death)
                break
        if entry is None:
            entry = {
                "count": 0,
                "reason": reason,
                "queue": self.name,
                "exchange": message.exchange,
                "routing-keys": [message.routing_key],
            }
            if message.expiration is not None:
                entry["original-expiration"] = message.expiration
        entry["count"] = int(entry["count"]) + 1
        entry["time"] = datetime.now(UTC).replace(microsecond=0)
        dead.headers[H_DEATH] = [entry, *deaths]
        dead.headers.setdefault(H_FIRST_DEATH_REASON, reason)
        dead.headers.setdefault(H_FIRST_DEATH_QUEUE, self.name)
        dead.headers.setdefault(H_FIRST_DEATH_EXCHANGE, message.exchange)
        dead.exchange, dead.routing_key = exchange, str(key)
        dead.expiration = None
        dead.redelivered = False
        dead.delivery_count = 0
        self.broker._enqueue_routed(exchange, str(key), dead)


class MemoryChannel:
    """A link's connection to the broker, with one channel; a `MemoryLink` opens one per connect.

    Closing it detaches its consumers and returns their unacked deliveries to the queues;
    settling one of those afterwards does nothing, as on a closed AMQP channel. The broker
    closes it where RabbitMQ closes the channel or cancels a consumer; `on_close(reason)` tells.
    """

    def __init__(self, broker: InMemoryBroker, name: str, on_close: Callable[[str], None]) -> None:
        self.broker = broker
        self.name = name
        self.open = True
        self.close_reason: str | None = None
        self.reply_address: str | None = None
        self._reply_consumer: _Consumer | None = None
        self._on_close = on_close

    def consume(self, spec: ConsumerSpec, prefetch: int | None) -> bool:
        """Attach a consumer; False where RabbitMQ would refuse it (missing queue, exclusive)."""
        consumer = _Consumer(self, spec, prefetch)
        if spec.queue == DIRECT_REPLY_TO:
            if not spec.no_ack or self._reply_consumer is not None:
                return False  # RabbitMQ: one reply-to consumer per channel, and no-ack
            self.reply_address = f"{_REPLY_PREFIX}{uuid.uuid4().hex}"
            self._reply_consumer = consumer
            self.broker._reply_channels[self.reply_address] = self
            return True
        queue = self.broker.queues.get(spec.queue)
        if queue is None:
            return False
        if spec.exclusive and queue.consumer_count:
            return False
        if any(c.spec.exclusive for c in queue._consumers):
            return False
        queue._attach(consumer)
        return True

    def cancel(self) -> None:
        """Detach every consumer, the reply-to one too; unacked deliveries stay settleable."""
        for queue in self.broker.queues.values():
            queue._detach(self)
        if self.reply_address is not None:
            self.broker._reply_channels.pop(self.reply_address, None)
        self.reply_address = None
        self._reply_consumer = None

    def close(self) -> None:
        """Close: consumers detached, unacked deliveries back at the head of their queues."""
        if not self.open:
            return
        self.open = False
        self.cancel()
        for queue in self.broker.queues.values():
            queue._return_unacked(self)
        self.broker._changed()

    def declare_queue(self, queue: QueueDecl) -> None:
        """Declare a queue; a conflicting one closes the channel (as RabbitMQ's 406 does).

        Raises:
            TopologyError: the queue exists with other arguments.
        """
        try:
            self.broker.declare_queue(queue.name, queue.arguments)
        except TopologyError as exc:
            self._closed_by_broker(f"PRECONDITION_FAILED - {exc}")
            raise

    def publish(self, message: Outgoing, *, kind: str, mandatory: bool) -> PublishOutcome:
        """Route `message` as RabbitMQ would, with a confirm; the broker records it."""
        reply_to = message.reply_to
        if reply_to == DIRECT_REPLY_TO:
            if self.reply_address is None:
                self._closed_by_broker("PRECONDITION_FAILED - fast reply consumer does not exist")
                return PublishOutcome.LOST
            reply_to = self.reply_address
        outcome = self.broker._publish(self, message, reply_to, kind=kind, mandatory=mandatory)
        if outcome is PublishOutcome.NO_EXCHANGE:
            self._closed_by_broker(f"NOT_FOUND - no exchange {message.exchange!r}")
        return outcome

    def _closed_by_broker(self, reason: str) -> None:
        if not self.open:
            return
        self.close_reason = reason
        self.close()
        self._on_close(reason)


class MemoryLink(LinkState):
    """A `Link` on an `InMemoryBroker`: the readiness, consumers and errors of `AmqpLink`.

    Where RabbitMQ closes the channel (a publish to a missing exchange, a deleted queue under
    a consumer), it reconnects at once: re-declares its topology and re-attaches.
    """

    def __init__(
        self,
        broker: InMemoryBroker,
        name: str,
        settings: Settings,
        *,
        topology: Topology | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(name, settings, topology=topology, prefetch=prefetch)
        self.broker = broker
        self._channel: MemoryChannel | None = None
        self._closing = False

    @property
    def blocked(self) -> bool:
        """True while the broker holds publishes back (`InMemoryBroker.set_blocked`)."""
        return self.broker.blocked

    @property
    def reply_address(self) -> str | None:
        """Where replies to this link's direct reply-to requests go, while it consumes them."""
        return None if self._channel is None else self._channel.reply_address

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Declare the topology and attach every consumer; `ready` is set when all attached."""
        if self._channel is not None or self._closing:
            return
        try:
            self.broker.apply(self.topology)
        except TopologyError as exc:
            self._set_fatal(exc)
            _log.error("topology conflict; not retrying", link=self.name, error=str(exc))
            self._notify_lost(exc)
            return
        channel = self._channel = self.broker.connect(self.name, self._closed_by_broker)
        wanted = list(self._consumers)
        for spec in wanted:
            if not channel.consume(spec, self.prefetch):
                # RabbitMQ closes the channel (404 / 403); the real link retries forever.
                channel.close()
                self._last_error = f"consumer of {spec.queue!r} not attached"
                _log.warning("consumer not attached", link=self.name, queue=spec.queue)
                return
        self._set_attached(len(wanted))
        self._last_error = None
        self._ready.set()

    async def close(self) -> None:
        """Close: unacked deliveries return to their queues, pending waiters are told."""
        self._closing = True
        self._drop(ConnectionLost("link closed"))

    async def disconnect(self) -> None:
        """Simulate a lost connection, then reconnect at once (re-declare, re-attach)."""
        self._drop(ConnectionLost("connection to the broker lost"))
        self.start()

    async def cancel_consumers(self) -> None:
        """Stop receiving new deliveries; unacked ones can still be settled."""
        self._consumers.clear()
        if self._channel is not None:
            self._channel.cancel()
        self._set_attached(0)

    def _drop(self, reason: BaseException) -> None:
        self._ready.clear()
        channel, self._channel = self._channel, None
        if channel is None:
            return
        self._set_attached(0)
        channel.close()
        self._notify_lost(reason)

    def _closed_by_broker(self, reason: str) -> None:
        # As AmqpLink does when its channel closes: rebuild, re-declare, re-attach.
        _log.warning("channel closed by the broker; reconnecting", link=self.name, reason=reason)
        self._drop(ConnectionLost(f"connection to the broker lost: {reason}"))
        self.start()

    def _live_channel(self) -> MemoryChannel:
        assert self._channel is not None  # ready: connected
        return self._channel

    # -- one-off operations -----------------------------------------------------------------

    async def declare_queue(self, queue: QueueDecl, timeout: float | None = None) -> None:
        """Declare a queue once; a conflicting redeclare raises `ConnectionLost` as the real one."""
        await self._wait_live(self.settings.publish_timeout if timeout is None else timeout)
        try:
            self._live_channel().declare_queue(queue)
        except TopologyError as exc:
            raise ConnectionLost(f"could not declare {queue.name}: {exc}") from None

    async def _declare_on_demand(
        self, topology: Topology, *, requires: str, timeout: float
    ) -> bool:
        """Declare `topology` now if queue `requires` exists (False if not); a conflict raises
        `TopologyError` and leaves the link connected, as the real link (which declares on a
        channel of its own)."""
        await self._wait_live(timeout)
        if requires not in self.broker.queues:
            return False
        self.broker.apply(topology)
        return True

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> bool:
        """Delete a queue, best effort (it may be gone already, or the link not connected);
        True if this call deleted it. With `if_unused` / `if_empty`, only when no consumer is
        attached / no message is ready (unacked deliveries do not count, as on RabbitMQ)."""
        queue = self.broker.queues.get(name)
        if not self._ready.is_set() or queue is None:
            return False
        if (if_unused and queue.consumer_count) or (if_empty and len(queue)):
            return False
        self.broker.delete_queue(name)
        return True

    async def peek(self, queue: str, timeout: float) -> Delivery:
        """Wait for the first message of `queue` and leave it there.

        Raises:
            NotFound: the queue does not exist.
            DeadlineExceeded: nothing arrived within `timeout` seconds.
        """
        await self._wait_live(timeout)
        target = self.broker.queues.get(queue)
        if target is None:
            raise NotFound(f"no such job or its result expired ({queue})")
        try:
            async with asyncio.timeout(timeout):
                return await target.peek()
        except TimeoutError:
            raise DeadlineExceeded(f"nothing in {queue} within {timeout:.1f}s") from None

    # -- publishing --------------------------------------------------------------------------

    async def _send(
        self,
        message: Outgoing,
        *,
        kind: str,
        mandatory: bool,
        timeout: float | None,
        check_size: bool,
    ) -> None:
        """Publish with a confirm; fail exactly as `AmqpLink.publish` (`link.PUBLISH_OUTCOMES`)."""
        if check_size:
            check_body_size(message, kind=kind, limit=self.settings.max_body_bytes)
        timeout = self.settings.publish_timeout if timeout is None else timeout
        await self._wait_live(timeout)
        if self.broker.blocked:
            try:
                async with asyncio.timeout(timeout):
                    await self.broker.unblocked()
            except TimeoutError:
                record_publish(PublishOutcome.NO_CONFIRM, message, kind=kind, timeout=timeout)
        channel = self._channel
        if channel is None:  # lost while held back
            outcome = PublishOutcome.LOST
            detail = "link closed"
        else:
            outcome = channel.publish(message, kind=kind, mandatory=mandatory)
            detail = channel.close_reason or ""
        await asyncio.sleep(0)  # the confirm is a round trip: let other tasks run meanwhile
        record_publish(outcome, message, kind=kind, timeout=timeout, detail=detail)


class InMemoryBroker:
    """Exchanges, queues and bindings in this process; pass `link_factory` to `App`/`Client`."""

    def __init__(self) -> None:
        self.exchanges: dict[str, MemoryExchange] = {"": MemoryExchange("", "direct")}
        self.queues: dict[str, MemoryQueue] = {}
        self.published: list[PublishedMessage] = []
        self.links: list[MemoryLink] = []
        self._reply_channels: dict[str, MemoryChannel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[asyncio.Future[None], bool]] = []
        self._tags = itertools.count(1)
        self._unblocked = asyncio.Event()
        self._unblocked.set()

    # -- for App and Client --------------------------------------------------------------------

    def link_factory(
        self,
        name: str,
        settings: Settings,
        *,
        topology: Topology | None = None,
        prefetch: int | None = None,
    ) -> MemoryLink:
        """Make a link on this broker (the `link_factory=` of `App`, `Client`, `Transport`)."""
        link = MemoryLink(self, name, settings, topology=topology, prefetch=prefetch)
        self.links.append(link)
        return link

    def connect(self, name: str, on_close: Callable[[str], None]) -> MemoryChannel:
        """Open a channel for the link `name`; `on_close(reason)` when the broker closes it."""
        return MemoryChannel(self, name, on_close)

    # -- declarations --------------------------------------------------------------------------

    def declare_exchange(self, name: str, type: str = "topic") -> MemoryExchange:
        """Declare an exchange; a different type for an existing one is a `TopologyError`."""
        existing = self.exchanges.get(name)
        if existing is not None:
            if existing.type != type:
                raise TopologyError(
                    f"exchange {name!r} exists with type {existing.type!r}, not {type!r}"
                )
            return existing
        exchange = self.exchanges[name] = MemoryExchange(name, type)
        return exchange

    def declare_queue(self, name: str, arguments: dict[str, Any] | None = None) -> MemoryQueue:
        """Declare a queue; other `x-` arguments for an existing one are a `TopologyError`."""
        arguments = arguments or {}
        existing = self.queues.get(name)
        if existing is not None:
            for key in _EQUIVALENT_ARGS:
                ours, theirs = _arg(existing.arguments, key), _arg(arguments, key)
                if ours != theirs:
                    raise TopologyError(
                        f"queue {name!r} exists with {key}={ours!r}, declared with {theirs!r}"
                    )
            return existing
        queue = self.queues[name] = MemoryQueue(self, name, arguments)
        return queue

    def delete_queue(self, name: str) -> int:
        """Delete a queue with its messages and bindings; return how many messages were ready.

        As on RabbitMQ, its consumers are cancelled: their links rebuild (and re-declare what
        their topology holds). Deleting a queue that does not exist does nothing.
        """
        queue = self.queues.pop(name, None)
        if queue is None:
            return 0
        count = len(queue)
        for exchange in self.exchanges.values():
            exchange.bindings = [
                b for b in exchange.bindings if not (b[0] == name and b[2] == "queue")
            ]
        for channel in queue._delete():
            channel._closed_by_broker(f"consumer cancelled: queue {name!r} deleted")
        self._changed()
        return count

    def bind(
        self, exchange: str, destination: str, key: str, destination_type: str = "queue"
    ) -> None:
        """Bind a queue (or, with destination_type="exchange", an exchange) to an exchange."""
        source = self.exchanges.get(exchange)
        target_exists = (
            destination in self.exchanges
            if destination_type == "exchange"
            else destination in self.queues
        )
        if source is None or not target_exists or exchange == "":
            raise TopologyError(f"cannot bind {destination!r} to {exchange!r}: not found")
        binding = (destination, key, destination_type)
        if binding not in source.bindings:
            source.bindings.append(binding)

    def apply(self, topology: Topology) -> None:
        """Declare a whole topology: exchanges, then queues, then bindings."""
        for ex in topology.exchanges:
            self.declare_exchange(ex.name, ex.type)
        for queue in topology.queues:
            self.declare_queue(queue.name, queue.arguments)
        for b in topology.bindings:
            self.bind(b.exchange, b.destination, b.key, b.destination_type)

    def queue(self, name: str) -> MemoryQueue:
        """The queue called `name` (KeyError if it was never declared)."""
        try:
            return self.queues[name]
        except KeyError:
            raise KeyError(f"no queue {name!r}; declared: {sorted(self.queues)}") from None

    def routes(self, exchange: str, routing_key: str) -> list[str]:
        """The queues a message published to `exchange` with `routing_key` would reach."""
        return self._route(exchange, routing_key) or []

    # -- helpers for tests -------------------------------------------------------------------

    @property
    def blocked(self) -> bool:
        """Whether publishes are held back, as under a RabbitMQ resource alarm."""
        return not self._unblocked.is_set()

    def set_blocked(self, blocked: bool) -> None:
        """Hold publishes back (they time out with `PublishFailed`) or release them."""
        if blocked:
            self._unblocked.clear()
        else:
            self._unblocked.set()

    async def unblocked(self) -> None:
        """Return once publishes are no longer held back."""
        await self._unblocked.wait()

    async def drain(self, timeout: float = 10.0, *, timers: bool = True) -> None:
        """Wait until idle: no handler running, nothing unacked, nothing deliverable waiting.

        Args:
            timers: also wait for messages with a TTL to expire (delays, dead-lettering).

        Raises:
            TimeoutError: still busy after `timeout` seconds (the message says where).
        """
        if not self._busy(timers):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, timers)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise TimeoutError(
                f"broker still busy after {timeout:.1f}s: {self._describe()}"
            ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def settled(self, timeout: float = 10.0) -> None:
        """Wait until every delivery is settled and no handler runs (TTL timers not awaited)."""
        await self.drain(timeout, timers=False)

    # -- internals -----------------------------------------------------------------------------

    def _busy(self, timers: bool) -> bool:
        if self._tasks:
            return True
        for queue in self.queues.values():
            if queue._unacked:
                return True
            if queue._ready and any(c.has_room for c in queue._consumers):
                return True
            if timers and queue._timer is not None:
                return True
        return False

    def _describe(self) -> str:
        parts = [f"{len(self._tasks)} handler task(s)"] if self._tasks else []
        parts += [
            repr(q)
            for q in self.queues.values()
            if q._unacked or q._timer is not None or (q._ready and q._consumers)
        ]
        return ", ".join(parts) or "nothing"

    def _changed(self) -> None:
        if not self._waiters:
            return
        for waiter, timers in list(self._waiters):
            if not waiter.done() and not self._busy(timers):
                waiter.set_result(None)

    def _route(self, exchange: str, routing_key: str) -> list[str] | None:
        if exchange == "":
            return [routing_key] if routing_key in self.queues else []
        if exchange not in self.exchanges:
            return None
        found: dict[str, None] = {}
        seen: set[str] = set()
        pending = [exchange]
        while pending:
            current = self.exchanges.get(pending.pop())
            if current is None or current.name in seen:
                continue
            seen.add(current.name)
            for destination, key, kind in current.bindings:
                if not current.matches(key, routing_key):
                    continue
                if kind == "exchange":
                    pending.append(destination)
                elif destination in self.queues:
                    found[destination] = None
        return list(found)

    def _enqueue_routed(self, exchange: str, routing_key: str, message: Message) -> list[str]:
        """Route and enqueue without confirms (dead-lettering); return where it went."""
        queues = self._route(exchange, routing_key) or []
        for name in queues:
            self.queues[name]._enqueue(message.copy())
        return queues

    def _publish(
        self,
        channel: MemoryChannel,
        outgoing: Outgoing,
        reply_to: str | None,
        *,
        kind: str,
        mandatory: bool,
    ) -> PublishOutcome:
        message = Message(
            exchange=outgoing.exchange,
            routing_key=outgoing.routing_key,
            body=bytes(outgoing.body),
            message_id=outgoing.message_id,
            correlation_id=outgoing.correlation_id,
            reply_to=reply_to,
            type=outgoing.type,
            headers=copy.deepcopy(outgoing.headers),
            content_type=outgoing.content_type,
            content_encoding=outgoing.content_encoding,
            expiration=(
                str(outgoing.expiration_ms) if outgoing.expiration_ms is not None else None
            ),
            persistent=outgoing.persistent,
        )
        queues: list[str]
        outcome = PublishOutcome.CONFIRMED
        if outgoing.exchange == "" and outgoing.routing_key.startswith(_REPLY_PREFIX):
            target = self._reply_channels.get(outgoing.routing_key)
            queues = [outgoing.routing_key] if target is not None else []
            if target is not None and target._reply_consumer is not None:
                self._run(target._reply_consumer, _delivery(message, 0, None))
        else:
            routed = self._route(outgoing.exchange, outgoing.routing_key)
            if routed is None:
                return PublishOutcome.NO_EXCHANGE  # RabbitMQ: 404 NOT_FOUND, channel closed
            queues = routed
            refused = [name for name in queues if not self.queues[name]._accepts()]
            for name in queues:
                if name not in refused:
                    self.queues[name]._enqueue(message.copy())
            if refused:
                outcome = PublishOutcome.NACKED
        if not queues and mandatory:
            outcome = PublishOutcome.RETURNED
        self.published.append(
            PublishedMessage(
                link=channel.name,
                exchange=outgoing.exchange,
                routing_key=outgoing.routing_key,
                body=message.body,
                headers=copy.deepcopy(outgoing.headers),
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=reply_to,
                type=message.type,
                content_type=message.content_type,
                expiration=message.expiration,
                persistent=message.persistent,
                mandatory=mandatory,
                kind=kind,
                queues=tuple(queues),
                outcome=PUBLISH_OUTCOMES[outcome].label or outcome.value,
            )
        )
        self._changed()
        return outcome

    def _deliver(self, queue: MemoryQueue, consumer: _Consumer, message: Message) -> None:
        tag = next(self._tags)
        settle_fn = None
        if not consumer.spec.no_ack:
            consumer.unacked += 1
            queue._unacked[tag] = (message, consumer)
            channel = consumer.channel

            async def settle(delivery: Delivery, how: Settle) -> None:
                if not channel.open:
                    # Its channel is gone: the message was already returned to the queue.
                    _log.info("stale delivery not settled; broker will redeliver", how=how.value)
                    return
                queue._settle(tag, how)

            settle_fn = settle
        delivery = _delivery(message, tag, settle_fn)
        delivery.queue = queue.name  # retries go back to the queue it came from
        if queue.quorum and message.delivery_count:
            delivery.headers[H_DELIVERY_COUNT] = message.delivery_count
        self._run(consumer, delivery)

    def _run(self, consumer: _Consumer, delivery: Delivery) -> None:
        callback = consumer.spec.callback

        async def run() -> None:
            try:
                await callback(delivery)
            except Exception:
                _log.exception("consumer callback raised", queue=consumer.spec.queue)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._changed()


def _arg(arguments: dict[str, Any], key: str) -> Any:
    value = arguments.get(key)
    if key == ARG_QUEUE_TYPE and value is None:
        return "classic"
    return value


def _delivery(
    message: Message, tag: int, settle_fn: Callable[[Delivery, Settle], Awaitable[None]] | None
) -> Delivery:
    return Delivery(
        body=message.body,
        routing_key=message.routing_key,
        exchange=message.exchange,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        type=message.type,
        headers=copy.deepcopy(message.headers),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        expiration=message.expiration,
        redelivered=message.redelivered,
        delivery_tag=tag,
        settle_fn=settle_fn,
    )


# -- serving services in a test ----------------------------------------------------------------

BACKEND_VARIABLE = "BURROW_TEST_BACKEND"  # memory (default) | rabbitmq
URL_VARIABLE = "BURROW_TEST_AMQP_URL"  # the rabbitmq backend's broker, over BURROW_AMQP_URL


_NO_BROKER = (
    "this test runs on RabbitMQ ({variable}=rabbitmq or --burrow-backend rabbitmq), and "
    "`broker` is the in-memory broker's: `broker.{name}` needs the memory backend. To run on "
    "both, wait with `await served.settle()` and assert what the client and the handlers saw; "
    'or pin this test with `serve(..., backend="memory")`'
)


class _RealBroker:
    """What `broker` is when `serve` runs on RabbitMQ: every use of it raises a `RuntimeError`
    that says so and what to write instead (not an `AttributeError` on None)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(_NO_BROKER.format(variable=BACKEND_VARIABLE, name=name))

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<no in-memory broker: the test runs on RabbitMQ>"


class Served:
    """What `serve` yields: the running `app`, a connected `client`, and (in memory) the
    `broker`. Unpacks as `(client, broker)`; on RabbitMQ that `broker` is a stand-in
    which refuses every use with an error saying why."""

    def __init__(self, app: App, client: Client, broker: InMemoryBroker | None) -> None:
        self.app = app
        self.client = client
        self._broker = broker

    @property
    def broker(self) -> InMemoryBroker:
        """The in-memory broker (what was published, queue contents, `drain`)."""
        if self._broker is None:
            raise RuntimeError(_NO_BROKER.format(variable=BACKEND_VARIABLE, name="…"))
        return self._broker

    @property
    def in_memory(self) -> bool:
        """Whether the services run on the in-memory broker."""
        return self._broker is not None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.client, _RealBroker() if self._broker is None else self._broker))

    async def settle(self) -> None:
        """Wait until nothing is left to do: `broker.drain()` in memory; on the real broker,
        until no handler is running."""
        if self._broker is not None:
            await self._broker.drain()
            return
        for server in self.app.servers:
            await server.idle.wait()


@contextlib.asynccontextmanager
async def serve(
    *services: Service,
    backend: str | None = None,
    middleware: Sequence[Middleware] = (),
    outbound: Sequence[Outbound] = (),
    lifespan: Lifespan | None = None,
    **settings: Any,
) -> AsyncIterator[Served]:
    """Run `services` with a connected `Client`; stop both (and clean up) afterwards.

    Args:
        backend: `memory` (a fresh `InMemoryBroker`, the default) or `rabbitmq` (the broker of
            `BURROW_TEST_AMQP_URL` when set, else of `BURROW_AMQP_URL`, in a namespace of its
            own whose queues and exchanges are deleted afterwards). Unset:
            `BURROW_TEST_BACKEND`, else `memory` (Burrow's pytest plugin sets both variables
            from `--burrow-backend` and `--burrow-amqp-url`). The same test runs on both; on
            RabbitMQ the `broker` it yields refuses every use with an error saying why.
        middleware, outbound, lifespan: as for `App`.
        settings: `Settings` fields, over the `BURROW_*` variables (`http=False` always); an
            `amqp_url` here wins over `BURROW_TEST_AMQP_URL`.

    Example:
        async with serve(calc) as (client, broker):
            assert await client.call("calc.add", {"a": 1, "b": 2}) == {"sum": 3}
    """
    chosen = backend or os.environ.get(BACKEND_VARIABLE) or "memory"
    if chosen not in ("memory", "rabbitmq"):
        raise ValueError(f"{BACKEND_VARIABLE} / backend: memory or rabbitmq, not {chosen!r}")
    broker = InMemoryBroker() if chosen == "memory" else None
    if broker is None:
        # A test run names its broker apart from the one the services deploy against.
        test_url = os.environ.get(URL_VARIABLE)
        if test_url and "amqp_url" not in settings:
            settings["amqp_url"] = test_url
        if "namespace" not in settings:
            base = load_settings().namespace
            settings["namespace"] = f"{base}-t{uuid.uuid4().hex[:10]}"
    config = load_settings(**settings)
    factory: LinkFactory = AmqpLink if broker is None else broker.link_factory
    app = App(
        *services,
        settings=config,
        http=False,
        link_factory=factory,
        middleware=middleware,
        outbound=outbound,
        lifespan=lifespan,
    )
    client = Client(config, link_factory=factory)
    try:
        await app.start()
        await app.wait_ready(config.connect_timeout + 5)
        await client.start()
        yield Served(app, client, broker)
    finally:
        await client.close()
        await app.stop()
        if broker is None:
            await delete_topology(app.topology, url=config.login_url(config.amqp_urls()[0]))


async def delete_topology(*topologies: Topology, url: str) -> None:
    """Delete every queue and exchange these topologies declare, on the broker at `url`."""
    queues = {queue.name for topology in topologies for queue in topology.queues}
    exchanges = {exchange.name for topology in topologies for exchange in topology.exchanges}
    await delete_entities(queues, exchanges, url)


async def delete_entities(queues: Iterable[str], exchanges: Iterable[str], url: str) -> None:
    """Delete these queues and exchanges, best effort, on one connection: a refused delete (the
    node holding the queue is down, say) closes only its channel and the rest is deleted."""
    await delete_queues_and_exchanges(url, queues, exchanges)
