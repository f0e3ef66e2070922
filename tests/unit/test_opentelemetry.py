"""OpenTelemetry spans on the in-memory broker, through the SDK's in-memory exporter: names,
kinds, messaging attributes and parentage across call, cast, submit and event, an error's
status, and a trace continued from an instrumented HTTP request."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service import InvalidArgument, Model, Service
from service._protocol import tracing
from service.testing import serve
from tests.conftest import Recorded

__all__: list[str] = []


class Num(Model):
    """A number."""

    n: int


def shop(seen: list[str]) -> Service:
    """`shop.double` (fails on a negative n) and a subscription to `shop.doubled`."""
    svc = Service("shop")
    svc.event("shop.doubled", Num)

    @svc.operation()
    async def double(req: Num) -> Num:
        """Twice n."""
        if req.n < 0:
            raise InvalidArgument("n must not be negative")
        return Num(n=2 * req.n)

    @svc.subscribe("shop.doubled", group="audit")
    async def audit(event: Num) -> None:
        """Record the event."""
        seen.append(f"audit {event.n}")

    return svc


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    found: int = span.context.span_id
    return found


async def test_a_call_is_client_producer_consumer_producer(otel: Recorded) -> None:
    """call → send (request) → process → send reply: one trace, each the parent of the next,
    with the messaging attributes of RabbitMQ."""
    async with serve(shop([])) as (client, _):
        assert await client.call("shop.double", {"n": 2}) == {"n": 4}
    found = _by_name(otel.exporter)
    [call], [send], [process], [reply] = (
        found["call shop.double"],
        found["send shop.double"],
        found["process shop.double"],
        found["send reply"],
    )
    assert [s.kind for s in (call, send, process, reply)] == [
        SpanKind.CLIENT,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.PRODUCER,
    ]
    assert _parent(send) == _id(call)
    assert _parent(process) == _id(send)
    assert _parent(reply) == _id(process)
    assert {s.context.trace_id for s in (call, send, process, reply) if s.context} == {
        call.context.trace_id if call.context else 0
    }
    attributes = dict(send.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.destination.name"] == client.names.rpc_exchange
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "shop.double"
    consumed = dict(process.attributes or {})
    assert consumed["messaging.operation.type"] == "process"
    assert consumed["messaging.destination.subscription.name"] == client.names.request_queue("shop")
    assert consumed["burrow.kind"] == "call"
    assert consumed["burrow.outcome"] == "ok"
    assert process.status.status_code is StatusCode.UNSET


async def test_cast_submit_and_event_spans_chain_to_their_senders(
    otel: Recorded,
) -> None:
    """A cast's and a submit's CONSUMER spans are children of their PRODUCER spans, the
    submit's completions children of its processing; an emitted event's subscriber too."""
    seen: list[str] = []
    async with serve(shop(seen)) as served:
        client = served.client
        await client.cast("shop.double", {"n": 1})
        job = await client.submit("shop.double", {"n": 3})
        assert await job.result(timeout=5) == {"n": 6}
        assert await client.emit("shop.doubled", {"n": 5})
        await served.settle()
    assert seen == ["audit 5"]
    found = _by_name(otel.exporter)
    sends = {_id(s): s for s in found["send shop.double"]}
    processes = found["process shop.double"]
    assert len(sends) == len(processes) == 2
    assert {_parent(p) for p in processes} == set(sends)
    by_kind = {dict(p.attributes or {})["burrow.kind"]: p for p in processes}
    completions = found["send shop.double.completed"]
    assert len(completions) == 2  # pushed to the submitter, and the event
    assert {_parent(c) for c in completions} == {_id(by_kind["submit"])}
    [emit] = found["send shop.doubled"]
    [audit] = found["process shop.audit"]
    assert _parent(audit) == _id(emit)


async def test_a_failed_call_marks_its_spans(otel: Recorded) -> None:
    """A handler's INVALID_ARGUMENT sets ERROR status and error.type on the consumer span and
    on the caller's call span."""
    async with serve(shop([])) as (client, _):
        with pytest.raises(InvalidArgument):
            await client.call("shop.double", {"n": -1})
    found = _by_name(otel.exporter)
    [process] = found["process shop.double"]
    [call] = found["call shop.double"]
    for span in (process, call):
        assert span.status.status_code is StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == "INVALID_ARGUMENT"


async def test_an_http_request_and_the_handler_share_one_trace(
    otel: Recorded,
) -> None:
    """A call made while serving an HTTP request that carried a traceparent continues it: the
    HTTP server span is the call's parent, and the handler's span is in the same trace."""
    provider_tracer = otel.provider.get_tracer("test")
    async with serve(shop([])) as (client, _):

        async def price(request: web.Request) -> web.Response:
            parent = propagate.extract(dict(request.headers))
            with provider_tracer.start_as_current_span(
                "GET /double", context=parent, kind=SpanKind.SERVER
            ):
                reply = await client.call("shop.double", {"n": 21})
            return web.json_response(reply)

        app = web.Application()
        app.router.add_get("/double", price)
        async with TestClient(TestServer(app)) as http:
            with provider_tracer.start_as_current_span("browser", kind=SpanKind.CLIENT):
                headers: dict[str, str] = {}
                propagate.inject(headers)
                response = await http.get("/double", headers=headers)
                assert await response.json() == {"n": 42}
    found = _by_name(otel.exporter)
    [browser], [server], [call], [process] = (
        found["browser"],
        found["GET /double"],
        found["call shop.double"],
        found["process shop.double"],
    )
    assert _parent(server) == _id(browser)
    assert _parent(call) == _id(server)
    traces = {s.context.trace_id for s in (browser, server, call, process) if s.context}
    assert len(traces) == 1


async def test_without_an_sdk_every_message_still_carries_a_trace() -> None:
    """With the API alone (no provider), requests and replies still get a traceparent, and a
    reply continues its request's trace."""
    assert not tracing.recording()
    async with serve(shop([])) as (client, broker):
        await client.call("shop.double", {"n": 1})
        assert broker is not None
        await broker.drain()
    request, reply = (m for m in broker.published if m.kind in ("request", "reply"))
    parent = tracing.parse(request.headers["traceparent"])
    answer = tracing.parse(reply.headers["traceparent"])
    assert parent is not None
    assert answer is not None
    assert tracing.trace_id(parent) == tracing.trace_id(answer)


EXTRACTED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _call_under_extracted_traceparent() -> str:
    """Make a call while a span context extracted from a `traceparent` header is current
    in OpenTelemetry's context; the traceparent the handler saw."""
    seen: list[str | None] = []
    svc = Service("echo")

    @svc.operation()
    async def ping(req: Num) -> Num:
        """Record the trace being handled."""
        seen.append(tracing.current())
        return req

    async with serve(svc) as (client, _):
        token = otel_context.attach(propagate.extract({"traceparent": EXTRACTED}))
        try:
            await client.call("echo.ping", {"n": 1})
        finally:
            otel_context.detach(token)
    [handled] = seen
    assert handled is not None
    return handled


async def test_an_extracted_trace_is_continued_without_an_sdk() -> None:
    """With opentelemetry-api alone, a call made under an extracted traceparent continues its
    trace (the API propagates a remote parent without an SDK)."""
    assert not tracing.recording()
    handled = await _call_under_extracted_traceparent()
    assert tracing.trace_id(handled) == tracing.trace_id(EXTRACTED)


async def test_an_extracted_trace_is_continued_with_an_sdk(otel: Recorded) -> None:
    """With an SDK provider, a call made under an extracted traceparent is a child span of it."""
    handled = await _call_under_extracted_traceparent()
    assert tracing.trace_id(handled) == tracing.trace_id(EXTRACTED)
    [call] = _by_name(otel.exporter)["call echo.ping"]
    assert call.parent is not None
    assert f"{call.parent.span_id:016x}" == tracing.span_id(EXTRACTED)


@pytest.mark.parametrize(
    "value",
    [b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", {"t": 1}, [1, 2], 1.5, 7, b"\xff\xfe", None],
    ids=["bytes", "table", "array", "float", "int", "undecodable-bytes", "void"],
)
async def test_trace_headers_of_any_type_are_answered_with_spans_on(
    otel: Recorded, value: object
) -> None:
    """With an SDK recording, a call carrying a tracestate of any AMQP type is answered (the
    caller's producer span writes its own traceparent); a consumer span started from a
    traceparent and tracestate of any type continues a usable one and starts a trace otherwise."""
    async with serve(shop([])) as (client, _):
        headers = {"traceparent": value, "tracestate": value}
        reply = await client.rpc.call_raw("shop.double", b'{"n": 2}', headers=headers)
    assert reply == b'{"n":4}'
    span = tracing.start_consumer(
        "shop.double",
        {"traceparent": value, "tracestate": value},
        kind="call",
        exchange="",
        routing_key="shop.double",
        queue="q",
        message_id=None,
        correlation_id=None,
        body=b"",
        delivery_tag=1,
    )
    assert span is not None
    span.end("ok", None)
    [direct] = [
        found
        for found in otel.exporter.get_finished_spans()
        if dict(found.attributes or {}).get("messaging.destination.subscription.name") == "q"
    ]
    assert direct.context is not None
    continued = direct.parent is not None and direct.context.trace_id == int("a" * 32, 16)
    assert continued is (isinstance(value, bytes) and value.startswith(b"00-"))
