"""Unit tests of the wire codec: envelope checks, decoding into models, encoding.

No broker: deliveries are built by hand, as the transport would fill them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from service._protocol.codec import (
    CONTENT_TYPE,
    MAX_ERROR_DETAILS,
    Model,
    body_fingerprint,
    check_envelope,
    decode_json,
    decode_model,
    encode,
)
from service._protocol.errors import InvalidArgument, MessageTooLarge
from service._protocol.types import Delivery

__all__: list[str] = []


class Point(Model):
    """A small request model."""

    x: int
    y: int


class Wide(Model):
    """A model with more fields than the error details may list."""

    f0: int
    f1: int
    f2: int
    f3: int
    f4: int
    f5: int
    f6: int
    f7: int
    f8: int
    f9: int
    f10: int
    f11: int
    f12: int
    f13: int
    f14: int
    f15: int
    f16: int
    f17: int
    f18: int
    f19: int
    f20: int
    f21: int
    f22: int
    f23: int
    f24: int


def _delivery(
    body: bytes = b"{}",
    content_type: str | None = CONTENT_TYPE,
    content_encoding: str | None = None,
) -> Delivery:
    return Delivery(
        body=body,
        routing_key="calc.add",
        content_type=content_type,
        content_encoding=content_encoding,
    )


def test_check_envelope_accepts_json() -> None:
    """A UTF-8 JSON body within the limit passes the envelope check."""
    check_envelope(_delivery(b'{"x": 1}'), max_bytes=1024)
    check_envelope(_delivery(content_type="application/json; charset=utf-8"), max_bytes=1024)
    check_envelope(_delivery(content_type="Application/JSON"), max_bytes=1024)
    check_envelope(_delivery(content_encoding="utf-8"), max_bytes=1024)
    check_envelope(_delivery(content_encoding="identity"), max_bytes=1024)


def test_check_envelope_accepts_body_exactly_at_limit() -> None:
    """A body of exactly max_bytes is accepted; the limit is inclusive."""
    check_envelope(_delivery(b" " * 1024), max_bytes=1024)


def test_check_envelope_refuses_oversize_body() -> None:
    """A body above the limit raises MessageTooLarge (an InvalidArgument) with size and limit."""
    with pytest.raises(MessageTooLarge) as info:
        check_envelope(_delivery(b" " * 1025), max_bytes=1024)
    assert isinstance(info.value, InvalidArgument)
    assert info.value.details == {"limit": 1024, "size": 1025}


def test_check_envelope_refuses_size_before_content_type() -> None:
    """An oversize body with a foreign content type is refused for its size first."""
    with pytest.raises(MessageTooLarge):
        check_envelope(_delivery(b"x" * 2000, content_type="text/plain"), max_bytes=1024)


@pytest.mark.parametrize(
    "content_type",
    ["application/x-python-pickle", "text/plain", "application/octet-stream", "", None],
)
def test_check_envelope_refuses_foreign_content_type(content_type: str | None) -> None:
    """Anything but application/json (pickle, text, missing) is refused as INVALID_ARGUMENT."""
    with pytest.raises(InvalidArgument) as info:
        check_envelope(_delivery(content_type=content_type), max_bytes=1024)
    assert "content type" in info.value.message
    assert "content_type" in info.value.details


def test_check_envelope_absent_content_type_detail_is_empty_string() -> None:
    """An absent content type gives details.content_type "" (a string, as §11 shows), not null."""
    with pytest.raises(InvalidArgument) as info:
        check_envelope(_delivery(content_type=None), max_bytes=1024)
    assert info.value.details == {"content_type": ""}
    assert info.value.message == f"no content type; send {CONTENT_TYPE}"


def test_check_envelope_clips_long_content_type() -> None:
    """A hostile 10 kB content type is clipped in the error, not echoed whole."""
    with pytest.raises(InvalidArgument) as info:
        check_envelope(_delivery(content_type="x" * 10_000), max_bytes=1024)
    assert len(info.value.message) < 200
    assert len(str(info.value.details["content_type"])) < 100


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_check_envelope_refuses_compressed_encoding(encoding: str) -> None:
    """A compressed content_encoding is refused: Burrow never decompresses."""
    with pytest.raises(InvalidArgument) as info:
        check_envelope(_delivery(content_encoding=encoding), max_bytes=1024)
    assert info.value.details == {"content_encoding": encoding}


def test_decode_model_returns_validated_model() -> None:
    """A valid body decodes straight into the model."""
    assert decode_model(Point, b'{"x": 1, "y": 2}') == Point(x=1, y=2)


def test_decode_model_missing_field_lists_it() -> None:
    """A missing field is an InvalidArgument whose details name the field."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Point, b'{"x": 1}')
    details = info.value.details
    assert details["reason"] == "schema"
    assert [(err["loc"], err["type"]) for err in details["errors"]] == [("y", "missing")]


def test_decode_model_wrong_type_and_extra_field_listed() -> None:
    """A wrong type and an unknown field are both reported, each with its location."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Point, b'{"x": "one", "y": 2, "z": 3}')
    locs = {err["loc"]: err["type"] for err in info.value.details["errors"]}
    assert locs == {"x": "int_parsing", "z": "extra_forbidden"}
    assert "2 error(s)" in info.value.message


def test_decode_model_error_details_hold_no_input() -> None:
    """Error details never echo the caller's input values back."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Point, b'{"x": "s3cr3t-value", "y": 2}')
    assert "s3cr3t-value" not in str(info.value.details)
    assert "s3cr3t-value" not in info.value.message


def test_decode_model_caps_error_details() -> None:
    """At most MAX_ERROR_DETAILS failing fields are listed, while the message counts all."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Wide, b"{}")
    assert len(info.value.details["errors"]) == MAX_ERROR_DETAILS
    assert "25 error(s)" in info.value.message


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b'{"x": 1,', b"\x80\x81\xfe\xff\x00garbage", b"null"]
)
def test_decode_model_malformed_body_is_invalid_argument(body: bytes) -> None:
    """Malformed JSON or binary garbage is an InvalidArgument, never another exception."""
    with pytest.raises(InvalidArgument):
        decode_model(Point, body)


def test_decode_model_malformed_json_reason() -> None:
    """Malformed JSON is marked reason=json, so the server can tell it from a schema error."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Point, b"{not json")
    assert info.value.details == {"reason": "json"}
    assert info.value.message.startswith("malformed JSON")


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"x":' * 100_000, b"[" * 100_000],
    ids=["lists", "objects", "unclosed"],
)
def test_decode_model_deeply_nested_is_invalid_not_recursion_error(body: bytes) -> None:
    """100,000 levels of nesting give InvalidArgument, not RecursionError."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Point, body)
    assert info.value.details == {"reason": "json"}


def test_decode_json_deeply_nested_is_invalid_not_recursion_error() -> None:
    """The schema-less decoder also refuses deep nesting with InvalidArgument."""
    with pytest.raises(InvalidArgument):
        decode_json(b"[" * 100_000 + b"]" * 100_000)


def test_decode_json_parses_and_refuses_garbage() -> None:
    """decode_json parses valid JSON and turns garbage into InvalidArgument."""
    assert decode_json(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(InvalidArgument):
        decode_json(b"\xff\xfe")


def test_encode_model_dict_and_list() -> None:
    """encode gives compact JSON bytes for models, dicts and lists, and round-trips."""
    assert encode(Point(x=1, y=2)) == b'{"x":1,"y":2}'
    assert encode({"a": 1}) == b'{"a":1}'
    assert encode([1, "two"]) == b'[1,"two"]'
    assert decode_model(Point, encode(Point(x=3, y=4))) == Point(x=3, y=4)


def test_body_fingerprint_holds_no_body_bytes() -> None:
    """The log fingerprint is the body's size and a short hash only, never any of its bytes."""
    body = b'{"password": "hunter2"}'
    fingerprint = body_fingerprint(body)
    assert fingerprint == {
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest()[:16],
    }
    assert "hunter2" not in str(fingerprint)
    assert "password" not in str(fingerprint)


def test_model_forbids_extra_and_is_frozen() -> None:
    """service.Model refuses unknown fields and cannot be mutated."""
    with pytest.raises(ValueError, match="extra"):
        Point(x=1, y=2, z=3)  # type: ignore[call-arg]
    point = Point(x=1, y=2)
    with pytest.raises(ValueError, match="frozen"):
        point.x = 5  # type: ignore[misc]


class Ratio(Model):
    """A float field, as calc.divide has."""

    a: float


class Loose(Model):
    """A field of any type: the JSON parser's numbers reach it unchecked by pydantic."""

    value: Any = None


class Big(Model):
    """An integer field."""

    n: int


NON_FINITE_BODIES = [
    pytest.param(b'{"a": NaN}', id="nan"),
    pytest.param(b'{"a": Infinity}', id="infinity"),
    pytest.param(b'{"a": -Infinity}', id="minus-infinity"),
    pytest.param(b'{"a": 1e400}', id="1e400"),
    pytest.param(b'{"a": -1E+400}', id="minus-1e400"),
    pytest.param(b'{"a": ' + b"9" * 250 + b".0e99}", id="long-mantissa"),
]


@pytest.mark.parametrize("body", NON_FINITE_BODIES)
def test_h4_non_finite_number_is_malformed_json(body: bytes) -> None:
    """NaN, ±Infinity and numbers beyond the double range are malformed JSON (reason json)."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Ratio, body)
    assert info.value.details == {"reason": "json"}
    assert info.value.message.startswith("malformed JSON")


@pytest.mark.parametrize("body", NON_FINITE_BODIES)
def test_h4_non_finite_number_refused_in_any_field(body: bytes) -> None:
    """A non-finite number is refused even where the field's type would accept it (Any)."""
    with pytest.raises(InvalidArgument) as info:
        decode_model(Loose, body.replace(b'"a"', b'"value"'))
    assert info.value.details == {"reason": "json"}


@pytest.mark.parametrize("body", NON_FINITE_BODIES)
def test_h4_decode_json_refuses_non_finite(body: bytes) -> None:
    """The schema-less decoder refuses the same numbers, on its fast and its exact path."""
    with pytest.raises(InvalidArgument) as fast:
        decode_json(body)
    assert fast.value.details == {"reason": "json"}
    with pytest.raises(InvalidArgument) as exact:  # a 20-digit integer takes the exact path
        decode_json(body[:-1] + b', "n": 12345678901234567890123}')
    assert exact.value.details == {"reason": "json"}


def test_h4_look_alike_numbers_and_text_pass() -> None:
    """Text holding NaN/Infinity/e999 and large but finite numbers are accepted unchanged."""
    body = b'{"value": ["NaN", "Infinity", "1e999", 1.5e300, 1e-400, -0.0]}'
    assert decode_model(Loose, body).value == ["NaN", "Infinity", "1e999", 1.5e300, 0.0, -0.0]
    assert decode_json(body) == {"value": ["NaN", "Infinity", "1e999", 1.5e300, 0.0, -0.0]}
    assert decode_model(Ratio, b'{"a": 1.7976931348623157e308}').a == 1.7976931348623157e308


@pytest.mark.parametrize(
    "number",
    [2**64, 2**70, -(2**63) - 1, -(2**70), 10**100, 10**400, 2**64 - 1, -(2**63)],
    ids=["2^64", "2^70", "-2^63-1", "-2^70", "1e100", "1e400-int", "2^64-1", "-2^63"],
)
def test_h4_big_integers_exact_both_ways(number: int) -> None:
    """Integers beyond 64 bits keep their exact value: encode, decode_json and decode_model."""
    body = encode({"n": number})
    assert body == b'{"n":' + str(number).encode() + b"}"
    assert decode_json(body) == {"n": number}
    assert decode_model(Big, body).n == number
    assert encode(Big(n=number)) == body


def test_h4_decode_json_keeps_64_bit_fast_path() -> None:
    """Integers within 64 bits and 19-digit timestamps decode as ints (orjson path)."""
    body = b'{"ns": 1700000000000000000, "max": 18446744073709551615}'
    assert decode_json(body) == {"ns": 1700000000000000000, "max": 18446744073709551615}


@pytest.mark.parametrize(
    "body",
    [b"[" + b"1" * 5000 + b"]", b"\xff" + b"1" * 25, b"[12345678901234567890123,", b"[" * 100_000],
    ids=["5000-digits", "not-utf8", "truncated", "deep"],
)
def test_h4_decode_json_exact_path_refuses_garbage(body: bytes) -> None:
    """The exact (stdlib) path turns every failure into InvalidArgument reason json."""
    with pytest.raises(InvalidArgument) as info:
        decode_json(body)
    assert info.value.details == {"reason": "json"}


def test_h4_model_refuses_non_finite_floats() -> None:
    """service.Model refuses NaN and ±Infinity when a model is built (a handler's reply)."""
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationError):
            Ratio(a=value)


class Plain(BaseModel):
    """A pydantic model not based on service.Model: it would write NaN as null."""

    a: float


class Holder(Model):
    """A service.Model holding a plain pydantic model."""

    inner: Plain


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"a": math.nan}, id="dict-nan"),
        pytest.param([1.0, math.inf], id="list-inf"),
        pytest.param(Ratio.model_construct(a=-math.inf), id="model-constructed"),
        pytest.param(Plain(a=math.nan), id="plain-model"),
        pytest.param(Holder(inner=Plain(a=math.inf)), id="nested-plain-model"),
    ],
)
def test_h4_encode_refuses_non_finite(value: Any) -> None:
    """encode raises ValueError for NaN/±Infinity anywhere, never writing null or NaN."""
    with pytest.raises(ValueError, match="NaN or Infinity"):
        encode(value)


def test_h4_encode_keeps_nan_text() -> None:
    """Strings that read NaN or Infinity are ordinary text and encode as such."""
    assert encode({"t": "NaN", "u": ["Infinity"]}) == b'{"t":"NaN","u":["Infinity"]}'
    assert encode(Plain(a=1.5)) == b'{"a":1.5}'
