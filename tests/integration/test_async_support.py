"""Shared helpers of the asynchronous-API integration tests: side-effect recorders, taps on the
events exchange and probes of queues (depth, dead letters, the delay ladder). Holds no tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from prometheus_client import REGISTRY

from service._protocol.vocabulary import H_DEAD_ERROR, H_DEAD_REASON, LEVELS, Names

__all__ = [
    "WAIT",
    "Recorder",
    "EventTap",
    "queue_depth",
    "ladder_depth",
    "next_dead_letter",
    "dead_reason",
    "dead_error",
    "body_json",
    "sample",
    "wait_until",
]

WAIT = 15.0  # upper bound on any single wait for the broker; never reached when things work


@dataclass
class Recorder:
    """What handlers did, in order, with a way to await the n-th entry instead of sleeping."""

    items: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() of each entry
    wall: list[float] = field(default_factory=list)  # time.time() of each entry
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, item: Any) -> None:
        """Record one side effect (call from inside a handler)."""
        self.items.append(item)
        self.times.append(time.monotonic())
        self.wall.append(time.time())
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        """Wait until at least `count` entries exist; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items


class EventTap:
    """An exclusive queue of our own bound to `<ns>.events`, consumed into an asyncio queue."""

    def __init__(self, channel: AbstractChannel, namespace: str) -> None:
        self.channel = channel
        self.names = Names(namespace)
        self.messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.queue: AbstractQueue | None = None

    async def start(self, *keys: str) -> EventTap:
        """Declare the queue, bind it with each key and start consuming (no-ack)."""
        self.queue = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        for key in keys:
            await self.queue.bind(self.names.events_exchange, routing_key=key)
        await self.queue.consume(self.messages.put, no_ack=True)
        return self

    async def next(self, timeout: float = WAIT) -> AbstractIncomingMessage:
        """The next event, or TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            return await self.messages.get()


async def queue_depth(channel: AbstractChannel, queue: str) -> int:
    """Ready messages in `queue` (passive declare: never creates it)."""
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def ladder_depth(channel: AbstractChannel, namespace: str) -> int:
    """Messages held in all the holding queues of the delay ladder."""
    names = Names(namespace)
    total = 0
    for level in range(LEVELS):
        total += await queue_depth(channel, names.delay_queue(level))
    return total


async def next_dead_letter(
    channel: AbstractChannel, queue: str, timeout: float = WAIT
) -> AbstractIncomingMessage:
    """Take the first message of a dead-letter queue with basic.get, polling until one is there."""
    dlq = await channel.get_queue(queue, ensure=True)
    async with asyncio.timeout(timeout):
        while True:
            message = await dlq.get(no_ack=True, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.05)  # basic.get has nothing to await; poll, bounded


def dead_reason(message: AbstractIncomingMessage) -> object:
    """The `x-burrow-dead-reason` header of a dead letter."""
    return (message.headers or {}).get(H_DEAD_REASON)


def dead_error(message: AbstractIncomingMessage) -> Any:
    """The structured error recorded on a dead letter (decoded JSON)."""
    raw = (message.headers or {}).get(H_DEAD_ERROR)
    assert isinstance(raw, (str, bytes)), raw
    return orjson.loads(raw)


def body_json(message: AbstractIncomingMessage | aio_pika.Message) -> Any:
    """The decoded JSON body of a message."""
    return orjson.loads(message.body)


def sample(name: str, **labels: str) -> float:
    """The current value of a Prometheus sample of this process (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition that has no event to await (a metric), bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a metric has no event to await
            await asyncio.sleep(0.02)
