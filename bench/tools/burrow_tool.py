"""Burrow as its users run it: `App` serving `service.example:calc`, `Client.call` calling it.

Events use `Client.emit`/`Service.subscribe` when they exist, else Burrow's transport `AmqpLink`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from bench.common import AMQP_URL, EVENT_EXCHANGE, EVENT_KEY, EVENT_PATTERN, EVENT_QUEUE
from bench.tools import Caller, Closer, Publisher, Submitter, Waiter
from service import App, Client, Settings, load_settings
from service.codec import Model, decode_model, encode
from service.example import calc
from service.log import configure_logging
from service.topology import BindingDecl, ExchangeDecl, QueueDecl, Topology
from service.transport import AmqpLink, ConsumerSpec
from service.types import Delivery, Outgoing

__all__ = ["serve", "open_caller", "open_submitter", "consume", "open_publisher"]

RESULT_TIMEOUT = 120.0


class OrderEvent(Model):
    """The benchmark event, validated on receipt as a Burrow subscriber would."""

    seq: int
    kind: str
    order: str
    note: str


def _settings(ns: str, queue_type: str, prefetch: int = 64) -> Settings:
    return load_settings(
        amqp_url=AMQP_URL,
        namespace=ns,
        queue_type=queue_type,
        prefetch=prefetch,
        log_level="warning",
        http_port=0,
        http_host="127.0.0.1",
    )


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Serve calc until `stop` is set."""
    settings = _settings(ns, queue_type, prefetch)
    configure_logging(settings.log_format, settings.log_level)
    app = App(calc, settings=settings)
    await app.start()
    await app.wait_ready(30)
    ready()
    await stop.wait()
    await app.stop()


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """A connected Client and a call that adds two integers."""
    settings = _settings(ns, queue_type)
    configure_logging(settings.log_format, settings.log_level)
    client = Client(settings)
    await client.start(timeout=30)

    async def call(a: int, b: int) -> int:
        reply: dict[str, Any] = await client.call("calc.add", {"a": a, "b": b})
        return int(reply["sum"])

    return call, client.close


async def open_submitter(ns: str, queue_type: str) -> tuple[Submitter, Closer]:
    """A connected Client: `submit` returns once the broker confirmed the job (a `Job`)."""
    settings = _settings(ns, queue_type)
    configure_logging(settings.log_format, settings.log_level)
    client = Client(settings)
    await client.start(timeout=30)

    async def submit(a: int, b: int) -> Waiter:
        job = await client.submit("calc.add", {"a": a, "b": b})

        async def result() -> int:
            reply: dict[str, Any] = await job.result(timeout=RESULT_TIMEOUT)
            return int(reply["sum"])

        return result

    return submit, client.close


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
    settings = _settings(ns, queue_type, prefetch)
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
    """A confirm-mode link publishing persistent events to the topic exchange."""
    from bench.common import event_payload  # noqa: PLC0415

    settings = _settings(ns, queue_type)
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
