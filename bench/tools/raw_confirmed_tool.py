"""`aio-pika-raw-confirmed`: `raw_tool`'s code with Burrow's guarantees switched on.

Requests and replies on confirm-mode channels, requests `mandatory` (an unroutable one raises;
replies not, as Burrow's: RabbitMQ 3.10 returns direct reply-to publishes spuriously), and the
server acks a request only after its reply's confirm; events are `raw_tool`'s own (already
confirmed and `mandatory`). Shows what the guarantees cost hand-written aio-pika.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bench.tools import Caller, Closer
from bench.tools.raw_tool import consume, open_publisher, open_rpc_caller, serve_rpc

__all__ = ["serve", "open_caller", "consume", "open_publisher"]


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Serve add; each request is acked after its reply's confirm."""
    await serve_rpc(ns, queue_type, prefetch, stop, ready, confirmed=True)


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """Confirmed, `mandatory` requests."""
    return await open_rpc_caller(ns, queue_type, confirmed=True)
