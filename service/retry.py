"""Retries with back-off: failed casts, submits and events wait in holding queues, then return.

Attempts are counted by Burrow itself: every retry copy carries `x-burrow-attempt`, the number
of retries made so far, so the count travels with the message on every broker. RabbitMQ 3.13+
does not interpret an `x-death` that a client republishes (each trip through a holding queue
starts a fresh one), so the broker's records serve only as the fallback for messages that were
retried before Burrow wrote its own count. The decision to retry is `middleware.decide`'s.
"""

from __future__ import annotations

from typing import Any

from service import envelope
from service.messages import retry_copy
from service.vocabulary import H_ATTEMPT, H_DEATH, MAX_ATTEMPT, Names

__all__ = ["attempts", "retry_level", "retry_message"]


def attempts(headers: dict[str, Any], names: Names) -> int:
    """How many retries this message has already had: Burrow's own count (x-burrow-attempt, as
    the envelope reader coerces it) when readable, else the broker's x-death records of this
    namespace's holding queues."""
    counted = envelope.attempt(headers.get(H_ATTEMPT))
    return _deaths(headers, names) if counted is None else counted


def _deaths(headers: dict[str, Any], names: Names) -> int:
    deaths = headers.get(H_DEATH)
    if not isinstance(deaths, list):
        return 0
    prefix = f"{names.namespace}.retry."
    total = 0
    for death in deaths[:64]:
        if not isinstance(death, dict):
            continue
        queue, count = death.get("queue"), death.get("count")
        if (
            isinstance(queue, str)
            and queue.startswith(prefix)
            and death.get("reason") == "expired"
            and isinstance(count, int)
            and not isinstance(count, bool)
        ):
            total += max(0, min(count, MAX_ATTEMPT))
    return min(total, MAX_ATTEMPT)


def retry_level(attempt: int, levels: int) -> int:
    """The holding queue for retry number `attempt` (0-based): delays double, then stay."""
    return min(attempt, levels - 1)


retry_message = retry_copy  # the copy itself is built in `messages`, with every other copy
