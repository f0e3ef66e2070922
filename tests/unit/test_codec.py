"""Unit tests of the wire codec: envelope checks, decoding into models, encoding.

No broker: deliveries are built by hand, as the transport would fill them.
"""

from __future__ import annotations

import pytest

from service.codec import (
    CONTENT_TYPE,
    MAX_ERROR_DETAILS,
    Model,
    body_fingerprint,
    check_envelope,
    decode_json,
    decode_model,
    encode,
)
from service.errors import InvalidArgument, MessageTooLarge
from service.types import Delivery

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


def test_body_fingerprint_holds_no_full_body() -> None:
    """The log fingerprint has size, a short hash and a 32-byte prefix only."""
    body = b"A" * 40 + b"SECRET-TAIL"
    fingerprint = body_fingerprint(body)
    assert fingerprint["body_size"] == len(body)
    assert len(fingerprint["body_sha256"]) == 16
    assert "SECRET" not in str(fingerprint)


def test_model_forbids_extra_and_is_frozen() -> None:
    """service.Model refuses unknown fields and cannot be mutated."""
    with pytest.raises(ValueError, match="extra"):
        Point(x=1, y=2, z=3)  # type: ignore[call-arg]
    point = Point(x=1, y=2)
    with pytest.raises(ValueError, match="frozen"):
        point.x = 5  # type: ignore[misc]
