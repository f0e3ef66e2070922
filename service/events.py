"""Domain events: publishing to the events topic exchange and tailing it from a shell.

Subscriptions are declared on a `Service` (`service.registry`) and served by `rpc_server`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import structlog

from service.config import Settings
from service.errors import InvalidArgument, Unroutable
from service.registry import _PATTERN
from service.topology import Names
from service.transport import Link
from service.types import Outgoing, new_id

__all__ = ["event_message", "publish_event", "tail"]

_log = structlog.get_logger("burrow.events")


def event_message(
    names: Names, event: str, body: bytes, *, headers: dict[str, Any] | None = None
) -> Outgoing:
    """A persistent event for the events exchange, keyed by its name."""
    if "*" in event or "#" in event or not _PATTERN.match(event):
        raise InvalidArgument(f"{event[:80]!r} is not an event name (dot-separated words)")
    return Outgoing(
        exchange=names.events_exchange,
        routing_key=event,
        body=body,
        message_id=new_id(),
        type=event,
        headers=headers or {},
        persistent=True,
    )


async def publish_event(link: Link, message: Outgoing) -> bool:
    """Publish with a confirm; False (counted, logged) when no subscriber queue matched."""
    try:
        await link.publish(message, kind="event", mandatory=True)
    except Unroutable:
        _log.warning("event had no subscriber", routing_key=message.routing_key[:128])
        return False
    return True


async def tail(
    settings: Settings, pattern: str
) -> AsyncIterator[aio_pika.abc.AbstractIncomingMessage]:
    """Yield events matching `pattern` from an exclusive queue that vanishes with the caller."""
    if not _PATTERN.match(pattern):
        raise InvalidArgument(f"{pattern!r} is not a topic pattern")
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_urls()[0], timeout=settings.connect_timeout)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(names.events_exchange, "topic", durable=True)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=pattern)
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                yield message
    finally:
        await connection.close()
