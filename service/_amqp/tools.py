"""The operator tools' access to the broker: `burrow dlq` (`open_tool`) and `burrow tail`.

A tool connects exactly as the service does (an `AmqpLink`: URL failover, password file, TLS,
heartbeat) and works in Burrow's terms: messages are `Delivery`s settled by their tag, counts
are ints, and what the AMQP library raises becomes a Burrow error (`BrokerLost`, `NotFound`,
`PermissionDenied`, `FailedPrecondition`). Also here: reading a message received with aio-pika
as a `Delivery`, and deleting queues and exchanges (what `service.testing` cleans up with).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from service._amqp.transport import CONNECTION_ERRORS, AmqpLink, delivery_of, open_tool_link
from service._protocol.config import Settings
from service._protocol.errors import (
    ConnectionLost,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from service._protocol.types import Delivery, Outgoing
from service._protocol.vocabulary import Names, is_topic_pattern


class BrokerLost(ConnectionLost):
    """A tool's connection or channel broke during a command; the message is what the AMQP
    library said, on one line."""


class ToolLink:
    """A one-off command's connection (from `open_tool`): one channel for taking and settling
    messages, throwaway channels for the checks that would close it, and the link to publish on.

    Every method raises `BrokerLost` when the connection or the channel goes away under it.
    """

    def __init__(self, link: AmqpLink, raw: aiormq.Channel, settings: Settings) -> None:
        self._link = link
        self._raw = raw
        self._settings = settings

    @property
    def is_open(self) -> bool:
        """Whether the tool's channel is still open (messages taken on it are still held)."""
        return not self._raw.is_closed

    async def count(self, queue: str) -> int:
        """How many ready messages `queue` holds (asked on a throwaway channel: a passive
        declare of a missing queue closes its channel).

        Raises:
            NotFound: no such queue.
            PermissionDenied: the user may not use it.
        """
        with _lost():
            probe = await self._raw.connection.channel(publisher_confirms=False)
            try:
                declared = await probe.queue_declare(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise NotFound(_one_line(exc)) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise PermissionDenied(_one_line(exc)) from None
            finally:
                if not probe.is_closed:
                    await probe.close()
            return int(declared.message_count or 0)

    async def wait_until_holds(
        self, queue: str, count: int, *, tries: int = 100, interval: float = 0.02
    ) -> None:
        """Return once `queue` holds at least `count` ready messages, or after `tries` looks
        `interval` seconds apart (someone else may be consuming it). Asked on the tool's
        channel: the queue must exist."""
        with _lost():
            for _ in range(tries):
                declared = await self._raw.queue_declare(queue, passive=True)
                if (declared.message_count or 0) >= count:
                    return
                await asyncio.sleep(interval)

    async def get(self, queue: str) -> Delivery | None:
        """Take the next message of `queue`, unacked (basic.get), or None when it is empty;
        the broker's answer is awaited for at most `publish_timeout`."""
        with _lost():
            message = await self._raw.basic_get(
                queue, no_ack=False, timeout=self._settings.publish_timeout
            )
        if isinstance(message.delivery, spec.Basic.GetEmpty):
            return None
        return delivery_of(message, queue=queue)

    async def ack(self, tag: int) -> None:
        """Ack the message taken with delivery tag `tag` (it leaves its queue)."""
        with _lost():
            await self._raw.basic_ack(tag)

    async def requeue(self, tag: int, *, multiple: bool = False) -> None:
        """Hand the message `tag` back to its queue (basic.nack, requeue); with `multiple`,
        every message taken up to it too, in order."""
        with _lost():
            await self._raw.basic_nack(tag, multiple=multiple, requeue=True)

    async def reject(self, tag: int) -> None:
        """Reject the message `tag` without requeue (its queue's dead-letter exchange, if any,
        gets it)."""
        with _lost():
            await self._raw.basic_reject(tag, requeue=False)

    async def check_exchange(self, name: str) -> None:
        """Make sure exchange `name` exists and may be used ("" is the default exchange), on a
        throwaway channel: publishing to a missing exchange would close the tool's.

        Raises:
            NotFound: no such exchange.
            PermissionDenied: the user may not use it.
            FailedPrecondition: the broker refused it otherwise (its reason in the message).
        """
        if not name:
            return
        with _lost():
            probe = await self._raw.connection.channel(publisher_confirms=False)
            try:
                await probe.exchange_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise NotFound(_one_line(exc)) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise PermissionDenied(_one_line(exc)) from None
            except aiormq.exceptions.ChannelClosed as exc:
                raise FailedPrecondition(_one_line(exc)) from None
            finally:
                if not probe.is_closed:
                    await probe.close()

    async def publish(
        self, message: Outgoing, *, kind: str, mandatory: bool, check_size: bool = True
    ) -> None:
        """Publish on the tool's link with a broker confirm (`Link.publish`: the same errors
        for each outcome)."""
        await self._link.publish(message, kind=kind, mandatory=mandatory, check_size=check_size)

    async def purge(self, queue: str) -> int:
        """Delete every ready message of `queue`; return how many there were."""
        with _lost():
            result = await self._raw.queue_purge(queue)
        return int(result.message_count or 0)


@contextlib.asynccontextmanager
async def open_tool(settings: Settings, name: str) -> AsyncIterator[ToolLink]:
    """A ready `ToolLink` for a one-off command named `name` (the connection's name and a
    metric label); its connection is closed on the way out, so what it took and did not
    settle goes back to its queues.

    Raises:
        ConfigError: the broker refused the login, TLS failed or the password file is unreadable.
        Unavailable: no broker was ready within `connect_timeout` per URL.
    """
    link, raw = await open_tool_link(settings, name)
    try:
        yield ToolLink(link, raw, settings)
    finally:
        await link.close()


@contextlib.contextmanager
def _lost() -> Iterator[None]:
    """What the library raises when the connection or channel goes away, as `BrokerLost`."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise BrokerLost(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())[:300]


async def tail(settings: Settings, pattern: str) -> AsyncGenerator[Delivery, None]:
    """Yield events matching `pattern` from an exclusive queue that vanishes with the caller.

    Connects exactly as the service does (URL failover, password file, TLS, heartbeat); at most
    `prefetch` events wait in memory. Raises `ConnectionLost` when the connection drops.
    """
    prefetch = 64
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
            inbox.put_nowait(delivery_of(message, queue=queue))

        await raw.basic_consume(queue, on_message, no_ack=False)
        while True:
            event = await inbox.get()
            if event is None:
                raise ConnectionLost("connection to the broker lost; tail stopped")
            yield event
            with contextlib.suppress(*CONNECTION_ERRORS):
                await raw.basic_ack(event.delivery_tag)
    except CONNECTION_ERRORS as exc:
        problem = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConnectionLost(f"connection to the broker lost; tail stopped ({problem})") from None
    finally:
        await link.close()


def delivery_from_message(message: AbstractIncomingMessage) -> Delivery:
    """A message received with aio-pika (say, a test draining a dead-letter queue) as a
    `Delivery`: its body, route, headers and the properties Burrow reads."""
    return Delivery(
        body=message.body,
        routing_key=message.routing_key or "",
        exchange=message.exchange or "",
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        type=message.type,
        headers=dict(message.headers or {}),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        redelivered=bool(message.redelivered),
        app_id=message.app_id,
    )


async def delete_queues_and_exchanges(
    url: str, queues: Iterable[str], exchanges: Iterable[str]
) -> None:
    """Delete these queues and exchanges on the broker at `url`, best effort, on one plain
    connection: a refused delete (the node holding the queue is down, say) closes only its
    channel and the rest is deleted."""
    work = [*(("queue", name) for name in queues), *(("exchange", name) for name in exchanges)]
    if not work:
        return
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for kind, name in work:
            if channel.is_closed:
                channel = await connection.channel()
            raw = await channel.get_underlay_channel()
            with contextlib.suppress(Exception):  # already gone, or refused: move on
                if kind == "queue":
                    await raw.queue_delete(name, timeout=5)
                else:
                    await raw.exchange_delete(name, timeout=5)
    finally:
        await connection.close()
