"""Every way Burrow can fail, as one tree, and the closed set of wire error codes.

A handler raises a `ServiceError` subclass to answer with that code; a caller receives the same
class back. Local failures (configuration, topology) never cross the wire.

    BurrowError
    ├── ConfigError                  settings invalid at start (never on the wire)
    ├── ClientUnusable               blocking client closed, or inherited across fork()
    ├── TopologyError                broker holds a queue/exchange with other arguments
    └── ServiceError                 carries a wire code, message, details, retryable
        ├── InvalidArgument          INVALID_ARGUMENT     bad JSON, schema, content type
        │   └── MessageTooLarge                           body above the size limit
        ├── FailedPrecondition       FAILED_PRECONDITION  contract version not accepted
        ├── NotFound                 NOT_FOUND            unknown operation
        │   └── Unroutable                                no queue for the route (not deployed)
        ├── PermissionDenied         PERMISSION_DENIED    spoofed reply_to, access refused
        ├── DeadlineExceeded         DEADLINE_EXCEEDED    the call's deadline passed
        ├── ResourceExhausted        RESOURCE_EXHAUSTED   overloaded, answer too large
        │   └── QueueFull                                 the broker refused: queue at max-length
        ├── Unavailable              UNAVAILABLE          retryable: broker or service away
        │   ├── ConnectionLost                            connection dropped mid-call
        │   └── PublishFailed                             nacked, or no confirm in time
        └── Internal                 INTERNAL             handler bug; no trace leaves
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorCode(StrEnum):
    """The closed set of codes an error reply may carry (after gRPC's status codes)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class BurrowError(Exception):
    """Base of every error Burrow raises."""


class ConfigError(BurrowError):
    """A setting is missing or invalid; the message names the environment variable."""


class ClientUnusable(BurrowError, RuntimeError):
    """The client was closed, or was inherited across `fork()`: create one per process."""


class TopologyError(BurrowError):
    """The broker already holds an entity with arguments that differ from ours."""


class ServiceError(BurrowError):
    """An error with a wire code: raised by handlers, received by callers.

    Args:
        message: human-readable, safe to show to the caller (no internals).
        details: JSON-serialisable specifics, e.g. the failing fields.
        retryable: whether the same request may succeed later; defaults per class.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        details: dict[str, Any] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message or self.code.value)
        self.message = message or self.code.value
        self.details: dict[str, Any] = details or {}
        self.retryable = self.default_retryable if retryable is None else retryable

    def to_wire(self) -> dict[str, Any]:
        """The error body sent in an error reply."""
        return {
            "code": self.code.value,
            "message": self.message,
            "details": self.details,
            "retryable": self.retryable,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable})"


class InvalidArgument(ServiceError):
    """The request is malformed or does not match the operation's schema."""

    code = ErrorCode.INVALID_ARGUMENT


class MessageTooLarge(InvalidArgument):
    """A body is above the configured size limit; refused before parsing or publishing."""


class FailedPrecondition(ServiceError):
    """The request cannot be served in the current state (e.g. contract version)."""

    code = ErrorCode.FAILED_PRECONDITION


class NotFound(ServiceError):
    """The operation does not exist on the service."""

    code = ErrorCode.NOT_FOUND


class Unroutable(NotFound):
    """The broker returned the request: no queue is bound for its route."""


class PermissionDenied(ServiceError):
    """The sender may not do this (spoofed reply_to, broker access refused)."""

    code = ErrorCode.PERMISSION_DENIED


class DeadlineExceeded(ServiceError):
    """The deadline passed before a reply arrived or the handler finished."""

    code = ErrorCode.DEADLINE_EXCEEDED
    default_retryable = True


class ResourceExhausted(ServiceError):
    """The service is overloaded or its request queue is full; back off or submit instead."""

    code = ErrorCode.RESOURCE_EXHAUSTED
    default_retryable = True


class QueueFull(ResourceExhausted):
    """The broker nacked the publish: the target queue is at its length limit."""


class Unavailable(ServiceError):
    """The broker or service cannot be reached now; retrying later can help."""

    code = ErrorCode.UNAVAILABLE
    default_retryable = True


class ConnectionLost(Unavailable):
    """The connection dropped while the call was pending; the request may or may not have run."""


class PublishFailed(Unavailable):
    """The broker nacked the publish or did not confirm it in time."""


class Internal(ServiceError):
    """The handler failed unexpectedly; its traceback stays in the service's log."""

    code = ErrorCode.INTERNAL

    @classmethod
    def unexpected(cls, exc: BaseException, *, trace_id: str | None = None) -> Internal:
        """What an exception a handler did not mean to raise becomes: "the handler failed",
        with the exception's type name and the trace id of the log line that holds its
        traceback as `details` (never its message, arguments or traceback: they may hold
        secrets)."""
        details: dict[str, Any] = {"exception": type(exc).__name__[:128]}
        if trace_id is not None:
            details["trace_id"] = trace_id
        return cls("the handler failed", details=details)


_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code.value: cls
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        NotFound,
        PermissionDenied,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
        Internal,
    )
}


def error_from_wire(body: Any) -> ServiceError:
    """Rebuild the typed error from an error reply body; unknown shapes become `Internal`."""
    if not isinstance(body, dict):
        return Internal("malformed error reply")
    cls = _BY_CODE.get(str(body.get("code")), Internal)
    details = body.get("details")
    retryable = body.get("retryable")
    return cls(
        str(body.get("message") or cls.code.value),
        details=details if isinstance(details, dict) else None,
        retryable=retryable if isinstance(retryable, bool) else None,
    )
