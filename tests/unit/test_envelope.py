"""The envelope reader and `forward`: every header type read as the protocol says, every copy
encodable."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest
from pamqp import commands, frame, header

from service._protocol import envelope, messages
from service._protocol.types import Delivery, Undecodable
from service._protocol.vocabulary import H_DEADLINE, H_KIND, H_VERSION

__all__: list[str] = []

_MS = 1_900_000_000_000  # a deadline in 2030, in ms


def _delivery(headers: dict[str, Any] | None = None, **props: Any) -> Delivery:
    return Delivery(body=b"{}", routing_key="calc.add", headers=headers, **props)


def _props(name: str, value: Any) -> dict[str, Any]:
    return {name: value}


def _bad() -> Undecodable:
    return Undecodable.of(b"\xff\xfe", "short string is not UTF-8")


# Every AMQP 0-9-1 field type, as pamqp decodes it.
FIELD_VALUES: dict[str, Any] = {
    "long string": "text",
    "non-UTF-8 long string": b"\xff\xfe",
    "byte array": bytearray(b"\x00\x01"),
    "table": {"a": 1},
    "array": [1, "x"],
    "bool": True,
    "int": 7,
    "float": 1.5,
    "decimal": decimal.Decimal("1.25"),
    "timestamp": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
    "void": None,
    "undecodable": _bad(),
}


@pytest.mark.parametrize("name", sorted(FIELD_VALUES))
@pytest.mark.parametrize("header", [H_KIND, H_DEADLINE, H_VERSION, "x-job-id", "traceparent"])
def test_every_header_type_is_read_without_exception(header: str, name: str) -> None:
    """Each header Burrow reads, with each AMQP field type, gives Fields (never raises)."""
    fields = envelope.read(_delivery({header: FIELD_VALUES[name]}))
    assert isinstance(fields, envelope.Fields)


@pytest.mark.parametrize("value", ["submit", b"submit", bytearray(b"submit")])
def test_kind_accepts_text_and_utf8_bytes(value: object) -> None:
    """x-burrow-kind as a string or as UTF-8 bytes (pika, Java, amqplib) is read as text."""
    assert envelope.read(_delivery({H_KIND: value})).kind == "submit"


@pytest.mark.parametrize("value", [{"a": 1}, ["call"], 1, b"\xff", "nonsense", True])
def test_kind_of_another_type_or_value_is_absent(value: object) -> None:
    """A kind that is not text naming call, cast or submit is treated as absent."""
    fields = envelope.read(_delivery({H_KIND: value}))
    assert fields.kind is None
    assert fields.refusal is None


@pytest.mark.parametrize(
    "value",
    [_MS, float(_MS), decimal.Decimal(_MS), datetime.datetime.fromtimestamp(_MS / 1000)],
)
def test_deadline_numbers_and_timestamps_are_honoured(value: object) -> None:
    """x-deadline as an integer, a double (Java), a decimal or a timestamp is a deadline."""
    fields = envelope.read(_delivery({H_DEADLINE: value}))
    assert fields.refusal is None
    assert fields.deadline == pytest.approx(_MS / 1000, abs=0.001)


@pytest.mark.parametrize(
    "value", ["1900000000000", b"1", True, {"a": 1}, [1], float("nan"), 0, -5, 2**60, 1e400]
)
def test_unusable_deadline_is_refused_not_ignored(value: object) -> None:
    """A present x-deadline that is not a plausible number is refused as invalid."""
    refusal = envelope.read(_delivery({H_DEADLINE: value})).refusal
    assert refusal is not None
    assert refusal.reason == "invalid"
    assert refusal.error.code.value == "INVALID_ARGUMENT"


@pytest.mark.parametrize(("value", "text"), [("2", "2"), (2, "2"), (b"2", "2")])
def test_version_from_string_int_or_bytes(value: object, text: str) -> None:
    """x-contract-version as a string, an integer or UTF-8 bytes is compared as text."""
    assert envelope.read(_delivery({H_VERSION: value})).version == text


@pytest.mark.parametrize("value", [{"a": 1}, [2], True, 2.0, b"\xff"])
def test_version_of_another_type_is_refused(value: object) -> None:
    """A contract version of another type is refused, not stringified."""
    refusal = envelope.read(_delivery({H_VERSION: value})).refusal
    assert refusal is not None
    assert refusal.reason == "invalid"


@pytest.mark.parametrize("prop", ["message_id", "type", "content_type", "app_id"])
def test_undecodable_property_is_refused_and_answerable(prop: str) -> None:
    """An undecodable property other than the reply address is refused; a reply can go."""
    refusal = envelope.read(_delivery(None, **_props(prop, _bad()))).refusal
    assert refusal is not None
    assert refusal.reason == "undecodable"
    assert refusal.answerable
    assert refusal.error.details["fields"] == [prop]


@pytest.mark.parametrize("prop", ["correlation_id", "reply_to"])
def test_undecodable_reply_address_is_not_answerable(prop: str) -> None:
    """An undecodable correlation_id or reply_to leaves nobody to answer."""
    refusal = envelope.read(_delivery(None, **_props(prop, _bad()))).refusal
    assert refusal is not None
    assert refusal.reason == "undecodable"
    assert not refusal.answerable


def test_undecodable_header_name_and_nested_value_are_found() -> None:
    """Undecodable header names and values nested in tables and arrays are found by name."""
    delivery = _delivery({_bad(): 1, "deep": {"a": [1, _bad()]}})
    assert envelope.undecodable_fields(delivery) == ["a header name", "header 'deep'"]


def test_error_names_fields_never_values() -> None:
    """The refusal's message names what was undecodable, never its bytes."""
    refusal = envelope.read(_delivery(correlation_id=_bad())).refusal
    assert refusal is not None
    assert "\\xff" not in refusal.error.message
    assert "correlation_id" in refusal.error.message


def _roundtrip(props: commands.Basic.Properties) -> commands.Basic.Properties:
    """Encode with pamqp and decode again: what the broker would carry."""
    _, _, decoded = frame.unmarshal(frame.marshal(header.ContentHeader(0, 2, props), 1))
    assert isinstance(decoded, header.ContentHeader)
    return decoded.properties


def test_forward_makes_every_header_encodable_and_keeps_bytes() -> None:
    """A copy of a delivery with bytes, byte arrays and undecodable values encodes, bytes kept."""
    headers = {name.replace(" ", "-"): value for name, value in FIELD_VALUES.items()}
    headers[_bad()] = "key"
    delivery = _delivery(
        headers,
        message_id=_bad(),
        correlation_id="c-1",
        content_encoding="utf-8",
        content_type="application/json",
        app_id="peer",
        priority=3,
    )
    copy = messages.forward(delivery, exchange="x", routing_key="k", add={"x-added": 1})
    decoded = _roundtrip(
        commands.Basic.Properties(
            headers=copy.headers,
            message_id=copy.message_id,
            content_encoding=copy.content_encoding,
            app_id=copy.app_id,
        )
    )
    assert decoded.headers is not None
    assert decoded.headers["non-UTF-8-long-string"] == bytearray(b"\xff\xfe")
    assert decoded.headers["undecodable"] == bytearray(b"\xff\xfe")
    assert decoded.headers["\\xff\\xfe"] == "key"
    assert decoded.headers["x-added"] == 1
    assert decoded.message_id == "\\xff\\xfe"
    assert type(copy.message_id) is str
    assert decoded.content_encoding == "utf-8"
    assert decoded.app_id == "peer"
    assert copy.priority == 3
    assert copy.persistent
    assert copy.expiration_ms is None


def test_forward_drops_and_gives_an_id() -> None:
    """`drop` removes headers; a delivery without a message id gets a new one."""
    copy = messages.forward(_delivery({"a": 1, "b": 2}), exchange="", routing_key="q", drop={"a"})
    assert copy.headers == {"b": 2}
    assert copy.message_id


def test_forward_keeps_a_double_deadline_exact() -> None:
    """A double x-deadline is copied as integer ms (pamqp would send single precision)."""
    copy = messages.forward(_delivery({H_DEADLINE: float(_MS) + 0.4}), exchange="", routing_key="q")
    assert copy.headers[H_DEADLINE] == _MS


def test_forward_keeps_only_broker_shaped_x_death() -> None:
    """x-death entries that are not broker-shaped tables are dropped from copies (they crash
    RabbitMQ 3.10's at-least-once dead-lettering); broker-shaped ones are kept."""
    good = {"queue": "ns.retry.0.wait", "reason": "expired", "count": 2, "routing-keys": ["q"]}
    forged = [[["deep"]], {"queue": {"a": 1}}, "text", {"count": True}, {"x": 1}, good]
    copy = messages.forward(_delivery({"x-death": forged}), exchange="", routing_key="q")
    assert copy.headers["x-death"] == [good]


def test_forward_leaves_an_absurd_double_deadline_alone() -> None:
    """A double x-deadline out of range is not turned into an integer pamqp cannot send."""
    copy = messages.forward(_delivery({H_DEADLINE: 1e300}), exchange="", routing_key="q")
    assert copy.headers[H_DEADLINE] == 1e300
