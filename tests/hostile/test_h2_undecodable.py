"""H2 of RELIABILITY.md: properties and headers the AMQP library cannot decode.

A non-UTF-8 short string (message_id, correlation_id, reply_to, type, content_type,
content_encoding, app_id, a header name), a table or array nested deeper than 32 levels (33 and
2000), a timestamp pamqp cannot turn into a date (in a header, or the `timestamp` property):
sent byte-exact through `rawamqp` as a call and as a cast, on classic and on quorum queues.
Never a reconnect (the consumers stay attached); the message is refused with reason
`undecodable` — parked in the service's DLQ with `x-burrow-dead-reason: undecodable`, except a
call whose reply_to and correlation_id are readable, answered INVALID_ARGUMENT with
`details.reason == "undecodable"`; a delayed message is parked in the scheduler's DLQ. The
service answers calc.add right after.

`expiration` cannot carry undecodable bytes over RabbitMQ: the broker refuses any expiration
that is not a number (406, channel closed) before a service sees it; that is checked too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests.hostile.conftest import NOT_UTF8, Case, Hostile, MakeHostile, Sent, run_cases
from tests.hostile.rawamqp import S, T, nested_array, nested_table

__all__: list[str] = []

QUEUE_TYPES = ["classic", "quorum"]

# (label, properties, headers, whether a call can still be answered)
Bad = tuple[str, dict[str, Any], dict[str | bytes, Any], bool]
UNDECODABLE: list[Bad] = [
    ("message_id", {"message_id": NOT_UTF8 + b"-id"}, {}, True),
    ("correlation_id", {"correlation_id": NOT_UTF8 + b"-cid"}, {}, False),
    ("reply_to", {"reply_to": b"amq.rabbitmq.reply-to." + NOT_UTF8}, {}, False),
    ("type", {"type": b"calc.probe" + NOT_UTF8}, {}, True),
    ("content_type", {"content_type": b"application/json" + NOT_UTF8}, {}, True),
    ("content_encoding", {"content_encoding": NOT_UTF8}, {}, True),
    ("app_id", {"app_id": NOT_UTF8}, {}, True),
    ("header_name", {}, {NOT_UTF8 + b"-name": S("v")}, True),
    ("table_33_deep", {}, {"x-nest": nested_table(33)}, True),
    ("table_2000_deep", {}, {"x-nest": nested_table(2000)}, True),
    ("array_33_deep", {}, {"x-nest": nested_array(33)}, True),
    ("array_2000_deep", {}, {"x-nest": nested_array(2000)}, True),
    ("header_timestamp_out_of_range", {}, {"x-when": T(2**62)}, True),
]
# The `timestamp` property beyond year 9999: stock pamqp raises decoding it (the shim keeps
# a marker instead). Burrow does not use the property; the SPEC says "properties pamqp cannot
# decode at all" are refused `undecodable` — tested on its own so the two can be told apart.
TIMESTAMP_PROPERTY: Bad = ("timestamp_property_out_of_range", {"timestamp": 2**63}, {}, True)


def _answered_undecodable(env: Hostile, one: Sent) -> str | None:
    details = env.reply_error(one).get("details", {})
    reason = details.get("reason") if isinstance(details, dict) else None
    return (
        None if reason == "undecodable" else f"error details {details!r}: want reason undecodable"
    )


def _parked_undecodable(env: Hostile, one: Sent) -> str | None:
    letters = env.parked.get(one.token, [])
    reasons = [letter.message.headers.get("x-burrow-dead-reason") for letter in letters]
    return None if reasons == ["undecodable"] else f"x-burrow-dead-reason {reasons!r}"


def undecodable_cases(path: str, which: Sequence[Bad] = tuple(UNDECODABLE)) -> list[Case]:
    """Each undecodable case as a call or a cast."""
    cases: list[Case] = []
    for label, props, headers, answerable in which:
        if path == "call" and answerable:
            expect = [frozenset({"reply:INVALID_ARGUMENT"})]
            check = _answered_undecodable
        else:
            expect = [frozenset({"parked:undecodable"})]
            check = _parked_undecodable
        cases.append(Case(path, label, headers, expect, check=check, props=props))
    return cases


async def _expiration_refused_by_broker(env: Hostile, path: str) -> None:
    """A non-numeric expiration never reaches the service: the broker closes the channel."""
    for expiration in (NOT_UTF8, b"soon"):
        one = await env.send(path, expiration=expiration)
        closed = one.published.closed
        assert closed is not None, f"expiration {expiration!r} was accepted by the broker"
        assert closed.code == 406, closed
        assert not env.tracker.of(one.token), "delivered despite the broker's refusal"


@pytest.mark.parametrize("path", ["call", "cast"])
@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_h2_undecodable_request_refused_without_reconnect(
    hostile: MakeHostile, queue_type: str, path: str
) -> None:
    """H2: every undecodable property or header on a call or cast is refused `undecodable`
    (answered INVALID_ARGUMENT when the call's reply address is readable), never a reconnect."""
    env = await hostile(queue_type=queue_type)
    await run_cases(env, undecodable_cases(path))
    await _expiration_refused_by_broker(env, path)
    await env.assert_sound()


@pytest.mark.parametrize("path", ["call", "cast"])
@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_h2_timestamp_property_pamqp_cannot_decode_is_refused(
    hostile: MakeHostile, queue_type: str, path: str
) -> None:
    """H2: a `timestamp` property pamqp cannot decode (year > 9999) is refused `undecodable`
    like any property pamqp cannot decode, never a reconnect."""
    env = await hostile(queue_type=queue_type)
    await run_cases(env, undecodable_cases(path, [TIMESTAMP_PROPERTY]))


def delayed_cases(env: Hostile) -> Sequence[Case]:
    """Each undecodable case on a delayed cast, and a foreign target."""
    cases = [
        Case(
            "forward",
            label,
            headers,
            [frozenset({"sched:undecodable"})],
            props=props,
        )
        for label, props, headers, _answerable in UNDECODABLE
    ]
    cases.append(
        Case(
            "forward",
            "foreign_target",
            {},
            [frozenset({"sched:invalid_target"})],
            target=(S("amq.topic"), S("calc.probe")),
        )
    )
    return cases


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_h2_undecodable_delayed_message_parked_by_the_scheduler(
    hostile: MakeHostile, queue_type: str
) -> None:
    """H2: a delayed message with an undecodable part is parked in the scheduler DLQ
    `undecodable` (a foreign target: `invalid_target`), never a reconnect."""
    env = await hostile(queue_type=queue_type)
    await run_cases(env, delayed_cases(env))
