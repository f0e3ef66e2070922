"""Hand-written RPC and events on aio-pika, as its tutorials build them.

RPC: direct reply-to and a dict of futures keyed by correlation id; events: publisher
confirms and manual acks. Bodies are JSON via orjson, as careful hand-written code would do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

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

REPLY_TO = "amq.rabbitmq.reply-to"


def _queue(ns: str) -> str:
    return f"{ns}.calc.add"


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Serve add until `stop` is set: ack after the reply is confirmed."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(
        _queue(ns), durable=True, arguments={"x-queue-type": queue_type}
    )
    exchange = channel.default_exchange

    async def on_request(message: AbstractIncomingMessage) -> None:
        request = orjson.loads(message.body)
        reply = orjson.dumps({"sum": request["a"] + request["b"]})
        if message.reply_to:
            await exchange.publish(
                aio_pika.Message(
                    reply,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                ),
                routing_key=message.reply_to,
            )
        await message.ack()

    await queue.consume(on_request)
    ready()
    await stop.wait()
    await connection.close()


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """A client consuming direct reply-to, matching replies to futures by correlation id."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    futures: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(message: AbstractIncomingMessage) -> None:
        future = futures.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    reply_queue = await channel.get_queue(REPLY_TO, ensure=False)
    await reply_queue.consume(on_reply, no_ack=True)
    exchange = channel.default_exchange
    routing_key = _queue(ns)
    loop = asyncio.get_running_loop()

    async def call(a: int, b: int) -> int:
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = loop.create_future()
        futures[correlation_id] = future
        try:
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps({"a": a, "b": b}),
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=REPLY_TO,
                ),
                routing_key=routing_key,
            )
            body = await asyncio.wait_for(future, 30)
        finally:
            futures.pop(correlation_id, None)
        return int(orjson.loads(body)["sum"])

    return call, connection.close


async def _exchange(
    channel: aio_pika.abc.AbstractChannel, ns: str
) -> aio_pika.abc.AbstractExchange:
    return await channel.declare_exchange(
        f"{ns}.{EVENT_EXCHANGE}", aio_pika.ExchangeType.TOPIC, durable=True
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
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    exchange = await _exchange(channel, ns)
    queue = await channel.declare_queue(
        f"{ns}.{EVENT_QUEUE}", durable=True, arguments={"x-queue-type": queue_type}
    )
    await queue.bind(exchange, EVENT_PATTERN)

    async def on_message(message: AbstractIncomingMessage) -> None:
        orjson.loads(message.body)
        await message.ack()
        on_event()

    await queue.consume(on_message)
    ready()
    await stop.wait()
    await connection.close()


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """Publish persistent events with confirms (aio-pika's channel default)."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    exchange = await _exchange(channel, ns)

    async def publish(seq: int) -> None:
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps(event_payload(seq)),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=uuid.uuid4().hex,
            ),
            routing_key=EVENT_KEY,
            mandatory=True,
        )

    return publish, connection.close
