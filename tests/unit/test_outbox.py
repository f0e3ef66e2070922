"""Unit tests of the outbox without a database: rows, the writer's checks, the relay's verdicts.

The writer and the relay are given a stand-in connection that records statements; the relay
publishes on the in-memory broker. The SQL itself runs against PostgreSQL in
tests/integration/test_outbox.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from service import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    MessageTooLarge,
    Settings,
    Unavailable,
)
from service._observe import metrics
from service._outbox import db, schema
from service._outbox.inbox import Inbox, connection
from service._outbox.relay import Relay, RelayConfig, run_relay
from service._outbox.rows import Row, to_message, to_row
from service._outbox.schema import PARTITIONS, Tables
from service._outbox.writer import Outbox
from service._protocol.topology import client_topology
from service._protocol.types import Delivery, Outgoing
from service._protocol.vocabulary import (
    H_CALLBACK,
    H_JOB_ID,
    H_TRACEPARENT,
    H_VERSION,
    MAX_DELAY_S,
    Names,
)
from service._serving.middleware import Request, Result
from service.example import calc
from service.testing import InMemoryBroker

ROOT = Path(__file__).resolve().parents[2]


class FakeConnection:
    """Records what is executed; answers `fetch` with the rows it was given."""

    def __init__(self, rows: list[dict[str, Any]] | None = None, *, in_transaction: bool = True):
        self.rows = rows or []
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.in_transaction = in_transaction

    def is_in_transaction(self) -> bool:
        return self.in_transaction

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        self.executed.append((query, args))
        return "UPDATE 0"

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return self.rows

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        return None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    def inserted(self) -> list[tuple[Any, ...]]:
        return [args for query, args in self.executed if query.startswith("INSERT")]


def _fields(args: tuple[Any, ...]) -> dict[str, Any]:
    names = [
        "key",
        "kind",
        "exchange",
        "routing_key",
        "message_id",
        "properties",
        "headers",
        "body",
        "due_at",
    ]
    return dict(zip(names, args, strict=True))


# -- rows ---------------------------------------------------------------------------------------


def test_a_row_gives_back_the_message_it_was_made_from() -> None:
    """Properties and headers survive the row: bytes (as a byte array), bools, floats, tables."""
    message = Outgoing(
        exchange="ns.events",
        routing_key="orders.created",
        body=b'{"id":1}',
        message_id="m1",
        type="orders.created",
        correlation_id="c1",
        headers={"s": "x", "i": 2**60, "f": 1.5, "b": True, "raw": b"\xff\x00", "t": {"n": [1]}},
        priority=3,
    )
    row = to_row(message, key="order-1", kind="event", due_at=None)
    again = to_message(row)
    expected = dataclasses.replace(
        message, headers={**message.headers, "raw": bytearray(b"\xff\x00")}
    )
    assert again == expected
    assert isinstance(again.headers["b"], bool)
    assert isinstance(again.headers["f"], float)
    assert row.key == "order-1"
    assert row.due_at is None


def test_a_damaged_row_is_refused_not_guessed() -> None:
    """Properties that are not a JSON object, or unknown properties, raise ValueError."""
    good = to_row(Outgoing("x", "a.b", b"{}", "m"), key="k", kind="event", due_at=None)
    for properties in ("[1]", '{"colour": "red"}', '{"priority": "high"}', '{"persistent": 3}'):
        damaged = Row(**{**_row_dict(good), "properties": properties})
        with pytest.raises(ValueError, match=r"JSON objects|unknown properties|is not"):
            to_message(damaged)


def _row_dict(row: Row) -> dict[str, Any]:
    return {name: getattr(row, name) for name in Row.__slots__}


# -- the writer ---------------------------------------------------------------------------------


async def test_emit_writes_one_row_built_as_client_emit_builds_it(settings: Settings) -> None:
    """The row holds the event for the events exchange, keyed by its name, with a trace."""
    conn = FakeConnection()
    outbox = Outbox(settings)
    assert await outbox.emit(conn, "orders.created", {"id": 7}, headers={"tenant": "eu"}) is True
    (args,) = conn.inserted()
    row = _fields(args)
    assert row["key"] == "orders.created"
    assert row["kind"] == "event"
    assert row["exchange"] == Names(settings.namespace).events_exchange
    assert row["routing_key"] == "orders.created"
    assert row["message_id"]
    assert orjson.loads(row["body"]) == {"id": 7}
    headers = orjson.loads(row["headers"])
    assert headers["tenant"] == "eu"
    assert H_TRACEPARENT in headers
    assert row["due_at"] is None


async def test_cast_returns_the_message_id_the_row_keeps(settings: Settings) -> None:
    """`cast` returns the id fixed in the row; a declared Operation adds its contract major."""
    conn = FakeConnection()
    message_id = await Outbox(settings).cast(
        conn, calc.operations["add"], {"a": 1, "b": 2}, key="k1"
    )
    row = _fields(conn.inserted()[0])
    assert row["message_id"] == message_id
    assert row["key"] == "k1"
    assert row["kind"] == "command"
    assert row["exchange"] == Names(settings.namespace).commands_exchange
    assert orjson.loads(row["headers"])[H_VERSION] == "1"


async def test_submit_is_a_job_whose_id_is_the_message_id(settings: Settings) -> None:
    """The job id is the message id; no reply address (nobody waits); the callback is kept."""
    conn = FakeConnection()
    job = await Outbox(settings).submit(
        conn, "calc.add", {"a": 1, "b": 2}, callback="calc.done", callback_data="x"
    )
    row = _fields(conn.inserted()[0])
    properties, headers = orjson.loads(row["properties"]), orjson.loads(row["headers"])
    assert job.id == row["message_id"] == headers[H_JOB_ID]
    assert job.route == "calc.add"
    assert "reply_to" not in properties
    assert headers[H_CALLBACK] == "calc.done"
    with pytest.raises(FailedPrecondition, match="without a client"):
        await job.status()


async def test_a_delay_keeps_the_due_time_and_is_checked(settings: Settings) -> None:
    """`delay`/`at` are stored as the due time; one beyond the delay ladder fails at write."""
    conn = FakeConnection()
    outbox = Outbox(settings)
    due = datetime.now(UTC) + timedelta(minutes=5)
    await outbox.emit(conn, "orders.later", {}, at=due)
    assert abs((_fields(conn.inserted()[0])["due_at"] - due).total_seconds()) < 0.001
    with pytest.raises(ValueError, match="ahead"):
        await outbox.cast(conn, "calc.add", {}, delay=MAX_DELAY_S + 3600)
    with pytest.raises(ValueError, match="timezone-aware"):
        await outbox.emit(conn, "orders.later", {}, at=datetime(2030, 1, 1))
    assert len(conn.inserted()) == 1


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda o, c: o.emit(c, "orders.*", {}), InvalidArgument),
        (lambda o, c: o.emit(c, "orders.created", {"x": math.nan}), ValueError),
        (lambda o, c: o.emit(c, "orders.created", object()), ValueError),
        (lambda o, c: o.emit(c, "orders.created", {"x": "y" * 2_000_000}), MessageTooLarge),
        (lambda o, c: o.emit(c, "orders.created", {}, headers={"x-burrow-kind": "a"}), ValueError),
        (lambda o, c: o.cast(c, "not-an-operation", {}), InvalidArgument),
        (lambda o, c: o.submit(c, "calc.add", {}, callback="bad key!"), ValueError),
        (lambda o, c: o.submit(c, "calc.add", {}, callback_data="x"), ValueError),
        (lambda o, c: o.emit(c, "orders.created", {}, key=5), TypeError),
    ],
    ids=[
        "wildcard-event",
        "nan",
        "not-json",
        "too-large",
        "protocol-header",
        "bad-route",
        "bad-callback",
        "data-without-callback",
        "key-not-text",
    ],
)
async def test_bad_messages_fail_the_write_not_the_relay(
    settings: Settings, call: Any, error: type[Exception]
) -> None:
    """A message the relay could never publish raises in the caller's transaction; no row."""
    conn = FakeConnection()
    with pytest.raises(error):
        await call(Outbox(settings), conn)
    assert conn.inserted() == []


async def test_outside_a_transaction_the_writer_refuses(settings: Settings) -> None:
    """A connection not in a transaction (autocommit: the row would not follow the caller's
    writes) is refused."""
    conn = FakeConnection(in_transaction=False)
    with pytest.raises(RuntimeError, match="inside your transaction"):
        await Outbox(settings).emit(conn, "orders.created", {})
    assert conn.inserted() == []


# -- the schema ---------------------------------------------------------------------------------


def test_the_schema_file_and_its_deploy_copy_agree() -> None:
    """deploy/postgres/outbox.sql is schema.sql; its partition count is PARTITIONS."""
    text = schema.sql()
    assert (ROOT / "deploy/postgres/outbox.sql").read_text("utf-8") == text
    assert f"% {PARTITIONS}) STORED" in text


@pytest.mark.parametrize("name", ["Burrow", "1abc", "a-b", "x" * 49, 'a"b', ""])
def test_schema_names_that_would_need_quoting_are_refused(name: str) -> None:
    """Schema names are plain lower-case identifiers that fit the NOTIFY channel."""
    with pytest.raises(ValueError, match="outbox schema"):
        Tables(name)


def test_tables_are_qualified_and_lock_spaces_differ() -> None:
    """Each schema has its own qualified tables, channel and advisory-lock space."""
    one, two = Tables("burrow"), Tables("burrow_two")
    assert one.outbox == '"burrow".outbox'
    assert one.channel == "burrow.outbox"
    assert one.lock_space != two.lock_space
    assert 0 <= one.lock_space < 2**31


def test_passwords_in_database_urls_are_masked() -> None:
    """A DSN in a log line or readiness reason never shows its password."""
    text = "cannot reach postgresql://app:s3cret@db:5432/x?password=other"
    assert db.redact(text) == "cannot reach postgresql://app:***@db:5432/x?password=***"
    assert "s3cret" not in db.describe(OSError(text))


def test_unreachable_is_told_apart_from_a_wrong_statement() -> None:
    """Connection failures, shutdowns and deadlocks are `unavailable`; a syntax error is not."""
    asyncpg = db.driver()
    assert db.unavailable(ConnectionRefusedError())
    assert db.unavailable(asyncpg.exceptions.AdminShutdownError())
    assert db.unavailable(asyncpg.exceptions.DeadlockDetectedError())
    assert db.unavailable(asyncpg.InterfaceError("connection is closed"))
    assert not db.unavailable(asyncpg.exceptions.PostgresSyntaxError())
    assert not db.unavailable(asyncpg.exceptions.UniqueViolationError())
    assert not db.unavailable(ValueError())


# -- the relay ----------------------------------------------------------------------------------


def test_relay_settings_come_from_the_outbox_settings(settings: Settings) -> None:
    """No outbox DSN: no relay. With one, the `outbox_*` settings configure it."""
    assert RelayConfig.from_settings(settings) is None
    given = settings.model_copy(
        update={
            "outbox_dsn": SecretStr("postgresql://x"),
            "outbox_schema": "s1",
            "outbox_poll_interval": 0.5,
            "outbox_batch_size": 9,
            "outbox_retention": 60.0,
            "outbox_max_attempts": 3,
        }
    )
    config = RelayConfig.from_settings(given)
    assert config == RelayConfig(
        dsn="postgresql://x",
        schema="s1",
        poll_interval=0.5,
        batch_size=9,
        retention=60.0,
        max_attempts=3,
    )
    with pytest.raises(ValueError, match="batch_size"):
        RelayConfig(dsn="x", batch_size=0)


def _row(n: int, message: Outgoing, kind: str = "event", **extra: Any) -> dict[str, Any]:
    row = to_row(message, key="k", kind=kind, due_at=None)
    return {**_row_dict(row), "id": n, "attempts": 0, **extra}


async def test_a_batch_publishes_in_order_and_parks_what_cannot_go(settings: Settings) -> None:
    """Confirmed rows and an event nobody subscribed to are marked sent; an unroutable command,
    a body now above the limit and a damaged row are parked with their reasons; the rows after
    them still go, in id order."""
    small = settings.model_copy(update={"max_body_bytes": 4096})
    names = Names(settings.namespace)
    broker = InMemoryBroker()
    broker.apply(client_topology(settings))
    broker.declare_queue("audit")
    broker.bind(names.events_exchange, "audit", "orders.#")
    link = broker.link_factory("outbox", small, topology=client_topology(small))
    link.start()

    def event(key: str, body: bytes = b"{}") -> Outgoing:
        return Outgoing(names.events_exchange, key, body, f"id-{key}-{len(body)}")

    rows = [
        _row(1, event("orders.one")),
        _row(2, Outgoing(names.commands_exchange, "nobody.home", b"{}", "c1"), kind="command"),
        _row(3, event("orders.big", b"x" * 5000)),
        _row(4, event("orders.two")),
        _row(5, event("nobody.listens")),
        {**_row(6, event("orders.three")), "properties": "[]"},
        {**_row(7, event("orders.four")), "kind": "gossip"},
        _row(8, event("orders.five")),
    ]
    relay = Relay(RelayConfig(dsn="postgresql://unused"), small, link)
    relay._held = list(range(PARTITIONS))
    reasons = ("unroutable", "too_large", "invalid")
    parked_before = {r: _sample("burrow_outbox_parked_total", reason=r) or 0 for r in reasons}
    conn = FakeConnection(rows)
    report = await relay.run_once(conn)

    assert [m.json() for m in broker.queue("audit").messages] == [{}, {}, {}]
    assert [m.routing_key for m in broker.queue("audit").messages] == [
        "orders.one",
        "orders.two",
        "orders.five",
    ]
    assert (report.rows, report.sent, report.unrouted, report.parked) == (8, 3, 1, 4)
    updates = {query.split(" SET ")[1].split(" ")[0]: args for query, args in conn.executed}
    assert sorted(updates["sent_at"][0]) == [1, 4, 5, 8]
    parked_ids, why = updates["parked_at"]
    assert dict(zip(parked_ids, [r.split(":")[0] for r in why], strict=True)) == {
        2: "unroutable",
        3: "too_large",
        6: "invalid",
        7: "invalid",
    }
    for reason, count in zip(reasons, (1, 1, 2), strict=True):
        assert _sample("burrow_outbox_parked_total", reason=reason) == parked_before[reason] + count
    await link.close()


async def test_a_refused_row_is_retried_then_parked(settings: Settings) -> None:
    """A nack (queue full) leaves the row pending with one more attempt, until max_attempts:
    then it is parked `refused`; the relay backs off meanwhile (`retried`)."""
    names = Names(settings.namespace)
    broker = InMemoryBroker()
    broker.apply(client_topology(settings))
    broker.declare_queue("full", {"x-max-length": 0, "x-overflow": "reject-publish"})
    broker.bind(names.events_exchange, "full", "orders.#")
    link = broker.link_factory("outbox", settings, topology=client_topology(settings))
    link.start()
    relay = Relay(RelayConfig(dsn="postgresql://unused", max_attempts=3), settings, link)
    relay._held = [0]
    message = Outgoing(names.events_exchange, "orders.x", b"{}", "m1")

    conn = FakeConnection([_row(1, message, attempts=0)])
    report = await relay.run_once(conn)
    assert (report.retried, report.parked) == (1, 0)
    assert "attempts = attempts + 1" in conn.executed[-1][0]

    conn = FakeConnection([_row(1, message, attempts=2)])
    report = await relay.run_once(conn)
    assert (report.retried, report.parked) == (0, 1)
    assert conn.executed[-1][1][1][0].startswith("refused:")
    await link.close()


async def test_without_partitions_a_relay_reads_nothing(settings: Settings) -> None:
    """A relay that holds no partition (more relays than partitions) publishes nothing."""
    broker = InMemoryBroker()
    link = broker.link_factory("outbox", settings)
    relay = Relay(RelayConfig(dsn="postgresql://unused"), settings, link)
    message = Outgoing("x", "a.b", b"{}", "m")
    conn = FakeConnection([_row(1, message)])
    assert (await relay.run_once(conn)).rows == 0
    assert broker.published == []


async def test_problems_say_why_the_relay_cannot_publish(settings: Settings) -> None:
    """Before it has connected, and with its broker away, readiness gets the reasons."""
    broker = InMemoryBroker()
    link = broker.link_factory("outbox", settings)
    relay = Relay(RelayConfig(dsn="postgresql://unused"), settings, link)
    problems = relay.problems()
    assert "outbox relay: not started" in problems
    assert any("broker not connected" in p for p in problems)
    link.start()
    await asyncio.sleep(0)
    assert not any("broker" in p for p in relay.problems())


async def test_the_standalone_relay_needs_an_outbox_database(settings: Settings) -> None:
    """`burrow outbox relay` without `outbox_dsn` is a configuration error, before connecting."""
    with pytest.raises(ConfigError, match="BURROW_OUTBOX_DSN"):
        await run_relay(settings, InMemoryBroker().link_factory, stop=asyncio.Event())


async def test_an_inbox_whose_pool_is_not_open_yet_is_unavailable() -> None:
    """An inbox reading its pool from a lifespan's state before it was opened says
    `Unavailable` (retried), and runs nothing."""
    inbox = Inbox(lambda: None)
    delivery = Delivery(body=b"{}", routing_key="a.b", message_id="m")
    request = Request("a", "a.b", calc.operations["add"], delivery, "cast", None, None, 5.0)

    async def never(request: Request) -> Result:  # pragma: no cover - must not run
        raise AssertionError("ran without its inbox")

    with pytest.raises(Unavailable, match="not open"):
        await inbox(request, never)
    with pytest.raises(RuntimeError, match="no inbox transaction"):
        connection()


def test_outbox_metrics_exist_at_zero() -> None:
    """Every outcome and park reason, and the inbox's duplicates, are series from the start."""
    for outcome in metrics.OUTBOX_OUTCOMES:
        assert _sample("burrow_outbox_published_total", outcome=outcome) is not None
    for reason in metrics.OUTBOX_PARK_REASONS:
        assert _sample("burrow_outbox_parked_total", reason=reason) is not None
    assert REGISTRY.get_sample_value("burrow_inbox_duplicates_total") is not None
    assert REGISTRY.get_sample_value("burrow_outbox_pending_rows") is not None
    assert REGISTRY.get_sample_value("burrow_outbox_lag_seconds") is not None


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)
