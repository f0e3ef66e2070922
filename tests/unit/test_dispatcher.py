"""The dispatcher on the in-memory broker: what each kind of ending publishes and how the
delivery is settled, end to end through a real `App` and `Client`."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from service import Context, Model, Service, Settings, Unavailable
from service._protocol.types import Delivery, Outgoing, Undecodable
from service._protocol.vocabulary import H_DEAD_ERROR, H_DEAD_REASON, H_KIND, Names
from service._serving.dead_letters import DeadLetter
from service.testing import InMemoryBroker
from tests.unit.conftest import ServeApp

__all__: list[str] = []


class Job(Model):
    """Work to do."""

    n: int


def _work(runs: list[int]) -> Service:
    svc = Service("work")

    @svc.operation()
    async def flaky(req: Job) -> Job:
        """Fail retryably, always."""
        runs.append(req.n)
        raise Unavailable("the database is away")

    @svc.operation()
    async def echo(req: Job) -> Job:
        """Answer the job."""
        runs.append(req.n)
        return req

    return svc


def _dlq(broker: InMemoryBroker, settings: Settings) -> list[Any]:
    return broker.queue(Names(settings.namespace).dead_letter_queue("work")).messages


async def test_retryable_cast_is_retried_then_parked(
    serve_app: ServeApp, settings: Settings
) -> None:
    """A cast failing retryably runs max_retries + 1 times, then is parked retries_exhausted."""
    runs: list[int] = []
    _, client, broker = await serve_app(_work(runs), max_retries=2, retry_base_delay=0.01)
    await client.cast("work.flaky", {"n": 1})
    await broker.drain()
    assert runs == [1, 1, 1]
    [letter] = _dlq(broker, settings)
    assert letter.headers[H_DEAD_REASON] == "retries_exhausted"
    retries = [m for m in broker.published if m.kind == "retry"]
    assert len(retries) == 2


async def test_oversize_cast_is_rejected_to_the_queue_dlx(
    serve_app: ServeApp, settings: Settings
) -> None:
    """A cast above the body limit is not copied: rejected, the broker dead-letters it whole."""
    runs: list[int] = []
    _, client, broker = await serve_app(_work(runs), max_body_bytes=1024)
    names = Names(settings.namespace)
    body = b'{"n": 1, "pad": "' + b"x" * 2000 + b'"}'
    await client.link.publish(
        Outgoing(
            names.commands_exchange,
            "work.echo",
            body,
            message_id="big",
            type="work.echo",
            headers={H_KIND: "cast"},
        ),
        kind="command",
        mandatory=True,
        check_size=False,
    )
    await broker.drain()
    assert runs == []
    [letter] = _dlq(broker, settings)
    assert letter.body == body
    assert H_DEAD_REASON not in letter.headers
    assert not [m for m in broker.published if m.kind == "dead_letter"]


async def test_undecodable_cast_is_parked_with_its_reason(
    serve_app: ServeApp, settings: Settings
) -> None:
    """A cast with an undecodable header name never runs and is parked as undecodable."""
    runs: list[int] = []
    _, client, broker = await serve_app(_work(runs))
    names = Names(settings.namespace)
    await client.link.publish(
        Outgoing(
            names.commands_exchange,
            "work.echo",
            b'{"n": 1}',
            message_id="odd",
            type="work.echo",
            headers={Undecodable.of(b"\xffname", "short string is not UTF-8"): 1},
        ),
        kind="command",
        mandatory=True,
    )
    await broker.drain()
    assert runs == []
    [letter] = _dlq(broker, settings)
    assert letter.headers[H_DEAD_REASON] == "undecodable"
    assert letter.message_id == "odd"


async def test_a_dispatch_bug_parks_instead_of_requeueing(
    serve_app: ServeApp, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If settling itself fails (a bug), the message is parked as internal, not requeued."""
    runs: list[int] = []
    app, client, broker = await serve_app(_work(runs))
    [dispatcher] = app.servers

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in planning")

    monkeypatch.setattr(dispatcher, "_plan", broken)
    await client.cast("work.echo", {"n": 7})
    await broker.drain()
    assert runs == [7]  # ran once, never again
    [letter] = _dlq(broker, settings)
    assert letter.headers[H_DEAD_REASON] == "internal"


async def test_a_crashed_handler_and_its_dead_letter_find_each_other(
    serve_app: ServeApp, settings: Settings
) -> None:
    """A cast whose handler raises KeyError: the `handler raised` line has the ids, and the
    dead letter (as `burrow dlq show` reads it) names the exception and carries the same
    message id and trace id."""
    svc = Service("crash")

    @svc.operation()
    async def boom(req: Job) -> Job:
        """Fail with a bug."""
        raise KeyError("secret")

    _, client, broker = await serve_app(svc)
    with capture_logs() as logs:
        sent = await client.cast("crash.boom", {"n": 1})
        await broker.drain()
    [raised] = [entry for entry in logs if entry["event"] == "handler raised"]
    [parked] = broker.queue(Names(settings.namespace).dead_letter_queue("crash")).messages
    letter = DeadLetter.from_delivery(
        Delivery(body=parked.body, routing_key="", message_id=parked.message_id,
                 headers=parked.headers),
        full=True,
    )  # fmt: skip
    shown = letter.detail()
    assert shown["message_id"] == raised["message_id"] == sent
    assert shown["error"]["code"] == "INTERNAL"
    assert shown["error"]["details"] == {"exception": "KeyError", "trace_id": raised["trace_id"]}
    assert raised["trace_id"] in shown["headers"]["traceparent"]
    assert "secret" not in parked.headers[H_DEAD_ERROR]


async def test_every_dispatcher_line_about_a_message_carries_its_ids(
    serve_app: ServeApp, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line of a dispatch bug and of a requeue after a failed publish carry the message's
    ids, like the `handled` line."""
    runs: list[int] = []
    app, client, broker = await serve_app(_work(runs))
    [dispatcher] = app.servers

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in planning")

    with capture_logs() as logs, monkeypatch.context() as patch:
        patch.setattr(dispatcher, "_plan", broken)
        sent = await client.cast("work.echo", {"n": 7})
        await broker.drain()
    [bug] = [entry for entry in logs if entry["event"] == "dispatch failed; dead-lettering"]
    assert bug["message_id"] == sent
    assert bug["trace_id"]
    assert bug["span_id"]
    assert "correlation_id" in bug

    publish, failed = dispatcher._publish, list[Any]()

    async def away_once(step: Any) -> None:
        if not failed:
            failed.append(step)
            raise Unavailable("the broker is away")
        await publish(step)

    with capture_logs() as logs, monkeypatch.context() as patch:
        patch.setattr(dispatcher, "_publish", away_once)
        assert await client.call("work.echo", {"n": 8}) == {"n": 8}  # answered once requeued
        await broker.drain()
    [requeued] = [entry for entry in logs if entry["event"] == "publish failed; requeueing"]
    handled = [entry for entry in logs if entry["event"] == "handled"]
    assert requeued["message_id"] == handled[-1]["message_id"]
    assert requeued["correlation_id"] == handled[-1]["correlation_id"] != ""
    assert requeued["trace_id"] == handled[-1]["trace_id"]


async def test_call_is_answered_and_acked(serve_app: ServeApp) -> None:
    """A call gets its reply and leaves nothing in the request queue."""
    runs: list[int] = []
    app, client, broker = await serve_app(_work(runs))
    assert await client.call("work.echo", {"n": 3}) == {"n": 3}
    await broker.drain()
    queue = broker.queue(Names(app.settings.namespace).request_queue("work"))
    assert queue.messages == []
    assert queue.unacked == 0


async def test_operation_without_reply_model_answers_an_empty_object(
    serve_app: ServeApp,
) -> None:
    """A `-> None` operation runs for a cast, answers a call with `{}` and completes a submit
    with `{}`."""
    noted: list[int] = []
    svc = Service("notes")

    @svc.operation()
    async def note(req: Job) -> None:
        """Record the job."""
        noted.append(req.n)

    _, client, broker = await serve_app(svc)
    await client.cast("notes.note", {"n": 1})
    assert await client.call("notes.note", {"n": 2}) == {}
    job = await client.submit("notes.note", {"n": 3})
    assert await job.result(timeout=5) == {}
    await broker.drain()
    assert sorted(noted) == [1, 2, 3]


async def test_a_retried_event_shows_its_event_name_as_routing_key(
    serve_app: ServeApp,
) -> None:
    """An event retried through the default exchange (keyed by its queue, as a replayed one
    is) still shows the event name in `ctx.routing_key`."""
    seen: list[str] = []
    svc = Service("audit")

    @svc.subscribe("orders.#", retries=2)
    async def record(event: Job, ctx: Context) -> None:
        seen.append(ctx.routing_key)
        if len(seen) == 1:
            raise Unavailable("the ledger is away")

    _, client, broker = await serve_app(svc, retry_base_delay=0.01)
    assert await client.emit("orders.created", {"n": 1})
    await broker.drain()
    assert seen == ["orders.created", "orders.created"]
    retried = [m for m in broker.published if m.kind == "retry"]
    assert [m.routing_key for m in retried] == [client.names.subscription_queue("audit", "record")]
