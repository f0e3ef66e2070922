"""The seam between Burrow and a broker: the `Link` Protocol, and what each publish outcome means.

`transport.AmqpLink` (RabbitMQ) and `testing.MemoryLink` (in process) implement `Link`; neither
inherits from the other. Both report publishes through one table, `PUBLISH_OUTCOMES`.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol

from service._observe import metrics
from service._observe.log import get_logger
from service._protocol import tracing
from service._protocol.errors import (
    BurrowError,
    ConnectionLost,
    MessageTooLarge,
    PublishFailed,
    QueueFull,
    ServiceError,
    Unavailable,
    Unroutable,
)
from service._protocol.topology import QueueDecl, Topology, delay_ladder
from service._protocol.types import Delivery, DeliveryCallback, Outgoing
from service._protocol.vocabulary import H_DUE, LEVELS, UNIT_MS, Names, PublishKind, delay_route

if TYPE_CHECKING:
    from prometheus_client import Counter

    from service._protocol.config import Settings

LostCallback = Callable[[BaseException], None]
_log = get_logger("burrow.link")


@dataclass(slots=True)
class Publishing:
    """One publish on its way out, as outbound middleware sees it: change `message` (its
    headers, say) or the whole object before passing it on."""

    message: Outgoing
    kind: str  # request, command, reply, completion, event, dead_letter, retry, scheduled
    mandatory: bool
    timeout: float | None = None
    check_size: bool = True


PublishNext = Callable[[Publishing], Awaitable[None]]
# Outbound middleware: `async def layer(publishing, call_next)`, awaiting `call_next` to send.
Outbound = Callable[[Publishing, PublishNext], Awaitable[None]]
# Outbound layers of what is being handled (its Service's and operation's), inside the link's
# own: set by the dispatcher for the length of one message.
OUTBOUND_SCOPE: ContextVar[tuple[Outbound, ...]] = ContextVar("burrow_outbound", default=())


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A consumer to keep attached: re-created on every reconnect."""

    queue: str
    callback: DeliveryCallback
    no_ack: bool = False
    exclusive: bool = False
    # For a no-ack consumer whose work never waits (resolving a future): a link may call this
    # in its frame reader instead of running `callback` as a task per delivery. It must not
    # raise; `callback` must do the same work.
    inline: Callable[[Delivery], None] | None = None


class Link(Protocol):
    """One supervised broker connection: consumers kept attached, confirmed publishes.

    Consumers and lost-callbacks are registered before `start` (or take effect on the next
    connect); everything else a caller reads is read-only.
    """

    @property
    def name(self) -> str:
        """`consumer`, `publisher`, `client`…: a metric label and the connection name."""
        ...

    @property
    def ready(self) -> asyncio.Event:
        """Set while connected, topology declared and every consumer attached."""
        ...

    @property
    def failed(self) -> asyncio.Event:
        """Set together with `fatal`."""
        ...

    @property
    def fatal(self) -> BurrowError | None:
        """A failure retrying cannot fix (login refused, topology conflict); None otherwise."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the last connect failed (for `/readyz`); None once connected."""
        ...

    @property
    def attached(self) -> int:
        """How many consumers are attached right now."""
        ...

    @property
    def consumers(self) -> Sequence[ConsumerSpec]:
        """The consumers this link keeps attached."""
        ...

    @property
    def blocked(self) -> bool:
        """True while the broker holds publishes back (a resource alarm)."""
        ...

    def add_consumer(self, spec: ConsumerSpec) -> None:
        """Keep `spec` attached from the next connect on."""
        ...

    def replace_consumers(self, specs: Iterable[ConsumerSpec]) -> None:
        """Keep exactly `specs` attached from the next connect on (e.g. to wrap callbacks)."""
        ...

    def on_lost(self, callback: LostCallback) -> None:
        """Call `callback(reason)` every time the connection is lost or the link fails."""
        ...

    def start(self) -> None:
        """Begin connecting in the background."""
        ...

    async def wait_ready(self, timeout: float) -> None:
        """Wait until `ready`; raise `fatal`, or `Unavailable` after `timeout` seconds."""
        ...

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        ...

    async def cancel_consumers(self) -> None:
        """Stop receiving new deliveries; unacked ones can still be settled."""
        ...

    async def declare_queue(self, queue: QueueDecl, timeout: float | None = None) -> None:
        """Declare a queue once (not re-declared on reconnect)."""
        ...

    async def delete_queue(
        self, name: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> bool:
        """Delete a queue, best effort (it may be gone already); True if this call deleted it.

        Args:
            if_unused: only if no consumer is attached to it.
            if_empty: only if it holds no ready message.
        """
        ...

    async def peek(self, queue: str, timeout: float) -> Delivery:
        """The first message of `queue`, left there; `NotFound`, `DeadlineExceeded` otherwise."""
        ...

    async def publish(
        self,
        message: Outgoing,
        *,
        kind: str,
        mandatory: bool,
        timeout: float | None = None,
        check_size: bool = True,
    ) -> None:
        """Publish with a broker confirm; raise the `PUBLISH_OUTCOMES` error when it fails."""
        ...

    def use(self, *outbound: Outbound) -> None:
        """Run every later publish through `outbound` (outermost first)."""
        ...


class LinkFactory(Protocol):
    """Builds a link: `transport.AmqpLink` itself, or `InMemoryBroker.link_factory`."""

    def __call__(
        self,
        name: str,
        settings: Settings,
        *,
        topology: Topology | None = None,
        prefetch: int | None = None,
    ) -> Link: ...


class PublishOutcome(Enum):
    """What became of one publish, in the broker's terms (each link maps its own signals)."""

    CONFIRMED = "confirmed"
    RETURNED = "returned"  # mandatory, and no queue is bound for the route
    NO_EXCHANGE = "no_exchange"  # the exchange does not exist (RabbitMQ: 404, channel closed)
    NACKED = "nacked"  # the broker refused it: queue at max-length, resource limit
    NO_CONFIRM = "no_confirm"  # no answer within the timeout: delivery unknown
    LOST = "lost"  # the connection or channel went away before the confirm
    TOO_LARGE = "too_large"  # refused before sending: body above max_body_bytes


@dataclass(frozen=True, slots=True)
class OutcomeRule:
    """How an outcome is reported: its metric label and the error raised (None: success).

    `text` is formatted with exchange, routing_key, kind, size, limit, timeout and detail.
    """

    label: str | None  # burrow_messages_published_total{outcome}; None: never sent, not counted
    error: type[ServiceError] | None
    text: str = ""


PUBLISH_OUTCOMES: Final[Mapping[PublishOutcome, OutcomeRule]] = MappingProxyType(
    {
        PublishOutcome.CONFIRMED: OutcomeRule("confirmed", None),
        PublishOutcome.RETURNED: OutcomeRule(
            "returned",
            Unroutable,
            "no queue is bound for {routing_key!r} on {exchange!r} (service not deployed?)",
        ),
        PublishOutcome.NO_EXCHANGE: OutcomeRule(
            "returned", Unroutable, "no exchange {exchange!r} (nothing deployed?)"
        ),
        PublishOutcome.NACKED: OutcomeRule(
            "nacked", QueueFull, "the broker refused the message (queue full or resource limit)"
        ),
        PublishOutcome.NO_CONFIRM: OutcomeRule(
            "timeout",
            PublishFailed,
            "no confirm from the broker within {timeout:.1f}s; delivery unknown",
        ),
        PublishOutcome.LOST: OutcomeRule(
            "lost", ConnectionLost, "connection lost while publishing: {detail}"
        ),
        PublishOutcome.TOO_LARGE: OutcomeRule(
            None, MessageTooLarge, "{kind} body of {size} bytes exceeds the limit of {limit}"
        ),
    }
)

_counters: dict[tuple[str, str], Counter] = {}


def record_publish(
    outcome: PublishOutcome,
    message: Outgoing,
    *,
    kind: str,
    timeout: float = 0.0,
    detail: str = "",
    limit: int = 0,
) -> None:
    """Count one publish by its outcome; raise the error the outcome means (none if confirmed).

    Args:
        kind: the publish's purpose (`request`, `reply`, …), a metric label.
        detail: what the library said (for `LOST`).
        limit: the body size limit (for `TOO_LARGE`).
    """
    rule = PUBLISH_OUTCOMES[outcome]
    if rule.label is not None:
        counter = _counters.get((kind, rule.label))
        if counter is None:
            counter = _counters[kind, rule.label] = metrics.MESSAGES_PUBLISHED.labels(
                kind, rule.label
            )
        counter.inc()
    if rule.error is not None:
        raise rule.error(
            rule.text.format(
                exchange=message.exchange,
                routing_key=message.routing_key,
                kind=kind,
                size=len(message.body),
                limit=limit,
                timeout=timeout,
                detail=detail,
            )
        )


def check_body_size(message: Outgoing, *, kind: str, limit: int) -> None:
    """Raise `MessageTooLarge` when the body is above `limit` bytes."""
    if len(message.body) > limit:
        record_publish(PublishOutcome.TOO_LARGE, message, kind=kind, limit=limit)


class LinkState(ABC):
    """The bookkeeping both links share: consumers to attach, readiness, lost-callbacks.

    Only state, no connection: the seam is the `Link` Protocol, not this class.
    """

    def __init__(
        self,
        name: str,
        settings: Settings,
        *,
        topology: Topology | None = None,
        prefetch: int | None = None,
    ) -> None:
        self._name = name
        self.settings = settings
        self.topology = topology or Topology()
        self.prefetch = prefetch
        self._consumers: list[ConsumerSpec] = []
        self._lost_callbacks: list[LostCallback] = []
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._fatal: BurrowError | None = None
        self._last_error: str | None = None
        self._attached = 0
        self._attached_gauge = metrics.CONSUMERS_ATTACHED.labels(name)
        self._outbound: list[Outbound] = []
        self._send_chain: PublishNext | None = None  # set once outbound middleware is added
        # With OUTBOUND_SCOPE's layers inside the link's own, built once per scope.
        self._scoped_chains: dict[tuple[Outbound, ...], PublishNext] = {}
        # The delay ladder is declared by the first publish into it on each connection.
        names = Names(settings.namespace)
        self._ladder_entry = names.delay_exchange(LEVELS - 1)
        self._ladder_end = names.delay_ready_queue
        self._ladder: Topology | None = None  # built at its first use
        self._ladder_lock = asyncio.Lock()
        self._connection_number = 0  # one more at every loss: "this connection"
        self._ladder_declared_on: int | None = None  # the connection that declared it
        metrics.watch_link(self)

    @property
    def name(self) -> str:
        """`consumer`, `publisher`, `client`…: a metric label and the connection name."""
        return self._name

    @property
    def ready(self) -> asyncio.Event:
        """Set while connected, topology declared and every consumer attached."""
        return self._ready

    @property
    def failed(self) -> asyncio.Event:
        """Set together with `fatal`."""
        return self._failed

    @property
    def fatal(self) -> BurrowError | None:
        """A failure retrying cannot fix; None otherwise."""
        return self._fatal

    @property
    def last_error(self) -> str | None:
        """Why the last connect failed; None once connected."""
        return self._last_error

    @property
    def attached(self) -> int:
        """How many consumers are attached right now."""
        return self._attached

    @property
    def consumers(self) -> Sequence[ConsumerSpec]:
        """The consumers this link keeps attached."""
        return tuple(self._consumers)

    @property
    @abstractmethod
    def blocked(self) -> bool:
        """True while the broker holds publishes back (a resource alarm)."""

    async def publish(
        self,
        message: Outgoing,
        *,
        kind: str,
        mandatory: bool,
        timeout: float | None = None,
        check_size: bool = True,
    ) -> None:
        """Publish with a broker confirm (through the outbound middleware, if any); raise
        what `PUBLISH_OUTCOMES` says when it fails. With spans recorded, the publish is a
        PRODUCER span whose context the message carries. A publish into the delay ladder
        declares the ladder first, once per connection (`_deliver`)."""
        span = tracing.start_producer(
            message.type or kind,
            message.headers,
            kind=kind,
            exchange=message.exchange,
            routing_key=message.routing_key,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            body=message.body,
        )
        chain = self._send_chain
        scoped = OUTBOUND_SCOPE.get()
        if scoped:
            chain = self._scoped_chains.get(scoped)
            if chain is None:
                chain = self._scoped_chains[scoped] = _chain([*self._outbound, *scoped], self)
        try:
            if chain is None:
                await self._deliver(
                    message, kind=kind, mandatory=mandatory, timeout=timeout, check_size=check_size
                )
            else:
                await chain(Publishing(message, kind, mandatory, timeout, check_size))
        except BaseException as exc:
            tracing.end_producer(span, exc)
            raise
        tracing.end_producer(span)

    def use(self, *outbound: Outbound) -> None:
        """Run every later publish through `outbound` (outermost first)."""
        self._outbound.extend(outbound)
        # No layer: publishes call `_send` directly (no `Publishing` per message).
        self._send_chain = _chain(self._outbound, self) if self._outbound else None
        self._scoped_chains.clear()

    async def _send_publishing(self, publishing: Publishing) -> None:
        await self._deliver(
            publishing.message,
            kind=publishing.kind,
            mandatory=publishing.mandatory,
            timeout=publishing.timeout,
            check_size=publishing.check_size,
        )

    async def _deliver(
        self,
        message: Outgoing,
        *,
        kind: str,
        mandatory: bool,
        timeout: float | None,
        check_size: bool,
    ) -> None:
        """`_send`, but for a publish into the delay ladder: the ladder is declared first, once
        per connection (again after a reconnect: a namespace's queues may have been deleted
        meanwhile), so a namespace holds its 25 holding queues only once a delay needed them."""
        if message.exchange != self._ladder_entry:
            await self._send(
                message, kind=kind, mandatory=mandatory, timeout=timeout, check_size=check_size
            )
            return
        if check_size:  # before declaring anything for it
            check_body_size(message, kind=kind, limit=self.settings.max_body_bytes)
        declared = self._ladder_declared_on == self._connection_number
        if not declared:
            message = await self._declare_ladder(message, kind=kind, timeout=timeout)
        try:
            await self._send(
                message, kind=kind, mandatory=mandatory, timeout=timeout, check_size=False
            )
        except Unroutable:
            if not declared:
                raise
            # Every ladder route ends in one queue: returned means the ladder (or its exchange)
            # was deleted under this connection. Nothing was enqueued: declare it again, once.
            self._ladder_declared_on = None
            message = await self._declare_ladder(message, kind=kind, timeout=timeout)
            await self._send(
                message, kind=kind, mandatory=mandatory, timeout=timeout, check_size=False
            )

    async def _declare_ladder(
        self, message: Outgoing, *, kind: str, timeout: float | None
    ) -> Outgoing:
        """Declare the delay ladder on this connection unless done already; `message` routed
        again from its due time (declaring takes a while). `Unroutable` (counted as returned,
        as a publish into a missing ladder was) when the namespace has no ready queue: no
        service ever ran there to forward what comes out of the ladder."""
        timeout = self.settings.publish_timeout if timeout is None else timeout
        async with self._ladder_lock:
            connection = self._connection_number
            if self._ladder_declared_on != connection:
                if self._ladder is None:
                    self._ladder = delay_ladder(self.settings)
                found = await self._declare_on_demand(
                    self._ladder, requires=self._ladder_end, timeout=timeout
                )
                if not found:
                    record_publish(PublishOutcome.RETURNED, message, kind=kind)
                if connection == self._connection_number:  # not lost meanwhile
                    self._ladder_declared_on = connection
                _log.debug("delay ladder declared", link=self.name)
        return _rerouted(message)

    @abstractmethod
    async def _declare_on_demand(
        self, topology: Topology, *, requires: str, timeout: float
    ) -> bool:
        """Declare `topology` now, on the current connection (not again on reconnect), once
        queue `requires` is found to exist; False when it does not (nothing declared).

        A conflicting or refused declare raises `TopologyError` and leaves the link as it was;
        `Unavailable` when not connected within `timeout` seconds or the declare is cut short.
        Passive (`Settings.passive_topology`): only checks that everything exists.
        """

    @abstractmethod
    async def _send(
        self,
        message: Outgoing,
        *,
        kind: str,
        mandatory: bool,
        timeout: float | None,
        check_size: bool,
    ) -> None:
        """The link's own publish with a confirm."""

    def add_consumer(self, spec: ConsumerSpec) -> None:
        """Keep `spec` attached from the next connect on."""
        self._consumers.append(spec)

    def replace_consumers(self, specs: Iterable[ConsumerSpec]) -> None:
        """Keep exactly `specs` attached from the next connect on (e.g. to wrap callbacks)."""
        self._consumers = list(specs)

    def on_lost(self, callback: LostCallback) -> None:
        """Call `callback(reason)` every time the connection is lost or the link fails."""
        self._lost_callbacks.append(callback)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until connected, topology declared and consumers attached; raise on fatal."""
        loop = asyncio.get_running_loop()
        fatal = loop.create_task(self._failed.wait())
        ready = loop.create_task(self._ready.wait())
        try:
            await asyncio.wait({fatal, ready}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            fatal.cancel()
            ready.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not self._ready.is_set():
            raise Unavailable(
                f"{self.name} link not ready after {timeout:.1f}s "
                f"(broker at {', '.join(self.settings.redacted_urls())})"
            )

    # -- for the implementations -------------------------------------------------------------

    def _set_attached(self, count: int) -> None:
        self._attached = count
        self._attached_gauge.set(count)

    def _set_fatal(self, error: BurrowError) -> None:
        self._fatal = error
        self._failed.set()

    def _notify_lost(self, reason: BaseException) -> None:
        self._connection_number += 1  # what was declared on demand is declared again
        for callback in list(self._lost_callbacks):
            callback(reason)

    async def _wait_live(self, timeout: float) -> None:
        """Return once ready; `Unavailable` if not within `timeout` seconds."""
        if self._ready.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            raise Unavailable("not connected to the broker") from None


def _rerouted(message: Outgoing) -> Outgoing:
    """A ladder message's routing key spelled again from its `x-burrow-due`, as
    `messages.schedule` spells it: the delay left now (a first publish waited for a declare)."""
    due_ms = message.headers.get(H_DUE)
    if isinstance(due_ms, bool) or not isinstance(due_ms, int):
        return message
    units = max(0, math.ceil((due_ms - time.time() * 1000) / UNIT_MS))
    return replace(message, routing_key=delay_route(min(units, (1 << LEVELS) - 1)))


def _chain(layers: Sequence[Outbound], link: LinkState) -> PublishNext:
    chain: PublishNext = link._send_publishing
    for layer in reversed(layers):
        chain = _bind_outbound(layer, chain)
    return chain


def _bind_outbound(layer: Outbound, inner: PublishNext) -> PublishNext:
    def call(publishing: Publishing) -> Awaitable[None]:
        return layer(publishing, inner)

    return call


_events_log = get_logger("burrow.events")


async def publish_event(link: Link, message: Outgoing) -> bool:
    """Publish with a confirm; False (counted, logged) when no subscriber queue matched."""
    try:
        await link.publish(message, kind=PublishKind.EVENT, mandatory=True)
    except Unroutable:
        # Normal for events (nobody has subscribed yet); the caller gets False to act on it.
        _events_log.info("event had no subscriber", routing_key=message.routing_key[:128])
        return False
    return True
