"""cast over the real broker: fire-and-forget commands are processed once and acked, and a
command whose handler fails is parked in the service's dead-letter queue with its reason.
"""

from __future__ import annotations

import aio_pika
import pytest

from service import Client, Context, Model, NotFound, Service
from service._protocol.vocabulary import Names
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


async def test_cast_where_no_service_ever_ran_is_not_found(client: Client) -> None:
    """A cast into a namespace with no exchanges yet raises NotFound, not a retryable error."""
    with pytest.raises(NotFound):
        await client.cast("notes.write", {"text": "nobody home"})
