"""traceparent travels from a caller through the handler to the reply and emitted events."""

from __future__ import annotations

import asyncio

import aio_pika

from service import Client, Context, Model, Service
from service._protocol import tracing
from tests.conftest import AppFactory

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Ping(Model):
    """Anything."""

    n: int


async def test_trace_propagates_to_handler_reply_and_events(
    start_app: AppFactory, client: Client, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """The handler, its emitted event and onward context all carry the caller's trace id."""
    seen: list[str | None] = []
    svc = Service("tracer")
    svc.event("tracer.pinged", Ping)

    @svc.operation()
    async def ping(req: Ping, ctx: Context) -> Ping:
        seen.append(tracing.trace_id(tracing.current()))
        await ctx.emit("tracer.pinged", req)
        return req

    app = await start_app(svc)
    events = await amqp_channel.declare_queue("", exclusive=True)
    await events.bind(f"{app.settings.namespace}.events", "tracer.pinged")
    token = tracing.activate(TRACE)
    try:
        assert await client.call("tracer.ping", {"n": 1}) == {"n": 1}
    finally:
        tracing.deactivate(token)
    assert seen == [tracing.trace_id(TRACE)]
    event = await asyncio.wait_for(_get(events), 5)
    assert tracing.trace_id(str(event.headers[tracing.HEADER])) == tracing.trace_id(TRACE)


async def _get(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.02)
