"""Every message Burrow builds: the requests a client sends (calls, casts, submits, events,
their delayed form) and what a service sends for what it handled (replies, completions, dead
letters, retry copies, forwards). Pure: in go a request's facts or a delivery, out comes an
`Outgoing`.

`forward` is the one copy of a received message into a new publish: it keeps or makes
encodable every property and header (bytes become byte arrays, undecodable text its escape,
x-death only as the broker writes it). `stamp` adds the trace and contract-version headers to
what a service sends on its own behalf.
"""

from __future__ import annotations

import datetime
import decimal
import math
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from service._protocol import codec, tracing
from service._protocol.errors import InvalidArgument, ServiceError
from service._protocol.jobs import valid_callback, valid_callback_data
from service._protocol.registry import Operation
from service._protocol.types import Delivery, Headers, Outgoing, Undecodable, new_id
from service._protocol.vocabulary import (
    DIRECT_REPLY_TO,
    H_ATTEMPT,
    H_CALLBACK,
    H_CALLBACK_DATA,
    H_DEAD_AT,
    H_DEAD_ERROR,
    H_DEAD_REASON,
    H_DEADLINE,
    H_DEATH,
    H_DUE,
    H_JOB_ID,
    H_KIND,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_QUEUE,
    H_ORIGINAL_ROUTING_KEY,
    H_STATUS,
    H_TARGET_EXCHANGE,
    H_TARGET_KEY,
    H_TRACEPARENT,
    H_VERSION,
    LEVELS,
    MAX_ATTEMPT,
    MAX_DEADLINE_MS,
    MAX_DELAY_S,
    UNIT_MS,
    Kind,
    Names,
    Status,
    delay_route,
    is_event_name,
)


def stamp(headers: Headers, *, version: str, trace: str | None) -> Headers:
    """`headers` plus what every message a service sends carries: its contract major and a
    child span of the trace being handled (`trace`, a traceparent, or a new trace)."""
    headers[H_VERSION] = version
    headers[tracing.HEADER] = tracing.child(trace)
    return headers


def call_request(
    names: Names,
    route: str,
    body: bytes,
    *,
    correlation_id: str,
    deadline_ms: int,
    timeout: float,
    trace: str | None,
    headers: Mapping[str, Any] | None = None,
) -> Outgoing:
    """A call of `route` (transient, expiring with its deadline), answered to the caller's
    direct reply-to address under `correlation_id`."""
    return Outgoing(
        exchange=names.rpc_exchange,
        routing_key=route,
        body=body,
        message_id=correlation_id,
        type=route,
        correlation_id=correlation_id,
        reply_to=DIRECT_REPLY_TO,
        headers={
            H_DEADLINE: deadline_ms,
            H_KIND: Kind.CALL,
            H_TRACEPARENT: tracing.child(trace),
            **(headers or {}),
        },
        expiration_ms=max(1, int(timeout * 1000)),
        persistent=False,
    )


def command(
    names: Names,
    route: str,
    body: bytes,
    kind: Kind,
    *,
    trace: str | None,
    headers: Mapping[str, Any] | None = None,
) -> Outgoing:
    """A cast of `route` (persistent, to the commands exchange), or the base of a submit."""
    return Outgoing(
        exchange=names.commands_exchange,
        routing_key=route,
        body=body,
        message_id=uuid.uuid4().hex,
        type=route,
        headers={H_KIND: kind, H_TRACEPARENT: tracing.child(trace), **(headers or {})},
        persistent=True,
    )


def submit_request(
    names: Names,
    route: str,
    body: bytes,
    *,
    trace: str | None,
    callback: str | None = None,
    callback_data: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Outgoing:
    """A submit of `route`: a command whose message id is the job id, whose completion comes
    back to the submitter's direct reply-to address (and to `callback`, with its data).

    Raises:
        ValueError: the callback is not a routing key, or its data is not allowed.
    """
    message = command(names, route, body, Kind.SUBMIT, trace=trace, headers=headers)
    if callback is not None:
        if valid_callback(callback) is None:
            raise ValueError(f"{callback!r} is not a routing key (dot-separated words)")
        message.headers[H_CALLBACK] = callback
    if callback_data is not None:
        if callback is None or valid_callback_data(callback_data) is None:
            raise ValueError("callback_data needs a callback and at most 4,096 characters")
        message.headers[H_CALLBACK_DATA] = callback_data
    message.headers[H_JOB_ID] = message.message_id
    message.reply_to, message.correlation_id = DIRECT_REPLY_TO, message.message_id
    return message


def reply(
    correlation_id: str | None,
    reply_to: str,
    body: bytes,
    *,
    ok: bool,
    version: str,
    trace: str | None,
) -> Outgoing:
    """The answer to a call, for its direct reply-to address (transient)."""
    return Outgoing(
        exchange="",
        routing_key=reply_to,
        body=body,
        message_id=new_id(),
        correlation_id=correlation_id,
        headers=stamp({H_STATUS: Status.OK if ok else Status.ERROR}, version=version, trace=trace),
        persistent=False,
    )


def completions(
    names: Names,
    route: str,
    job_id: str,
    body: bytes,
    *,
    ok: bool,
    reply_to: str | None,
    callback: str | None,
    version: str,
    trace: str | None,
    callback_data: str | None = None,
) -> list[Outgoing]:
    """The messages announcing that job `job_id` of `route` finished: to the submitter's reply
    address (or, without one, to the job queue a pre-0.2 submitter declared), as the
    `<route>.completed|failed` event, and to the callback (with the submit's callback data)."""
    suffix = "completed" if ok else "failed"
    headers = stamp(
        {H_JOB_ID: job_id, H_STATUS: Status.OK if ok else Status.ERROR},
        version=version,
        trace=trace,
    )
    targets = [
        ("", reply_to or names.job_queue(job_id)),
        (names.events_exchange, f"{route}.{suffix}"),
    ]
    sent = [
        Outgoing(
            exchange=exchange,
            routing_key=key,
            body=body,
            message_id=new_id(),
            type=f"{route}.{suffix}",
            correlation_id=job_id,
            headers=dict(headers),
            persistent=True,
        )
        for exchange, key in targets
    ]
    if callback is not None:
        extra = {H_CALLBACK_DATA: callback_data} if callback_data is not None else {}
        sent.append(
            Outgoing(
                exchange=names.events_exchange,
                routing_key=callback,
                body=body,
                message_id=new_id(),
                type=f"{route}.{suffix}",
                correlation_id=job_id,
                headers={**headers, **extra},
                persistent=True,
            )
        )
    return sent


def dead_letter(
    delivery: Delivery, names: Names, service: str, reason: str, error: ServiceError | None
) -> Outgoing:
    """The copy of `delivery` parked in `service`'s DLQ, with why, when and where it came from
    (its exchange and routing key, and the queue it was taken from: where a replay puts it)."""
    add: dict[str, Any] = {
        H_DEAD_REASON: str(reason),
        H_DEAD_ERROR: codec.encode_error(error).decode() if error else "",
        H_ORIGINAL_EXCHANGE: str(delivery.exchange),
        H_ORIGINAL_ROUTING_KEY: str(delivery.routing_key),
        H_DEAD_AT: int(time.time() * 1000),
    }
    if delivery.queue:
        add[H_ORIGINAL_QUEUE] = str(delivery.queue)
    return forward(
        delivery,
        exchange=names.dead_letter_exchange,
        routing_key=names.dead_letter_queue(service),
        add=add,
    )


def retry_copy(delivery: Delivery, names: Names, level: int, attempt: int) -> Outgoing:
    """The copy of `delivery` that waits in retry holding queue `level`, then goes back to the
    queue it came from, as retry number `attempt + 1` (x-burrow-attempt: Burrow's own count,
    which every broker version carries as it is). It comes back keyed by the queue's name, so
    a message that named its route only by its routing key (no `type`) gets that route as its
    `type`: the retry reaches the same operation."""
    copy = forward(
        delivery,
        exchange=names.retry_exchange(level),
        routing_key=delivery.queue,
        add={H_ATTEMPT: min(attempt + 1, MAX_ATTEMPT)},
    )
    if copy.type is None:
        copy = replace(copy, type=_plain(delivery.routing_key))
    return copy


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
    if isinstance(deadline, float | decimal.Decimal) and 0 < deadline < MAX_DEADLINE_MS:
        headers[H_DEADLINE] = round(deadline)  # the integer ms the protocol prefers
    if H_DEATH in headers:
        headers[H_DEATH] = _deaths(headers[H_DEATH])
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


def version_header(operation: str | Operation[Any, Any]) -> dict[str, Any]:
    """The contract-version header of a request made against a declared `Operation` (which
    says which contract its caller speaks); none for a route given as text."""
    return {H_VERSION: str(operation.major)} if isinstance(operation, Operation) else {}


def due_time(delay: float | None, at: datetime.datetime | None) -> float | None:
    """The absolute due time (seconds since the epoch) of `delay` seconds from now, or of the
    timezone-aware `at`; None for now.

    Raises:
        ValueError: both given, `at` naive, or `delay` negative.
    """
    if delay is not None and at is not None:
        raise ValueError("give delay or at, not both")
    if at is not None:
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        return at.timestamp()
    if delay is not None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        return time.time() + delay
    return None


def event_message(
    names: Names, event: str, body: bytes, *, headers: dict[str, Any] | None = None
) -> Outgoing:
    """A persistent event for the events exchange, keyed by its name."""
    if not is_event_name(event):
        raise InvalidArgument(f"{event[:80]!r} is not an event name (dot-separated words)")
    return Outgoing(
        exchange=names.events_exchange,
        routing_key=event,
        body=body,
        message_id=new_id(),
        type=event,
        headers=headers or {},
        persistent=True,
    )


def schedule(names: Names, message: Outgoing, due_at: float) -> Outgoing:
    """The message to publish instead of `message` so that it reaches its target at `due_at`.

    Args:
        due_at: absolute time, seconds since the epoch. Rounded up to the next 100 ms:
            a scheduled message never arrives early.
    """
    now_ms = time.time() * 1000
    due_ms = math.ceil(due_at * 1000)
    units = max(0, math.ceil((due_ms - now_ms) / UNIT_MS))
    if units >= 1 << LEVELS:
        raise ValueError(f"cannot schedule more than {MAX_DELAY_S:.0f}s ahead")
    headers = dict(message.headers)
    headers.update(
        {H_TARGET_EXCHANGE: message.exchange, H_TARGET_KEY: message.routing_key, H_DUE: due_ms}
    )
    return replace(
        message,
        exchange=names.delay_exchange(LEVELS - 1),
        routing_key=delay_route(units),
        headers=headers,
        persistent=True,
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
