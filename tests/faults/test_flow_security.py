"""Faults E1-E5, F1 and F3 of RELIABILITY.md: resource alarms, nacks, unroutable messages,
revoked permissions, wrong credentials and a deleted user — each an error and a metric.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from service import (
    App,
    BurrowError,
    NotFound,
    PublishFailed,
    ResourceExhausted,
    Unavailable,
)
from service.topology import Names
from service.types import Outgoing
from tests.faults.conftest import MakeClient, MakeLink, RunApp
from tests.faults.harness import (
    FaultProxy,
    Ledger,
    PrivateBroker,
    PublishOutcome,
    assert_calls_sound,
    cast,
    eventually,
    publish_until_confirmed,
    sample,
    tracked_call,
    wait_until,
    work_service,
)

__all__: list[str] = []

_PASSWORD = "Sup3r-S3cret-zq9x"


def _nacked() -> float:
    value = REGISTRY.get_sample_value(
        "burrow_messages_published_total", {"kind": "event", "outcome": "nacked"}
    )
    return value or 0.0


async def test_e3_nacked_publish_is_an_error(
    make_link: MakeLink, amqp_channel: AbstractChannel, namespace: str
) -> None:
    """E3: a publish the broker nacks (queue full, reject-publish) raises and is counted."""
    queue = f"{namespace}.bounded"
    await amqp_channel.declare_queue(
        queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    link = await make_link()

    def message(i: int) -> Outgoing:
        return Outgoing(exchange="", routing_key=queue, body=b"{}", message_id=f"e3-{i}")

    await link.publish(message(0), kind="event", mandatory=True)
    before = _nacked()
    with pytest.raises((ResourceExhausted, PublishFailed)) as caught:
        await link.publish(message(1), kind="event", mandatory=True)
    assert caught.value.retryable
    assert _nacked() == before + 1


async def test_f1_wrong_credentials_fail_fast(
    broker: PrivateBroker, make_client: MakeClient
) -> None:
    """F1: wrong credentials fail fast with an error that says the login was refused."""
    client = await make_client(broker.url_for("guest", _PASSWORD), start=False)
    started = time.monotonic()
    with pytest.raises(BurrowError) as caught:
        await client.start(timeout=8)
    elapsed = time.monotonic() - started
    text = str(caught.value).lower()
    assert "refused the login" in text or "credential" in text or "authentic" in text, text
    assert elapsed < 4, f"took {elapsed:.1f}s: retried until the timeout"


async def test_f1_password_never_logged(
    broker: PrivateBroker,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """F1: failed logins never put the password in a log line, stdout, stderr or the error."""
    client = await make_client(broker.url_for("guest", _PASSWORD), start=False)
    with capture_logs() as logs, pytest.raises(BurrowError) as caught:
        await client.start(timeout=2)
    assert logs, "the failed logins were not logged at all"
    out = capsys.readouterr()
    for where, text in (
        ("structlog", repr(logs)),
        ("stdlib logging", caplog.text),
        ("stdout", out.out),
        ("stderr", out.err),
        ("error", str(caught.value)),
    ):
        assert _PASSWORD not in text, f"password leaked to {where}"


async def _readyz(app: App) -> tuple[int, Any]:
    assert app.http is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.http.port}/readyz") as response,
    ):
        return response.status, await response.json()


async def _resource_alarm(  # noqa: PLR0917 (fixtures)
    raise_alarm: Callable[[], Awaitable[None]],
    clear_alarm: Callable[[], Awaitable[None]],
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    make_client: MakeClient,
    ledger: Ledger,
    namespace: str,
) -> None:
    gate = asyncio.Event()
    app = await run_app(work_service(ledger, gate=gate))
    producer = await make_link()
    client = await make_client()
    held = [f"held-{i}" for i in range(5)]
    for key in held:
        await publish_until_confirmed(producer, ledger, cast(namespace, key), give_up_after=10)
    await wait_until(lambda: set(ledger.started) == set(held), 10, "deliveries held unacked")

    await raise_alarm()
    started = time.monotonic()
    with pytest.raises(PublishFailed) as caught:
        await producer.publish(
            cast(namespace, "in-alarm"), kind="event", mandatory=True, timeout=1.0
        )
    assert caught.value.retryable
    assert time.monotonic() - started < 1.0 + 2.0, "a blocked publish waited past its timeout"
    ledger.record_publish("in-alarm", PublishOutcome.UNKNOWN)  # may still arrive after the alarm
    await wait_until(lambda: producer.blocked, 10, "Link.blocked on the producer")
    assert sample("burrow_amqp_connection_blocked", link="producer") == 1
    # The client's publishes fail within their own timeout, never queue up unboundedly.
    ledger.record_publish("client-in-alarm", PublishOutcome.UNKNOWN)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await client.cast("work.do", {"key": "client-in-alarm"})
    assert time.monotonic() - started < client.settings.publish_timeout + 2.0
    record = await tracked_call(client, 0, deadline=2.0, ledger=ledger)
    assert record.outcome in ("timeout", "error"), record
    assert record.error is not None
    assert record.error.retryable, record

    # Consumers keep consuming and acking on their own (unblocked) connection.
    assert not app.transport.consumer.blocked
    gate.set()
    await ledger.wait_processed(held, 10)
    queue = Names(namespace).commands_queue("work")

    async def acked() -> bool:
        return await broker.queue_counts(queue) == (0, 0)

    await eventually(acked, 15, "the held deliveries acked during the alarm")

    await clear_alarm()
    await wait_until(lambda: not producer.blocked, 15, "the producer unblocked")
    assert sample("burrow_amqp_connection_blocked", link="producer") == 0
    after = [f"after-{i}" for i in range(5)]
    for key in [*after, "in-alarm"]:
        outcome = await publish_until_confirmed(
            producer, ledger, cast(namespace, key), give_up_after=20
        )
        assert outcome is PublishOutcome.CONFIRMED, key
    await ledger.wait_processed([*after, "in-alarm"], 20)
    call = await tracked_call(client, 1, deadline=10, ledger=ledger)
    assert call.outcome == "result", call
    assert_calls_sound([record, call], client)
    await app.wait_ready(10)
    await app.stop()
    names = Names(namespace)
    await ledger.drain(
        broker.url,
        [names.request_queue("work"), names.commands_queue("work")],
        [names.dead_letter_queue("work")],
    )
    summary = ledger.assert_sound()
    # Only the message published in the alarm may arrive twice (its retry and itself).
    assert set(ledger.duplicates()) <= {"in-alarm"}, summary


@pytest.mark.slow
async def test_e1_memory_alarm(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    make_client: MakeClient,
    ledger: Ledger,
    namespace: str,
) -> None:
    """E1: memory alarm: publishes fail within their timeout, Link.blocked and the gauge say
    so, consumers keep acking, everything recovers once the alarm clears."""
    await _resource_alarm(
        lambda: broker.set_vm_memory_high_watermark(0),
        lambda: broker.set_vm_memory_high_watermark(0.4),
        broker, run_app, make_link, make_client, ledger, namespace,
    )  # fmt: skip


@pytest.mark.slow
async def test_e2_disk_alarm(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_link: MakeLink,
    make_client: MakeClient,
    ledger: Ledger,
    namespace: str,
) -> None:
    """E2: disk alarm: the same as the memory alarm."""
    await _resource_alarm(
        lambda: broker.set_disk_free_limit("100000GB"),
        lambda: broker.set_disk_free_limit("1MB"),
        broker, run_app, make_link, make_client, ledger, namespace,
    )  # fmt: skip


async def test_e4_unroutable_event_and_cast_counted(
    run_app: RunApp, make_client: MakeClient, ledger: Ledger
) -> None:
    """E4: an event no queue matches returns False and counts as returned; a cast to no queue
    raises NotFound and counts; neither is silent."""
    await run_app(work_service(ledger))
    client = await make_client()
    events = sample("burrow_messages_published_total", kind="event", outcome="returned")
    assert await client.emit("nobody.listens.e4", {"x": 1}) is False
    assert sample("burrow_messages_published_total", kind="event", outcome="returned") == (
        events + 1
    )
    commands = sample("burrow_messages_published_total", kind="command", outcome="returned")
    with pytest.raises(NotFound):
        await client.cast("ghost.do", {"key": "k"})
    assert sample("burrow_messages_published_total", kind="command", outcome="returned") == (
        commands + 1
    )
    assert client.link.ready.is_set(), "a return must not cost the connection"


async def _close_user_connections(broker: PrivateBroker, *names: str) -> None:
    for name in names:
        await broker.close_connection(name)


@pytest.mark.slow
async def test_e5_permissions_revoked_mid_run(
    broker: PrivateBroker,
    proxy: FaultProxy,
    run_app: RunApp,
    make_client: MakeClient,
    ledger: Ledger,
) -> None:
    """E5: permissions revoked, then the connections drop: the consumer link stops with a
    fatal error naming ACCESS_REFUSED (readiness says so), never a reconnect storm; a restarted
    App works once permissions are back."""
    await broker.add_user("e5", "e5-pass")
    url = broker.url_for("e5", "e5-pass", proxy.port)
    app = await run_app(work_service(ledger), url=url)
    client = await make_client()
    assert (await tracked_call(client, 0, deadline=10)).outcome == "result"
    with capture_logs() as logs:
        await broker.set_permissions("e5", "^$", "^$", "^$")
        await _close_user_connections(broker, "burrow:consumer", "burrow:publisher")
        await wait_until(lambda: not app.health.ready, 10, "readiness false")
        before = proxy.accepted
        await asyncio.sleep(3.0)  # the observation window for a reconnect storm
        attempts = proxy.accepted - before
        status, body = await _readyz(app)
        record = await tracked_call(client, 1, deadline=3)
    consumer = app.transport.consumer
    assert consumer.fatal is not None, "a refused declare must stop the link, not loop"
    assert "ACCESS_REFUSED" in str(consumer.fatal)
    assert status == 503
    assert any("ACCESS_REFUSED" in problem for problem in body["problems"]), body
    assert attempts <= 2, f"{attempts} connection attempts in 3 s after a fatal refusal"
    assert [e for e in logs if e["log_level"] == "error"], "the refusal was not logged as error"
    assert all("e5-pass" not in repr(e) for e in logs)
    assert sample("burrow_consumers_attached", link="consumer") == 0
    assert record.outcome in ("timeout", "error"), record
    await broker.set_permissions("e5", ".*", ".*", ".*")
    await run_app(work_service(ledger), url=url)  # the restart an orchestrator would do
    assert (await tracked_call(client, 2, deadline=10)).outcome == "result"


@pytest.mark.slow
async def test_f3_user_deleted(
    broker: PrivateBroker, proxy: FaultProxy, run_app: RunApp, ledger: Ledger
) -> None:
    """F3: the service's user deleted: connections closed, readiness false, the refused login
    logged without the password, slow retries (no storm), back once the user exists again."""
    await broker.add_user("f3", "f3-pass")
    app = await run_app(work_service(ledger), url=broker.url_for("f3", "f3-pass", proxy.port))
    with capture_logs() as logs:
        await broker.delete_user("f3")
        await wait_until(lambda: not app.health.ready, 10, "readiness false")
        before = proxy.accepted
        await asyncio.sleep(3.0)  # the observation window for a login storm
        attempts = proxy.accepted - before
        status, body = await _readyz(app)
    assert status == 503, body
    assert attempts <= 2 * 3.0 / (app.settings.reconnect_max_delay / 2) + 4, attempts
    assert [e for e in logs if e["event"] == "broker refused the login"], logs[-10:]
    assert all("f3-pass" not in repr(e) for e in logs)
    await broker.add_user("f3", "f3-pass")
    await app.wait_ready(30)
    assert app.health.ready


async def test_f3_readiness_names_the_refused_login(
    broker: PrivateBroker, run_app: RunApp, ledger: Ledger
) -> None:
    """F3: once the user is gone, /readyz names the cause, not just 'not connected'."""
    await broker.add_user("f3r", "f3r-pass")
    app = await run_app(work_service(ledger), url=broker.url_for("f3r", "f3r-pass"))
    await broker.delete_user("f3r")
    await wait_until(lambda: not app.health.ready, 10, "readiness false")
    await asyncio.sleep(1.0)  # a few refused attempts; nothing to await
    status, body = await _readyz(app)
    assert status == 503
    assert any("login" in p or "refused" in p for p in body["problems"]), body
