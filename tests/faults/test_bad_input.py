"""Faults C1 to C9 of RELIABILITY.md: bad input sent to a service, and bad output asked of it.

Malformed, foreign, oversize and deeply nested bodies, schema-invalid payloads, oversize answers,
hostile headers and duplicate message ids. Hand-made requests go through a raw channel, so they
are exactly as broken as a buggy client or an attacker would send them. Each checks the oracle:
answered or dead-lettered with its reason, never requeued, nothing confirmed lost.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from collections.abc import MutableMapping
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from service import (
    App,
    Context,
    InvalidArgument,
    MessageTooLarge,
    Model,
    ResourceExhausted,
    Service,
    Unavailable,
)
from service._amqp.tools import delivery_from_message
from service._protocol.codec import encode
from service._protocol.tracing import HEADER as TRACEPARENT
from service._protocol.vocabulary import H_CALLBACK, H_DEAD_ERROR, H_JOB_ID, H_KIND, H_STATUS, Names
from service._serving.dead_letters import DeadLetter, DeadLetterTool
from tests.faults.conftest import MakeClient, MakeLink, RunApp
from tests.faults.harness import (
    Ledger,
    PrivateBroker,
    RawCaller,
    assert_calls_sound,
    cast,
    drain_dead_letters,
    drain_service,
    eventually,
    publish_until_confirmed,
    raw_channel,
    reply_json,
    sample,
    tracked_call,
    tracked_route_call,
    wait_until,
    work_service,
)

__all__: list[str] = []

_LIMIT = 2048  # BURROW_MAX_BODY_BYTES for these tests


_WORK = "work.do"
TRACE_MARKERS = ("Traceback", 'File "', ".py", "pydantic_core")


def _received(operation: str = _WORK) -> float:
    return sample("burrow_messages_received_total", service="work", operation=operation)


def _handled(outcome: str, operation: str = _WORK) -> float:
    return sample(
        "burrow_messages_handled_total", service="work", operation=operation, outcome=outcome
    )


def _dead_lettered(reason: str) -> float:
    return sample("burrow_dead_lettered_total", service="work", reason=reason)


def _request(key: str, **fields: Any) -> bytes:
    """A valid `work.do` body whose side effect is recorded under `key`."""
    return encode({"key": key, **fields})


async def _assert_answered_and_acked(
    broker: PrivateBroker, app: App, ledger: Ledger, *, received: float, deliveries: int = 1
) -> None:
    """Stop the App and drain its queues: every request was acked once (answered, neither
    requeued nor parked), nothing confirmed is lost."""
    await app.stop()
    summary = await drain_service(broker.url, ledger, app.settings.namespace)
    assert not ledger.queued, f"left unacked or requeued: {summary}"
    assert not ledger.dead, f"answered and also parked: {summary}"
    assert _received() == received + deliveries, "delivered again: requeued instead of acked"


def _assert_fingerprint_only(logs: list[MutableMapping[str, Any]], body: bytes) -> None:
    """The log names a refused body by its size and hash only, never any of its bytes."""
    [handled] = [event for event in logs if event["event"] == "handled"]
    assert handled["body_size"] == len(body)
    assert handled["body_sha256"] == hashlib.sha256(body).hexdigest()[:16]
    assert "body" not in handled
    assert "body_prefix" not in handled
    text = body.decode("utf-8", "backslashreplace")
    if len(text) >= 8:
        assert not [key for key, value in handled.items() if text in str(value)], handled


async def _garbage_with_caller(
    body: bytes, *, broker: PrivateBroker, run_app: RunApp, channel: AbstractChannel, ledger: Ledger
) -> None:
    app = await run_app(work_service(ledger))
    received, rejected = _received(), _handled("rejected")
    caller = await RawCaller(await raw_channel(channel), app.settings.namespace, ledger).start()
    with capture_logs() as logs:
        correlation_id = await caller.publish(_WORK, body)
        reply = await caller.reply(correlation_id)
    assert reply.header.properties.correlation_id == correlation_id
    assert (reply.header.properties.headers or {}).get(H_STATUS) == "error"
    error = reply_json(reply)
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["retryable"] is False
    assert error["message"].startswith("malformed JSON")
    _assert_fingerprint_only(logs, body)
    assert not caller.stray
    assert not caller.unanswered()
    await _assert_answered_and_acked(broker, app, ledger, received=received)
    assert not ledger.started, "garbage reached the handler"
    assert _handled("rejected") == rejected + 1


async def _garbage_without_caller(
    body: bytes, *, broker: PrivateBroker, run_app: RunApp, channel: AbstractChannel, ledger: Ledger
) -> None:
    app = await run_app(work_service(ledger))
    names = Names(app.settings.namespace)
    received, parked_before = _received(), _dead_lettered("malformed")
    caller = RawCaller(await raw_channel(channel), names.namespace, ledger)
    correlation_id = await caller.publish(_WORK, body, reply_to=None)
    [parked] = await drain_dead_letters(
        broker.url, names.dead_letter_queue("work"), ledger, expect=1
    )
    assert parked.body == body
    assert parked.correlation_id == correlation_id
    headers = parked.headers or {}
    assert H_KIND not in headers
    assert DeadLetter.from_delivery(delivery_from_message(parked)).reason == "malformed"
    assert '"INVALID_ARGUMENT"' in str(headers[H_DEAD_ERROR])
    await app.stop()
    summary = await drain_service(broker.url, ledger, names.namespace)
    assert ledger.dead == {correlation_id}, summary
    assert not ledger.queued, summary
    assert not ledger.started, "garbage reached the handler"
    assert _received() == received + 1, "delivered again: requeued instead of parked"
    assert _dead_lettered("malformed") == parked_before + 1


MALFORMED_JSON = [
    pytest.param(b"{not json", id="malformed"),
    pytest.param(b'{"key": "c1", "delay_ms":', id="truncated"),
]
BINARY_GARBAGE = [
    pytest.param(b"\x80\x81\xfe\xff\x00\x01garbage\xc3\x28", id="binary"),
    pytest.param(bytes(range(256)), id="all-bytes"),
]


@pytest.mark.parametrize("body", MALFORMED_JSON)
async def test_c1_malformed_json_with_caller_gets_invalid_argument(
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    body: bytes,
) -> None:
    """C1: malformed JSON from a caller → INVALID_ARGUMENT reply, acked once, never requeued;
    the log holds the body's hash and prefix."""
    await _garbage_with_caller(
        body, broker=broker, run_app=run_app, channel=amqp_channel, ledger=ledger
    )


@pytest.mark.parametrize("body", MALFORMED_JSON)
async def test_c1_malformed_json_without_caller_dead_lettered(
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    body: bytes,
) -> None:
    """C1: malformed JSON with no reply_to and no kind header (a cast) → DLQ once, reason
    `malformed`, counted by reason; never requeued."""
    await _garbage_without_caller(
        body, broker=broker, run_app=run_app, channel=amqp_channel, ledger=ledger
    )


@pytest.mark.parametrize(
    ("payload", "field", "error_type"),
    [
        pytest.param({"delay_ms": 1}, "key", "missing", id="missing-field"),
        pytest.param({"key": "c2", "delay_ms": "one"}, "delay_ms", "int_parsing", id="wrong-type"),
        pytest.param({"key": "c2", "extra": 3}, "extra", "extra_forbidden", id="extra-field"),
    ],
)
async def test_c2_schema_invalid_payload_lists_failing_fields(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    ledger: Ledger,
    payload: dict[str, object],
    field: str,
    error_type: str,
) -> None:
    """C2: a payload that breaks the schema → INVALID_ARGUMENT listing the field, no trace;
    acked, the handler never runs."""
    app = await run_app(work_service(ledger))
    client = await make_client()
    received = _received()
    record, _ = await tracked_route_call(client, _WORK, payload, deadline=5)
    assert record.outcome == "error", record
    assert isinstance(record.error, InvalidArgument), record
    errors = record.error.details["errors"]
    assert [(err["loc"], err["type"]) for err in errors] == [(field, error_type)]
    assert record.error.details["reason"] == "schema"
    for marker in TRACE_MARKERS:
        assert marker not in record.error.message
        assert marker not in str(record.error.details)
    assert_calls_sound([record], client)
    await _assert_answered_and_acked(broker, app, ledger, received=received)
    assert not ledger.started


async def test_c2_schema_errors_list_every_field(
    broker: PrivateBroker, run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """C2: several problems in one payload are all listed."""
    app = await run_app(work_service(ledger))
    client = await make_client()
    received = _received()
    record, _ = await tracked_route_call(client, _WORK, {"delay_ms": "x", "z": 1}, deadline=5)
    assert isinstance(record.error, InvalidArgument), record
    locs = {err["loc"] for err in record.error.details["errors"]}
    assert locs == {"delay_ms", "key", "z"}
    assert_calls_sound([record], client)
    await _assert_answered_and_acked(broker, app, ledger, received=received)
    assert not ledger.started


@pytest.mark.parametrize(
    ("content_type", "content_encoding", "body"),
    [
        pytest.param("application/x-python-pickle", None, pickle.dumps({"key": "c3"}), id="pickle"),
        pytest.param("application/json", "gzip", gzip.compress(b'{"key": "c3"}'), id="gzip"),
        pytest.param("text/plain", None, b'{"key": "c3"}', id="text"),
        pytest.param(None, None, b'{"key": "c3"}', id="none"),
    ],
)
async def test_c3_foreign_content_type_or_encoding_refused(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    content_type: str | None,
    content_encoding: str | None,
    body: bytes,
) -> None:
    """C3: pickle, gzip or non-JSON content is refused with INVALID_ARGUMENT, never decoded:
    the handler never runs; acked once."""
    app = await run_app(work_service(ledger))
    received = _received()
    caller = await RawCaller(
        await raw_channel(amqp_channel), app.settings.namespace, ledger
    ).start()
    reply = await caller.call(
        _WORK, body, content_type=content_type, content_encoding=content_encoding
    )
    error = reply_json(reply)
    assert error["code"] == "INVALID_ARGUMENT"
    assert "content" in error["message"]
    assert not caller.stray
    await _assert_answered_and_acked(broker, app, ledger, received=received)
    assert not ledger.started


async def test_c3_foreign_content_without_caller_dead_lettered(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, ledger: Ledger
) -> None:
    """C3: a pickle cast is parked once with reason `unsupported_content`, never decoded."""
    app = await run_app(work_service(ledger))
    names = Names(app.settings.namespace)
    received, parked_before = _received(), _dead_lettered("unsupported_content")
    body = pickle.dumps({"key": "c3"})
    correlation_id = await RawCaller(
        await raw_channel(amqp_channel), names.namespace, ledger
    ).publish(_WORK, body, content_type="application/x-python-pickle", reply_to=None)
    [parked] = await drain_dead_letters(
        broker.url, names.dead_letter_queue("work"), ledger, expect=1
    )
    assert DeadLetter.from_delivery(delivery_from_message(parked)).reason == "unsupported_content"
    assert parked.body == body
    await app.stop()
    summary = await drain_service(broker.url, ledger, names.namespace)
    assert ledger.dead == {correlation_id}, summary
    assert not ledger.queued, summary
    assert not ledger.started
    assert _received() == received + 1
    assert _dead_lettered("unsupported_content") == parked_before + 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_request("c4-big", blob="x" * 4096), id="valid-json"),
        pytest.param(b'{"key": "c4-big", "blob": "' + b"x" * 4096, id="malformed-json"),
    ],
)
async def test_c4_oversize_body_refused_before_parsing(
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    body: bytes,
) -> None:
    """C4: a 4 kB body above a 2 kB limit is refused for its size (even if malformed), acked;
    the next small request is served."""
    app = await run_app(work_service(ledger), max_body_bytes=2048)
    received, rejected = _received(), _handled("rejected")
    caller = await RawCaller(
        await raw_channel(amqp_channel), app.settings.namespace, ledger
    ).start()
    error = reply_json(await caller.call(_WORK, body))
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["details"] == {"limit": 2048, "size": len(body)}
    assert "malformed" not in error["message"]
    assert not ledger.started
    small = _request("c4-small")
    ok = reply_json(await caller.call(_WORK, small, correlation_id="c4-small"))
    assert ok == {"key": "c4-small"}
    assert not caller.stray
    assert _handled("rejected") == rejected + 1
    await _assert_answered_and_acked(broker, app, ledger, received=received, deliveries=2)
    assert dict(ledger.started) == {"c4-small": 1}


class Size(Model):
    """How big an answer or event to make."""

    n: int


class Blob(Model):
    """A reply or event of `n` characters."""

    blob: str


def _inflating_service() -> Service:
    svc = Service("inflate")
    svc.event("inflate.made", Blob)

    @svc.operation()
    async def reply(req: Size) -> Blob:
        """Answer with a blob of the requested size."""
        return Blob(blob="x" * req.n)

    @svc.operation()
    async def announce(req: Size, ctx: Context) -> Blob:
        """Emit an event of the requested size, then answer small."""
        await ctx.emit("inflate.made", Blob(blob="y" * req.n))
        return Blob(blob="ok")

    return svc


async def test_c5_oversize_reply_and_event_refused_locally(
    run_app: RunApp, make_client: MakeClient
) -> None:
    """C5: a reply or event above the body limit is refused before publishing with a clear
    error; no channel error, no reconnect, other calls unaffected."""
    app = await run_app(_inflating_service(), max_body_bytes=_LIMIT)
    client = await make_client(max_body_bytes=_LIMIT)
    reconnects = sample("burrow_amqp_reconnects_total", link="publisher")
    events = sample("burrow_messages_published_total", kind="event", outcome="confirmed")

    with pytest.raises(ResourceExhausted) as too_big:
        await client.call("inflate.reply", {"n": 4 * _LIMIT}, timeout=10)
    assert "too large" in too_big.value.message
    with pytest.raises(InvalidArgument) as event_too_big:
        await client.call("inflate.announce", {"n": 4 * _LIMIT}, timeout=10)
    assert "exceeds the limit" in event_too_big.value.message
    assert sample("burrow_messages_published_total", kind="event", outcome="confirmed") == events
    with pytest.raises(MessageTooLarge):
        await client.emit("inflate.made", {"blob": "z" * 4 * _LIMIT})
    with pytest.raises(MessageTooLarge):
        await client.call("inflate.reply", {"n": 1, "pad": "p" * 4 * _LIMIT}, timeout=10)

    assert await client.call("inflate.reply", {"n": 10}, timeout=10) == {"blob": "x" * 10}
    assert await client.call("inflate.announce", {"n": 10}, timeout=10) == {"blob": "ok"}
    assert sample("burrow_amqp_reconnects_total", link="publisher") == reconnects
    assert app.transport.publisher.ready.is_set()
    assert client.link.ready.is_set()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="lists"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="objects"),
    ],
)
async def test_c6_deeply_nested_json_refused_and_service_keeps_serving(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    body: bytes,
) -> None:
    """C6: 100,000 levels of nesting → INVALID_ARGUMENT, no RecursionError; acked; the service
    still serves afterwards."""
    app = await run_app(work_service(ledger), max_body_bytes=1_048_576)
    client = await make_client(max_body_bytes=1_048_576)
    received = _received()
    caller = await RawCaller(
        await raw_channel(amqp_channel), app.settings.namespace, ledger
    ).start()
    error = reply_json(await caller.call(_WORK, body))
    assert error["code"] == "INVALID_ARGUMENT"
    assert "Recursion" not in error["message"]
    assert not ledger.started
    record = await tracked_call(client, 1, deadline=5, ledger=ledger)
    assert record.outcome == "result", record
    assert_calls_sound([record], client)
    assert not caller.stray
    assert app.health.ready
    await _assert_answered_and_acked(broker, app, ledger, received=received, deliveries=2)
    assert list(ledger.started.values()) == [1]


@pytest.mark.parametrize("body", BINARY_GARBAGE)
async def test_c7_binary_garbage_with_caller_gets_invalid_argument(
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    body: bytes,
) -> None:
    """C7: binary garbage from a caller → INVALID_ARGUMENT reply, acked once, never requeued;
    the log holds the body's hash and prefix, not the body."""
    await _garbage_with_caller(
        body, broker=broker, run_app=run_app, channel=amqp_channel, ledger=ledger
    )


@pytest.mark.parametrize("body", BINARY_GARBAGE)
async def test_c7_binary_garbage_without_caller_dead_lettered(
    broker: PrivateBroker,
    run_app: RunApp,
    amqp_channel: AbstractChannel,
    ledger: Ledger,
    body: bytes,
) -> None:
    """C7: binary garbage as a cast → DLQ once, reason `malformed`, counted; never requeued."""
    await _garbage_without_caller(
        body, broker=broker, run_app=run_app, channel=amqp_channel, ledger=ledger
    )


def _flaky_service(calls: list[str]) -> Service:
    svc = Service("hostile")

    @svc.operation(retries=3)
    async def fail(req: Size) -> Size:
        """Always fail retryably."""
        calls.append("fail")
        raise Unavailable("always down")

    @svc.operation()
    async def work(req: Size) -> Size:
        """Succeed."""
        calls.append("work")
        return req

    return svc


def _burrow_label_values() -> list[str]:
    values: list[str] = []
    for family in REGISTRY.collect():
        if family.name.startswith("burrow_"):
            for metric in family.samples:
                values.extend(metric.labels.values())
    return values


async def test_c8_hostile_headers_capped_and_validated(
    broker: PrivateBroker, run_app: RunApp, amqp_channel: AbstractChannel, namespace: str
) -> None:
    """C8: huge header tables, a forged x-death with an absurd count and 10 kB header values
    are capped or ignored: no retry loop, nothing of them in logs or metric labels."""
    calls: list[str] = []
    app = await run_app(_flaky_service(calls), max_retries=3, retry_base_delay=0.05)
    names = Names(namespace)
    huge = "h" * 10_000
    # As large as a header frame may be (frame_max, 128 kB): the table itself ~50 kB.
    hostile: dict[str, Any] = {
        **{f"x-junk-{i}": "j" * 100 for i in range(500)},
        "x-death": [
            {
                "queue": names.retry_queue(0),
                "reason": "expired",
                "count": 10**15,
                "exchange": names.retry_exchange(0),
                "routing-keys": ["r"],
            }
        ],
        TRACEPARENT: huge,
        H_JOB_ID: huge,
        H_CALLBACK: huge,
        # (An x-deadline that is not a number is refused, not ignored: tests/hostile H1.)
        H_KIND: "cast",
    }
    long_id = "i" * 255  # AMQP short strings stop at 255 bytes: the longest id possible

    def message(route: str) -> aio_pika.Message:
        return aio_pika.Message(
            json.dumps({"n": 1}).encode(),
            content_type="application/json",
            message_id=f"{route}-{long_id}"[:255],
            correlation_id=long_id,
            type=route,
            headers=hostile,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    exchange = await amqp_channel.get_exchange(names.commands_exchange)
    with capture_logs() as logs:
        await exchange.publish(message("hostile.work"), routing_key="hostile.work")
        await exchange.publish(message("hostile.fail"), routing_key="hostile.fail")
        dlq = names.dead_letter_queue("hostile")

        async def parked() -> bool:
            return await broker.ready_count(dlq) == 1

        await eventually(parked, 20, "the forged-x-death message in the DLQ")
        await wait_until(lambda: "work" in calls, 10, "the hostile cast processed")
    assert calls.count("work") == 1, calls
    assert calls.count("fail") == 1, f"forged x-death: {calls.count('fail')} runs, want 1"
    [letter] = await DeadLetterTool(app.settings, "hostile").list()
    assert letter.reason == "retries_exhausted"
    assert letter.error["details"]["attempts"] <= 1_000_001  # capped, never 10**15
    for event in logs:
        for key, value in event.items():
            assert len(str(value)) <= 2_000, f"log field {key} of {len(str(value))} chars"
    assert all(len(value) <= 128 for value in _burrow_label_values())
    assert app.health.ready


async def test_c9_same_message_id_twice_is_processed_once(
    broker: PrivateBroker, run_app: RunApp, make_link: MakeLink, ledger: Ledger
) -> None:
    """C9: with idempotency on, a second cast with the same message id is acked without a second
    side effect (the handler does not run again)."""
    app = await run_app(work_service(ledger, idempotent=True))
    namespace = app.settings.namespace
    producer = await make_link()
    received, handled = _received(), _handled("ok")
    for _ in range(2):
        await publish_until_confirmed(
            producer, ledger, cast(namespace, "c9-once"), give_up_after=10
        )
    # A later, distinct cast proves the duplicate was consumed (queues are FIFO per consumer).
    await publish_until_confirmed(producer, ledger, cast(namespace, "c9-after"), give_up_after=10)
    await ledger.wait_processed(["c9-once", "c9-after"], 10)
    await wait_until(lambda: _handled("ok") >= handled + 3, 10, "all three casts handled")
    assert ledger.effects == {"c9-once": 1, "c9-after": 1}, ledger.effects
    assert ledger.started["c9-once"] == 1, "the duplicate ran the handler again"
    await _assert_answered_and_acked(broker, app, ledger, received=received, deliveries=3)
    assert not ledger.duplicates()
