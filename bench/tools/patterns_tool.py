"""`aio_pika.patterns.JsonRPC`, registered and called as aio-pika's documentation shows.

The method queue is declared classic and durable like every other tool's; no events pattern.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
from aio_pika.patterns import JsonRPC

from bench.common import AMQP_URL
from bench.tools import Caller, Closer, Publisher

__all__ = ["serve", "open_caller", "consume", "open_publisher"]


def _method(ns: str) -> str:
    return f"{ns}.calc.add"


async def add(*, a: int, b: int) -> dict[str, int]:
    """The benchmark operation."""
    return {"sum": a + b}


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Register add until `stop` is set."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    rpc = await JsonRPC.create(channel)
    await rpc.register(
        _method(ns), add, durable=True, auto_delete=False, arguments={"x-queue-type": queue_type}
    )
    ready()
    await stop.wait()
    await connection.close()


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """A JsonRPC client."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    rpc = await JsonRPC.create(channel)
    method = _method(ns)

    async def call(a: int, b: int) -> int:
        reply = await rpc.call(method, kwargs={"a": a, "b": b})
        return int(reply["sum"])

    return call, connection.close


async def consume(
    ns: str,
    queue_type: str,
    *,
    prefetch: int,
    on_event: Callable[[], None],
    stop: asyncio.Event,
    ready: Callable[[], None],
) -> None:
    """aio-pika's patterns have no topic events; W3 skips this tool."""
    raise NotImplementedError("aio_pika.patterns has no topic-event pattern")


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """aio-pika's patterns have no topic events; W3 skips this tool."""
    raise NotImplementedError("aio_pika.patterns has no topic-event pattern")
