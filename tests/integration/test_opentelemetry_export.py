"""`burrow run` with the standard OTEL_* variables: spans printed by the console exporter and
sent by OTLP/HTTP to a receiver on loopback, the handler's CONSUMER span a child of the
caller's PRODUCER span."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service import Client, Settings
from tests.conftest import AMQP_URL, Recorded

__all__: list[str] = []


async def _receiver() -> tuple[web.AppRunner, int, list[ExportTraceServiceRequest]]:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port, received


async def test_burrow_run_exports_consumer_spans_parented_by_the_caller(
    settings: Settings, otel: Recorded
) -> None:
    """OTEL_TRACES_EXPORTER=console,otlp: stdout and the OTLP receiver both get the span
    `process calc.add` (CONSUMER) whose parent is this process's `send calc.add` span."""
    runner, port, received = await _receiver()
    env = {
        **os.environ,
        "BURROW_NAMESPACE": settings.namespace,
        "BURROW_AMQP_URL": AMQP_URL,
        "BURROW_HTTP_PORT": "0",
        "BURROW_LOG_LEVEL": "warning",
        "BURROW_QUEUE_TYPE": "classic",
        "OTEL_TRACES_EXPORTER": "console,otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "calc-under-test",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "run",
        "service.example:calc",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with Client(settings) as client:
            for _ in range(150):
                try:
                    await client.call("calc.add", {"a": 1, "b": 1}, timeout=1)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            otel.exporter.clear()
            assert await client.call("calc.add", {"a": 2, "b": 3}) == {"sum": 5}
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(process.communicate(), 30)
        await runner.cleanup()
    [send] = [s for s in otel.exporter.get_finished_spans() if s.name == "send calc.add"]
    assert send.context is not None
    producer_id = f"0x{send.context.span_id:016x}"
    printed = _console_spans(stdout.decode())
    consumers = [s for s in printed if s["name"] == "process calc.add"]
    assert any(
        s["kind"] == "SpanKind.CONSUMER" and s["parent_id"] == producer_id for s in consumers
    )
    exported = [
        span
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert any(
        span.name == "process calc.add" and span.parent_span_id == send.context.span_id.to_bytes(8)
        for span in exported
    )
    names = {
        attribute.value.string_value
        for request in received
        for resource in request.resource_spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert names == {"calc-under-test"}


def _console_spans(text: str) -> list[dict[str, object]]:
    """The JSON objects the console exporter printed (one pretty-printed object per span)."""
    found: list[dict[str, object]] = []
    decoder = json.JSONDecoder()
    index = 0
    while (start := text.find("{", index)) != -1:
        try:
            value, index = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        if isinstance(value, dict) and "context" in value:
            found.append(value)
    return found
