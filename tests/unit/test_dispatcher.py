"""The dispatcher on the in-memory broker: what each kind of ending publishes and how the
delivery is settled, end to end through a real `App` and `Client`."""

from __future__ import annotations

from typing import Any

import pytest

from service import Model, Service, Settings, Unavailable
from service._protocol.types import Outgoing, Undecodable
from service._protocol.vocabulary import H_DEAD_REASON, H_KIND, Names
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


async def test_call_is_answered_and_acked(serve_app: ServeApp) -> None:
    """A call gets its reply and leaves nothing in the request queue."""
    runs: list[int] = []
    app, client, broker = await serve_app(_work(runs))
    assert await client.call("work.echo", {"n": 3}) == {"n": 3}
    await broker.drain()
    queue = broker.queue(Names(app.settings.namespace).request_queue("work"))
    assert queue.messages == []
    assert queue.unacked == 0
