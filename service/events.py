"""Domain events: publishing to the events topic exchange and tailing it from a shell.

Subscriptions are declared on a `Service` (`service.registry`) and served by `dispatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import aiormq
import structlog
from aiormq.abc import DeliveredMessage

from service.config import Settings
from service.errors import ConnectionLost, InvalidArgument, Unroutable
from service.transport import Link, _delivery, open_tool_link
from service.types import Delivery, Outgoing, new_id
from service.vocabulary import Names, PublishKind, is_event_name, is_topic_pattern

__all__ = ["event_message", "publish_event", "tail"]

_log = structlog.get_logger("burrow.events")


def event_message(
    names: Names, event: str, body: bytes, *, headers: dict[str, Any] | None = None
) -> Outgoing:
    """A persistent event for the events exchange, keyed by its name."""
    if not is_event_name(event):
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
        await link.publish(message, kind=PublishKind.EVENT, mandatory=True)
    except Unroutable:
        # Normal for events (nobody has subscribed yet); the caller gets False to act on it.
        _log.info("event had no subscriber", routing_key=message.routing_key[:128])
        return False
    return True


async def tail(settings: Settings, pattern: str) -> AsyncGenerator[Delivery, None]:
    """Yield events matching `pattern` from an exclusive queue that vanishes with the caller.

    Connects exactly as the service does (URL failover, password file, TLS, heartbeat); at most
    `prefetch` events wait in memory. Raises `ConnectionLost` when the connection drops.
    """
    prefetch = 64
    lost_errors = (
        aiormq.exceptions.AMQPError,
        aiormq.exceptions.ChannelInvalidStateError,
        ConnectionError,
        OSError,
    )
    if not is_topic_pattern(pattern):
        raise InvalidArgument(f"{pattern!r} is not a topic pattern")
    names = Names(settings.namespace)
    link, raw = await open_tool_link(settings, "tail")
    inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
    link.on_lost(lambda _reason: inbox.put_nowait(None))
    try:
        await raw.exchange_declare(
            names.events_exchange,
            exchange_type="topic",
            durable=True,
            passive=settings.passive_topology,
        )
        declared = await raw.queue_declare("", exclusive=True, auto_delete=True)
        queue = declared.queue or ""
        await raw.queue_bind(queue, names.events_exchange, routing_key=pattern)
        await raw.basic_qos(prefetch_count=prefetch)

        async def on_message(message: DeliveredMessage) -> None:
            inbox.put_nowait(_delivery(message, queue=queue))

        await raw.basic_consume(queue, on_message, no_ack=False)
        while True:
            event = await inbox.get()
            if event is None:
                raise ConnectionLost("connection to the broker lost; tail stopped")
            yield event
            with contextlib.suppress(*lost_errors):
                await raw.basic_ack(event.delivery_tag)
    except lost_errors as exc:
        problem = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConnectionLost(f"connection to the broker lost; tail stopped ({problem})") from None
    finally:
        await link.close()
