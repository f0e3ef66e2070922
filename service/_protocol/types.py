"""The small vocabulary the rest of Burrow speaks: outgoing messages and deliveries.

Neither knows aio-pika nor pydantic: the transport fills them, the codec reads them.
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import structlog

Headers = dict[str, Any]


class _Ids:
    """Random per process, then a counter; re-seeded in a forked child."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex() + "."
        self.counter = itertools.count(1)


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reseed)  # a forked child must not repeat its parent's ids


def new_id() -> str:
    """A process-unique message/correlation id: random per process, then a counter.

    Cheaper than uuid4 on the per-message path; not for secrets (job ids use uuid4).
    """
    return f"{_ids.prefix}{next(_ids.counter):x}"


_log = structlog.get_logger("burrow.delivery")


@dataclass(slots=True)
class Outgoing:
    """A message ready to publish: bytes plus the AMQP properties Burrow uses."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: Headers = field(default_factory=dict)
    expiration_ms: int | None = None
    persistent: bool = True
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    app_id: str | None = None
    priority: int | None = None
    timestamp: datetime.datetime | None = None


class Settle(StrEnum):
    """How a delivery is settled with the broker."""

    ACK = "ack"
    REJECT = "reject"  # no requeue: dead-letters through the queue's DLX, if any
    REQUEUE = "requeue"


SettleFn = Callable[["Delivery", Settle], Awaitable[None]]


class Delivery:
    """One received message; settled exactly once (a second settle is ignored and logged).

    Args:
        settle_fn: the transport's way to ack/reject; None for no-ack deliveries.
    """

    __slots__ = (
        "app_id",
        "body",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_tag",
        "exchange",
        "expiration",
        "headers",
        "message_id",
        "priority",
        "queue",
        "redelivered",
        "reply_to",
        "routing_key",
        "settle_fn",
        "settled",
        "timestamp",
        "type",
    )

    def __init__(
        self,
        *,
        body: bytes,
        routing_key: str,
        exchange: str = "",
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        type: str | None = None,
        headers: Headers | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        expiration: str | None = None,
        redelivered: bool = False,
        delivery_tag: int = 0,
        settle_fn: SettleFn | None = None,
        queue: str = "",
        app_id: str | None = None,
        priority: int | None = None,
        timestamp: datetime.datetime | None = None,
    ) -> None:
        self.body = body
        self.routing_key = routing_key
        self.exchange = exchange
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.type = type
        self.headers: Headers = headers or {}
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.expiration = expiration
        self.redelivered = redelivered
        self.delivery_tag = delivery_tag
        self.settle_fn = settle_fn
        self.queue = queue  # the queue it was consumed from (retries go back there)
        self.app_id = app_id
        self.priority = priority
        self.timestamp = timestamp
        self.settled: Settle | None = None

    async def settle(self, how: Settle) -> None:
        """Ack, reject or requeue once; later calls are no-ops, so a double ack cannot happen."""
        if self.settled is not None:
            _log.warning("delivery already settled", first=self.settled, second=how)
            return
        self.settled = how
        if self.settle_fn is not None:
            await self.settle_fn(self, how)

    async def ack(self) -> None:
        """Acknowledge: the broker forgets the message."""
        await self.settle(Settle.ACK)

    async def reject(self) -> None:
        """Reject without requeue."""
        await self.settle(Settle.REJECT)

    async def requeue(self) -> None:
        """Hand the message back to the queue for another consumer."""
        await self.settle(Settle.REQUEUE)


DeliveryCallback = Callable[[Delivery], Awaitable[None]]


class Outcome(StrEnum):
    """How handling one message ended; a metric label and a log field."""

    OK = "ok"
    ERROR = "error"
    REJECTED = "rejected"
    EXPIRED = "expired"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"


class Undecodable(str):
    """A value the AMQP library could not decode. As a str it is a printable escape of the
    bytes (safe to log length-capped, to compare, to re-encode); `raw` keeps the bytes."""

    raw: bytes
    problem: str
    made: ClassVar[int] = 0  # markers made in this process: 0 means no delivery can hold one

    @classmethod
    def of(cls, raw: bytes, problem: str) -> Undecodable:
        """The marker for `raw`, which could not be decoded because of `problem`."""
        cls.made += 1
        value = cls(raw.decode("utf-8", "backslashreplace"))
        value.raw = raw
        value.problem = problem
        return value
