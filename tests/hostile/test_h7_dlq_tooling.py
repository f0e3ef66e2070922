"""H7: `burrow dlq` and `burrow tail` on the real broker, against hostile dead letters.

Replaying a letter whose deadline passed runs it; a replay puts a letter back on the queue it
was dead-lettered from only (an event reaches its own subscription, never every group); one
poisoned letter never stops list, show or replay of the others; a wrong password or an
unreachable broker is a one-line error; the tools connect as the service does (password file,
URL failover, TLS); looking at a letter never uses up its delivery attempts; `list` holds one
body at a time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import os
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlunsplit

import aio_pika
import aiormq
import orjson
import pytest
from pamqp import commands as spec
from pydantic import SecretStr

from service import Client, ConfigError, FailedPrecondition, Model, Service, Settings
from service._amqp.tools import tail
from service._protocol.topology import service_topology
from service._protocol.types import Delivery, Outgoing, Undecodable
from service._protocol.vocabulary import (
    H_DEAD_ERROR,
    H_DEAD_REASON,
    H_DEADLINE,
    H_KIND,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_QUEUE,
    H_ORIGINAL_ROUTING_KEY,
    Names,
)
from service._serving.dead_letters import DeadLetter, DeadLetterTool, json_line
from service.testing import delete_entities
from tests.brokers import TEST_BROKER
from tests.conftest import AMQP_URL, AppFactory
from tests.hostile.rawamqp import Props, RawAmqp, S, ShortStr, T, nested_table, x

__all__: list[str] = []

SERVICE = "h7"
RUN_TIMEOUT = 60.0  # a CLI run starts a fresh interpreter on a shared machine
RECOMMENDED_DLQ_LIMIT = 1_000_000  # the DLQ's x-delivery-limit docs/operations.md asks for


class Item(Model):
    """One piece of work."""

    id: int


class Created(Model):
    """An event, padded to a size."""

    id: int
    pad: str = ""


def _service(ran: list[int], broken: Callable[[], bool]) -> Service:
    svc = Service(SERVICE)

    @svc.operation()
    async def work(req: Item) -> Item:
        """Fail while `broken`, else record the id."""
        if broken():
            raise FailedPrecondition("not yet")
        ran.append(req.id)
        return req

    return svc


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _url(password: str | None = None, port: int | None = None, scheme: str = "amqp") -> str:
    """The test broker's URL with another password, port or scheme."""
    secret = TEST_BROKER.password if password is None else password
    login = f"{quote(TEST_BROKER.user, safe='')}:{quote(secret, safe='')}"
    host = f"{TEST_BROKER.host}:{port or TEST_BROKER.port}"
    vhost = "" if TEST_BROKER.vhost == "/" else quote(TEST_BROKER.vhost, safe="")
    return urlunsplit((scheme, f"{login}@{host}", f"/{vhost}", "", ""))


async def _raw() -> RawAmqp:
    return await RawAmqp.connect()


def _dlq_arguments(settings: Settings, *, limit: int | None = None) -> dict[str, Any]:
    """The DLQ's arguments as the service declares them (optionally with a delivery limit)."""
    dlq = Names(settings.namespace).dead_letter_queue(SERVICE)
    [decl] = [q for q in service_topology(Service(SERVICE), settings).queues if q.name == dlq]
    arguments = dict(decl.arguments)
    if limit is not None and arguments.get("x-queue-type") == "quorum":
        arguments["x-delivery-limit"] = limit
    return arguments


@pytest.fixture
async def declare(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Declare queues on the broker (deleted after the test); returns the queue's name."""
    declared: list[str] = []
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel()

    async def make(name: str, arguments: dict[str, Any]) -> str:
        await channel.queue_declare(name, durable=True, arguments=arguments)
        declared.append(name)
        return name

    yield make
    await connection.close()
    await delete_entities(declared, (), AMQP_URL)


async def _park(raw: RawAmqp, dlq: str, body: bytes, props: Props) -> None:
    """Publish a letter straight into the DLQ, as anything on the network could."""
    sent = await raw.publish("", dlq, body, props, mandatory=True)
    assert sent.acked, sent
    assert sent.returned is None, sent
    assert sent.closed is None, sent


async def _burrow(namespace: str, *args: str, **env: str) -> tuple[int, str, str]:
    """Run `burrow <args>` in a fresh interpreter; (exit code, stdout, stderr)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    environment.update(
        BURROW_NAMESPACE=namespace, BURROW_AMQP_URL=AMQP_URL, BURROW_LOG_FORMAT="json"
    )
    environment.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        *args,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(RUN_TIMEOUT):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _assert_one_line_error(stderr: str, *secrets: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in stderr
    for secret in secrets:
        assert secret not in stderr, "the password is shown"


# -- 1. a replay means now ------------------------------------------------------------------


async def test_h7_replay_runs_a_letter_whose_deadline_passed(
    start_app: AppFactory, amqp_channel: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    """A cast parked with an `x-deadline` that has since passed runs when replayed."""
    ran: list[int] = []
    broken = True
    app = await start_app(_service(ran, lambda: broken))
    names = Names(settings.namespace)
    deadline_ms = int((time.time() + 1.0) * 1000)
    exchange = await amqp_channel.get_exchange(names.commands_exchange)
    await exchange.publish(
        aio_pika.Message(
            b'{"id": 7}',
            content_type="application/json",
            message_id="late-7",
            headers={H_KIND: "cast", H_DEADLINE: deadline_ms},
        ),
        routing_key=f"{SERVICE}.work",
    )
    tool = DeadLetterTool(app.settings, SERVICE)

    async def parked() -> bool:
        return [letter.message_id for letter in await tool.list()] == ["late-7"]

    await _eventually(parked, "the cast in the DLQ")
    [letter] = await tool.show(["late-7"])
    assert letter.headers[H_DEADLINE] == deadline_ms
    await asyncio.sleep(max(0.0, deadline_ms / 1000 - time.time()) + 0.2)
    broken = False

    report = await tool.replay(["late-7"])

    assert (report.replayed, report.skipped, report.missing) == (1, [], [])

    async def done() -> bool:
        return ran == [7]

    await _eventually(done, "the replayed cast to run")
    assert await tool.list() == []


async def test_h7_replay_goes_back_only_to_the_queue_it_was_dead_lettered_from(
    start_app: AppFactory, client: Client, settings: Settings, namespace: str
) -> None:
    """An event the broker dead-lettered from one group's subscription queue (too large for
    it: rejected, x-death only) is replayed onto that queue alone: the other group's handler
    count stays unchanged. Letters naming a queue that is gone or unreadable, and an event
    parked without its queue, are skipped with why (never sent to every subscription)."""
    names = Names(settings.namespace)
    runs: dict[str, list[int]] = {SERVICE: [], "audit": []}

    def group(name: str) -> Service:
        svc = Service(name)

        async def on_created(event: Created) -> None:
            runs[name].append(event.id)

        svc.subscribe("orders.created", name="on_created")(on_created)
        return svc

    small = await start_app(group(SERVICE), max_body_bytes=256)
    await start_app(group("audit"))
    tool = DeadLetterTool(small.settings, SERVICE)
    body = {"id": 5, "pad": "x" * 1000}  # over the h7 group's limit only
    await client.link.publish(
        Outgoing(names.events_exchange, "orders.created", orjson.dumps(body),
                 content_type="application/json", message_id="big-5"),
        kind="event", mandatory=True, check_size=False,
    )  # fmt: skip

    async def parked() -> bool:
        return [letter.message_id for letter in await tool.list()] == ["big-5"]

    await _eventually(parked, "the oversized event in the h7 DLQ")
    [letter] = await tool.show(["big-5"])
    assert letter.reason == "broker:rejected"
    assert letter.original_queue == names.subscription_queue(SERVICE, "on_created")

    async def audited() -> bool:
        return runs["audit"] == [5]

    await _eventually(audited, "the audit group to handle the event")
    assert runs[SERVICE] == []

    event_route: dict[ShortStr, Any] = {
        H_ORIGINAL_EXCHANGE: S(names.events_exchange),
        H_ORIGINAL_ROUTING_KEY: S("orders.created"),
        H_DEAD_REASON: S("failed"),
    }
    dlq = names.dead_letter_queue(SERVICE)
    raw = await _raw()
    try:
        await _park(raw, dlq, b'{"id": 6}', Props(
            message_id="q-gone", content_type="application/json",
            headers={**event_route, H_ORIGINAL_QUEUE: S(f"{namespace}.nobody.events")},
        ))  # fmt: skip
        await _park(raw, dlq, b'{"id": 7}', Props(
            message_id="q-bytes", content_type="application/json",
            headers={**event_route, H_ORIGINAL_QUEUE: S(b"\xff\xfe")},
        ))  # fmt: skip
        await _park(raw, dlq, b'{"id": 8}', Props(
            message_id="old-event", content_type="application/json", headers=event_route,
        ))  # fmt: skip
    finally:
        await raw.close()

    await small.stop()
    await start_app(group(SERVICE))  # the limit raised: the cause is fixed
    code, out, err = await _burrow(namespace, "dlq", "replay", SERVICE, "--all")
    assert code == 1, "skipped letters make the exit code non-zero"
    report = orjson.loads(out)
    assert report["replayed"] == 1, (report, err)
    skipped = {entry["message_id"]: entry["problem"] for entry in report["skipped"]}
    assert list(skipped) == ["q-gone", "q-bytes", "old-event"]
    assert "no queue" in skipped["q-gone"]
    assert "original queue" in skipped["q-bytes"]
    assert "every subscription" in skipped["old-event"]

    async def replayed() -> bool:
        return runs[SERVICE] == [5]

    await _eventually(replayed, "the h7 group to handle the replayed event")
    await asyncio.sleep(0.3)  # time enough for a copy that reached audit to run
    assert runs == {SERVICE: [5], "audit": [5]}
    assert [letter.message_id for letter in await tool.list()] == list(skipped)


# -- 2. one poisoned letter never stops the others --------------------------------------------


async def test_h7_poisoned_letter_does_not_stop_list_show_replay(
    start_app: AppFactory, client: Client, settings: Settings, namespace: str
) -> None:
    """Letters with bytes, undecodable text, deep tables, bad routes: all listed and shown;
    replay runs every routable one and leaves the unreadable ones in the DLQ, reported."""
    ran: list[int] = []
    broken = True
    app = await start_app(_service(ran, lambda: broken))
    names = Names(settings.namespace)
    dlq = names.dead_letter_queue(SERVICE)
    tool = DeadLetterTool(app.settings, SERVICE)
    good = [await client.cast(f"{SERVICE}.work", {"id": n}) for n in (1, 2)]

    async def both_parked() -> bool:
        return len(await tool.list()) == 2

    await _eventually(both_parked, "two good letters in the DLQ")
    route: dict[ShortStr, Any] = {
        H_ORIGINAL_EXCHANGE: S(names.commands_exchange),
        H_ORIGINAL_ROUTING_KEY: S(f"{SERVICE}.work"),
        H_KIND: S("cast"),
    }
    raw = await _raw()
    try:
        # Unreadable route: the original routing key is not UTF-8.
        await _park(raw, dlq, b'{"id": 90}', Props(
            message_id="p-route-bytes",
            headers={**route, H_ORIGINAL_ROUTING_KEY: S(b"\xff\xfe" + SERVICE.encode()),
                     H_DEAD_REASON: S("failed")},
        ))  # fmt: skip
        # Undecodable short strings, a non-UTF-8 header name, byte arrays, a timestamp out of
        # range, a bytes reason and error: readable route, so it replays (safely converted).
        await _park(raw, dlq, b'{"id": 3}', Props(
            message_id=b"\xc3(p-bytes", correlation_id=b"\xfe\xff",
            timestamp=2**63 + 5, content_type="application/json",
            headers={**route, b"\xc3(name": x(b"\x00\xff"), "x-array": x(b"\x01\x02"),
                     H_DEAD_REASON: x(b"failed"), H_DEAD_ERROR: S(b"\xff{not json")},
        ))  # fmt: skip
        # A header table nested deeper than anything decodes.
        await _park(raw, dlq, b'{"id": 4}', Props(
            message_id="p-deep", content_type="application/json",
            headers={**route, "x-deep": nested_table(40), "x-when": T(2**62)},
        ))  # fmt: skip
        # No route at all and a body that is not JSON: replaying it would loop into the DLQ.
        await _park(raw, dlq, b"\xff\xfe not json", Props(message_id="p-no-route"))
        # A route to an exchange that does not exist (publishing there closes a channel).
        await _park(raw, dlq, b'{"id": 91}', Props(
            message_id="p-gone",
            headers={H_ORIGINAL_EXCHANGE: S(f"{namespace}.gone"),
                     H_ORIGINAL_ROUTING_KEY: S("x.y")},
        ))  # fmt: skip
    finally:
        await raw.close()

    letters = await tool.list()
    ids = [letter.message_id for letter in letters]
    assert ids == [*good, "p-route-bytes", "\\xc3(p-bytes", "p-deep", "p-no-route", "p-gone"]
    by_id = {letter.message_id: letter for letter in letters}
    for letter in letters:
        json_line(letter.summary())  # every summary is printable
        assert letter.size > 0
        assert letter.body is None
    assert "x-burrow-original-*" in (by_id["p-route-bytes"].problem or "")
    assert "undecodable" in (by_id["\\xc3(p-bytes"].problem or "")
    assert by_id["\\xc3(p-bytes"].reason == "failed"
    assert "x-deep" in (by_id["p-deep"].problem or "")
    assert "back into the DLQ" in (by_id["p-no-route"].problem or "")
    shown = await tool.show([found for found in ids if found is not None])
    assert [letter.message_id for letter in shown] == ids
    for letter in shown:
        detail = orjson.loads(json_line(letter.detail()))
        assert detail["body"] is not None
        assert detail["headers"] is not None

    # The command line: every letter listed (rc 0), and a poisoned one shown.
    code, out, err = await _burrow(namespace, "dlq", "list", SERVICE)
    assert code == 0, err
    assert [orjson.loads(line)["message_id"] for line in out.splitlines()] == ids
    code, out, err = await _burrow(namespace, "dlq", "show", SERVICE, "p-no-route", good[0])
    assert code == 0, err
    assert [orjson.loads(line)["body"] for line in out.splitlines()] == [
        {"id": 1},
        "\\xff\\xfe not json",
    ]

    broken = False
    code, out, err = await _burrow(namespace, "dlq", "replay", SERVICE, "--all")
    assert code == 1, "skipped letters make the exit code non-zero"
    report = orjson.loads(out)
    assert report["replayed"] == 4
    assert [entry["message_id"] for entry in report["skipped"]] == [
        "p-route-bytes",
        "p-no-route",
        "p-gone",
    ]
    assert "no exchange" in report["skipped"][2]["problem"]
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")

    async def all_ran() -> bool:
        return sorted(ran) == [1, 2, 3, 4]

    await _eventually(all_ran, "every routable letter to run")
    left = [letter.message_id for letter in await tool.list()]
    assert left == ["p-route-bytes", "p-no-route", "p-gone"]


def test_h7_unreadable_letter_fields_never_raise() -> None:
    """A letter with a non-numeric expiration, odd header types or no readable anything is
    read into a summary and detail that print as JSON."""
    odd = Delivery(
        body=b"\x00" * 10,
        routing_key="ns.h7.dlq",
        queue="ns.h7.dlq",
        message_id=Undecodable.of(b"\xff\xfe", "short string is not UTF-8"),
        expiration="soon",
        headers={
            H_DEAD_REASON: bytearray(b"\xff"),
            H_DEAD_ERROR: 12,
            "x-burrow-dead-at": True,
            "x-decimal": decimal.Decimal("1.50"),
            "x-when": datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
            "x-big": 2**70,
            "x-list": [b"\xff", {"k": bytearray(b"\x01")}],
            "x-death": [{"exchange": 5, "routing-keys": "not a list"}],
        },
    )
    for full in (False, True):
        letter = DeadLetter.from_delivery(odd, full=full)
        assert letter.message_id == "\\xff\\xfe"
        assert letter.original_routing_key is None
        assert letter.problem
        assert letter.size == 10
        assert letter.dead_at is None
        detail = orjson.loads(json_line(letter.detail()))
        assert detail["problem"] == letter.problem
    assert '"x-big":1180591620717411303424' in json_line(
        DeadLetter.from_delivery(odd, full=True).detail()
    )

    class Hostile(dict[str, Any]):
        def items(self) -> Any:
            raise RuntimeError("no")

    broken = Delivery(body=b"abc", routing_key="k", headers=Hostile(x=1), message_id="m")
    letter = DeadLetter.from_delivery(broken)
    assert (letter.message_id, letter.size, letter.original_routing_key) == ("m", 3, None)
    assert letter.problem
    assert "cannot be read" in letter.problem


# -- 3. one-line errors ------------------------------------------------------------------------


async def test_h7_wrong_password_is_one_line(namespace: str) -> None:
    """A refused login ends `burrow dlq` and `burrow tail` with one `error:` line, exit 2."""
    url = _url(password="not-the-password-h7")
    for args in (("dlq", "list", SERVICE), ("tail", "h7.#")):
        code, out, err = await _burrow(namespace, *args, BURROW_AMQP_URL=url)
        assert (code, out) == (2, ""), err
        _assert_one_line_error(err, "not-the-password-h7")
        assert "refused the login" in err


async def test_h7_unreachable_broker_is_one_line(namespace: str) -> None:
    """No broker at the URL: one `error: UNAVAILABLE` line naming it (password masked), exit 1."""
    url = _url(password="s3cret-h7", port=1)
    for args in (("dlq", "replay", SERVICE, "--all"), ("tail", "h7.#")):
        code, out, err = await _burrow(
            namespace, *args, BURROW_AMQP_URL=url, BURROW_CONNECT_TIMEOUT="0.5"
        )
        assert (code, out) == (1, ""), err
        _assert_one_line_error(err, "s3cret-h7")
        assert "UNAVAILABLE" in err
        assert "127.0.0.1:1" in err


async def test_h7_missing_dlq_is_one_line(namespace: str) -> None:
    """A service with no dead-letter queue: one `error: NOT_FOUND` line, exit 1."""
    code, out, err = await _burrow(namespace, "dlq", "list", "nosuch")
    assert (code, out) == (1, ""), err
    _assert_one_line_error(err)
    assert "NOT_FOUND" in err


# -- 4. connect as the service does ------------------------------------------------------------


async def test_h7_tools_use_password_file(
    settings: Settings,
    declare: Callable[..., Awaitable[str]],
    tmp_path: Path,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """`dlq` and `tail` read the password file and fail over past a dead URL, as the service
    does; without the file the same URLs are refused."""
    dlq = await declare(
        Names(settings.namespace).dead_letter_queue(SERVICE), _dlq_arguments(settings)
    )
    await amqp_channel.default_exchange.publish(
        aio_pika.Message(b"{}", message_id="pw-1"), routing_key=dlq
    )
    secret = tmp_path / "password"
    secret.write_text(TEST_BROKER.password + "\n")
    urls = f"{_url(password='wrong', port=1)},{_url(password='wrong')}"
    with_file = settings.model_copy(
        update={"amqp_url": SecretStr(urls), "amqp_password_file": str(secret)}
    )
    without = settings.model_copy(update={"amqp_url": SecretStr(_url(password="wrong"))})

    assert [letter.message_id for letter in await DeadLetterTool(with_file, SERVICE).list()] == [
        "pw-1"
    ]
    with pytest.raises(ConfigError, match="refused the login"):
        await DeadLetterTool(without, SERVICE).list()

    events_exchange = Names(settings.namespace).events_exchange
    exchange = await amqp_channel.declare_exchange(events_exchange, "topic", durable=True)
    events = tail(with_file, "h7.#")
    first = asyncio.ensure_future(anext(events))
    try:

        async def received() -> bool:
            if not first.done():
                await exchange.publish(
                    aio_pika.Message(b'{"n": 1}', headers={"x-raw": bytearray(b"\xff")}),
                    routing_key="h7.probe",
                )
                await asyncio.sleep(0.05)
            return first.done()

        await _eventually(received, "tail's queue to receive an event")
        event = await first
        assert event.routing_key == "h7.probe"
        assert orjson.loads(json_line(event.headers))["x-raw"] == "\\xff"
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await events.aclose()
        await delete_entities((), [events_exchange], AMQP_URL)


async def test_h7_tools_use_tls_settings(settings: Settings) -> None:
    """An amqps:// URL goes through the service's TLS setup: a plain port is a TLS error."""
    tls = settings.model_copy(update={"amqp_url": SecretStr(_url(scheme="amqps"))})
    with pytest.raises(ConfigError, match="TLS"):
        await DeadLetterTool(tls, SERVICE).list()
    events = tail(tls, "h7.#")
    with pytest.raises(ConfigError, match="TLS"):
        await anext(events)


# -- 5. looking costs nothing that matters ----------------------------------------------------


@pytest.mark.parametrize("limit", [None, RECOMMENDED_DLQ_LIMIT], ids=["as-declared", "limit"])
async def test_h7_looking_does_not_use_a_delivery_attempt(
    settings: Settings, declare: Callable[..., Awaitable[str]], limit: int | None
) -> None:
    """21 looks (more than RabbitMQ 4.x's default delivery limit of 20) lose no letter, full
    looks keep the order, partial ones (`--limit`) lose nothing either; the replayed copies
    start with no delivery count, no death history and no deadline."""
    names = Names(settings.namespace)
    dlq = await declare(names.dead_letter_queue(SERVICE), _dlq_arguments(settings, limit=limit))
    target = await declare(f"{settings.namespace}.h7.target", {"x-queue-type": "classic"})
    raw = await _raw()
    try:
        for n in range(3):
            await _park(raw, dlq, b'{"n": %d}' % n, Props(
                message_id=f"look-{n}",
                headers={H_ORIGINAL_EXCHANGE: S(""), H_ORIGINAL_ROUTING_KEY: S(target),
                         H_DEAD_REASON: S("failed"), H_DEADLINE: int(time.time() * 1000) - 1},
            ))  # fmt: skip
    finally:
        await raw.close()
    tool = DeadLetterTool(settings, SERVICE)
    order = [f"look-{n}" for n in range(3)]

    for _ in range(21):
        assert [letter.message_id for letter in await tool.list()] == order
    for _ in range(5):
        # A partial look hands its letters back behind the others (RabbitMQ's requeue).
        assert len(await tool.list(limit=2)) == 2
    letters = await tool.show(order)
    assert sorted(letter.message_id or "" for letter in letters) == order
    assert sorted(letter.body or b"" for letter in letters) == [b'{"n": %d}' % n for n in range(3)]

    report = await tool.replay(None)
    assert (report.replayed, report.skipped) == (3, [])
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        copies = []
        for _ in range(3):
            message = await channel.basic_get(target, no_ack=True)
            copies.append(message)
        assert sorted(str(m.header.properties.message_id) for m in copies) == order
        for message in copies:
            headers = message.header.properties.headers or {}
            assert not {"x-delivery-count", "x-death", H_DEADLINE, H_DEAD_REASON} & set(headers)
            assert message.header.properties.expiration is None
            assert message.header.properties.delivery_mode == 2
    finally:
        await connection.close()
    assert await tool.list() == []


# -- 6. memory ---------------------------------------------------------------------------------


async def test_h7_list_memory_is_bounded_by_one_letter(
    settings: Settings, declare: Callable[..., Awaitable[str]]
) -> None:
    """`list` over 6 letters of 8 MiB peaks near one letter, not their 48 MiB; `show` of one
    keeps only that one's body."""
    size = 8 * 1024 * 1024
    dlq = await declare(
        Names(settings.namespace).dead_letter_queue(SERVICE), _dlq_arguments(settings)
    )
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for n in range(6):
            await channel.basic_publish(
                bytes([65 + n]) * size,
                routing_key=dlq,
                properties=spec.Basic.Properties(message_id=f"big-{n}"),
            )
    finally:
        await connection.close()
    tool = DeadLetterTool(settings, SERVICE)

    tracemalloc.start()
    try:
        letters = await tool.list()
        _, listed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        [shown] = await tool.show(["big-3"])
        _, shown_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert [letter.size for letter in letters] == [size] * 6
    assert shown.body == b"D" * size
    assert listed_peak < 2 * size, f"list peaked at {listed_peak / 2**20:.1f} MiB"
    assert shown_peak < 3 * size, f"show peaked at {shown_peak / 2**20:.1f} MiB"
