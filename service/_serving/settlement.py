"""What to publish and how to settle, once a message is handled: one pure function, `plan`.

`middleware.decide` has already made the outcome final (answered, retried, parked or
dropped); `plan` turns it into the messages to publish, each confirmed, and the settle action
that follows. No I/O: the dispatcher carries the plan out, and a unit test walks it as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from service._protocol import codec, messages
from service._protocol.types import Outcome, Outgoing, Settle
from service._protocol.vocabulary import DeadReason, Kind, Names, PublishKind
from service._serving.middleware import Request, Result
from service._serving.retry import retry_level


class Role(StrEnum):
    """What a publish is for, which says what its failure means."""

    ANSWER = "answer"  # reply or completion: unroutable means nobody waits; drop it, ack
    COPY = "copy"  # dead letter or retry copy: it must land, or the delivery is handed back


@dataclass(frozen=True, slots=True)
class Publish:
    """One message of a plan, with how to publish it."""

    message: Outgoing
    kind: PublishKind  # metric label (burrow_messages_published_total{kind})
    mandatory: bool
    role: Role


@dataclass(frozen=True, slots=True)
class Plan:
    """The messages to publish, in order and each confirmed, then how to settle the delivery.

    If a publish fails: `Unavailable` hands the delivery back (requeue); any other error of a
    `COPY` rejects it to its queue's dead-letter exchange (requeueing would loop); an
    `ANSWER` nobody can receive is dropped.
    """

    publishes: Sequence[Publish] = field(default_factory=tuple)
    then: Settle = Settle.ACK


def plan(
    request: Request,
    result: Result,
    *,
    names: Names,
    version: str,
    retry_levels: int,
    trace: str | None,
) -> Plan:
    """What to publish for a decided `result`, and how to settle `request.delivery` after
    (`retry_levels`: the holding queues a retry copy may wait in, `BURROW_RETRY_LEVELS`)."""
    delivery = request.delivery
    outcome = result.outcome
    if outcome is Outcome.EXPIRED:
        return Plan()
    if outcome is Outcome.RETRIED:
        # Where it waits is the retry policy's; the copy carries one retry more than it had.
        level = retry_level(request.attempt, retry_levels)
        copy = messages.retry_copy(delivery, names, level, request.attempt)
        return Plan((Publish(copy, PublishKind.RETRY, mandatory=True, role=Role.COPY),))
    if outcome is Outcome.DEAD_LETTERED:
        if result.dead_reason == DeadReason.TOO_LARGE and delivery.queue != names.request_queue(
            request.service
        ):
            # H5: a body over the limit is not copied (a publish holds it two or three times
            # more): the queue's own dead-letter exchange moves it whole into the DLQ.
            return Plan(then=Settle.REJECT)
        letter = messages.dead_letter(
            delivery, names, request.service, result.dead_reason or DeadReason.FAILED, result.error
        )
        parked = Publish(letter, PublishKind.DEAD_LETTER, mandatory=True, role=Role.COPY)
        return Plan((parked, *_answers(request, result, names, version, trace)))
    return Plan(tuple(_answers(request, result, names, version, trace)))


def _answers(
    request: Request, result: Result, names: Names, version: str, trace: str | None
) -> list[Publish]:
    """The reply to a call's caller, or a submit's completions (the submitter learns it
    failed even when the submit is parked)."""
    if result.error is None:
        body, ok = result.reply or b"{}", True
    else:
        body, ok = codec.encode_error(result.error), False
    if request.kind == Kind.SUBMIT:
        return _completions(request, body, ok=ok, names=names, version=version, trace=trace)
    if request.reply_to is not None and result.outcome is not Outcome.DEAD_LETTERED:
        message = messages.reply(
            request.delivery.correlation_id,
            request.reply_to,
            body,
            ok=ok,
            version=version,
            trace=trace,
        )
        # mandatory=False: RabbitMQ 3.10 returns direct reply-to publishes spuriously.
        return [Publish(message, PublishKind.REPLY, mandatory=False, role=Role.ANSWER)]
    return []


def _completions(
    request: Request, body: bytes, *, ok: bool, names: Names, version: str, trace: str | None
) -> list[Publish]:
    """A submit's completions (none when its job id was refused), none mandatory: the record
    in the job store is what must not be lost, and it was written first."""
    if request.job_id is None:
        return []
    return [
        Publish(message, PublishKind.COMPLETION, mandatory=False, role=Role.ANSWER)
        for message in messages.completions(
            names,
            request.route,
            request.job_id,
            body,
            ok=ok,
            reply_to=request.reply_to,
            callback=request.callback,
            callback_data=request.callback_data,
            version=version,
            trace=trace,
        )
    ]
