"""Integration tests of hostile requests (C1-C7, D6, D7) against services on the real broker.

Every request here is hand-made on a raw channel, so it can be exactly as broken as a real
attacker or buggy client would send it.
"""

from __future__ import annotations

import gzip
import pickle

import aio_pika
import pytest

from service import Client, InvalidArgument
from service.codec import H_DEAD_ERROR, H_KIND, encode
from service.example import calc
from service.topology import Names
from tests.conftest import AppFactory
from tests.integration.test_rpc_support import (
    DIRECT_REPLY_TO,
    H_STATUS,
    Collector,
    RawCaller,
    dead_reason,
    make_lab,
    queue_depth,
    raw_channel,
    reply_json,
    stop_and_count,
)

__all__: list[str] = []

GARBAGE = [
    pytest.param(b"{not json", id="C1-malformed"),
    pytest.param(b'{"a": 1, "b":', id="C1-truncated"),
    pytest.param(b"\x80\x81\xfe\xff\x00\x01garbage\xc3\x28", id="C7-binary"),
    pytest.param(bytes(range(256)), id="C7-all-bytes"),
]

TRACE_MARKERS = ("Traceback", 'File "', ".py", "pydantic_core")


@pytest.mark.parametrize("body", GARBAGE)
async def test_garbage_with_caller_gets_invalid_argument_and_is_acked(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    body: bytes,
) -> None:
    """C1/C7: malformed JSON or binary garbage from a caller → INVALID_ARGUMENT reply, acked."""
    app = await start_app(calc)
    raw = await raw_channel(amqp_channel)
    caller = await RawCaller(raw, namespace).start()
    correlation_id = await caller.publish("calc.add", body)
    reply = await caller.reply(correlation_id)
    assert reply.header.properties.correlation_id == correlation_id
    assert (reply.header.properties.headers or {}).get(H_STATUS) == "error"
    error = reply_json(reply)
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["retryable"] is False
    assert error["message"].startswith("malformed JSON")
    assert await stop_and_count(app, raw, Names(namespace).request_queue("calc")) == 0


@pytest.mark.parametrize("body", GARBAGE)
async def test_garbage_without_caller_is_dead_lettered_as_malformed(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    body: bytes,
) -> None:
    """C1/C7: garbage with no reply_to and no kind header (a cast) → DLQ, reason `malformed`."""
    names = Names(namespace)
    app = await start_app(calc)
    raw = await raw_channel(amqp_channel)
    dlq = await Collector().attach(raw, names.dead_letter_queue("calc"))
    caller = RawCaller(raw, namespace)
    correlation_id = await caller.publish("calc.add", body, reply_to=None)
    parked = await dlq.next()
    assert parked.body == body
    assert parked.header.properties.correlation_id == correlation_id
    headers = parked.header.properties.headers or {}
    assert H_KIND not in headers
    assert dead_reason(parked) == "malformed"
    assert '"INVALID_ARGUMENT"' in str(headers[H_DEAD_ERROR])
    assert await stop_and_count(app, raw, names.request_queue("calc")) == 0


@pytest.mark.parametrize(
    ("payload", "field", "error_type"),
    [
        pytest.param({"a": 1}, "b", "missing", id="missing-field"),
        pytest.param({"a": "one", "b": 2}, "a", "int_parsing", id="wrong-type"),
        pytest.param({"a": 1, "b": 2, "c": 3}, "c", "extra_forbidden", id="extra-field"),
    ],
)
async def test_schema_invalid_payload_lists_failing_fields(
    start_app: AppFactory, client: Client, payload: dict[str, object], field: str, error_type: str
) -> None:
    """C2: a payload that breaks the schema → INVALID_ARGUMENT listing the field, no trace."""
    await start_app(calc)
    with pytest.raises(InvalidArgument) as info:
        await client.call("calc.add", payload, timeout=5)
    errors = info.value.details["errors"]
    assert [(err["loc"], err["type"]) for err in errors] == [(field, error_type)]
    assert info.value.details["reason"] == "schema"
    for marker in TRACE_MARKERS:
        assert marker not in info.value.message
        assert marker not in str(info.value.details)


async def test_schema_errors_list_every_field(start_app: AppFactory, client: Client) -> None:
    """C2: several problems in one payload are all listed."""
    await start_app(calc)
    with pytest.raises(InvalidArgument) as info:
        await client.call("calc.add", {"a": "x", "z": 1}, timeout=5)
    locs = {err["loc"] for err in info.value.details["errors"]}
    assert locs == {"a", "b", "z"}


@pytest.mark.parametrize(
    ("content_type", "content_encoding", "body"),
    [
        pytest.param(
            "application/x-python-pickle", None, pickle.dumps({"text": "x"}), id="C3-pickle"
        ),
        pytest.param("application/json", "gzip", gzip.compress(b'{"text": "x"}'), id="C3-gzip"),
        pytest.param("text/plain", None, b'{"text": "x"}', id="C3-text"),
        pytest.param(None, None, b'{"text": "x"}', id="C3-none"),
    ],
)
async def test_foreign_content_type_or_encoding_refused(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    content_type: str | None,
    content_encoding: str | None,
    body: bytes,
) -> None:
    """C3: pickle, gzip or non-JSON content is refused with INVALID_ARGUMENT; handler never runs."""
    lab = make_lab()
    app = await start_app(lab.service)
    namespace = app.settings.namespace
    raw = await raw_channel(amqp_channel)
    caller = await RawCaller(raw, namespace).start()
    reply = await caller.call(
        lab.route("echo"), body, content_type=content_type, content_encoding=content_encoding
    )
    error = reply_json(reply)
    assert error["code"] == "INVALID_ARGUMENT"
    assert "content" in error["message"]
    assert lab.calls == []
    assert await stop_and_count(app, raw, Names(namespace).request_queue("lab")) == 0


async def test_foreign_content_without_caller_dead_lettered(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    """C3: a pickle cast is parked with reason `unsupported_content`, never decoded."""
    lab = make_lab()
    await start_app(lab.service)
    raw = await raw_channel(amqp_channel)
    dlq = await Collector().attach(raw, Names(namespace).dead_letter_queue("lab"))
    body = pickle.dumps({"text": "x"})
    await RawCaller(raw, namespace).publish(
        lab.route("echo"), body, content_type="application/x-python-pickle", reply_to=None
    )
    parked = await dlq.next()
    assert dead_reason(parked) == "unsupported_content"
    assert parked.body == body
    assert lab.calls == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(encode({"text": "x" * 4096}), id="valid-json"),
        pytest.param(b'{"text": "' + b"x" * 4096, id="malformed-json"),
    ],
)
async def test_oversize_body_refused_before_parsing(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    body: bytes,
) -> None:
    """C4: a 4 kB body above a 2 kB limit is refused for its size (even if malformed)."""
    lab = make_lab()
    app = await start_app(lab.service, max_body_bytes=2048)
    raw = await raw_channel(amqp_channel)
    caller = await RawCaller(raw, namespace).start()
    error = reply_json(await caller.call(lab.route("echo"), body))
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["details"] == {"limit": 2048, "size": len(body)}
    assert "malformed" not in error["message"]
    assert lab.calls == []
    ok = reply_json(await caller.call(lab.route("echo"), encode({"text": "small"})))
    assert ok == {"text": "small"}
    assert await stop_and_count(app, raw, Names(namespace).request_queue("lab")) == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="lists"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="objects"),
    ],
)
async def test_deeply_nested_json_refused_and_service_keeps_serving(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    client: Client,
    namespace: str,
    body: bytes,
) -> None:
    """C6: 100,000 levels of nesting → INVALID_ARGUMENT; the service still serves afterwards."""
    await start_app(calc, max_body_bytes=1_048_576)
    raw = await raw_channel(amqp_channel)
    caller = await RawCaller(raw, namespace).start()
    error = reply_json(await caller.call("calc.add", body))
    assert error["code"] == "INVALID_ARGUMENT"
    assert "Recursion" not in error["message"]
    assert await client.call("calc.add", {"a": 2, "b": 3}, timeout=5) == {"sum": 5}


async def test_call_without_reply_to_dead_lettered_not_executed(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    """D6: x-burrow-kind=call without reply_to → DLQ (missing_reply_to); handler never runs."""
    lab = make_lab()
    app = await start_app(lab.service)
    raw = await raw_channel(amqp_channel)
    dlq = await Collector().attach(raw, Names(namespace).dead_letter_queue("lab"))
    await RawCaller(raw, namespace).publish(
        lab.route("echo"), encode({"text": "hi"}), headers={H_KIND: "call"}, reply_to=None
    )
    parked = await dlq.next()
    assert dead_reason(parked) == "missing_reply_to"
    assert '"PERMISSION_DENIED"' in str((parked.header.properties.headers or {})[H_DEAD_ERROR])
    assert lab.calls == []
    assert await stop_and_count(app, raw, Names(namespace).request_queue("lab")) == 0


@pytest.mark.parametrize("kind_header", [True, False], ids=["kind-call", "no-kind"])
async def test_spoofed_reply_to_refused_target_gets_nothing(
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
    kind_header: bool,
) -> None:
    """D7: reply_to naming another queue → DLQ (invalid_reply_to); that queue receives nothing."""
    lab = make_lab()
    app = await start_app(lab.service)
    raw = await raw_channel(amqp_channel)
    victim = f"{namespace}.victim"
    await raw.queue_declare(victim, exclusive=True)
    dlq = await Collector().attach(raw, Names(namespace).dead_letter_queue("lab"))
    await RawCaller(raw, namespace).publish(
        lab.route("echo"),
        encode({"text": "hi"}),
        headers={H_KIND: "call"} if kind_header else None,
        reply_to=victim,
    )
    parked = await dlq.next()
    assert dead_reason(parked) == "invalid_reply_to"
    assert parked.header.properties.reply_to == victim
    assert lab.calls == []
    assert await stop_and_count(app, raw, Names(namespace).request_queue("lab")) == 0
    assert await queue_depth(raw, victim) == 0


async def test_reply_to_lookalike_prefix_refused(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    """D7: a reply_to that only resembles direct reply-to (no `.` suffix) is refused."""
    lab = make_lab()
    await start_app(lab.service)
    raw = await raw_channel(amqp_channel)
    dlq = await Collector().attach(raw, Names(namespace).dead_letter_queue("lab"))
    await RawCaller(raw, namespace).publish(
        lab.route("echo"), encode({"text": "hi"}), reply_to=DIRECT_REPLY_TO + "-evil"
    )
    parked = await dlq.next()
    assert dead_reason(parked) == "invalid_reply_to"
    assert lab.calls == []
