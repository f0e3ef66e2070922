"""Retry counting and copies without a broker: `attempts` over Burrow's own `x-burrow-attempt`
in every AMQP type and over forged `x-death` records (the fallback), `retry_level`'s back-off
ladder, and the copy `retry_message` publishes (docs/protocol.md §10)."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest

from service.retry import attempts, retry_level, retry_message
from service.topology import Names
from service.types import Delivery

__all__: list[str] = []

NAMES = Names("rt")
CAP = 1_000_000  # what one forged entry can add at most


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


def test_retry_message_goes_back_to_its_queue_through_the_level() -> None:
    """The copy enters the level's fanout exchange keyed by the queue it was consumed from."""
    copy = retry_message(_failed(), NAMES, 3, 0)
    assert (copy.exchange, copy.routing_key) == ("rt.retry.3", "rt.notes.commands")


def test_retry_message_keeps_properties_and_headers() -> None:
    """Body, ids, type, reply address, content type and every header (x-death too) are kept;
    the copy is persistent and never expires on its own."""
    failed = _failed()
    copy = retry_message(failed, NAMES, 0, 2)
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


def test_retry_message_counts_one_more_retry() -> None:
    """The copy carries retry number attempt + 1, which `attempts` reads back."""
    failed = _failed()
    copy = retry_message(failed, NAMES, 0, attempts(failed.headers, NAMES))
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


def test_retry_message_without_an_id_gets_one() -> None:
    """A message that arrived without a message id is copied with a fresh one."""
    copy = retry_message(_failed(message_id=None), NAMES, 0, 0)
    assert copy.message_id
