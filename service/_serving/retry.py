"""The retry policy: which failures are retried, how retries are counted, capped and staged.

Failed casts, submits and events wait in holding queues, then return to the queue they came
from (docs/protocol.md §10). A retry-policy change edits this module only:

- which failures are retried: `verdict` (the kinds, a retryable error, raised while the
  handler ran: `_RETRIED_KINDS`, `_RETRIED_REASONS`);
- how retries are counted: `attempts` (Burrow's own `x-burrow-attempt`, `x-death` as the
  fallback) and the `attempts` detail `verdict` adds when they run out;
- the cap: `max_retries` (an operation's or subscription's `retries=`, else
  `BURROW_MAX_RETRIES`) and the comparison in `verdict`;
- what happens at the cap: `verdict` (`EXHAUSTED`: parked as `retries_exhausted`);
- where each retry waits: `retry_level` (the holding level of retry number n).

What stays elsewhere, not being policy: the settings and `retries=` (the user's configuration:
`_protocol.config`, `_protocol.registry`); the holding queues and their delays
(`_protocol.topology.retry_topology`: level L waits `BURROW_RETRY_BASE_DELAY`·2^L, a queue
argument of the wire protocol that an existing queue cannot change); the copy itself
(`messages.retry_copy`, which writes attempts + 1); acting on a verdict (`middleware.decide`
turns it into the final `Result`, `settlement.plan` publishes the copy at `retry_level`).

Attempts are counted by Burrow itself: every retry copy carries `x-burrow-attempt`, the number
of retries made so far, so the count travels with the message on every broker. RabbitMQ 3.13+
does not interpret an `x-death` that a client republishes (each trip through a holding queue
starts a fresh one), so the broker's records serve only as the fallback for messages that were
retried before Burrow wrote its own count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from service._protocol import envelope
from service._protocol.config import Settings
from service._protocol.errors import ServiceError
from service._protocol.types import Outcome
from service._protocol.vocabulary import H_ATTEMPT, H_DEATH, MAX_ATTEMPT, DeadReason, Kind, Names

# Calls are never retried: the caller holds the deadline and gets the error, `retryable` and all.
_RETRIED_KINDS = frozenset({Kind.CAST, Kind.SUBMIT, Kind.EVENT})
# Raised while the handler ran (error_middleware's reason; None: a result without one). A
# refusal of the input (schema, size, unknown operation…) is never retried, retryable or not.
_RETRIED_REASONS = frozenset({None, DeadReason.FAILED})


class Verdict(NamedTuple):
    """What the policy makes of a failure it retries: the final outcome, and the dead-letter
    reason when it is parked."""

    outcome: Outcome
    dead_reason: DeadReason | None


RETRY = Verdict(Outcome.RETRIED, None)
"""Retry: a copy waits in holding queue `retry_level(attempt)`, then comes back."""
EXHAUSTED = Verdict(Outcome.DEAD_LETTERED, DeadReason.RETRIES_EXHAUSTED)
"""The retries ran out: parked as `retries_exhausted`, `details.attempts` in its error."""


def verdict(
    kind: str, error: ServiceError, reason: str | None, attempt: int, max_retries: int
) -> Verdict | None:
    """The policy's word on a failure of a `kind` message that already had `attempt` retries.

    None: not one the policy retries (a call, a final error, a refusal): `decide` answers or
    parks it for its own `reason`. Else `RETRY` while retries remain, then `EXHAUSTED`, which
    adds to `error.details` how many attempts were made (the first run and every retry)."""
    if not (error.retryable and kind in _RETRIED_KINDS and reason in _RETRIED_REASONS):
        return None
    if attempt < max_retries:
        return RETRY
    error.details = {**error.details, "attempts": attempt + 1}
    return EXHAUSTED


def max_retries(configured: int | None, settings: Settings) -> int:
    """The retries allowed: `retries=` of the operation or subscription when it says, else
    `BURROW_MAX_RETRIES`."""
    return settings.max_retries if configured is None else configured


def retry_level(attempt: int, levels: int) -> int:
    """The holding level for retry number `attempt` (0-based) on a ladder of `levels` holding
    queues (`BURROW_RETRY_LEVELS`): level n for retry n, then the last level for every later
    one. Each level waits twice as long as the one below (`retry_topology`), so the delays
    double, then stay."""
    return min(attempt, levels - 1)


def attempts(headers: dict[str, Any], names: Names, kind: str | None = None) -> int:
    """How many retries this message has already had: Burrow's own count (x-burrow-attempt, as
    the envelope reader coerces it) when readable, else the broker's x-death records of this
    namespace's holding queues. 0 without reading anything for a `kind` never retried (a
    call): its count decides nothing."""
    if kind is not None and kind not in _RETRIED_KINDS:
        return 0
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
