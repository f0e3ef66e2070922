"""cast over the real broker: fire-and-forget commands are processed once and acked, and a
command whose handler fails is parked in the service's dead-letter queue with its reason.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
import structlog.testing

from service import Client, Context, Model, NotFound, Service
from service._protocol.vocabulary import Names
from service._serving.dead_letters import DeadLetterTool, json_line
from tests.conftest import AppFactory
from tests.integration.test_async_support import (
    Recorder,
    body_json,
    dead_error,
    dead_reason,
    next_dead_letter,
    queue_depth,
)


class Note(Model):
    """A command carrying a bit of text."""

    text: str


class Done(Model):
    """Nothing worth returning (a cast's reply goes nowhere)."""


def make_notes(recorder: Recorder) -> Service:
    """A fresh `notes` service whose handlers record (message id, text, redelivered)."""
    notes = Service("notes")

    async def write(req: Note, ctx: Context) -> Done:
        """Record the command."""
        recorder.add((ctx.message_id, req.text, ctx.redelivered))
        return Done()

    async def explode(req: Note, ctx: Context) -> Done:
        """Record the command, then fail with an internal detail."""
        recorder.add((ctx.message_id, req.text, ctx.redelivered))
        raise RuntimeError("disk /var/secret is on fire")

    notes.add_operation(write)
    notes.add_operation(explode)
    return notes


async def test_cast_is_processed_exactly_once(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """Each cast runs its handler once, with its message id, and is acked (nothing left over)."""
    recorder = Recorder()
    app = await start_app(make_notes(recorder))

    ids = [await client.cast("notes.write", {"text": f"n{i}"}) for i in range(3)]

    await recorder.wait_for(3)
    # Stopping settles what is in flight; an unacked delivery would return to the queue.
    await app.stop()
    assert await queue_depth(amqp_channel, Names(namespace).commands_queue("notes")) == 0
    assert sorted(recorder.items) == sorted((mid, f"n{i}", False) for i, mid in enumerate(ids))
    assert len({item[0] for item in recorder.items}) == 3


async def test_failing_cast_is_dead_lettered_with_reason(
    start_app: AppFactory,
    client: Client,
    amqp_channel: aio_pika.abc.AbstractChannel,
    namespace: str,
) -> None:
    """A cast whose handler raises lands once in `<ns>.notes.dlq` with reason `failed`."""
    recorder = Recorder()
    app = await start_app(make_notes(recorder))
    names = Names(namespace)

    message_id = await client.cast("notes.explode", {"text": "boom"})

    dead = await next_dead_letter(amqp_channel, names.dead_letter_queue("notes"))
    assert dead_reason(dead) == "failed"
    assert dead.message_id == message_id
    assert body_json(dead) == {"text": "boom"}
    error = dead_error(dead)
    assert error["code"] == "INTERNAL"
    assert "secret" not in error["message"]
    await app.stop()
    assert recorder.items == [(message_id, "boom", False)]  # run once, never looped
    assert await queue_depth(amqp_channel, names.commands_queue("notes")) == 0
    assert await queue_depth(amqp_channel, names.dead_letter_queue("notes")) == 0


async def test_a_crashed_cast_and_its_log_line_find_each_other(
    start_app: AppFactory, client: Client
) -> None:
    """The `handler raised` line carries the message, correlation, trace and span ids; the
    parked letter, as `burrow dlq show` prints it, names the exception type and has the same
    message id and trace id (and no word of the exception's message)."""
    recorder = Recorder()
    app = await start_app(make_notes(recorder))
    tool = DeadLetterTool(app.settings, "notes")
    with structlog.testing.capture_logs() as logs:
        message_id = await client.cast("notes.explode", {"text": "boom"})
        for _ in range(200):
            if await tool.list():
                break
            await asyncio.sleep(0.05)
    [raised] = [entry for entry in logs if entry["event"] == "handler raised"]
    assert raised["message_id"] == message_id
    assert raised["trace_id"]
    assert raised["span_id"]
    assert "correlation_id" in raised
    [letter] = await tool.show([message_id])
    shown = letter.detail()
    assert shown["error"]["code"] == "INTERNAL"
    expected = {"exception": "RuntimeError", "trace_id": raised["trace_id"]}
    assert shown["error"]["details"] == expected
    assert raised["trace_id"] in shown["headers"]["traceparent"]
    assert "secret" not in json_line(shown["error"])


async def test_cast_where_no_service_ever_ran_is_not_found(client: Client) -> None:
    """A cast into a namespace with no exchanges yet raises NotFound, not a retryable error."""
    with pytest.raises(NotFound):
        await client.cast("notes.write", {"text": "nobody home"})
