"""The retry policy without a broker (docs/protocol.md §10): its decisions as a table (kind,
failure, attempt → retried at level L, parked `retries_exhausted`, or not retried), the cap,
`attempts` over Burrow's own `x-burrow-attempt` in every AMQP type and over forged `x-death`
records (the fallback), `retry_level`'s back-off ladder, and the copy a retry publishes."""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Callable
from typing import Any

import pytest

from service._protocol.config import load_settings
from service._protocol.errors import InvalidArgument, ServiceError, Unavailable
from service._protocol.messages import retry_copy
from service._protocol.types import Delivery, Outcome
from service._protocol.vocabulary import Names
from service._serving.retry import (
    EXHAUSTED,
    RETRY,
    attempts,
    max_retries,
    retry_level,
    verdict,
)

__all__: list[str] = []

NAMES = Names("rt")
CAP = 1_000_000  # what one forged entry can add at most


MAX_RETRIES = 3
LEVELS = 2


def fate(kind: str, error: ServiceError, reason: str | None, attempt: int) -> str:
    """What the policy alone makes of a failure: the row's last column."""
    decided = verdict(kind, error, reason, attempt, MAX_RETRIES)
    if decided is None:
        return "not retried"  # middleware.decide answers it, or parks it for its own reason
    if decided is RETRY:
        return f"retried at level {retry_level(attempt, LEVELS)}"
    assert decided is EXHAUSTED
    return f"parked {decided.dead_reason}, attempts {error.details['attempts']}"


def retryable() -> ServiceError:
    """A fresh retryable error (the policy adds `attempts` to the one it parks)."""
    return Unavailable("db down")


def final() -> ServiceError:
    """A fresh error that is not retryable."""
    return InvalidArgument("bad")


# With at most 3 retries on a ladder of 2 holding levels.
FATES = [
    # A retryable failure of a cast, submit or event: retried up the ladder, then parked.
    ("cast", retryable, "failed", 0, "retried at level 0"),
    ("cast", retryable, "failed", 1, "retried at level 1"),
    ("cast", retryable, "failed", 2, "retried at level 1"),
    ("cast", retryable, "failed", 3, "parked retries_exhausted, attempts 4"),
    ("cast", retryable, "failed", 50, "parked retries_exhausted, attempts 51"),
    ("submit", retryable, "failed", 0, "retried at level 0"),
    ("submit", retryable, "failed", 3, "parked retries_exhausted, attempts 4"),
    ("event", retryable, "failed", 2, "retried at level 1"),
    ("event", retryable, "failed", 3, "parked retries_exhausted, attempts 4"),
    ("cast", retryable, None, 0, "retried at level 0"),  # a failure without a reason of its own
    # Calls (and a job's result lookup) are answered: the caller holds the deadline.
    ("call", retryable, "failed", 0, "not retried"),
    ("call", retryable, "failed", 3, "not retried"),
    ("result", retryable, "failed", 0, "not retried"),
    # A final error is never retried: answered or parked at once, whatever the attempt.
    ("cast", final, "failed", 0, "not retried"),
    ("submit", final, "failed", 3, "not retried"),
    ("event", final, "failed", 1, "not retried"),
    # A refusal of the input is never retried, even when its error is retryable.
    ("cast", retryable, "too_large", 0, "not retried"),
    ("event", retryable, "invalid", 0, "not retried"),
    ("submit", retryable, "unknown_operation", 0, "not retried"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "error", "reason", "attempt", "expected"),
    FATES,
    ids=[
        f"{kind}-{error.__name__}-{reason}-{attempt}" for kind, error, reason, attempt, _ in FATES
    ],
)
def test_decisions_table(
    kind: str,
    error: Callable[[], ServiceError],
    reason: str | None,
    attempt: int,
    expected: str,
) -> None:
    """Each kind, failure and attempt is retried at its level, parked retries_exhausted, or
    left to be answered or parked for its own reason."""
    assert fate(kind, error(), reason, attempt) == expected


def test_exhausted_is_parked_and_retry_is_not() -> None:
    """A retry's outcome is RETRIED with no dead-letter reason; running out parks the message."""
    assert (RETRY.outcome, RETRY.dead_reason) == (Outcome.RETRIED, None)
    assert (EXHAUSTED.outcome, EXHAUSTED.dead_reason) == (
        Outcome.DEAD_LETTERED,
        "retries_exhausted",
    )


def test_exhausted_keeps_the_error_details() -> None:
    """Parking after the last retry adds `attempts` to the error's own details."""
    error = Unavailable("db down", details={"host": "db-1"})
    assert verdict("cast", error, "failed", 3, 3) is EXHAUSTED
    assert error.details == {"host": "db-1", "attempts": 4}


def test_retry_leaves_the_error_as_it_is() -> None:
    """A retried failure's error is not touched: only the parked one says its attempts."""
    error = retryable()
    assert verdict("cast", error, "failed", 0, 3) is RETRY
    assert "attempts" not in error.details


def test_no_retries_parks_at_the_first_failure() -> None:
    """With retries=0 a retryable failure is parked after its one run."""
    error = retryable()
    assert verdict("event", error, "failed", 0, 0) is EXHAUSTED
    assert error.details["attempts"] == 1


@pytest.mark.parametrize(("configured", "cap"), [(None, 5), (0, 0), (2, 2), (50, 50)])
def test_max_retries_is_the_operations_else_the_settings(configured: int | None, cap: int) -> None:
    """`retries=` of the operation or subscription wins; without it, BURROW_MAX_RETRIES."""
    assert max_retries(configured, load_settings(max_retries=5)) == cap


def death(
    count: object = 1, *, queue: object = "rt.retry.0.wait", reason: object = "expired"
) -> dict[str, Any]:
    """An x-death entry as RabbitMQ writes it for a retry holding queue."""
    return {
        "count": count,
        "reason": reason,
        "queue": queue,
        "exchange": "rt.retry.0",
        "routing-keys": ["rt.notes.commands"],
        "time": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    }


def test_no_x_death_is_zero_attempts() -> None:
    """A message that never waited in a holding queue has made no retry."""
    assert attempts({}, NAMES) == 0


def test_counts_are_summed_over_the_retry_queues() -> None:
    """Each holding queue's entry counts its trips; the levels add up."""
    headers = {"x-death": [death(2, queue="rt.retry.1.wait"), death(3, queue="rt.retry.0.wait")]}
    assert attempts(headers, NAMES) == 5


@pytest.mark.parametrize("value", ["1", b"x", 3, 2.5, None, {"count": 3}, (death(),)], ids=type)
def test_x_death_that_is_not_a_list_counts_nothing(value: object) -> None:
    """An x-death of any other type (string, number, table, tuple) is no record at all."""
    assert attempts({"x-death": value}, NAMES) == 0


@pytest.mark.parametrize("entry", ["entry", 7, None, [death()], b"\x00"], ids=repr)
def test_entries_that_are_not_tables_are_skipped(entry: object) -> None:
    """A non-table entry is skipped; the real entries beside it still count."""
    assert attempts({"x-death": [entry, death(2)]}, NAMES) == 2


@pytest.mark.parametrize(
    "queue",
    [
        "rt.notes.commands",  # dead-lettered from a work queue, not a retry
        "other.retry.0.wait",  # another namespace's retries
        "rt.retryx.0.wait",
        "rt.delay.3.wait",
        "xrt.retry.0.wait",
        b"rt.retry.0.wait",  # not text as RabbitMQ writes it
        None,
        5,
    ],
    ids=repr,
)
def test_entries_of_other_queues_are_not_retries(queue: object) -> None:
    """Only queues named `<ns>.retry.` count: other queues and namespaces do not."""
    assert attempts({"x-death": [death(4, queue=queue)]}, NAMES) == 0


@pytest.mark.parametrize(
    "reason", ["rejected", "maxlen", "delivery_limit", "EXPIRED", b"expired", None, 1], ids=repr
)
def test_entries_not_expired_are_not_retries(reason: object) -> None:
    """A retry is a trip through a holding queue ended by its TTL: reason `expired` only."""
    assert attempts({"x-death": [death(4, reason=reason)]}, NAMES) == 0


@pytest.mark.parametrize("count", ["3", b"3", 2.0, None, [3], {"n": 3}], ids=repr)
def test_counts_that_are_not_integers_are_skipped(count: object) -> None:
    """A count of another type adds nothing (the entry beside it still counts)."""
    assert attempts({"x-death": [death(count), death(1)]}, NAMES) == 1


@pytest.mark.parametrize("count", [True, False], ids=repr)
def test_boolean_counts_are_skipped(count: bool) -> None:
    """A boolean is not a count (RabbitMQ writes a long): it adds nothing, True included."""
    assert attempts({"x-death": [death(count), death(1)]}, NAMES) == 1


@pytest.mark.parametrize("count", [0, -1, -(1 << 70)], ids=repr)
def test_zero_and_negative_counts_add_nothing(count: int) -> None:
    """A count below one cannot lower the total."""
    assert attempts({"x-death": [death(count), death(2)]}, NAMES) == 2


@pytest.mark.parametrize("count", [CAP, CAP + 1, 1 << 63, 10**100], ids=repr)
def test_huge_counts_are_capped(count: int) -> None:
    """x-death counts at most 1_000_000 in all, whatever a forger wrote."""
    assert attempts({"x-death": [death(count)]}, NAMES) == CAP
    assert attempts({"x-death": [death(count), death(count)]}, NAMES) == CAP


def test_only_the_first_64_entries_are_read() -> None:
    """A forged x-death of thousands of entries costs 64 reads: the rest is ignored."""
    assert attempts({"x-death": [death(1) for _ in range(10_000)]}, NAMES) == 64
    assert attempts({"x-death": [*(["junk"] * 64), death(CAP)]}, NAMES) == 0


@pytest.mark.parametrize(
    ("attempt", "levels", "level"),
    [(0, 6, 0), (1, 6, 1), (5, 6, 5), (6, 6, 5), (50, 6, 5), (0, 1, 0), (9, 1, 0), (3, 20, 3)],
)
def test_retry_level_doubles_then_stays_at_the_top(attempt: int, levels: int, level: int) -> None:
    """Retry n waits at level n until the last holding queue, which takes every later one."""
    assert retry_level(attempt, levels) == level


def _failed(**overrides: Any) -> Delivery:
    fields: dict[str, Any] = {
        "body": b'{"text":"hi"}',
        "routing_key": "notes.write",
        "exchange": "rt.commands",
        "message_id": "m-1",
        "correlation_id": "c-1",
        "reply_to": "rt.replies",
        "type": "notes.write",
        "headers": {
            "x-burrow-kind": "cast",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "custom": {"nested": [1, "two"]},
            "x-death": [death(2)],
        },
        "content_type": "application/json",
        "content_encoding": "identity",
        "expiration": "60000",
        "queue": "rt.notes.commands",
        "app_id": "tests",
        "priority": 4,
        "timestamp": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    }
    fields.update(overrides)
    return Delivery(**fields)


def test_retry_copy_goes_back_to_its_queue_through_the_level() -> None:
    """The copy enters the level's fanout exchange keyed by the queue it was consumed from."""
    copy = retry_copy(_failed(), NAMES, 3, 0)
    assert (copy.exchange, copy.routing_key) == ("rt.retry.3", "rt.notes.commands")


def test_retry_copy_keeps_properties_and_headers() -> None:
    """Body, ids, type, reply address, content type and every header (x-death too) are kept;
    the copy is persistent and never expires on its own."""
    failed = _failed()
    copy = retry_copy(failed, NAMES, 0, 2)
    assert copy.headers == failed.headers | {"x-burrow-attempt": 3}
    assert copy.body == failed.body
    assert (copy.message_id, copy.correlation_id, copy.reply_to, copy.type) == (
        "m-1",
        "c-1",
        "rt.replies",
        "notes.write",
    )
    assert (copy.content_type, copy.content_encoding, copy.app_id) == (
        "application/json",
        "identity",
        "tests",
    )
    assert (copy.priority, copy.timestamp) == (4, failed.timestamp)
    assert copy.persistent is True
    assert copy.expiration_ms is None


def test_retry_copy_counts_one_more_retry() -> None:
    """The copy carries retry number attempt + 1, which `attempts` reads back."""
    failed = _failed()
    copy = retry_copy(failed, NAMES, 0, attempts(failed.headers, NAMES))
    assert copy.headers["x-burrow-attempt"] == 3
    assert attempts(copy.headers, NAMES) == 3


def test_own_count_wins_over_a_fresh_x_death() -> None:
    """On RabbitMQ 3.13+ each trip starts a one-entry x-death: Burrow's count is the one used."""
    headers = {"x-burrow-attempt": 4, "x-death": [death(1)]}
    assert attempts(headers, NAMES) == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (2, 2),
        (-3, 0),  # negative: no retry made
        (-(1 << 70), 0),
        (CAP + 1, CAP),  # capped: never trusted past the limit
        (1 << 63, CAP),
        (10**100, CAP),
        ("2", 2),  # other clients' spellings of an integer
        (b"2", 2),
        (bytearray(b" 7 "), 7),
        ("9" * 40, CAP),  # any number of digits: at the cap
        ("-" + "9" * 40, 0),
        (2.0, 2),
        (decimal.Decimal("5"), 5),
        (decimal.Decimal("1e400"), CAP),
        (float("inf"), CAP),
        (float("-inf"), 0),
    ],
    ids=repr,
)
def test_own_count_is_coerced_and_capped(value: object, expected: int) -> None:
    """x-burrow-attempt of any integral AMQP type is read, clamped to 0..1_000_000."""
    assert attempts({"x-burrow-attempt": value, "x-death": [death(9)]}, NAMES) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        2.5,
        float("nan"),
        decimal.Decimal("NaN"),
        decimal.Decimal("sNaN"),
        "two",
        "",
        "1_0",  # Python's integer syntax is not the protocol's
        "\u0661",  # a non-ASCII digit
        "+3",
        b"\xff",
        [1],
        {"n": 1},
        datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    ],
    ids=repr,
)
def test_unreadable_own_count_falls_back_to_x_death(value: object) -> None:
    """A count of no integral type (or a boolean) is not read: x-death counts instead."""
    assert attempts({"x-burrow-attempt": value, "x-death": [death(2)]}, NAMES) == 2
    assert attempts({"x-burrow-attempt": value}, NAMES) == 0


def test_retry_copy_without_an_id_gets_one() -> None:
    """A message that arrived without a message id is copied with a fresh one."""
    copy = retry_copy(_failed(message_id=None), NAMES, 0, 0)
    assert copy.message_id


def test_a_copy_of_a_message_without_type_keeps_its_route_as_type() -> None:
    """A cast that named its operation only by its routing key comes back (keyed by the queue)
    with that route as its `type`, so the retry reaches the same operation."""
    copy = retry_copy(_failed(type=None, routing_key="notes.write"), NAMES, 0, 0)
    assert (copy.routing_key, copy.type) == ("rt.notes.commands", "notes.write")
    assert retry_copy(_failed(), NAMES, 0, 0).type == "notes.write"  # a type is kept as it is
