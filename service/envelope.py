"""Reading what arrives and copying it on: the tolerant envelope reader and `forward`.

Every consumer path reads its headers through `read`, so a header of any AMQP type is either
coerced as docs/protocol.md §3 says, treated as absent, or a refusal with a reason — never an
exception. Every copy of a received message (park, retry, forward, replay) is made by `forward`,
which turns what the encoder would refuse (bytes, undecodable text) into values it accepts.
"""

from __future__ import annotations

import datetime
import decimal
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from service import tracing
from service.codec import H_CALLBACK, H_DEADLINE, H_JOB_ID, H_KIND, H_VERSION
from service.errors import InvalidArgument, ServiceError
from service.shim import Undecodable
from service.types import Delivery, Headers, Outgoing, new_id

__all__ = ["Refusal", "Fields", "text", "read", "undecodable_fields", "forward"]

_MAX_DEADLINE_MS = 2**53
_PROPERTIES = (
    "message_id",
    "correlation_id",
    "reply_to",
    "type",
    "content_type",
    "content_encoding",
    "expiration",
    "app_id",
    "timestamp",
    "routing_key",
    "exchange",
)
_MAX_NAMES = 8  # an error names at most this many undecodable fields


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message is refused before any handler sees it: a dead-letter reason and the
    error answered to the sender (when there is one)."""

    reason: str
    error: ServiceError
    answerable: bool = True  # False: the reply address itself cannot be trusted


@dataclass(frozen=True, slots=True)
class Fields:
    """The protocol headers of one delivery, coerced (docs/protocol.md §3)."""

    kind: str | None  # call | cast | submit as sent, or None (absent or not one of them)
    deadline: float | None  # absolute, seconds since the epoch
    version: str | None
    job_id: str | None  # as sent (text); validity is the jobs module's to judge
    callback: str | None
    traceparent: str | None
    refusal: Refusal | None


def text(value: object) -> str | None:
    """A header value as text: a string, or bytes (pika's, Java's and amqplib's byte arrays)
    that are UTF-8; None for every other type and for undecodable text."""
    if isinstance(value, Undecodable):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


_KINDS = frozenset({"call", "cast", "submit"})


def read(delivery: Delivery) -> Fields:
    """Coerce the headers Burrow reads; a refusal when one cannot be used or decoded."""
    headers = delivery.headers
    refusal = _undecodable_refusal(delivery)
    deadline, problem = _deadline(headers.get(H_DEADLINE))
    if refusal is None and problem is not None:
        refusal = Refusal("invalid", InvalidArgument(problem, details={"header": H_DEADLINE}))
    version, problem = _version(headers.get(H_VERSION))
    if refusal is None and problem is not None:
        refusal = Refusal("invalid", InvalidArgument(problem, details={"header": H_VERSION}))
    kind = text(headers.get(H_KIND))
    return Fields(
        kind=kind if kind in _KINDS else None,
        deadline=deadline,
        version=version,
        job_id=text(headers.get(H_JOB_ID)),
        callback=text(headers.get(H_CALLBACK)),
        traceparent=text(headers.get(tracing.HEADER)),
        refusal=refusal,
    )


def undecodable_fields(delivery: Delivery) -> list[str]:
    """Names of the properties and headers that arrived undecodable (never their values)."""
    found = [name for name in _PROPERTIES if isinstance(getattr(delivery, name), Undecodable)]
    for key, value in delivery.headers.items():
        if isinstance(key, Undecodable):
            found.append("a header name")
        elif _holds_undecodable(value):
            found.append(f"header {key[:64]!r}")
    return found


def _holds_undecodable(value: object) -> bool:
    if isinstance(value, Undecodable):
        return True
    if isinstance(value, dict):
        return any(isinstance(k, Undecodable) or _holds_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_undecodable(item) for item in value)
    return False


def _undecodable_refusal(delivery: Delivery) -> Refusal | None:
    names = undecodable_fields(delivery)
    if not names:
        return None
    shown = ", ".join(names[:_MAX_NAMES]) + (", …" if len(names) > _MAX_NAMES else "")
    error = InvalidArgument(
        f"the message could not be decoded ({shown}): short strings and header names must be "
        "UTF-8, tables nested at most 32 deep",
        details={"reason": "undecodable", "fields": names[:_MAX_NAMES]},
    )
    trusted = not any(name in ("reply_to", "correlation_id") for name in names)
    return Refusal("undecodable", error, answerable=trusted)


def _deadline(value: object) -> tuple[float | None, str | None]:
    """x-deadline: integer ms of any width; a float, double or decimal is rounded; a
    timestamp is taken as is. Anything else present is an error: dropping it would run the
    request with no deadline at all."""
    if value is None:
        return None, None
    ms: float | None = None
    if isinstance(value, datetime.datetime):
        return value.timestamp(), None
    if isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
        try:
            ms = float(value)
        except (OverflowError, ValueError):
            ms = None
    if ms is None or not math.isfinite(ms) or not 0 < ms < _MAX_DEADLINE_MS:
        return None, (
            "x-deadline must be a number of milliseconds since the epoch, 0 < v < 2^53 "
            f"(got {_type_name(value)})"
        )
    return round(ms) / 1000.0, None


def _version(value: object) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    found = text(value)
    if found is None:
        return None, f"x-contract-version must be a string or an integer (got {_type_name(value)})"
    return found, None


def _type_name(value: object) -> str:
    if isinstance(value, Undecodable):
        return "undecodable text"
    return {
        bool: "a boolean",
        bytes: "a non-UTF-8 string",
        bytearray: "a byte array",
        dict: "a table",
        list: "an array",
        str: "a string",
        float: "a float",
        int: "an integer",
        decimal.Decimal: "a decimal",
    }.get(type(value), type(value).__name__)


# -- copying ---------------------------------------------------------------------------------


def forward(
    delivery: Delivery,
    *,
    exchange: str,
    routing_key: str,
    add: Mapping[str, Any] | None = None,
    drop: Collection[str] = (),
) -> Outgoing:
    """A persistent copy of `delivery` for `exchange`/`routing_key`, with every property and
    header kept or made encodable; `drop` removes headers, `add` sets them (after `drop`).

    The copy never expires on its own (no `expiration`) and keeps the message id (a new one
    if it had none), so a ledger can follow it.
    """
    headers: Headers = {}
    for key, value in delivery.headers.items():
        name = str(key)
        if name in drop:
            continue
        headers[name] = _encodable(value)
    deadline = headers.get(H_DEADLINE)
    if isinstance(deadline, float | decimal.Decimal) and 0 < deadline < _MAX_DEADLINE_MS:
        headers[H_DEADLINE] = round(deadline)  # the integer ms the protocol prefers
    if "x-death" in headers:
        headers["x-death"] = _deaths(headers["x-death"])
    if add:
        headers.update(add)
    return Outgoing(
        exchange=exchange,
        routing_key=routing_key,
        body=delivery.body,
        message_id=_plain(delivery.message_id) or new_id(),
        type=_plain(delivery.type),
        correlation_id=_plain(delivery.correlation_id),
        reply_to=_plain(delivery.reply_to),
        headers=headers,
        persistent=True,
        content_type=_plain(delivery.content_type),
        content_encoding=_plain(delivery.content_encoding),
        app_id=_plain(delivery.app_id),
        priority=_priority(delivery.priority),
        timestamp=delivery.timestamp if isinstance(delivery.timestamp, datetime.datetime) else None,
    )


def _plain(value: str | None) -> str | None:
    """A property as plain text: undecodable bytes as their printable escape."""
    if value is None:
        return None
    return str.__str__(value) if isinstance(value, Undecodable) else value


def _priority(value: object) -> int | None:
    return value if isinstance(value, int) and 0 <= value <= 255 else None


_DEATH_FIELDS: dict[str, type | tuple[type, ...]] = {
    "queue": str,
    "reason": str,
    "count": int,
    "exchange": str,
    "routing-keys": list,
    "time": datetime.datetime,
    "original-expiration": str,
}


def _deaths(value: Any) -> list[dict[str, Any]]:
    """x-death as the broker writes it, and only that: a copy goes back to the broker, and
    RabbitMQ 3.10's at-least-once dead-lettering crashes (node-wide, after a few restarts) on an
    x-death whose entries are not tables. Entries of another shape are dropped."""
    if not isinstance(value, list):
        return []
    kept: list[dict[str, Any]] = []
    for entry in value[:64]:
        if not isinstance(entry, dict) or not entry:
            continue
        if all(
            isinstance(entry.get(k), t) and not isinstance(entry.get(k), bool)
            for k, t in _DEATH_FIELDS.items()
            if k in entry
        ) and set(entry) <= set(_DEATH_FIELDS):
            keys = entry.get("routing-keys", [])
            if all(isinstance(key, str) for key in keys):
                kept.append(entry)
    return kept


def _encodable(value: Any) -> Any:
    """A header value the encoder accepts, keeping bytes exactly (as a byte array)."""
    if isinstance(value, Undecodable):
        return bytearray(value.raw) if value.raw else f"<undecodable: {value.problem}>"
    if isinstance(value, bytes):
        return bytearray(value)  # a non-UTF-8 long string: pamqp refuses bytes
    if isinstance(value, dict):
        return {str(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value
