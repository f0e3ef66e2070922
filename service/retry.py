"""Retries with back-off: failed casts, submits and events wait in holding queues, then return.

Attempts are counted from the broker's own `x-death` records of the holding queues, so a
count survives restarts. The decision to retry is `middleware.decide`'s.
"""

from __future__ import annotations

from typing import Any

from service.messages import retry_copy
from service.vocabulary import H_DEATH, Names

__all__ = ["attempts", "retry_level", "retry_message"]

_MAX_COUNT = 1_000_000  # a forged x-death cannot make the count absurd


def attempts(headers: dict[str, Any], names: Names) -> int:
    """How many times this message has already waited in a retry holding queue."""
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
            total += max(0, min(count, _MAX_COUNT))
    return total


def retry_level(attempt: int, levels: int) -> int:
    """The holding queue for retry number `attempt` (0-based): delays double, then stay."""
    return min(attempt, levels - 1)


retry_message = retry_copy  # the copy itself is built in `messages`, with every other copy
