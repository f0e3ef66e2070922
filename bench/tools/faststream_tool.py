"""FastStream's `RabbitBroker`: typed subscribers, `broker.request` for RPC, publish for events.

Written as FastStream's guides show, with pydantic models and a warning-level logger so that,
like Burrow at log level warning, no line is written per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from faststream.rabbit import (
    Channel,
    ExchangeType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
)
from pydantic import BaseModel

from bench.common import (
    AMQP_URL,
    EVENT_EXCHANGE,
    EVENT_KEY,
    EVENT_PATTERN,
    EVENT_QUEUE,
    event_payload,
)
from bench.tools import Caller, Closer, Publisher

__all__ = ["serve", "open_caller", "consume", "open_publisher"]

_logger = logging.getLogger("bench.faststream")
_logger.setLevel(logging.WARNING)


class AddRequest(BaseModel):
    """Two integers to add."""

    a: int
    b: int


class AddReply(BaseModel):
    """Their sum."""

    sum: int


class OrderEvent(BaseModel):
    """The benchmark event."""

    seq: int
    kind: str
    order: str
    note: str


def _queue(ns: str, queue_type: str) -> RabbitQueue:
    return RabbitQueue(f"{ns}.calc.add", durable=True, arguments={"x-queue-type": queue_type})


def _exchange(ns: str) -> RabbitExchange:
    return RabbitExchange(f"{ns}.{EVENT_EXCHANGE}", type=ExchangeType.TOPIC, durable=True)


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Serve add until `stop` is set."""
    broker = RabbitBroker(
        AMQP_URL, default_channel=Channel(prefetch_count=prefetch), logger=_logger
    )

    @broker.subscriber(_queue(ns, queue_type))
    async def add(request: AddRequest) -> AddReply:
        return AddReply(sum=request.a + request.b)

    await broker.start()
    ready()
    await stop.wait()
    await broker.stop()


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """A broker used only to make requests."""
    broker = RabbitBroker(AMQP_URL, logger=_logger)
    await broker.start()
    queue = _queue(ns, queue_type)

    async def call(a: int, b: int) -> int:
        message = await broker.request(AddRequest(a=a, b=b), queue=queue, timeout=30)
        reply = await message.decode()
        assert isinstance(reply, dict)
        return int(reply["sum"])

    return call, broker.stop


async def consume(
    ns: str,
    queue_type: str,
    *,
    prefetch: int,
    on_event: Callable[[], None],
    stop: asyncio.Event,
    ready: Callable[[], None],
) -> None:
    """Consume order events (acked after the handler) until `stop` is set."""
    broker = RabbitBroker(AMQP_URL, logger=_logger)
    queue = RabbitQueue(
        f"{ns}.{EVENT_QUEUE}",
        durable=True,
        routing_key=EVENT_PATTERN,
        arguments={"x-queue-type": queue_type},
    )

    @broker.subscriber(queue, _exchange(ns), channel=Channel(prefetch_count=prefetch))
    async def audit(event: OrderEvent) -> None:
        on_event()

    await broker.start()
    ready()
    await stop.wait()
    await broker.stop()


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """Publish persistent events; the default channel waits for each confirm."""
    broker = RabbitBroker(AMQP_URL, logger=_logger)
    await broker.start()
    exchange = _exchange(ns)
    await broker.declare_exchange(exchange)

    async def publish(seq: int) -> None:
        await broker.publish(
            OrderEvent.model_validate(event_payload(seq)),
            exchange=exchange,
            routing_key=EVENT_KEY,
            persist=True,
        )

    return publish, broker.stop
