"""Every exchange, queue and binding Burrow uses, declared once, with their names.

The transport declares this at each (re)connect; `deploy/rabbitmq/definitions.json` is
generated from the same declaration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.config import Settings

__all__ = [
    "ExchangeDecl",
    "QueueDecl",
    "BindingDecl",
    "Topology",
    "Names",
    "DIRECT_REPLY_TO",
    "service_topology",
    "to_definitions",
]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ExchangeDecl:
    """A durable exchange."""

    name: str
    type: str  # topic | direct | fanout


@dataclass(frozen=True, slots=True)
class QueueDecl:
    """A durable queue and its `x-` arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class BindingDecl:
    """Route messages from `exchange` whose key matches `key` into `queue`."""

    exchange: str
    queue: str
    key: str


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


@dataclass(frozen=True, slots=True)
class Names:
    """The names of everything in a namespace (default `burrow`); see docs/protocol.md."""

    namespace: str

    @property
    def rpc_exchange(self) -> str:
        """Topic exchange for requests (call, cast, submit), keyed `<service>.<operation>`."""
        return f"{self.namespace}.rpc"

    @property
    def dead_letter_exchange(self) -> str:
        """Direct exchange for dead letters, keyed by the dead-letter queue's name."""
        return f"{self.namespace}.dlx"

    def request_queue(self, service: str) -> str:
        """The queue a service consumes its requests from."""
        return f"{self.namespace}.{service}.requests"

    def dead_letter_queue(self, service: str) -> str:
        """Where a service parks what it could not process, with the reason."""
        return f"{self.namespace}.{service}.dlq"


def _queue_args(settings: Settings, dlq: str | None, bounded: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": settings.queue_type}
    if dlq is not None:
        args["x-dead-letter-exchange"] = f"{settings.namespace}.dlx"
        args["x-dead-letter-routing-key"] = dlq
    if bounded and settings.max_queue_length is not None:
        args["x-max-length"] = settings.max_queue_length
        args["x-overflow"] = "reject-publish"
    return args


def service_topology(service: str, settings: Settings) -> Topology:
    """What one service needs: the shared exchanges, its request queue and its DLQ."""
    names = Names(settings.namespace)
    requests, dlq = names.request_queue(service), names.dead_letter_queue(service)
    return Topology(
        exchanges=[
            ExchangeDecl(names.rpc_exchange, "topic"),
            ExchangeDecl(names.dead_letter_exchange, "direct"),
        ],
        queues=[
            QueueDecl(requests, _queue_args(settings, dlq, bounded=True)),
            QueueDecl(dlq, _queue_args(settings, None, bounded=False)),
        ],
        bindings=[
            BindingDecl(names.rpc_exchange, requests, f"{service}.*"),
            BindingDecl(names.dead_letter_exchange, dlq, dlq),
        ],
    )


def to_definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (for `rabbitmqctl import_definitions`)."""
    return {
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
                "destination": b.queue,
                "destination_type": "queue",
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
