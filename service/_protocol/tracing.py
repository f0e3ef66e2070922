"""Trace context across every hop, the OpenTelemetry way when an SDK is installed.

On the wire: W3C `traceparent` (and `tracestate`) headers, through OpenTelemetry's propagators.
With an SDK configured (`configure_from_env`: `OTEL_TRACES_EXPORTER=console|otlp`, or the
application's own `TracerProvider`), each call, publish and handled message is a span named and
attributed by the OpenTelemetry messaging conventions for RabbitMQ: a PRODUCER span per publish
(a call's lasts until its reply), a CONSUMER span per handled message, its parent the
producer's; a call made inside an instrumented HTTP request continues that request's trace.

Without an SDK (`opentelemetry-api` alone is a no-op) Burrow still carries the trace: every
message it sends gets a `traceparent`, a child of the one being handled or of the span context
current in OpenTelemetry's context (a new trace when neither), kept in a context variable so a
`Client` used inside a handler continues it.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service._protocol.errors import ConfigError
from service._protocol.vocabulary import H_TRACEPARENT

# What users call on `service.tracing` (the rest is used inside the package).
__all__ = ["configure_from_env", "current", "span_id", "trace_id", "use"]

HEADER = H_TRACEPARENT
_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_current: ContextVar[str | None] = ContextVar("burrow_traceparent", default=None)
_tracer = trace.get_tracer("burrow")
_recording: bool | None = None  # an SDK's TracerProvider is installed (None: not looked yet)
_tracer_override = False  # `use` gave a provider of its own
SYSTEM = "rabbitmq"


def parse(value: object) -> str | None:
    """A valid traceparent header value, or None (hostile or malformed input is dropped)."""
    if not isinstance(value, str | bytes):
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    match = _FORMAT.match(text)
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return text


def child(parent: str | None) -> str:
    """A traceparent for an outgoing message: same trace, new span (a new trace if none)."""
    span = f"{random.getrandbits(64) or 1:016x}"  # ids, not secrets: no syscall per message
    if parent is None:
        return f"00-{random.getrandbits(128) or 1:032x}-{span}-01"
    return f"{parent[:36]}{span}{parent[52:]}"


def current() -> str | None:
    """The traceparent of what this task is doing: its current span, else the message being
    handled. The span is OpenTelemetry's current one, with or without an SDK: with the API
    alone it is the non-recording span of a context that an instrumentation (or the user)
    extracted and attached, whose trace the API says must still propagate."""
    found = _traceparent(trace.get_current_span())
    if found is not None:
        return found
    return _current.get()


def activate(traceparent: str | None) -> Token[str | None]:
    """Make `traceparent` current for this task (until `deactivate`)."""
    return _current.set(traceparent)


def deactivate(token: Token[str | None]) -> None:
    """Restore the trace that was current before `activate`."""
    _current.reset(token)


def trace_id(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a traceparent, for log lines."""
    return traceparent[3:35] if traceparent else None


def span_id(traceparent: str | None) -> str | None:
    """The 16-hex span (parent) id of a traceparent, for log lines."""
    return traceparent[36:52] if traceparent else None


def recording() -> bool:
    """Whether spans are recorded: an OpenTelemetry SDK's `TracerProvider` is installed.

    Looked up once (the lookup reads the environment) and again at every `refresh`, which
    `App.start` and `Client.start` call: set a global provider before starting them.
    """
    if _recording is None:
        return refresh()
    return _recording


def refresh() -> bool:
    """Look again whether a global SDK `TracerProvider` was installed; the answer."""
    global _recording  # noqa: PLW0603 - one flag, refreshed at start
    if _tracer_override:
        _recording = True
    else:
        provider = trace.get_tracer_provider()
        _recording = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _recording


def use(provider: trace.TracerProvider | None) -> None:
    """Record Burrow's spans with `provider` instead of the global one (None: back to the
    global provider), e.g. an SDK provider with an in-memory exporter in a test."""
    global _tracer, _tracer_override  # noqa: PLW0603
    _tracer_override = provider is not None
    _tracer = trace.get_tracer("burrow") if provider is None else provider.get_tracer("burrow")
    refresh()


def _traceparent(span: Span) -> str | None:
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads propagation headers as AMQP delivers them: text, or UTF-8 bytes (a byte array)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


_GETTER = _HeaderGetter()


def _attributes(
    operation: str,
    *,
    exchange: str,
    routing_key: str,
    message_id: str | None,
    correlation_id: str | None,
    body: bytes,
) -> dict[str, Any]:
    """The messaging semantic-convention attributes of a RabbitMQ message."""
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": "publish" if operation == "send" else operation,
        "messaging.destination.name": exchange or "amq.default",
        "messaging.rabbitmq.destination.routing_key": routing_key[:255],
        "messaging.message.body.size": len(body),
    }
    if message_id:
        attributes["messaging.message.id"] = message_id[:128]
    if correlation_id:
        attributes["messaging.message.conversation_id"] = correlation_id[:128]
    return attributes


class ActiveSpan:
    """A span made current (a handled message's CONSUMER span, a call's CLIENT span) until
    `end`."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self._token = token

    def end(self, outcome: str, error_code: str | None) -> None:
        """Record how it ended (an error code sets the span's status), then close it."""
        span = self.span
        span.set_attribute("burrow.outcome", outcome)
        if error_code is not None:
            span.set_attribute("error.type", error_code)
            span.set_status(Status(StatusCode.ERROR, error_code))
        otel_context.detach(self._token)  # type: ignore[arg-type]
        span.end()


def start_consumer(
    name: str,
    headers: Mapping[str, Any],
    *,
    kind: str,
    exchange: str,
    routing_key: str,
    queue: str,
    message_id: str | None,
    correlation_id: str | None,
    body: bytes,
    delivery_tag: int,
) -> ActiveSpan | None:
    """Start the CONSUMER span `process <name>`, its parent the sender's (from `headers`), and
    make it current; None when spans are not recorded."""
    if not recording():
        return None
    parent = propagate.extract(headers, getter=_GETTER)
    attributes = _attributes(
        "process",
        exchange=exchange,
        routing_key=routing_key,
        message_id=message_id,
        correlation_id=correlation_id,
        body=body,
    )
    attributes["messaging.destination.subscription.name"] = queue
    attributes["messaging.rabbitmq.message.delivery_tag"] = delivery_tag
    attributes["burrow.kind"] = kind
    span = _tracer.start_span(
        f"process {name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return ActiveSpan(span, token)


def start_call(route: str) -> ActiveSpan | None:
    """Start the CLIENT span `call <route>` (publish and wait for the reply; its request's
    PRODUCER span is a child) and make it current; None when spans are not recorded."""
    if not recording():
        return None
    attributes = {"messaging.system": SYSTEM, "rpc.system": "burrow", "rpc.method": route}
    span = _tracer.start_span(f"call {route}", kind=SpanKind.CLIENT, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span))
    return ActiveSpan(span, token)


def resume(headers: Mapping[str, Any]) -> object | None:
    """Make the trace that `headers` carry current (a forwarded message's next hop is a child
    of its sender); a token for `leave`, or None when spans are not recorded."""
    if not recording():
        return None
    return otel_context.attach(propagate.extract(headers, getter=_GETTER))


def leave(token: object | None) -> None:
    """Undo `resume`."""
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


def start_producer(
    name: str,
    headers: dict[str, Any],
    *,
    kind: str,
    exchange: str,
    routing_key: str,
    message_id: str | None,
    correlation_id: str | None,
    body: bytes,
) -> Span | None:
    """Start the PRODUCER span `send <name>` (a child of the current span) and write its
    context into `headers` (`traceparent`, `tracestate`); None when spans are not recorded
    (the headers keep the traceparent they have)."""
    if not recording():
        return None
    attributes = _attributes(
        "send",
        exchange=exchange,
        routing_key=routing_key,
        message_id=message_id,
        correlation_id=correlation_id,
        body=body,
    )
    attributes["burrow.kind"] = kind
    span = _tracer.start_span(f"send {name}", kind=SpanKind.PRODUCER, attributes=attributes)
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return span


def end_producer(span: Span | None, error: BaseException | None = None) -> None:
    """Close a producer span; a failed publish or call sets its status."""
    if span is None:
        return
    if error is not None:
        code = getattr(getattr(error, "code", None), "value", None) or type(error).__name__
        span.set_attribute("error.type", str(code))
        span.set_status(Status(StatusCode.ERROR, str(code)))
    span.end()


def configure_from_env(service_name: str) -> Any:
    """Install an SDK `TracerProvider` from the standard `OTEL_*` variables when
    `OTEL_TRACES_EXPORTER` names exporters (`console`, `otlp`…) and the SDK is installed
    (`pip install 'burrow[otel]'`); return it (to shut down, which flushes), else None.

    `OTEL_SERVICE_NAME` (default: `service_name`), `OTEL_RESOURCE_ATTRIBUTES` and the
    exporters' own `OTEL_EXPORTER_*` variables apply as the SDK defines them.
    """
    names = [
        name.strip()
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip() and name.strip() != "none"
    ]
    if not names or recording():
        return None
    try:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - optional
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not installed: "
            "pip install 'burrow[otel]'"
        ) from None
    resource = Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    )
    provider = TracerProvider(resource=resource)
    for exporter in _exporters(names):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    refresh()
    return provider


def _exporters(names: Iterable[str]) -> list[Any]:
    from importlib.metadata import entry_points  # noqa: PLC0415

    available = {point.name: point for point in entry_points(group="opentelemetry_traces_exporter")}
    found = []
    for name in names:
        point = available.get(name)
        if point is None and name == "otlp":  # the HTTP exporter alone registers under its own
            point = available.get("otlp_proto_http")
        if point is None:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: no exporter {name!r} installed "
                f"(installed: {', '.join(sorted(available)) or 'none'})"
            )
        found.append(point.load()())
    return found
