"""Delivery later, without plugins: a ladder of holding queues with power-of-two TTLs.

A message due in d units (100 ms) is routed, by the binary digits of d in its routing key,
through the holding queues of the bits that are set; each dead-letters down to the next level
when its TTL ends. Due messages land in one ready queue; a `Forwarder` in every running service
republishes them to their target with a confirm before it acks. Durable and persistent
throughout, so a broker restart delays nothing further than its own downtime.

Every App declares the ready queue and the scheduler's DLQ (`topology.scheduler_topology`); the
ladder itself is declared by the first delayed publish on a connection (`topology.delay_ladder`,
`link.LinkState.publish`), so a namespace holds its 25 holding queues only once it delays.
"""

from __future__ import annotations

import asyncio
import time

from service._amqp.link import ConsumerSpec, Link
from service._observe.log import get_logger
from service._protocol import tracing
from service._protocol.config import Settings
from service._protocol.envelope import text, undecodable_fields
from service._protocol.errors import InvalidArgument, ServiceError, Unavailable
from service._protocol.messages import forward
from service._protocol.types import Delivery
from service._protocol.vocabulary import (
    H_DEATH,
    H_DELIVERY_COUNT,
    H_DUE,
    H_FIRST_DEATH_EXCHANGE,
    H_FIRST_DEATH_QUEUE,
    H_FIRST_DEATH_REASON,
    H_LAST_DEATH_EXCHANGE,
    H_LAST_DEATH_QUEUE,
    H_LAST_DEATH_REASON,
    H_TARGET_EXCHANGE,
    H_TARGET_KEY,
    UNIT_MS,
    DeadReason,
    Names,
    PublishKind,
)
from service._serving.dead_letters import DeadLetterQueue
from service._serving.middleware import message_ids

_log = get_logger("burrow.scheduler")

# The ladder's own headers, and the broker's record of the trip down it.
_STRIP = frozenset(
    {H_TARGET_EXCHANGE, H_TARGET_KEY, H_DUE, H_DEATH, H_DELIVERY_COUNT}
    | {H_FIRST_DEATH_QUEUE, H_FIRST_DEATH_REASON, H_FIRST_DEATH_EXCHANGE}
    | {H_LAST_DEATH_QUEUE, H_LAST_DEATH_REASON, H_LAST_DEATH_EXCHANGE}
)
_MARGIN_S = 0.001  # the event loop's timers may fire a clock tick before their time


class Forwarder:
    """Consumes the ready queue and republishes each due message to its target, then acks."""

    def __init__(self, settings: Settings, publisher: Link) -> None:
        self.names = Names(settings.namespace)
        self.publisher = publisher
        self.dead_letters = DeadLetterQueue(self.names, "scheduler", publisher)
        self._targets = frozenset(
            {self.names.rpc_exchange, self.names.commands_exchange, self.names.events_exchange}
        )

    def consumer(self) -> ConsumerSpec:
        """The consumer to attach to the ready queue."""
        return ConsumerSpec(self.names.delay_ready_queue, self.on_delivery)

    async def on_delivery(self, delivery: Delivery) -> None:
        """Forward one due message; a target that is gone sends it to the scheduler's DLQ."""
        exchange = text(delivery.headers.get(H_TARGET_EXCHANGE))
        key = text(delivery.headers.get(H_TARGET_KEY))
        undecodable = undecodable_fields(delivery)
        if exchange not in self._targets or key is None or undecodable:
            # Only Burrow's own exchanges may be targeted, and only what can be read again.
            reason = DeadReason.UNDECODABLE if undecodable else DeadReason.INVALID_TARGET
            _log.warning(
                "scheduled message refused; dead-lettered",
                reason=reason,
                target=(exchange or "")[:64],
                **message_ids(delivery),
            )
            error = InvalidArgument(
                f"a delayed message must name one of {sorted(self._targets)} in "
                f"{H_TARGET_EXCHANGE} and a routing key in {H_TARGET_KEY}, all decodable",
                details={"fields": undecodable[:8]},
            )
            try:
                await self.dead_letters.park(delivery, reason, error)
            except ServiceError:
                await delivery.reject()  # the ready queue dead-letters to the scheduler's DLQ
                return
            await delivery.ack()
            return
        early = _early_by(delivery.headers.get(H_DUE), time.time())
        if early:
            # The broker's TTLs run to the millisecond; the promise is "never early".
            await asyncio.sleep(early)
        message = forward(delivery, exchange=exchange, routing_key=key, drop=_STRIP)
        resumed = tracing.resume(delivery.headers)  # the forward is a hop of the sender's trace
        try:
            await self.publisher.publish(
                message, kind=PublishKind.SCHEDULED, mandatory=True, check_size=False
            )
        except Unavailable:
            await delivery.requeue()
            return
        except ServiceError as exc:
            _log.warning(
                "scheduled message not deliverable",
                route=key[:128],
                error=exc.message,
                **message_ids(delivery),
            )
            await delivery.reject()  # dead-letters to the scheduler's DLQ
            return
        finally:
            tracing.leave(resumed)
        await delivery.ack()


def _early_by(due_ms: object, now: float) -> float:
    """Seconds to hold a message the ladder let out before its `x-burrow-due`, else 0.

    A broker expires TTLs a millisecond or so either side of the mark; only that is made up.
    A due time further ahead (another host's clock, a forged header) or not a number is not
    waited for: the ready queue is never held up by a message's own claim.
    """
    if isinstance(due_ms, bool) or not isinstance(due_ms, int | float):
        return 0.0
    early = due_ms / 1000 - now
    return early + _MARGIN_S if 0 < early <= UNIT_MS / 1000 else 0.0
