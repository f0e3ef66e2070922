"""An `Outgoing` as an outbox row and back: what the writer inserts and the relay publishes.

Properties and headers are JSON (jsonb columns, readable with SQL); a header's bytes value is
`{"$b": "<base64>"}`, so every value a caller may send (str, int, float, bool, bytes) comes back
as it went in (bytes as a byte array, which is how AMQP carries them). The body is kept as
bytes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from service._protocol.types import Outgoing

_BYTES = "$b"
# The properties kept, with the value `Outgoing` has when they are absent.
_PROPERTIES: dict[str, Any] = {
    "type": None,
    "correlation_id": None,
    "reply_to": None,
    "expiration_ms": None,
    "persistent": True,
    "content_type": "application/json",
    "content_encoding": None,
    "app_id": None,
    "priority": None,
}


_TYPES: dict[str, type] = {"expiration_ms": int, "persistent": bool, "priority": int}


@dataclass(frozen=True, slots=True)
class Row:
    """The columns of one outbox row that say what to publish."""

    key: str
    kind: str  # the publish kind (`event`, `command`); `scheduled` when due_at is set
    exchange: str
    routing_key: str
    message_id: str
    properties: str  # JSON text
    headers: str  # JSON text
    body: bytes
    due_at: datetime | None = None


def to_row(message: Outgoing, *, key: str, kind: str, due_at: float | None) -> Row:
    """The row for `message`, published as `kind` (at `due_at`, seconds since the epoch).

    Raises:
        TypeError: a header value JSON cannot carry (not str, int, float, bool, bytes, a list
            or a table of them).
    """
    properties = {
        name: getattr(message, name)
        for name, absent in _PROPERTIES.items()
        if getattr(message, name) != absent
    }
    return Row(
        key=key,
        kind=kind,
        exchange=message.exchange,
        routing_key=message.routing_key,
        message_id=message.message_id,
        properties=orjson.dumps(properties).decode(),
        headers=orjson.dumps({str(k): _encode(v) for k, v in message.headers.items()}).decode(),
        body=message.body,
        due_at=None if due_at is None else datetime.fromtimestamp(due_at, UTC),
    )


def to_message(row: Row) -> Outgoing:
    """The message a row holds.

    Raises:
        ValueError: the row's JSON is not what `to_row` writes (edited by hand, or damaged).
    """
    properties = orjson.loads(row.properties)
    headers = orjson.loads(row.headers)
    if not isinstance(properties, dict) or not isinstance(headers, dict):
        raise ValueError("properties and headers must be JSON objects")
    unknown = set(properties) - set(_PROPERTIES)
    if unknown:
        raise ValueError(f"unknown properties {sorted(unknown)[:5]}")
    for name, value in properties.items():
        wanted = _TYPES.get(name, str)
        if value is not None and (
            not isinstance(value, wanted) or (wanted is int and isinstance(value, bool))
        ):
            raise ValueError(f"property {name} is not {wanted.__name__}: {value!r}"[:200])
    try:
        return Outgoing(
            exchange=row.exchange,
            routing_key=row.routing_key,
            body=bytes(row.body),
            message_id=row.message_id,
            headers={str(k): _decode(v) for k, v in headers.items()},
            **{name: properties.get(name, absent) for name, absent in _PROPERTIES.items()},
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unusable row: {exc}") from None


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return value
    raise TypeError(f"a header value of type {type(value).__name__} cannot be kept in the outbox")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(_BYTES), str):
            # A byte array: what AMQP carries bytes as (pamqp refuses `bytes` in a table).
            return bytearray(base64.b64decode(value[_BYTES], validate=True))
        return {str(k): _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
