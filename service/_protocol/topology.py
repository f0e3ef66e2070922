"""Every exchange, queue and binding Burrow uses, declared once, with their names.

The transport declares this at each (re)connect, but for the delay ladder (`delay_ladder`),
which the first delayed publish on a connection declares (`link.LinkState.publish`);
`deploy/rabbitmq/definitions.json` is generated from the whole of it, the ladder included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service._protocol.config import Settings
from service._protocol.registry import Service
from service._protocol.vocabulary import (
    ARG_DEAD_LETTER_EXCHANGE,
    ARG_DEAD_LETTER_ROUTING_KEY,
    ARG_DEAD_LETTER_STRATEGY,
    ARG_DELIVERY_LIMIT,
    ARG_MAX_LENGTH,
    ARG_MESSAGE_TTL,
    ARG_OVERFLOW,
    ARG_QUEUE_TYPE,
    LEVELS,
    UNIT_MS,
    Names,
    level_pattern,
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ExchangeDecl:
    """A durable exchange."""

    name: str
    type: str  # topic | direct | fanout


@dataclass(frozen=True, slots=True)
class QueueDecl:
    """A durable queue and its `x-` arguments.

    `look_only`: a queue nobody consumes, only looks into and takes from by hand (a dead-letter
    queue): declared with a delivery limit no look can use up (`DLQ_DELIVERY_LIMIT`).
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    look_only: bool = False


@dataclass(frozen=True, slots=True)
class BindingDecl:
    """Route messages from `exchange` whose key matches `key` into a queue or an exchange."""

    exchange: str
    destination: str
    key: str
    destination_type: str = "queue"  # queue | exchange


@dataclass(slots=True)
class Topology:
    """A set of declarations, declared in order: exchanges, then queues, then bindings."""

    exchanges: list[ExchangeDecl] = field(default_factory=list)
    queues: list[QueueDecl] = field(default_factory=list)
    bindings: list[BindingDecl] = field(default_factory=list)

    def merge(self, other: Topology) -> Topology:
        """Both sets, without duplicates, order kept."""
        return Topology(
            exchanges=_unique(self.exchanges + other.exchanges),
            queues=_unique_queues(self.queues + other.queues),
            bindings=_unique(self.bindings + other.bindings),
        )


def _queue_args(
    settings: Settings, dlq: str | None, bounded: bool, delivery_limit: bool = False
) -> dict[str, Any]:
    args: dict[str, Any] = {ARG_QUEUE_TYPE: settings.queue_type}
    if dlq is not None:
        args[ARG_DEAD_LETTER_EXCHANGE] = f"{settings.namespace}.dlx"
        args[ARG_DEAD_LETTER_ROUTING_KEY] = dlq
    if bounded and settings.max_queue_length is not None:
        args[ARG_MAX_LENGTH] = settings.max_queue_length
        args[ARG_OVERFLOW] = "reject-publish"
    if (dlq is not None or delivery_limit) and settings.queue_type == "quorum":
        # Last safety net against a message that crashes its consumer every time.
        args[ARG_DELIVERY_LIMIT] = 20
    return args


def _dead_letter_queue(name: str, settings: Settings) -> QueueDecl:
    """A dead-letter queue: no dead-letter exchange of its own and, on quorum queues, a delivery
    limit no look can use up (RabbitMQ 4.x counts every letter `burrow dlq list` hands back as a
    delivery, and drops it after its default limit of 20)."""
    args = _queue_args(settings, None, bounded=False)
    if settings.queue_type == "quorum":
        args[ARG_DELIVERY_LIMIT] = DLQ_DELIVERY_LIMIT
    return QueueDecl(name, args, look_only=True)


def _holding_args(settings: Settings, ttl_ms: int, dead_letter_exchange: str) -> dict[str, Any]:
    """A holding queue: a FIFO with one fixed TTL (so expiry is always at the head) that
    dead-letters what expires. Same type as the work queues: a quorum holding queue survives
    the loss of a cluster node (G2), where a classic one would wait for its home node. Quorum
    dead-letters at least once: an expired message leaves only once its target confirmed it."""
    args: dict[str, Any] = {
        ARG_QUEUE_TYPE: settings.queue_type,
        ARG_MESSAGE_TTL: ttl_ms,
        ARG_DEAD_LETTER_EXCHANGE: dead_letter_exchange,
    }
    if settings.queue_type == "quorum":
        args[ARG_DEAD_LETTER_STRATEGY] = "at-least-once"
        args[ARG_OVERFLOW] = "reject-publish"  # required by at-least-once; no length limit
    return args


def client_topology(settings: Settings) -> Topology:
    """What a caller declares: the shared exchanges, so a call to nothing is returned, not a
    channel error (publishing to a missing exchange closes the channel)."""
    names = Names(settings.namespace)
    return Topology(
        exchanges=[
            ExchangeDecl(names.rpc_exchange, "topic"),
            ExchangeDecl(names.commands_exchange, "topic"),
            ExchangeDecl(names.events_exchange, "topic"),
            ExchangeDecl(names.delay_exchange(LEVELS - 1), "topic"),
        ]
    )


def service_topology(service: Service, settings: Settings, *, ladder: bool = True) -> Topology:
    """What one service needs: shared exchanges, its queues, subscriptions, the retry holding
    queues, the scheduler's ready queue and DLQ and (`ladder`) the delay ladder.

    An App declares it without the ladder (`ladder=False`): 25 holding queues that only a
    delayed message uses, declared by the first delayed publish (`delay_ladder`). With the
    ladder it is everything the service may use: what `burrow definitions` exports for a
    pre-provisioned broker and what a clean-up deletes.
    """
    names = Names(settings.namespace)
    name = service.name
    requests, commands = names.request_queue(name), names.commands_queue(name)
    dlq = names.dead_letter_queue(name)
    topology = Topology(
        exchanges=[
            ExchangeDecl(names.rpc_exchange, "topic"),
            ExchangeDecl(names.commands_exchange, "topic"),
            ExchangeDecl(names.events_exchange, "topic"),
            ExchangeDecl(names.dead_letter_exchange, "direct"),
        ],
        queues=[
            # No dead-letter exchange on calls: a call that expires in the queue has no caller
            # left, and parking it would fill the DLQ with abandoned requests.
            QueueDecl(requests, _queue_args(settings, None, bounded=True, delivery_limit=True)),
            QueueDecl(commands, _queue_args(settings, dlq, bounded=False)),
            _dead_letter_queue(dlq, settings),
        ],
        bindings=[
            BindingDecl(names.rpc_exchange, requests, f"{name}.*"),
            BindingDecl(names.commands_exchange, commands, f"{name}.*"),
            BindingDecl(names.dead_letter_exchange, dlq, dlq),
        ],
    )
    for sub in service.subscriptions.values():
        queue = names.subscription_queue(sub.group, sub.name)
        topology.queues.append(QueueDecl(queue, _queue_args(settings, dlq, bounded=False)))
        topology.bindings.append(BindingDecl(names.events_exchange, queue, sub.pattern))
    topology = topology.merge(scheduler_topology(settings))
    if ladder:
        topology = topology.merge(delay_ladder(settings))
    return topology.merge(retry_topology(settings))


def retry_topology(settings: Settings) -> Topology:
    """Retry holding queues: level k waits base·2^k, then expires back to the original queue.

    A message enters through the fanout exchange of its level with the routing key of the
    queue it failed on; the holding queue dead-letters it to the default exchange with that
    key, i.e. straight back into that queue. The delays are queue arguments (wire protocol,
    fixed once a queue exists) made of the user's settings; which level a retry waits at, and
    whether it is retried at all, is the retry policy's (`service._serving.retry`).
    """
    names = Names(settings.namespace)
    topology = Topology()
    for level in range(settings.retry_levels):
        exchange, queue = names.retry_exchange(level), names.retry_queue(level)
        topology.exchanges.append(ExchangeDecl(exchange, "fanout"))
        ttl_ms = int(settings.retry_base_delay * 1000) << level
        topology.queues.append(QueueDecl(queue, _holding_args(settings, ttl_ms, "")))
        topology.bindings.append(BindingDecl(exchange, queue, ""))
    return topology


def delay_topology(settings: Settings) -> Topology:
    """Delayed delivery whole: the scheduler's ready queue and DLQ, and the delay ladder."""
    return scheduler_topology(settings).merge(delay_ladder(settings))


def scheduler_topology(settings: Settings) -> Topology:
    """The forwarder's side of delayed delivery, declared by every App: the ready queue it
    consumes (where the ladder ends) and the scheduler's DLQ. A due message always finds them,
    whoever declared the ladder."""
    names = Names(settings.namespace)
    ready = names.delay_ready_queue
    sched_dlq = names.scheduler_dead_letter_queue
    return Topology(
        exchanges=[ExchangeDecl(names.dead_letter_exchange, "direct")],
        queues=[
            QueueDecl(ready, _queue_args(settings, sched_dlq, bounded=False)),
            _dead_letter_queue(sched_dlq, settings),
        ],
        bindings=[BindingDecl(names.dead_letter_exchange, sched_dlq, sched_dlq)],
    )


def delay_ladder(settings: Settings) -> Topology:
    """The delay ladder: one exchange and one holding queue per power-of-two delay, ending in
    the ready queue (`scheduler_topology`), which must exist first: level 0 binds it.

    Declared when a delay first needs it, not with every service: the first delayed publish
    on each connection of a link declares it (`service._amqp.link.LinkState.publish`).
    """
    names = Names(settings.namespace)
    ready = names.delay_ready_queue
    topology = Topology()
    for level in range(LEVELS):
        exchange, queue = names.delay_exchange(level), names.delay_queue(level)
        below = names.delay_exchange(level - 1) if level else ""
        args = _holding_args(settings, UNIT_MS << level, below)
        if not level:
            args[ARG_DEAD_LETTER_ROUTING_KEY] = ready
        topology.exchanges.append(ExchangeDecl(exchange, "topic"))
        topology.queues.append(QueueDecl(queue, args))
        topology.bindings.append(BindingDecl(exchange, queue, level_pattern(level, 1)))
        if level:
            topology.bindings.append(
                BindingDecl(exchange, below, level_pattern(level, 0), "exchange")
            )
        else:
            topology.bindings.append(BindingDecl(exchange, ready, level_pattern(level, 0)))
    return topology


DLQ_DELIVERY_LIMIT = 1_000_000
"""The delivery limit of dead-letter queues, as their `x-delivery-limit` argument and in the
shipped policy: on RabbitMQ 4.x every look at a letter (`burrow dlq list`) counts as a delivery,
and the default limit of 20 would drop letters after 20 looks (a DLQ has no dead-letter exchange
of its own). Not `-1`: RabbitMQ 4.x reads it as "no limit", but 3.10 drops the letter at its
first look (measured), and refuses it as a policy value."""


def dead_letter_policy(topology: Topology, vhost: str = "/") -> dict[str, Any] | None:
    """The policy that lifts the delivery limit of the topology's dead-letter queues.

    Queues declared by this version carry the limit as an argument already; the policy also
    covers dead-letter queues declared before it (a queue's arguments cannot change once it
    exists, a policy applies to existing queues). Apply-to `queues`, the value 3.10 knows
    (later versions also accept `quorum_queues`).
    """
    dlqs = sorted(q.name for q in topology.queues if q.look_only)
    if not dlqs:
        return None
    return {
        "vhost": vhost,
        "name": "burrow-dlq-delivery-limit",
        "pattern": "^(" + "|".join(re.escape(name) for name in dlqs) + ")$",
        "apply-to": "queues",
        "definition": {"delivery-limit": DLQ_DELIVERY_LIMIT},
        "priority": 10,
    }


def to_definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (for `rabbitmqctl import_definitions`)."""
    policy = dead_letter_policy(topology, vhost)
    return {
        "policies": [policy] if policy is not None else [],
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in topology.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.key,
                "arguments": {},
            }
            for b in topology.bindings
        ],
    }


def _unique(items: list[_T]) -> list[_T]:
    return list(dict.fromkeys(items))


def _unique_queues(queues: list[QueueDecl]) -> list[QueueDecl]:
    seen: dict[str, QueueDecl] = {}
    for queue in queues:
        seen.setdefault(queue.name, queue)
    return list(seen.values())
