"""The dispatcher's decisions as tables: `decide` (answer, retry, park, drop) and `plan`
(what to publish, then how to settle), without a broker."""

# ruff: noqa: E501 - the tables read best with one row per line

from __future__ import annotations

from dataclasses import dataclass

import pytest

from service._protocol.codec import decode_json
from service._protocol.errors import InvalidArgument, ServiceError, Unavailable
from service._protocol.types import Delivery, Outcome, Settle
from service._protocol.vocabulary import H_DEAD_REASON, H_JOB_ID, H_STATUS, Names
from service._serving.middleware import Request, Result, decide
from service._serving.settlement import Plan, Role, plan

__all__: list[str] = []

NAMES = Names("ns")
REPLY_TO = "amq.rabbitmq.reply-to.abc"
COMMANDS = NAMES.commands_queue("calc")
REQUESTS = NAMES.request_queue("calc")


def _request(
    kind: str,
    *,
    attempt: int = 0,
    max_retries: int = 3,
    queue: str = COMMANDS,
    reply_to: str | None = REPLY_TO,
) -> Request:
    return Request(
        service="calc",
        route="calc.add",
        operation=None,
        delivery=Delivery(
            body=b'{"a": 1}', routing_key="calc.add", correlation_id="c-1", queue=queue
        ),
        kind=kind,
        deadline=None,
        reply_to=reply_to if kind in ("call", "submit", "result") else None,
        job_id="job-1" if kind in ("submit", "result") else None,
        callback="my.inbox" if kind == "submit" else None,
        handler_timeout=5.0,
        attempt=attempt,
        max_retries=max_retries,
    )


RETRYABLE: ServiceError = Unavailable("db down")
FINAL: ServiceError = InvalidArgument("bad")


@dataclass(frozen=True)
class Row:
    """One line of the decision table."""

    kind: str
    result: Result
    attempt: int
    outcome: Outcome
    reason: str | None


DECISIONS = [
    # An answer is final whatever the kind.
    Row("call", Result(Outcome.OK, reply=b"{}"), 0, Outcome.OK, None),
    Row("cast", Result(Outcome.EXPIRED), 0, Outcome.EXPIRED, None),
    # A retryable failure: calls are answered, async work is retried, then parked (the retry
    # policy's own table, by kind, failure and attempt: test_retry.py).
    Row("call", Result(Outcome.ERROR, error=RETRYABLE, dead_reason="failed"), 0, Outcome.ERROR, "failed"),
    Row("cast", Result(Outcome.ERROR, error=RETRYABLE, dead_reason="failed"), 0, Outcome.RETRIED, None),
    Row("submit", Result(Outcome.ERROR, error=RETRYABLE, dead_reason="failed"), 2, Outcome.RETRIED, None),
    Row("event", Result(Outcome.ERROR, error=RETRYABLE, dead_reason="failed"), 3, Outcome.DEAD_LETTERED, "retries_exhausted"),
    Row("cast", Result(Outcome.ERROR, error=RETRYABLE, dead_reason="failed"), 3, Outcome.DEAD_LETTERED, "retries_exhausted"),
    # A final failure: answered where there is a caller, parked where there is none.
    Row("call", Result(Outcome.ERROR, error=FINAL, dead_reason="failed"), 0, Outcome.ERROR, "failed"),
    Row("submit", Result(Outcome.ERROR, error=FINAL, dead_reason="failed"), 0, Outcome.ERROR, "failed"),
    Row("cast", Result(Outcome.ERROR, error=FINAL, dead_reason="failed"), 0, Outcome.DEAD_LETTERED, "failed"),
    Row("event", Result(Outcome.REJECTED, error=FINAL, dead_reason="invalid"), 0, Outcome.DEAD_LETTERED, "invalid"),
    # A refusal is never retried, even when its error is retryable.
    Row("cast", Result(Outcome.REJECTED, error=RETRYABLE, dead_reason="too_large"), 0, Outcome.DEAD_LETTERED, "too_large"),
    # A job's stored failure, answered again to a redelivered submit: never retried again.
    Row("submit", Result(Outcome.ERROR, error=RETRYABLE, duplicate=True), 0, Outcome.ERROR, None),
    # Already parked (e.g. job_id_in_use): left as it is.
    Row("submit", Result(Outcome.DEAD_LETTERED, error=FINAL, dead_reason="job_id_in_use"), 0, Outcome.DEAD_LETTERED, "job_id_in_use"),
]  # fmt: skip


@pytest.mark.parametrize("row", DECISIONS, ids=lambda row: f"{row.kind}-{row.result.outcome}")
def test_decide_table(row: Row) -> None:
    """decide() gives the outcome and dead-letter reason of each row."""
    decided = decide(_request(row.kind, attempt=row.attempt), row.result)
    assert decided.outcome is row.outcome
    if row.outcome in (Outcome.DEAD_LETTERED, Outcome.ERROR):
        assert decided.dead_reason == row.reason


def test_exhausted_retries_record_the_attempts() -> None:
    """Parking after the last retry says how many attempts were made."""
    error = Unavailable("db down")
    decided = decide(_request("cast", attempt=3), Result(Outcome.ERROR, error=error))
    assert decided.error is not None
    assert decided.error.details["attempts"] == 4


def _plan(request: Request, result: Result) -> Plan:
    return plan(request, result, names=NAMES, version="1", retry_levels=6, trace=None)


def _shape(todo: Plan) -> list[tuple[str, str, str, bool, Role]]:
    return [
        (p.kind, p.message.exchange, p.message.routing_key, p.mandatory, p.role)
        for p in todo.publishes
    ]


ERROR = Result(Outcome.ERROR, error=FINAL, dead_reason="failed")
PARKED = Result(Outcome.DEAD_LETTERED, error=FINAL, dead_reason="failed")
EVENTS = NAMES.events_exchange

PLANS = [
    ("call", Result(Outcome.OK, reply=b'{"sum": 3}'), [("reply", "", REPLY_TO, False, Role.ANSWER)], Settle.ACK),
    ("call", ERROR, [("reply", "", REPLY_TO, False, Role.ANSWER)], Settle.ACK),
    ("call", Result(Outcome.EXPIRED), [], Settle.ACK),
    ("cast", Result(Outcome.OK), [], Settle.ACK),
    ("event", Result(Outcome.OK), [], Settle.ACK),
    (
        "submit",
        Result(Outcome.OK, reply=b"{}"),
        [
            ("completion", "", REPLY_TO, False, Role.ANSWER),
            ("completion", EVENTS, "calc.add.completed", False, Role.ANSWER),
            ("completion", EVENTS, "my.inbox", False, Role.ANSWER),
        ],
        Settle.ACK,
    ),
    ("cast", Result(Outcome.RETRIED, error=RETRYABLE), [("retry", NAMES.retry_exchange(0), COMMANDS, True, Role.COPY)], Settle.ACK),
    ("cast", PARKED, [("dead_letter", NAMES.dead_letter_exchange, NAMES.dead_letter_queue("calc"), True, Role.COPY)], Settle.ACK),
    (
        "submit",
        PARKED,
        [
            ("dead_letter", NAMES.dead_letter_exchange, NAMES.dead_letter_queue("calc"), True, Role.COPY),
            ("completion", "", REPLY_TO, False, Role.ANSWER),
            ("completion", EVENTS, "calc.add.failed", False, Role.ANSWER),
            ("completion", EVENTS, "my.inbox", False, Role.ANSWER),
        ],
        Settle.ACK,
    ),
    ("result", Result(Outcome.OK, reply=b'{"state": "running"}'), [("reply", "", REPLY_TO, False, Role.ANSWER)], Settle.ACK),
    # H5: an oversize body from a queue with a dead-letter exchange is not copied.
    ("cast", Result(Outcome.DEAD_LETTERED, error=FINAL, dead_reason="too_large"), [], Settle.REJECT),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "result", "publishes", "then"),
    PLANS,
    ids=[f"{kind}-{result.outcome}-{result.dead_reason}" for kind, result, _, _ in PLANS],
)
def test_plan_table(
    kind: str,
    result: Result,
    publishes: list[tuple[str, str, str, bool, Role]],
    then: Settle,
) -> None:
    """plan() publishes exactly these messages, in order, then settles as the row says."""
    todo = _plan(_request(kind), result)
    assert _shape(todo) == publishes
    assert todo.then is then


def test_a_submit_without_reply_address_completes_to_its_pre_0_2_job_queue() -> None:
    """A submitter that named no reply address may have declared `<ns>.job.<id>` (before 0.2):
    the completion goes there, unmandatory, instead."""
    todo = _plan(_request("submit", reply_to=None), Result(Outcome.OK, reply=b"{}"))
    assert _shape(todo)[0] == ("completion", "", NAMES.job_queue("job-1"), False, Role.ANSWER)


def test_oversize_call_on_the_request_queue_is_parked_by_burrow() -> None:
    """The request queue has no dead-letter exchange: an oversize body from it is copied."""
    too_large = Result(Outcome.DEAD_LETTERED, error=FINAL, dead_reason="too_large")
    todo = _plan(_request("cast", queue=REQUESTS), too_large)
    [parked] = todo.publishes
    assert parked.message.headers[H_DEAD_REASON] == "too_large"
    assert todo.then is Settle.ACK


def test_answers_carry_status_version_trace_and_the_error_body() -> None:
    """A reply to a failed call holds the error body, x-status error and the stamped headers."""
    [reply] = _plan(_request("call"), ERROR).publishes
    assert reply.message.correlation_id == "c-1"
    assert reply.message.headers[H_STATUS] == "error"
    assert reply.message.headers["x-contract-version"] == "1"
    assert reply.message.headers["traceparent"].startswith("00-")
    assert decode_json(reply.message.body)["code"] == "INVALID_ARGUMENT"
    assert not reply.message.persistent


def test_completions_name_the_job() -> None:
    """Every completion carries the job id as header and correlation id."""
    todo = _plan(_request("submit"), Result(Outcome.OK, reply=b"{}"))
    assert {p.message.headers[H_JOB_ID] for p in todo.publishes} == {"job-1"}
    assert {p.message.correlation_id for p in todo.publishes} == {"job-1"}
