"""`burrow-link` (W3 extra row): events through Burrow's transport `AmqpLink` alone.

Below the public API: a confirmed `Link.publish` (persistent, `mandatory`) on the producer, a
`ConsumerSpec` with a manual ack and the body validated into a `Model` on the consumer, with no
dispatcher, middleware or metrics around it. It shows what `Client.emit` and `Service.subscribe`
(the `burrow` row) add on top of the transport.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from bench.common import EVENT_EXCHANGE, EVENT_KEY, EVENT_PATTERN, EVENT_QUEUE, event_payload
from bench.tools import Caller, Closer, Publisher
from bench.tools.burrow_tool import OrderEvent, settings_for
from service._amqp.link import ConsumerSpec
from service._amqp.transport import AmqpLink
from service._observe.log import configure_logging
from service._protocol.codec import decode_model, encode
from service._protocol.topology import BindingDecl, ExchangeDecl, QueueDecl, Topology
from service._protocol.types import Delivery, Outgoing

__all__ = ["serve", "open_caller", "consume", "open_publisher"]


def _event_topology(ns: str, queue_type: str, *, with_queue: bool) -> Topology:
    exchange = f"{ns}.{EVENT_EXCHANGE}"
    queue = f"{ns}.{EVENT_QUEUE}"
    if not with_queue:
        return Topology(exchanges=[ExchangeDecl(exchange, "topic")])
    return Topology(
        exchanges=[ExchangeDecl(exchange, "topic")],
        queues=[QueueDecl(queue, {"x-queue-type": queue_type})],
        bindings=[BindingDecl(exchange, queue, EVENT_PATTERN)],
    )


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Not an RPC row."""
    raise NotImplementedError("burrow-link is a W3 row only")


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """Not an RPC row."""
    raise NotImplementedError("burrow-link is a W3 row only")


async def consume(
    ns: str,
    queue_type: str,
    *,
    prefetch: int,
    on_event: Callable[[], None],
    stop: asyncio.Event,
    ready: Callable[[], None],
) -> None:
    """Consume order events with manual acks until `stop` is set."""
    settings = settings_for(ns, queue_type, prefetch)
    configure_logging(settings.log_format, settings.log_level)
    link = AmqpLink(
        "consumer",
        settings,
        topology=_event_topology(ns, queue_type, with_queue=True),
        prefetch=prefetch,
    )

    async def handle(delivery: Delivery) -> None:
        decode_model(OrderEvent, delivery.body)
        await delivery.ack()
        on_event()

    link.add_consumer(ConsumerSpec(f"{ns}.{EVENT_QUEUE}", handle))
    link.start()
    await link.wait_ready(30)
    ready()
    await stop.wait()
    await link.close()


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """A confirm-mode link publishing persistent, `mandatory` events to the topic exchange."""
    settings = settings_for(ns, queue_type)
    configure_logging(settings.log_format, settings.log_level)
    link = AmqpLink(
        "publisher", settings, topology=_event_topology(ns, queue_type, with_queue=False)
    )
    link.start()
    await link.wait_ready(30)
    exchange = f"{ns}.{EVENT_EXCHANGE}"

    async def publish(seq: int) -> None:
        body = encode(OrderEvent.model_validate(event_payload(seq)))
        await link.publish(
            Outgoing(
                exchange=exchange,
                routing_key=EVENT_KEY,
                body=body,
                message_id=uuid.uuid4().hex,
                persistent=True,
            ),
            kind="event",
            mandatory=True,
        )

    return publish, link.close
