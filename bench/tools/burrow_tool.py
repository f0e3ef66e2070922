"""Burrow as its users run it: `App` serving `service.example:calc`, `Client.call` calling it.

Events (W3) go through the public API too: `Client.emit` on the producer, and on the consumer an
`App` serving a `Service` whose `subscribe` handler takes a pydantic model. W6 uses
`Client.submit` and `Job.result`. The transport-only events row is `burrow_link_tool`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench.common import AMQP_URL, EVENT_KEY, EVENT_PATTERN, event_payload
from bench.tools import Caller, Closer, Publisher, Submitter, Waiter
from service import App, Client, Model, Service, Settings, load_settings
from service._observe.log import configure_logging
from service.example import calc

__all__ = [
    "OrderEvent",
    "settings_for",
    "serve",
    "open_caller",
    "open_submitter",
    "consume",
    "open_publisher",
]

RESULT_TIMEOUT = 120.0


class OrderEvent(Model):
    """The benchmark event, validated on receipt as a Burrow subscriber would."""

    seq: int
    kind: str
    order: str
    note: str


def settings_for(ns: str, queue_type: str, prefetch: int = 64) -> Settings:
    """The settings of every Burrow row: the tool's namespace, warning level, no HTTP port."""
    return load_settings(
        amqp_url=AMQP_URL,
        namespace=ns,
        queue_type=queue_type,
        prefetch=prefetch,
        log_level="warning",
        http_port=0,
        http_host="127.0.0.1",
    )


async def _serve_app(app: App, stop: asyncio.Event, ready: Callable[[], None]) -> None:
    await app.start()
    await app.wait_ready(30)
    ready()
    await stop.wait()
    await app.stop()


async def _client(ns: str, queue_type: str) -> Client:
    settings = settings_for(ns, queue_type)
    configure_logging(settings.log_format, settings.log_level)
    client = Client(settings)
    await client.start(timeout=30)
    return client


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Serve calc until `stop` is set."""
    settings = settings_for(ns, queue_type, prefetch)
    configure_logging(settings.log_format, settings.log_level)
    await _serve_app(App(calc, settings=settings), stop, ready)


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """A connected Client and a call that adds two integers."""
    client = await _client(ns, queue_type)

    async def call(a: int, b: int) -> int:
        reply: dict[str, Any] = await client.call("calc.add", {"a": a, "b": b})
        return int(reply["sum"])

    return call, client.close


async def open_submitter(ns: str, queue_type: str) -> tuple[Submitter, Closer]:
    """A connected Client: `submit` returns once the broker confirmed the job (a `Job`)."""
    client = await _client(ns, queue_type)

    async def submit(a: int, b: int) -> Waiter:
        job = await client.submit("calc.add", {"a": a, "b": b})

        async def result() -> int:
            reply: dict[str, Any] = await job.result(timeout=RESULT_TIMEOUT)
            return int(reply["sum"])

        return result

    return submit, client.close


async def consume(
    ns: str,
    queue_type: str,
    *,
    prefetch: int,
    on_event: Callable[[], None],
    stop: asyncio.Event,
    ready: Callable[[], None],
) -> None:
    """An App serving a service that subscribes to order events, until `stop` is set."""
    settings = settings_for(ns, queue_type, prefetch)
    configure_logging(settings.log_format, settings.log_level)
    audit = Service("audit", description="Audits every order event (the W3 consumer).")

    @audit.subscribe(EVENT_PATTERN)
    async def orders(event: OrderEvent) -> None:
        """Count the event (acked by Burrow once this returns)."""
        on_event()

    await _serve_app(App(audit, settings=settings), stop, ready)


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """A connected Client emitting order events (each returns at its confirm)."""
    client = await _client(ns, queue_type)

    async def publish(seq: int) -> None:
        if not await client.emit(EVENT_KEY, OrderEvent.model_validate(event_payload(seq))):
            raise AssertionError(f"{EVENT_KEY} reached no subscriber queue")

    return publish, client.close
