"""The wire format: JSON bodies, header names, limits; bytes in, validated models out.

Sits between the transport (bytes, properties) and handlers (pydantic models). Nothing is
ever unpickled or decompressed: only `application/json` in UTF-8 is accepted.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import orjson
import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import InvalidArgument, MessageTooLarge
from service.types import Delivery

__all__ = [
    "CONTENT_TYPE",
    "H_DEADLINE",
    "H_KIND",
    "H_STATUS",
    "H_VERSION",
    "H_DEAD_REASON",
    "H_DEAD_ERROR",
    "H_ORIGINAL_EXCHANGE",
    "H_ORIGINAL_ROUTING_KEY",
    "H_JOB_ID",
    "H_CALLBACK",
    "MAX_ERROR_DETAILS",
    "Model",
    "check_envelope",
    "decode_model",
    "decode_json",
    "encode",
    "body_fingerprint",
]

CONTENT_TYPE = "application/json"
_ACCEPTED_ENCODINGS = frozenset({None, "", "identity", "utf-8", "utf8"})

# Header names of the Burrow protocol (docs/protocol.md).
H_DEADLINE = "x-deadline"  # absolute deadline, integer milliseconds since the Unix epoch
H_KIND = "x-burrow-kind"  # call | cast | submit
H_STATUS = "x-status"  # on replies: ok | error
H_VERSION = "x-contract-version"  # major version of the service contract
H_DEAD_REASON = "x-burrow-dead-reason"
H_DEAD_ERROR = "x-burrow-dead-error"
H_ORIGINAL_EXCHANGE = "x-burrow-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-burrow-original-routing-key"
H_JOB_ID = "x-job-id"
H_CALLBACK = "x-callback-route"  # routing key on the events exchange for the completion

MAX_ERROR_DETAILS = 20

M = TypeVar("M", bound=BaseModel)


class Model(BaseModel):
    """Base for request, reply and event models: unknown fields are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_envelope(delivery: Delivery, max_bytes: int) -> None:
    """Refuse what must not be parsed at all: oversize bodies, foreign content types/encodings."""
    if len(delivery.body) > max_bytes:
        raise MessageTooLarge(
            f"body of {len(delivery.body)} bytes exceeds the limit of {max_bytes}",
            details={"limit": max_bytes, "size": len(delivery.body)},
        )
    content_type = delivery.content_type
    if content_type != CONTENT_TYPE:  # the common case skips the normalisation below
        content_type = (content_type or "").split(";", 1)[0].strip().lower()
    if content_type != CONTENT_TYPE:
        raise InvalidArgument(
            f"unsupported content type {_clip(delivery.content_type)!r}; send {CONTENT_TYPE}",
            details={"content_type": _clip(delivery.content_type)},
        )
    encoding = delivery.content_encoding
    if encoding and encoding.lower() not in _ACCEPTED_ENCODINGS:
        raise InvalidArgument(
            f"unsupported content encoding {_clip(delivery.content_encoding)!r}",
            details={"content_encoding": _clip(delivery.content_encoding)},
        )


def decode_model(model: type[M], body: bytes) -> M:
    """Parse and validate in one pass (pydantic's JSON path, straight from bytes)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _invalid(exc) from None


def decode_json(body: bytes) -> Any:
    """Parse JSON without a schema (replies read by untyped callers, CLI)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc.msg}") from None


def encode(value: Any) -> bytes:
    """Serialise a model, dict or list to compact JSON bytes."""
    return pydantic_core.to_json(value)


def body_fingerprint(body: bytes) -> dict[str, Any]:
    """What logs may hold of an untrusted body: its size, a hash and a short escaped prefix."""
    return {
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest()[:16],
        "body_prefix": body[:32].decode("utf-8", "backslashreplace"),
    }


def _invalid(exc: ValidationError) -> InvalidArgument:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if errors and errors[0]["type"] == "json_invalid":
        return InvalidArgument(f"malformed JSON: {errors[0]['msg']}", details={"reason": "json"})
    fields = [
        {"loc": ".".join(str(part) for part in err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in errors[:MAX_ERROR_DETAILS]
    ]
    return InvalidArgument(
        f"request does not match the schema ({len(errors)} error(s))",
        details={"reason": "schema", "errors": fields},
    )


def _clip(value: str | None, limit: int = 64) -> str | None:
    return value if value is None or len(value) <= limit else value[:limit] + "…"
