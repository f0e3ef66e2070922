"""Shared helpers of the RPC integration tests: hand-made requests on a raw channel, a test service.

Holds no tests itself; the `test_rpc_*` modules import from here so each hostile message is built
the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic
from prometheus_client import REGISTRY

from service import App, Context, Model, Service
from service.codec import H_DEAD_REASON, H_DEADLINE, H_STATUS
from service.topology import DIRECT_REPLY_TO, Names

__all__ = [
    "Lab",
    "Text",
    "Wait",
    "RawCaller",
    "Collector",
    "make_lab",
    "raw_channel",
    "queue_depth",
    "stop_and_count",
    "sample",
    "wait_until",
    "dead_reason",
    "reply_json",
    "H_STATUS",
    "DIRECT_REPLY_TO",
]

WAIT = 10.0  # upper bound on any single wait for the broker; never reached when things work


class Text(Model):
    """A request or reply carrying some text."""

    text: str


class Wait(Model):
    """How long a slow handler sleeps, and how long it lingers once told to stop."""

    seconds: float
    linger: float = 0.0


@dataclass
class Lab:
    """A small service whose handlers record what ran, for tests that must prove a non-run."""

    service: Service
    calls: list[str] = field(default_factory=list)
    contexts: list[Context] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def route(self, operation: str) -> str:
        """`<service>.<operation>`."""
        return f"{self.service.name}.{operation}"


def make_lab(name: str = "lab") -> Lab:
    """A fresh `lab` service with its own side-effect records (one per test)."""
    lab = Lab(Service(name))

    async def echo(req: Text, ctx: Context) -> Text:
        """Record and return the text."""
        lab.calls.append(req.text)
        lab.contexts.append(ctx)
        return req

    async def gate(req: Text) -> Text:
        """Record, then hold the request until the test releases it."""
        lab.calls.append(req.text)
        lab.entered.set()
        await lab.release.wait()
        return req

    async def stubborn(req: Wait) -> Text:
        """Sleep; when cut at the deadline, linger before giving up (a late reply)."""
        lab.calls.append("stubborn")
        try:
            await asyncio.sleep(req.seconds)
        except asyncio.CancelledError:
            # A handler finishing its current step before honouring cancellation: its reply
            # leaves well after the caller's deadline, which is what makes it "late".
            await asyncio.sleep(req.linger)
            raise
        finally:
            lab.finished.set()
        return Text(text="done")

    async def boom(req: Text) -> Text:
        """Fail with an internal detail that must never reach the caller."""
        lab.calls.append(req.text)
        raise Exception("secret /etc/path")

    for handler in (echo, gate, stubborn, boom):
        lab.service.add_operation(handler)
    return lab


async def raw_channel(channel: aio_pika.abc.AbstractChannel) -> AbstractChannel:
    """The aiormq channel under an aio-pika channel, for byte-exact publishing."""
    return await channel.get_underlay_channel()


class Collector:
    """Consumes a queue (no-ack) into an asyncio queue, so tests await messages, never poll."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

    async def on_message(self, message: DeliveredMessage) -> None:
        """Consumer callback."""
        await self.messages.put(message)

    async def attach(self, raw: AbstractChannel, queue: str) -> Collector:
        """Start consuming `queue`."""
        await raw.basic_consume(queue, self.on_message, no_ack=True)
        return self

    async def next(self, timeout: float = WAIT) -> DeliveredMessage:
        """The next message, or TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            return await self.messages.get()


class RawCaller:
    """Publishes hand-made requests to `<ns>.rpc` and collects replies on direct reply-to."""

    def __init__(self, raw: AbstractChannel, namespace: str) -> None:
        self.raw = raw
        self.names = Names(namespace)
        self.replies: dict[str, asyncio.Future[DeliveredMessage]] = {}
        self.stray: list[DeliveredMessage] = []

    async def start(self) -> RawCaller:
        """Consume direct reply-to on this channel (must precede any publish with reply_to)."""
        await self.raw.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
        return self

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self.replies.get(message.header.properties.correlation_id or "")
        if future is None or future.done():
            self.stray.append(message)
        else:
            future.set_result(message)

    async def publish(
        self,
        route: str,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        reply_to: str | None = DIRECT_REPLY_TO,
        correlation_id: str | None = None,
        deadline_in: float | None = 30.0,
    ) -> str:
        """Publish one request exactly as given; returns its correlation id.

        Args:
            deadline_in: seconds from now for `x-deadline` (negative: already passed; None: none).
        """
        correlation_id = correlation_id or uuid.uuid4().hex
        all_headers: dict[str, Any] = dict(headers or {})
        if deadline_in is not None:
            all_headers.setdefault(H_DEADLINE, int((time.time() + deadline_in) * 1000))
        if reply_to is not None:
            self.replies[correlation_id] = asyncio.get_running_loop().create_future()
        await self.raw.basic_publish(
            body,
            exchange=self.names.rpc_exchange,
            routing_key=route,
            properties=Basic.Properties(
                content_type=content_type,
                content_encoding=content_encoding,
                correlation_id=correlation_id,
                message_id=correlation_id,
                reply_to=reply_to,
                message_type=route,
                headers=all_headers or None,
            ),
        )
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = WAIT) -> DeliveredMessage:
        """The reply to a published request."""
        async with asyncio.timeout(timeout):
            return await self.replies[correlation_id]

    async def call(self, route: str, body: bytes, **kwargs: Any) -> DeliveredMessage:
        """Publish with reply_to and wait for the reply."""
        return await self.reply(await self.publish(route, body, **kwargs))


def reply_json(message: DeliveredMessage) -> Any:
    """The decoded body of a reply."""
    return orjson.loads(message.body)


def dead_reason(message: DeliveredMessage) -> object:
    """The `x-burrow-dead-reason` header of a dead letter."""
    return (message.header.properties.headers or {}).get(H_DEAD_REASON)


async def queue_depth(raw: AbstractChannel, queue: str) -> int:
    """Ready messages in `queue` (passive declare: never creates it)."""
    declared = await raw.queue_declare(queue, passive=True)
    assert declared is not None
    return int(declared.message_count or 0)


async def stop_and_count(app: App, raw: AbstractChannel, queue: str) -> int:
    """Stop `app` (in-flight work finishes and is settled) and count what is left in `queue`.

    Unacked deliveries go back to the queue when the app's channel closes, so a request that
    was handled but never acked shows up here.
    """
    await app.stop()
    return await queue_depth(raw, queue)


def sample(name: str, **labels: str) -> float:
    """The current value of a Prometheus sample of this process (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition that has no event to await (metrics), bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a metric has no event to await
            await asyncio.sleep(0.02)
