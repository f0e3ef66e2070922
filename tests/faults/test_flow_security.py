"""Faults E1-E5 and F1-F4 of RELIABILITY.md: resource alarms, nacks, unroutable messages,
revoked permissions, wrong, rotated and deleted credentials, and TLS — each an error and a metric.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from service import (
    App,
    BurrowError,
    ConfigError,
    NotFound,
    PublishFailed,
    ResourceExhausted,
    Unavailable,
)
from service._protocol.types import Outgoing
from service._protocol.vocabulary import Names
from tests.faults.conftest import MakeClient, MakeLink, RunApp, make_settings
from tests.faults.harness import (
    FaultProxy,
    Ledger,
    PrivateBroker,
    PublishOutcome,
    assert_calls_sound,
    cast,
    drain_service,
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
    summary = await drain_service(broker.url, ledger, namespace)
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


# -- F2: credentials rotated -------------------------------------------------------------------


async def test_f2_password_rotated_picked_up_on_reconnect(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    ledger: Ledger,
    namespace: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """F2: the password rotated on the broker, the App's connections closed: its reconnects are
    refused (slowly retried) until the secret file holds the new password, which it then reads
    and serves calls again; nothing lost, neither password in any log."""
    old, new = "F2-old-pw-7kq3z", "F2-new-pw-9xv5m"
    await broker.add_user("f2", old)
    secret = tmp_path / "amqp-password"
    secret.write_text(f"{old}\n")
    client = await make_client()  # guest: untouched by the rotation
    with capture_logs() as logs:
        app = await run_app(
            work_service(ledger),
            url=f"amqp://f2@127.0.0.1:{broker.port}/",
            amqp_password_file=str(secret),
        )
        reconnects = sample("burrow_amqp_reconnects_total", link="consumer")
        records = [await tracked_call(client, i, deadline=10, ledger=ledger) for i in range(3)]

        await broker.change_password("f2", new)
        assert await broker.close_user_connections("f2") == 2  # consumer and publisher
        await wait_until(
            lambda: any(e["event"] == "broker refused the login" for e in logs),
            10,
            "a reconnect refused with the old password",
        )
        assert not app.health.ready
        assert app.transport.consumer.fatal is None, "a rotation must not stop a running App"
        secret.write_text(f"{new}\n")  # the orchestrator updates the mounted secret
        await app.wait_ready(20)
        records += [await tracked_call(client, i, deadline=10, ledger=ledger) for i in (3, 4, 5)]

    assert [r.outcome for r in records] == ["result"] * 6, records
    assert_calls_sound(records, client)
    assert sample("burrow_amqp_reconnects_total", link="consumer") > reconnects
    users = {
        c["name"]: c["user"]
        for c in await broker.connection_details()
        if c["name"] in ("burrow:consumer", "burrow:publisher")
    }
    assert users == {"burrow:consumer": "f2", "burrow:publisher": "f2"}, users
    await app.stop()
    await drain_service(broker.url, ledger, namespace)
    out = capsys.readouterr()
    for where, text in (
        ("structlog", repr(logs)),
        ("stdlib logging", caplog.text),
        ("stdout", out.out),
        ("stderr", out.err),
    ):
        assert old not in text, f"old password leaked to {where}"
        assert new not in text, f"new password leaked to {where}"


# -- F4: TLS -------------------------------------------------------------------------------------


async def test_f4_tls_verified_call_round_trip(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    run_app: RunApp,
    make_client: MakeClient,
    make_link: MakeLink,
    ledger: Ledger,
    namespace: str,
) -> None:
    """F4: an App (offering a client certificate), a Client and a producer over verified
    amqps:// serve calls and casts with nothing lost, and the broker holds each of their
    connections as TLS on its TLS port."""
    assert broker.tls is not None
    client_cert = {
        "tls_cert_file": str(broker.tls.client_cert),
        "tls_key_file": str(broker.tls.client_key),
    }
    app = await run_app(
        work_service(ledger), url=broker.tls_url, tls_ca_file=broker.ca_file, **client_cert
    )
    client = await make_client(broker.tls_url, tls_ca_file=broker.ca_file, tls_required=True)
    producer = await make_link(url=broker.tls_url, tls_ca_file=broker.ca_file)

    records = list(
        await asyncio.gather(
            *(tracked_call(client, i, deadline=10, ledger=ledger) for i in range(10))
        )
    )
    casts = [f"tls-cast-{i}" for i in range(10)]
    for key in casts:
        outcome = await publish_until_confirmed(
            producer, ledger, cast(namespace, key), give_up_after=10
        )
        assert outcome is PublishOutcome.CONFIRMED, key
    await ledger.wait_processed(casts, 10)
    assert [r.outcome for r in records] == ["result"] * 10, records
    assert_calls_sound(records, client)

    seen = {c["name"]: c for c in await broker.connection_details()}
    ours = ("burrow:consumer", "burrow:publisher", "burrow:client", "burrow:producer")
    for name in ours:
        assert name in seen, f"no {name} connection on the broker: {sorted(seen)}"
        assert seen[name]["ssl"] is True, seen[name]
        assert seen[name]["port"] == broker.tls_port, seen[name]
    client_subject = "CN=burrow-test-client"
    assert seen["burrow:consumer"]["peer_cert_subject"] == client_subject, seen["burrow:consumer"]
    assert not seen["burrow:client"]["peer_cert_subject"]  # no client certificate configured

    await app.stop()
    await drain_service(broker.url, ledger, namespace)


async def _tls_refused(
    broker: PrivateBroker, make_client: MakeClient, **settings: Any
) -> tuple[ConfigError, list[MutableMapping[str, Any]]]:
    """Start a Client over amqps:// through a proxy in front of the TLS port, check it failed
    at once, without retrying and only ever speaking TLS; return the error and the log."""
    proxy = FaultProxy(broker.tls_port)
    await proxy.start()
    try:
        host = settings.pop("host", "localhost")
        url = broker.tls_url_for("guest", "guest", host=host, port=proxy.port)
        client = await make_client(url, start=False, **settings)
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(ConfigError) as caught:
            await client.start(timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"took {elapsed:.1f}s: a TLS failure must not wait for a timeout"
        assert client.link.fatal is caught.value
        accepted = proxy.accepted
        await asyncio.sleep(1.0)  # the observation window for retries after a fatal error
        assert proxy.accepted == accepted == 1, f"{proxy.accepted} connection attempts"
        # Only TLS handshakes (record type 0x16) crossed: never an AMQP header in clear.
        assert proxy.openings, "the client never sent anything"
        assert all(opening.startswith(b"\x16\x03") for opening in proxy.openings), proxy.openings
    finally:
        await proxy.close()
    return caught.value, logs


@pytest.mark.parametrize("trusted", ["other CA", "system CAs"])
async def test_f4_unknown_ca_refused_clearly(
    broker: PrivateBroker, make_client: MakeClient, trusted: str
) -> None:
    """F4: a broker certificate from a CA not trusted (another CA's file, or the system CAs)
    fails the start at once with 'TLS verification failed'; no retry, never plaintext."""
    assert broker.tls is not None
    ca_file = str(broker.tls.other_ca_file) if trusted == "other CA" else None
    error, logs = await _tls_refused(broker, make_client, tls_ca_file=ca_file)
    text = str(error)
    assert "TLS verification failed" in text, text
    assert "BURROW_TLS_CA_FILE" in text, text
    assert "guest:guest" not in text  # the URL is shown redacted
    assert [e for e in logs if e["log_level"] == "error" and "TLS" in e["event"]], logs
    connections = [c["name"] for c in await broker.connection_details()]
    assert "burrow:client" not in connections, "a connection was made in spite of TLS failing"


async def test_f4_hostname_mismatch_refused(
    broker: PrivateBroker, make_client: MakeClient, run_app: RunApp, ledger: Ledger
) -> None:
    """F4: the right CA but an address the certificate does not name (127.0.0.1 for a
    `localhost` certificate) is refused with a hostname error; an App says so in readiness."""
    error, _logs = await _tls_refused(
        broker, make_client, tls_ca_file=broker.ca_file, host="127.0.0.1"
    )
    text = str(error)
    assert "TLS verification failed" in text, text
    assert "mismatch" in text, text
    assert "127.0.0.1" in text, text

    url = broker.tls_url_for("guest", "guest", host="127.0.0.1")
    app = await run_app(work_service(ledger), url=url, wait=False, tls_ca_file=broker.ca_file)
    with pytest.raises(ConfigError, match="TLS verification failed"):
        await app.wait_ready(10)
    status, body = await _readyz(app)
    assert status == 503
    assert any("mismatch" in problem for problem in body["problems"]), body


async def test_f4_tls_required_refuses_plain_url(broker: PrivateBroker, namespace: str) -> None:
    """F4: with BURROW_TLS_REQUIRED any plain amqp:// URL in the list is a ConfigError at load
    time, naming the setting; the same settings with amqps:// only load."""
    for urls in (broker.url, f"{broker.tls_url},{broker.url}"):
        with pytest.raises(ConfigError, match="BURROW_TLS_REQUIRED") as caught:
            make_settings(urls, namespace, tls_required=True)
        assert "amqp://guest:***@" in str(caught.value)
    loaded = make_settings(broker.tls_url, namespace, tls_required=True, tls_ca_file=broker.ca_file)
    assert loaded.amqp_urls() == [broker.tls_url]
