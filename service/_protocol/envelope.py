"""Reading what arrives: the tolerant envelope reader.

Every consumer path reads its headers through `read`, so a header of any AMQP type is either
coerced as docs/protocol.md §3 says, treated as absent, or a refusal with a reason — never an
exception. Copies of received messages are `messages.forward`'s.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from service._protocol.errors import Internal, InvalidArgument, ServiceError
from service._protocol.types import Delivery, Undecodable
from service._protocol.vocabulary import (
    H_CALLBACK,
    H_CALLBACK_DATA,
    H_DEADLINE,
    H_JOB_ID,
    H_KIND,
    H_STATUS,
    H_TRACEPARENT,
    H_VERSION,
    HEADER_KINDS,
    MAX_ATTEMPT,
    MAX_DEADLINE_MS,
    DeadReason,
    Kind,
    Status,
)

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
_INTEGER = re.compile(r"(-?)([0-9]+)")  # an integer as text: no sign but -, no `_`, no spaces


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message is refused before any handler sees it: a dead-letter reason and the
    error answered to the sender (when there is one)."""

    reason: DeadReason
    error: ServiceError
    answerable: bool = True  # False: the reply address itself cannot be trusted


@dataclass(frozen=True, slots=True)
class Fields:
    """The protocol headers of one delivery, coerced (docs/protocol.md §3): what `read` makes
    of them. The request and the handler's `ctx.envelope` carry it whole, so a new header is a
    field here, its line in `read`, and its builder in `messages` (guide §14)."""

    kind: Kind | None = None  # call | cast | submit as sent, or None (absent or not one of them)
    deadline: float | None = None  # absolute, seconds since the epoch
    version: str | None = None
    job_id: str | None = None  # as sent (text); validity is the jobs module's to judge
    callback: str | None = None
    callback_data: str | None = None
    traceparent: str | None = None
    refusal: Refusal | None = None


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


def failed(headers: Mapping[str, object]) -> bool:
    """Whether an answer (reply or completion) says it is an error: x-status `error` as text
    or UTF-8 bytes; any other value or type, or none, is success (protocol §3).

    Raises:
        Internal: x-status arrived undecodable: whether the answer is an error is unknown.
    """
    value = headers.get(H_STATUS)
    if Undecodable.made and _holds_undecodable(value):  # (none made: none can be here)
        problem = f"the answer's {H_STATUS} could not be decoded"
        raise Internal(problem, details={"header": H_STATUS})
    return text(value) == Status.ERROR


def read(delivery: Delivery) -> Fields:
    """Coerce the headers Burrow reads; a refusal when one cannot be used or decoded."""
    headers = delivery.headers
    refusal = _undecodable_refusal(delivery)
    deadline, problem = _deadline(headers.get(H_DEADLINE))
    if refusal is None and problem is not None:
        refusal = Refusal(
            DeadReason.INVALID, InvalidArgument(problem, details={"header": H_DEADLINE})
        )
    version, problem = _version(headers.get(H_VERSION))
    if refusal is None and problem is not None:
        refusal = Refusal(
            DeadReason.INVALID, InvalidArgument(problem, details={"header": H_VERSION})
        )
    kind = text(headers.get(H_KIND))
    return Fields(
        kind=Kind(kind) if kind in HEADER_KINDS else None,
        deadline=deadline,
        version=version,
        job_id=text(headers.get(H_JOB_ID)),
        callback=text(headers.get(H_CALLBACK)),
        callback_data=text(headers.get(H_CALLBACK_DATA)),
        traceparent=text(headers.get(H_TRACEPARENT)),
        refusal=refusal,
    )


def attempt(value: object) -> int | None:
    """x-burrow-attempt as a count in 0..MAX_ATTEMPT: an integer of any width, or the
    same as text or as an integral float or decimal (other clients' spellings); negative is 0,
    beyond the cap is the cap. None when absent or of any other type: the caller then falls
    back to x-death (messages retried before Burrow wrote its own count)."""
    if value is None or isinstance(value, bool):
        return None
    count: int | None = None
    if isinstance(value, int):
        count = value
    elif isinstance(value, float | decimal.Decimal):
        try:
            number = float(value)  # a decimal beyond a double's range becomes infinite
        except ValueError:  # a signalling NaN
            number = math.nan
        if math.isinf(number):
            count = MAX_ATTEMPT if number > 0 else 0
        elif number.is_integer():
            count = int(number)
    else:
        found = text(value)
        digits = _INTEGER.fullmatch(found.strip()) if found is not None else None
        if digits is not None:  # ASCII digits only; too many to matter: at the cap (or 0)
            negative, figures = digits.group(1), digits.group(2).lstrip("0") or "0"
            count = int(figures) if len(figures) <= 18 else MAX_ATTEMPT
            count = -count if negative else count
    return None if count is None else max(0, min(count, MAX_ATTEMPT))


def undecodable_fields(delivery: Delivery) -> list[str]:
    """Names of the properties and headers that arrived undecodable (never their values)."""
    if not Undecodable.made:
        return []  # the common case: nothing undecodable ever arrived, nothing to scan
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
        details={"reason": DeadReason.UNDECODABLE.value, "fields": names[:_MAX_NAMES]},
    )
    trusted = not any(name in ("reply_to", "correlation_id") for name in names)
    return Refusal(DeadReason.UNDECODABLE, error, answerable=trusted)


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
    if ms is None or not math.isfinite(ms) or not 0 < ms < MAX_DEADLINE_MS:
        return None, (
            f"{H_DEADLINE} must be a number of milliseconds since the epoch, 0 < v < 2^53 "
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
        return None, f"{H_VERSION} must be a string or an integer (got {_type_name(value)})"
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
