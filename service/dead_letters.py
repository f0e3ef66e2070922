"""Dead-letter queues: parking what cannot be processed, with the reason; inspecting,
replaying and purging them (`burrow dlq`).

Each service has `<ns>.<service>.dlq`. A parked message keeps its body and properties and gains
headers saying why, when, the error, and where it was originally routed (for replay).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from service import codec
from service.codec import (
    H_DEAD_ERROR,
    H_DEAD_REASON,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
)
from service.config import Settings
from service.envelope import forward
from service.errors import NotFound, ServiceError
from service.topology import Names
from service.transport import Link
from service.types import Delivery

__all__ = ["H_DEAD_AT", "DeadLetter", "DeadLetterQueue", "DeadLetterTool"]

H_DEAD_AT = "x-burrow-dead-at"


class DeadLetterQueue:
    """One service's dead-letter queue, written through a publishing link."""

    def __init__(self, names: Names, service: str, publisher: Link) -> None:
        self.names = names
        self.name = names.dead_letter_queue(service)
        self.publisher = publisher

    async def park(self, delivery: Delivery, reason: str, error: ServiceError | None) -> None:
        """Publish `delivery` into the DLQ with a confirm (the caller acks it afterwards)."""
        message = forward(
            delivery,
            exchange=self.names.dead_letter_exchange,
            routing_key=self.name,
            add={
                H_DEAD_REASON: reason,
                H_DEAD_ERROR: codec.encode(error.to_wire()).decode() if error else "",
                H_ORIGINAL_EXCHANGE: str(delivery.exchange),
                H_ORIGINAL_ROUTING_KEY: str(delivery.routing_key),
                H_DEAD_AT: int(time.time() * 1000),
            },
        )
        await self.publisher.publish(message, kind="dead_letter", mandatory=True, check_size=False)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One parked message as ops see it."""

    message_id: str | None
    reason: str
    error: Any
    original_exchange: str
    original_routing_key: str
    dead_at: int | None
    headers: dict[str, Any]
    body: bytes

    def summary(self) -> dict[str, Any]:
        """The one-line view for `burrow dlq list`."""
        return {
            "message_id": self.message_id,
            "reason": self.reason,
            "route": self.original_routing_key,
            "dead_at": self.dead_at,
            "error": self.error.get("message") if isinstance(self.error, dict) else self.error,
            "size": len(self.body),
        }

    def detail(self) -> dict[str, Any]:
        """Everything, for `burrow dlq show`: headers, error, history and the body."""
        try:
            body: Any = codec.decode_json(self.body)
        except ServiceError:
            body = self.body.decode("utf-8", "backslashreplace")
        return {
            **self.summary(),
            "original_exchange": self.original_exchange,
            "error": self.error,
            "headers": {k: _plain(v) for k, v in self.headers.items()},
            "body": body,
        }

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> DeadLetter:
        """Read the Burrow headers of a parked message."""
        headers = dict(message.headers or {})
        error_text = headers.get(H_DEAD_ERROR)
        try:
            error: Any = codec.decode_json(str(error_text).encode()) if error_text else None
        except ServiceError:
            error = str(error_text)
        dead_at = headers.get(H_DEAD_AT)
        return cls(
            message_id=message.message_id,
            reason=str(headers.get(H_DEAD_REASON, _broker_reason(headers))),
            error=error,
            original_exchange=str(
                headers.get(H_ORIGINAL_EXCHANGE, headers.get("x-first-death-exchange", ""))
            ),
            original_routing_key=str(
                headers.get(H_ORIGINAL_ROUTING_KEY, _first_death_key(headers, message))
            ),
            dead_at=dead_at if isinstance(dead_at, int) else None,
            headers=headers,
            body=message.body,
        )


_DEAD_HEADERS = frozenset(
    {H_DEAD_REASON, H_DEAD_ERROR, H_ORIGINAL_EXCHANGE, H_ORIGINAL_ROUTING_KEY, H_DEAD_AT}
)
_BROKER_HEADERS = ("x-death", "x-first-death-queue", "x-first-death-reason",
                   "x-first-death-exchange", "x-last-death-queue", "x-last-death-reason",
                   "x-last-death-exchange", "x-delivery-count")  # fmt: skip


class DeadLetterTool:
    """Inspect, replay and purge a dead-letter queue: what `burrow dlq` runs."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.queue_name = self.names.dead_letter_queue(service)

    async def _open(self) -> tuple[AbstractConnection, AbstractChannel, AbstractQueue]:
        connection = await aio_pika.connect(
            self.settings.amqp_urls()[0], timeout=self.settings.connect_timeout
        )
        # A replay whose route has no queue must fail, not be acked out of the DLQ.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            queue = await channel.declare_queue(self.queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await connection.close()
            raise NotFound(f"no dead-letter queue {self.queue_name}") from None
        return connection, channel, queue

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """Up to `limit` parked messages, oldest first; they stay in the queue."""
        connection, _, queue = await self._open()
        try:
            found: list[DeadLetter] = []
            while len(found) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(DeadLetter.from_message(message))
            return found  # unacked: closing the connection puts them all back
        finally:
            await connection.close()

    async def replay(self, message_ids: Sequence[str] | None) -> int:
        """Send parked messages back to their original route (all when `message_ids` is None).

        Each is published with a confirm before it is removed from the DLQ; the dead-letter
        headers and the broker's death history are dropped so retries count afresh.
        """
        wanted = None if message_ids is None else set(message_ids)
        connection, channel, queue = await self._open()
        replayed = 0
        try:
            pending = queue.declaration_result.message_count or 0
            for _ in range(pending):  # only what was there: re-failures are not re-read
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                if wanted is not None and message.message_id not in wanted:
                    continue
                letter = DeadLetter.from_message(message)
                headers = {
                    k: v
                    for k, v in letter.headers.items()
                    if k not in _DEAD_HEADERS and k not in _BROKER_HEADERS
                }
                exchange = (
                    await channel.get_exchange(letter.original_exchange, ensure=False)
                    if letter.original_exchange
                    else channel.default_exchange
                )
                await exchange.publish(
                    aio_pika.Message(
                        message.body,
                        headers=headers,
                        content_type=message.content_type,
                        content_encoding=message.content_encoding,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        reply_to=message.reply_to,
                        type=message.type,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=letter.original_routing_key,
                    mandatory=True,
                )
                await message.ack()
                replayed += 1
        finally:
            await connection.close()
        return replayed

    async def purge(self) -> int:
        """Delete every parked message; return how many there were."""
        connection, _, queue = await self._open()
        try:
            result = await queue.purge()
            return int(result.message_count or 0)
        finally:
            await connection.close()


def _first_death_key(headers: dict[str, Any], message: AbstractIncomingMessage) -> str:
    # Parked by the broker: the first x-death entry holds the routing key it was sent with.
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        keys = deaths[-1].get("routing-keys")
        if isinstance(keys, list) and keys:
            return str(keys[0])
    return message.routing_key or ""


def _broker_reason(headers: dict[str, Any]) -> str:
    # Parked by the broker itself (delivery limit, expiry), not by Burrow.
    reason = headers.get("x-first-death-reason")
    return f"broker:{reason}" if isinstance(reason, str) else "unknown"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
