"""Unit tests of the error tree: wire codes, the to_wire/error_from_wire round trip, defaults.

A caller must get back the same class, message, details and retryable flag the handler raised.
"""

from __future__ import annotations

from typing import Any

import pytest

from service._protocol.errors import (
    BurrowError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    PublishFailed,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unroutable,
    error_from_wire,
)

__all__: list[str] = []

BY_CODE: dict[ErrorCode, type[ServiceError]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidArgument,
    ErrorCode.FAILED_PRECONDITION: FailedPrecondition,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.INTERNAL: Internal,
}


def test_every_code_has_a_class() -> None:
    """The table above covers the closed set of wire codes exactly."""
    assert set(BY_CODE) == set(ErrorCode)
    for code, cls in BY_CODE.items():
        assert cls.code is code


@pytest.mark.parametrize("code", list(ErrorCode))
def test_round_trip_keeps_class_message_details_retryable(code: ErrorCode) -> None:
    """error_from_wire(to_wire()) rebuilds the same class, message, details and flag."""
    cls = BY_CODE[code]
    original = cls("it went wrong", details={"field": "b", "n": [1, 2]}, retryable=True)
    wire = original.to_wire()
    assert wire == {
        "code": code.value,
        "message": "it went wrong",
        "details": {"field": "b", "n": [1, 2]},
        "retryable": True,
    }
    rebuilt = error_from_wire(wire)
    assert type(rebuilt) is cls
    assert rebuilt.code is code
    assert rebuilt.message == "it went wrong"
    assert rebuilt.details == {"field": "b", "n": [1, 2]}
    assert rebuilt.retryable is True


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (MessageTooLarge, ErrorCode.INVALID_ARGUMENT),
        (Unroutable, ErrorCode.NOT_FOUND),
        (ConnectionLost, ErrorCode.UNAVAILABLE),
        (PublishFailed, ErrorCode.UNAVAILABLE),
    ],
)
def test_subclasses_travel_as_their_parent_code(cls: type[ServiceError], code: ErrorCode) -> None:
    """Local refinements (Unroutable, ConnectionLost…) carry their parent's wire code."""
    rebuilt = error_from_wire(cls("x").to_wire())
    assert rebuilt.code is code
    assert isinstance(rebuilt, BY_CODE[code])


@pytest.mark.parametrize(
    "body",
    [
        {"code": "TEAPOT", "message": "short and stout"},
        {"message": "no code"},
        {"code": None},
        {"code": 42, "message": "numeric"},
    ],
)
def test_unknown_code_becomes_internal(body: dict[str, Any]) -> None:
    """A code outside the closed set is read as Internal, not trusted or dropped."""
    assert type(error_from_wire(body)) is Internal


@pytest.mark.parametrize("body", [None, "INTERNAL", 3, ["INVALID_ARGUMENT"]])
def test_non_object_error_body_becomes_internal(body: object) -> None:
    """An error reply that is not a JSON object becomes Internal('malformed error reply')."""
    error = error_from_wire(body)
    assert type(error) is Internal
    assert "malformed" in error.message


def test_bad_details_and_retryable_fall_back_to_defaults() -> None:
    """Non-dict details and non-bool retryable from the wire are replaced by the defaults."""
    error = error_from_wire(
        {"code": "UNAVAILABLE", "message": "m", "details": [1], "retryable": "yes"}
    )
    assert type(error) is Unavailable
    assert error.details == {}
    assert error.retryable is True


def test_missing_message_defaults_to_code() -> None:
    """An error with no message reads as its code."""
    assert error_from_wire({"code": "NOT_FOUND"}).message == "NOT_FOUND"
    assert NotFound().message == "NOT_FOUND"
    assert str(NotFound()) == "NOT_FOUND"


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (InvalidArgument, False),
        (MessageTooLarge, False),
        (FailedPrecondition, False),
        (NotFound, False),
        (Unroutable, False),
        (PermissionDenied, False),
        (DeadlineExceeded, True),
        (ResourceExhausted, True),
        (Unavailable, True),
        (ConnectionLost, True),
        (PublishFailed, True),
        (Internal, False),
    ],
)
def test_retryable_defaults(cls: type[ServiceError], retryable: bool) -> None:
    """Only deadline, exhaustion and unavailability are retryable by default."""
    assert cls("m").retryable is retryable
    assert cls("m", retryable=not retryable).retryable is (not retryable)


def test_tree_shape() -> None:
    """Every wire error is a ServiceError and a BurrowError."""
    for cls in BY_CODE.values():
        assert issubclass(cls, ServiceError)
        assert issubclass(cls, BurrowError)


def test_repr_shows_class_message_and_flag() -> None:
    """repr names the class, the message and the retryable flag."""
    assert repr(Unavailable("down")) == "Unavailable('down', retryable=True)"
