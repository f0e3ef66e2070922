"""Stage 1 of the dispatcher: `read_request` turns a delivery into a `Request`, purely."""

from __future__ import annotations

from typing import Any

from service import Model, Service
from service._protocol.config import load_settings
from service._protocol.types import Delivery, Undecodable
from service._protocol.vocabulary import H_CALLBACK, H_DEADLINE, H_JOB_ID, H_KIND, Names
from service._serving.dispatcher import read_request

__all__: list[str] = []

SETTINGS = load_settings(namespace="ns", handler_timeout=7.0, max_retries=2)
NAMES = Names("ns")
REPLY = "amq.rabbitmq.reply-to.g1h2"


class Number(Model):
    """A number."""

    x: int


calc = Service("calc")


@calc.operation(timeout=3.0, retries=5)
async def double(req: Number) -> Number:
    """Double x."""
    return Number(x=req.x * 2)


@calc.subscribe("numbers.#", group="calc")
async def on_number(event: Number) -> None:
    """See a number."""


def _delivery(headers: dict[str, Any] | None = None, **props: Any) -> Delivery:
    values: dict[str, Any] = {"routing_key": "calc.double", "type": "calc.double"}
    values.update(props)
    return Delivery(body=b'{"x": 1}', headers=headers, **values)


def test_call_with_a_direct_reply_address() -> None:
    """A delivery with reply_to is a call: reply address kept, the operation's own timeout."""
    request = read_request(_delivery(reply_to=REPLY, correlation_id="c"), calc, SETTINGS, NAMES)
    assert (request.kind, request.reply_to, request.route) == ("call", REPLY, "calc.double")
    assert request.handler_timeout == 3.0
    assert request.attempt == 0
    assert request.refusal is None


def test_spoofed_reply_address_is_dropped() -> None:
    """A reply_to that is not a direct reply-to address is not answered to."""
    request = read_request(_delivery(reply_to="victim.queue"), calc, SETTINGS, NAMES)
    assert request.kind == "call"
    assert request.reply_to is None


def test_submit_reads_job_id_and_callback_from_bytes() -> None:
    """A submit's kind, job id and callback route may arrive as UTF-8 byte arrays."""
    headers = {H_KIND: bytearray(b"submit"), H_JOB_ID: b"job-7", H_CALLBACK: "my.inbox"}
    request = read_request(_delivery(headers), calc, SETTINGS, NAMES)
    assert (request.kind, request.job_id, request.callback) == ("submit", "job-7", "my.inbox")
    assert request.max_retries == 5


def test_cast_without_kind_or_reply_to() -> None:
    """No kind header and no reply_to: a cast, with no caller."""
    request = read_request(_delivery(), calc, SETTINGS, NAMES)
    assert request.kind == "cast"
    assert not request.has_caller


def test_unknown_route_has_no_operation_and_the_default_timeout() -> None:
    """A route the service does not have keeps the route and the settings' handler timeout."""
    request = read_request(_delivery(type="calc.nope"), calc, SETTINGS, NAMES)
    assert request.operation is None
    assert request.handler_timeout == 7.0


def test_event_request_from_the_subscription() -> None:
    """An event takes its route, timeout and retries from the subscription, never a caller."""
    sub = next(iter(calc.subscriptions.values()))
    request = read_request(
        _delivery(reply_to=REPLY, routing_key="numbers.one"), calc, SETTINGS, NAMES, sub
    )
    assert (request.kind, request.route, request.reply_to) == ("event", sub.route, None)
    assert request.max_retries == 2


def test_undecodable_correlation_id_leaves_nobody_to_answer() -> None:
    """An undecodable correlation id refuses the call and drops the reply address."""
    bad = Undecodable.of(b"\xff", "short string is not UTF-8")
    request = read_request(_delivery(reply_to=REPLY, correlation_id=bad), calc, SETTINGS, NAMES)
    assert request.refusal is not None
    assert request.refusal.reason == "undecodable"
    assert request.reply_to is None


def test_deadline_and_trace_are_read() -> None:
    """x-deadline becomes seconds; a valid traceparent is kept, a malformed one dropped."""
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    request = read_request(
        _delivery({H_DEADLINE: 1_900_000_000_000, "traceparent": parent}), calc, SETTINGS, NAMES
    )
    assert request.deadline == 1_900_000_000.0
    assert request.trace == parent
    assert read_request(_delivery({"traceparent": "junk"}), calc, SETTINGS, NAMES).trace is None
