"""Dead-letter queues: parking what cannot be processed, with the reason, never losing it.

Each service has `<ns>.<service>.dlq`. A parked message keeps its body and properties and gains
headers saying why, when, the error, and where it was originally routed (for replay).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from service import codec
from service.codec import (
    H_DEAD_ERROR,
    H_DEAD_REASON,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
)
from service.errors import ServiceError
from service.topology import Names
from service.transport import Link
from service.types import Delivery, Outgoing

__all__ = ["H_DEAD_AT", "DeadLetterQueue"]

H_DEAD_AT = "x-burrow-dead-at"


class DeadLetterQueue:
    """One service's dead-letter queue, written through a publishing link."""

    def __init__(self, names: Names, service: str, publisher: Link) -> None:
        self.names = names
        self.name = names.dead_letter_queue(service)
        self.publisher = publisher

    async def park(self, delivery: Delivery, reason: str, error: ServiceError | None) -> None:
        """Publish `delivery` into the DLQ with a confirm (the caller acks it afterwards)."""
        headers: dict[str, Any] = dict(delivery.headers)
        headers.update(
            {
                H_DEAD_REASON: reason,
                H_DEAD_ERROR: codec.encode(error.to_wire()).decode() if error else "",
                H_ORIGINAL_EXCHANGE: delivery.exchange,
                H_ORIGINAL_ROUTING_KEY: delivery.routing_key,
                H_DEAD_AT: int(time.time() * 1000),
            }
        )
        message = Outgoing(
            exchange=self.names.dead_letter_exchange,
            routing_key=self.name,
            body=delivery.body,
            message_id=delivery.message_id or uuid.uuid4().hex,
            type=delivery.type,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            headers=headers,
            persistent=True,
            content_type=delivery.content_type or "application/octet-stream",
        )
        await self.publisher.publish(message, kind="dead_letter", mandatory=True, check_size=False)
