"""The Python bound: a tight aiormq loop with the same confirms, acks and persistence as W3.

No framework and no wrapper objects: frames in, frames out. Only events (the limit row).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from bench.common import AMQP_URL, EVENT_EXCHANGE, EVENT_KEY, EVENT_PATTERN, EVENT_QUEUE
from bench.tools import Caller, Closer, Publisher

__all__ = ["serve", "open_caller", "consume", "open_publisher"]

_BODY = b'{"seq":0,"kind":"order.created","order":"ord-00000000","note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'  # noqa: E501
_PERSISTENT = Basic.Properties(delivery_mode=2, content_type="application/json")


async def _declare(channel: aiormq.abc.AbstractChannel, ns: str, queue_type: str) -> None:
    await channel.exchange_declare(f"{ns}.{EVENT_EXCHANGE}", exchange_type="topic", durable=True)
    await channel.queue_declare(
        f"{ns}.{EVENT_QUEUE}", durable=True, arguments={"x-queue-type": queue_type}
    )
    await channel.queue_bind(f"{ns}.{EVENT_QUEUE}", f"{ns}.{EVENT_EXCHANGE}", EVENT_PATTERN)


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Not an RPC tool."""
    raise NotImplementedError


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """Not an RPC tool."""
    raise NotImplementedError


async def consume(
    ns: str,
    queue_type: str,
    *,
    prefetch: int,
    on_event: Callable[[], None],
    stop: asyncio.Event,
    ready: Callable[[], None],
) -> None:
    """Consume with manual acks until `stop` is set."""
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=prefetch)
    await _declare(channel, ns, queue_type)

    async def on_message(message: DeliveredMessage) -> None:
        await channel.basic_ack(message.delivery_tag or 0)
        on_event()

    await channel.basic_consume(f"{ns}.{EVENT_QUEUE}", on_message)
    ready()
    await stop.wait()
    await connection.close()


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """Publish persistent, mandatory, confirmed messages."""
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = f"{ns}.{EVENT_EXCHANGE}"

    async def publish(seq: int) -> None:
        await channel.basic_publish(
            _BODY, exchange=exchange, routing_key=EVENT_KEY, properties=_PERSISTENT, mandatory=True
        )

    return publish, connection.close
