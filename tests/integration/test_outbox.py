"""The outbox and inbox on the real PostgreSQL and the real RabbitMQ.

Each test gets a schema of its own (`<run prefix>_ob<n>`, dropped afterwards) on
`BURROW_TEST_POSTGRES_URL` (default: the machine's server, database `test`), and a namespace
of its own on the broker (deleted with the run's entities). PostgreSQL itself is never
stopped: "the database away" is a relay pointed at a closed port, or its own backend
terminated (`pg_terminate_backend`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client import REGISTRY

from service import Client, Context, Model, Service, Settings, Unavailable
from service._amqp.transport import AmqpLink
from service._outbox import db, schema
from service._outbox.inbox import Inbox, connection
from service._outbox.relay import Relay, RelayConfig
from service._outbox.schema import PARTITIONS, Tables
from service._outbox.writer import Outbox
from service._protocol.registry import Operation
from service._protocol.topology import client_topology
from service._protocol.types import Delivery, Outcome
from service._protocol.vocabulary import Names
from service._serving.middleware import Request, Result
from tests.conftest import RUN_PREFIX, AppFactory, ClientFactory

PG_URL = os.environ.get("BURROW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_schemas = itertools.count()

RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    """The test's own connection, for setting up and looking at the tables."""
    conn = await db.connect(PG_URL, timeout=5)
    yield conn
    await conn.close()


@pytest.fixture
async def tables(pg: Any) -> AsyncIterator[Tables]:
    """A fresh outbox schema for this test, dropped afterwards."""
    made = Tables(f"{RUN_PREFIX}_ob{next(_schemas)}")
    await schema.apply(pg, made)
    yield made
    await pg.execute(f'DROP SCHEMA IF EXISTS "{made.schema}" CASCADE')


@pytest.fixture
async def start_relay(settings: Settings, tables: Tables) -> AsyncIterator[RelayFactory]:
    """Start relays on this test's schema and namespace (ready to publish when returned);
    stopped after the test."""
    relays: list[Relay] = []

    async def start(dsn: str = PG_URL, *, ready: bool = True, **config: Any) -> Relay:
        options: dict[str, Any] = {"poll_interval": 0.2, "schema": tables.schema} | config
        link = AmqpLink("outbox", settings, topology=client_topology(settings))
        relay = Relay(RelayConfig(dsn=dsn, **options), settings, link, owns_link=True)
        relays.append(relay)
        relay.start()
        if ready:
            await eventually(lambda: not relay.problems() and bool(relay.partitions))
        return relay

    yield start
    for relay in relays:
        await relay.stop()


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until `check()` is true (it may be a coroutine function)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {check}")
        await asyncio.sleep(0.02)


async def listen(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, pattern: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """A private queue bound to the events exchange for `pattern`; what arrives, in order."""
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(Names(settings.namespace).events_exchange, routing_key=pattern)
    received: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append(message)

    await queue.consume(keep, no_ack=True)
    return received


def _arrived(received: list[Any], count: int) -> Callable[[], bool]:
    return lambda: len(received) == count


def sample(name: str, **labels: str) -> float:
    """A metric sample's value (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def pending(pg: Any, tables: Tables) -> int:
    """Rows neither sent nor parked."""
    return int(
        await pg.fetchval(
            f"SELECT count(*) FROM {tables.outbox} WHERE sent_at IS NULL AND parked_at IS NULL"
        )
    )


# -- the writer ---------------------------------------------------------------------------------


async def test_only_committed_rows_are_published(
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """A row written in a committed transaction is published once, with the message id fixed
    at insert; one written in a rolled-back transaction never exists."""
    await start_relay()
    received = await listen(amqp_channel, settings, "shop.#")
    outbox = Outbox(settings, schema=tables.schema)
    async with pg.transaction():
        await outbox.emit(pg, "shop.committed", {"n": 1})
    transaction = pg.transaction()
    await transaction.start()
    await outbox.emit(pg, "shop.rolled_back", {"n": 2})
    await transaction.rollback()
    rows = await pg.fetch(f"SELECT routing_key, message_id FROM {tables.outbox}")
    assert [row["routing_key"] for row in rows] == ["shop.committed"]
    await eventually(lambda: len(received) == 1)
    assert orjson.loads(received[0].body) == {"n": 1}
    assert received[0].message_id == rows[0]["message_id"]
    await eventually(lambda: _is_zero(pending(pg, tables)))
    await asyncio.sleep(0.3)
    assert len(received) == 1


async def _is_zero(count: Awaitable[int]) -> bool:
    return await count == 0


class Sum(Model):
    """Reply: a sum."""

    sum: int


class Pair(Model):
    """Request: two numbers."""

    a: int
    b: int


async def test_cast_and_submit_reach_a_service(  # noqa: PLR0917 (fixtures)
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    start_app: AppFactory,
    make_client: ClientFactory,
) -> None:
    """A cast runs the operation, and a submit's result is read through the client."""
    casts: list[int] = []
    calc = Service("ocalc")

    @calc.operation()
    async def add(req: Pair) -> Sum:
        """Add, and note casts."""
        casts.append(req.a + req.b)
        return Sum(sum=req.a + req.b)

    await start_app(calc)
    client = await make_client()
    outbox = Outbox(settings, schema=tables.schema, client=client)
    await start_relay()
    async with pg.transaction():
        await outbox.cast(pg, "ocalc.add", {"a": 1, "b": 2})
        job = await outbox.submit(pg, "ocalc.add", {"a": 20, "b": 22})
    assert await job.result(timeout=10) == {"sum": 42}
    await eventually(lambda: 3 in casts)


async def test_a_delayed_event_arrives_no_earlier_than_its_delay(  # noqa: PLR0917 (fixtures)
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    start_app: AppFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """A delayed row goes through the delay ladder (routed from its due time when the relay
    publishes it) and reaches subscribers at its due time, not before."""
    await start_app(Service("olater"))  # a namespace whose delays are forwarded
    await start_relay()
    received = await listen(amqp_channel, settings, "later.#")
    outbox = Outbox(settings, schema=tables.schema)
    async with pg.transaction():
        written = time.time()
        await outbox.emit(pg, "later.event", {"x": 1}, delay=1.0)
    await eventually(lambda: len(received) == 1)
    assert time.time() - written >= 1.0


# -- the relay ----------------------------------------------------------------------------------


async def test_two_relays_share_the_table_and_keep_per_key_order(
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """Two relays racing over one table while writers commit, the second joining mid-stream
    (half the partitions change hands): every message arrives exactly once, each key's in the
    order written, and each relay ends with half the partitions."""
    keys, per_key = 24, 40
    first = await start_relay(batch_size=50)
    received = await listen(amqp_channel, settings, "race.#")
    outbox = Outbox(settings, schema=tables.schema)
    pool = await db.create_pool(PG_URL, min_size=4, max_size=8)

    async def writer(key: int) -> None:
        for seq in range(per_key):
            async with pool.acquire() as conn, conn.transaction():
                await outbox.emit(conn, "race.event", {"k": key, "s": seq}, key=f"key-{key}")

    before = sample("burrow_outbox_published_total", outcome="confirmed")
    try:
        writing = asyncio.gather(*(writer(key) for key in range(keys)))
        await eventually(lambda: len(received) >= keys * per_key // 4, timeout=30)
        second = await start_relay(batch_size=50)
        await writing
    finally:
        await pool.close()
    await eventually(lambda: len(first.partitions) == len(second.partitions) == PARTITIONS // 2)
    assert not set(first.partitions) & set(second.partitions)
    await eventually(lambda: len(received) >= keys * per_key, timeout=30)
    await asyncio.sleep(0.5)  # a duplicate would arrive by now
    seen = [orjson.loads(m.body) for m in received]
    assert len(seen) == keys * per_key  # none twice, none lost
    for key in range(keys):
        assert [m["s"] for m in seen if m["k"] == key] == list(range(per_key))
    published = sample("burrow_outbox_published_total", outcome="confirmed") - before
    assert published == keys * per_key
    sent = await pg.fetchval(f"SELECT count(*) FROM {tables.outbox} WHERE sent_at IS NOT NULL")
    assert sent == keys * per_key


async def test_unpublishable_rows_are_parked_and_block_nothing(
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """A command to an operation with no queue and a body above the relay's limit are parked
    with their reasons, not retried; the row of the same key behind them is published."""
    parked_before = sample("burrow_outbox_parked_total", reason="unroutable")
    # This relay's limit is below what the writer allowed (a setting changed meanwhile).
    small = settings.model_copy(update={"max_body_bytes": 4096})
    link = AmqpLink("outbox", small, topology=client_topology(small))
    config = RelayConfig(dsn=PG_URL, schema=tables.schema, poll_interval=0.2)
    relay = Relay(config, small, link, owns_link=True)
    relay.start()
    try:
        await eventually(lambda: not relay.problems() and bool(relay.partitions))
        received = await listen(amqp_channel, settings, "park.#")
        outbox = Outbox(settings, schema=tables.schema)
        async with pg.transaction():
            await outbox.cast(pg, "nobody.home", {}, key="k")
            await outbox.emit(pg, "park.big", {"x": "y" * 5000}, key="k")
            await outbox.emit(pg, "park.fine", {"x": 1}, key="k")
        await eventually(lambda: len(received) == 1)
        assert received[0].routing_key == "park.fine"
        await eventually(lambda: _is_zero(pending(pg, tables)))
    finally:
        await relay.stop()
    rows = await pg.fetch(
        f"SELECT routing_key, parked_reason, attempts FROM {tables.outbox} "
        "WHERE parked_at IS NOT NULL ORDER BY id"
    )
    assert [(r["routing_key"], r["parked_reason"].split(":")[0]) for r in rows] == [
        ("nobody.home", "unroutable"),
        ("park.big", "too_large"),
    ]
    assert all(r["attempts"] == 1 for r in rows)
    assert sample("burrow_outbox_parked_total", reason="unroutable") == parked_before + 1
    listed = await schema.parked(pg, tables)
    assert [p.routing_key for p in listed] == ["nobody.home", "park.big"]
    assert await schema.retry_parked(pg, tables, [listed[1].id]) == 1
    assert await pending(pg, tables) == 1


async def test_notify_wakes_the_relay_long_before_its_poll(
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """With a 5 s poll, a committed row is published within a small fraction of it (NOTIFY);
    without the trigger, polling alone still publishes it within about one poll interval."""
    poll = 5.0
    await start_relay(poll_interval=poll)
    received = await listen(amqp_channel, settings, "wake.#")
    outbox = Outbox(settings, schema=tables.schema)
    await asyncio.sleep(0.5)  # the relay's first scan is over: it is waiting
    latencies = []
    for i in range(3):
        async with pg.transaction():
            await outbox.emit(pg, "wake.up", {"i": i})
        committed = time.monotonic()
        await eventually(_arrived(received, i + 1))
        latencies.append(time.monotonic() - committed)
        await asyncio.sleep(0.2)
    assert max(latencies) / poll < 0.1, latencies

    await pg.execute(f"DROP TRIGGER outbox_notify ON {tables.outbox}")
    async with pg.transaction():
        await outbox.emit(pg, "wake.up", {"i": 3})
    committed = time.monotonic()
    await eventually(lambda: len(received) == 4, timeout=3 * poll)
    assert (time.monotonic() - committed) / poll < 1.5


async def test_a_relay_without_its_database_says_why_and_catches_up(
    pg: Any,
    tables: Tables,
    settings: Settings,
    start_relay: RelayFactory,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """A relay whose database refuses connections, or has no outbox tables, is not ready and
    says why; one whose own backend is terminated reconnects, takes its partitions again and
    publishes what was committed meanwhile."""
    away = await start_relay("postgresql://postgres@127.0.0.1:1/test", ready=False)
    await eventually(lambda: any("database unavailable" in p for p in away.problems()))
    await away.stop()
    uninitialised = await start_relay(schema=f"{tables.schema}_none", ready=False)
    await eventually(lambda: any("outbox init" in p for p in uninitialised.problems()))
    await uninitialised.stop()

    relay = await start_relay()
    received = await listen(amqp_channel, settings, "gone.#")
    outbox = Outbox(settings, schema=tables.schema)
    backends = await pg.fetch(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::bigint::oid "
        "AND objid = $2 AND objsubid = 2",
        tables.lock_space,
        PARTITIONS,
    )
    assert len(backends) == 1
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", backends[0]["pid"])
    async with pg.transaction():
        await outbox.emit(pg, "gone.and.back", {"n": 1})
    await eventually(lambda: len(received) == 1)
    await eventually(lambda: not relay.problems() and len(relay.partitions) == PARTITIONS)


async def test_sent_rows_and_inbox_ids_are_purged_after_the_retention(
    pg: Any, tables: Tables, settings: Settings
) -> None:
    """Sent rows and inbox ids older than the retention go; pending, parked and recent stay."""
    outbox = Outbox(settings, schema=tables.schema)
    async with pg.transaction():
        for _ in range(4):
            await outbox.emit(pg, "old.news", {})
    ids = [r["id"] for r in await pg.fetch(f"SELECT id FROM {tables.outbox} ORDER BY id")]
    old, recent = "now() - interval '2 days'", "now() - interval '1 hour'"
    await pg.execute(f"UPDATE {tables.outbox} SET sent_at = {old} WHERE id = $1", ids[0])
    await pg.execute(f"UPDATE {tables.outbox} SET sent_at = {recent} WHERE id = $1", ids[1])
    await pg.execute(
        f"UPDATE {tables.outbox} SET parked_at = {old}, parked_reason = 'x' WHERE id = $1", ids[2]
    )
    await pg.execute(
        f"INSERT INTO {tables.inbox} (consumer, message_id, received_at) "
        f"VALUES ('a.b', 'old', {old}), ('a.b', 'new', {recent})"
    )
    link = AmqpLink("outbox", settings)
    relay = Relay(RelayConfig(dsn=PG_URL, schema=tables.schema, retention=86400), settings, link)
    assert await relay.purge(pg) == (1, 1)
    left = [r["id"] for r in await pg.fetch(f"SELECT id FROM {tables.outbox} ORDER BY id")]
    assert left == ids[1:]
    assert [r[0] for r in await pg.fetch(f"SELECT message_id FROM {tables.inbox}")] == ["new"]


async def test_init_is_idempotent_and_safe_to_run_concurrently(pg: Any) -> None:
    """`burrow outbox init` run three times at once, then again, leaves one set of tables
    and one trigger."""
    name = f"{RUN_PREFIX}_obinit"
    try:
        await asyncio.gather(*(schema.init(PG_URL, name) for _ in range(3)))
        await schema.init(PG_URL, name)
        triggers = await pg.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_notify' "
            "AND tgrelid = $1::regclass",
            f'"{name}".outbox',
        )
        assert triggers == 1
        assert await pg.fetchval(f'SELECT count(*) FROM "{name}".inbox') == 0
    finally:
        await pg.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


# -- the inbox ----------------------------------------------------------------------------------


class Bump(Model):
    """Event: count one for `id`."""

    id: str


@pytest.fixture
async def pool(tables: Tables) -> AsyncIterator[Any]:
    """A pool for the inbox, with a counter table in the test's schema."""
    made = await db.create_pool(PG_URL, min_size=1, max_size=8)
    await made.execute(
        f'CREATE TABLE "{tables.schema}".counter (id text PRIMARY KEY, n integer NOT NULL)'
    )
    yield made
    await made.close()


async def _bump(tables: Tables, id_: str) -> None:
    await connection().execute(
        f'INSERT INTO "{tables.schema}".counter VALUES ($1, 1) '
        f'ON CONFLICT (id) DO UPDATE SET n = "{tables.schema}".counter.n + 1',
        id_,
    )


async def _count(pg: Any, tables: Tables, id_: str) -> int | None:
    value = await pg.fetchval(f'SELECT n FROM "{tables.schema}".counter WHERE id = $1', id_)
    return None if value is None else int(value)


async def test_a_republished_message_has_no_second_effect(  # noqa: PLR0917 (fixtures)
    pg: Any,
    pool: Any,
    tables: Tables,
    settings: Settings,
    start_app: AppFactory,
    start_relay: RelayFactory,
) -> None:
    """An outbox row published again (its sent mark lost in a crash) reaches the inbox
    handler as a duplicate: acked, counted, the counter incremented once, and the event the
    handler wrote into the outbox in the same transaction written once."""
    inbox = Inbox(pool, schema=tables.schema)
    svc = Service("inb")
    outbox = Outbox(settings, schema=tables.schema)

    @svc.subscribe("bump.*", middleware=[inbox])
    async def on_bump(event: Bump) -> None:
        """Count one and announce it, in the inbox's transaction."""
        await _bump(tables, event.id)
        await outbox.emit(connection(), "bumped.once", {"id": event.id})

    await start_app(svc)
    await start_relay()
    async with pg.transaction():
        await outbox.emit(pg, "bump.one", {"id": "a"})
    await eventually(lambda: _equals(_count(pg, tables, "a"), 1))
    duplicates = sample("burrow_inbox_duplicates_total")
    await pg.execute(  # as if the relay had crashed before marking it sent
        f"UPDATE {tables.outbox} SET sent_at = NULL WHERE routing_key = 'bump.one'"
    )
    await eventually(lambda: sample("burrow_inbox_duplicates_total") == duplicates + 1)
    await asyncio.sleep(0.2)
    assert await _count(pg, tables, "a") == 1
    assert await pg.fetchval(f"SELECT count(*) FROM {tables.inbox}") == 1
    keys = await pg.fetch(f"SELECT routing_key FROM {tables.outbox} ORDER BY id")
    assert [r["routing_key"] for r in keys] == ["bump.one", "bumped.once"]


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_failed_handler_leaves_no_trace_and_its_retry_counts_once(  # noqa: PLR0917 (fixtures)
    pg: Any,
    pool: Any,
    tables: Tables,
    settings: Settings,
    start_app: AppFactory,
    client: Client,
) -> None:
    """A handler that writes and then fails rolls back (no count, no inbox id): its retry
    runs again and counts once; one that always fails leaves nothing at all. (This inbox
    opens its own pool from a DSN.)"""
    inbox = Inbox(PG_URL, schema=tables.schema)
    svc = Service("inf")
    attempts: dict[str, int] = {}

    @svc.subscribe("flaky.*", middleware=[inbox], retries=3)
    async def on_flaky(event: Bump, ctx: Context) -> None:
        """Count one, then fail the first time (or every time for `never`)."""
        await _bump(tables, event.id)
        attempts[event.id] = attempts.get(event.id, 0) + 1
        if event.id == "never" or attempts[event.id] == 1:
            raise Unavailable("not yet")

    await start_app(svc, retry_base_delay=0.05)
    await client.emit("flaky.once", {"id": "once"})
    await client.emit("flaky.never", {"id": "never"})
    await eventually(lambda: attempts.get("once") == 2 and attempts.get("never") == 4)
    await eventually(lambda: _equals(_count(pg, tables, "once"), 1))
    await asyncio.sleep(0.3)
    assert await _count(pg, tables, "never") is None
    consumers = await pg.fetch(f"SELECT consumer FROM {tables.inbox}")
    assert [r["consumer"] for r in consumers] == ["inf.on_flaky"]
    await inbox.close()


async def test_a_duplicate_call_is_answered_with_the_stored_reply(
    pg: Any, pool: Any, tables: Tables
) -> None:
    """The second delivery of a call (same message id) is not run: it gets the first reply."""
    inbox = Inbox(pool, schema=tables.schema)
    runs: list[int] = []

    async def handler(request: Request) -> Result:
        await _bump(tables, "call")
        runs.append(1)
        return Result(Outcome.OK, reply=orjson.dumps({"run": len(runs)}))

    async def noop(req: Pair) -> Sum:  # pragma: no cover - the stand-in endpoint runs instead
        return Sum(sum=0)

    operation = Operation("svc", "op", Pair, Sum, noop, wants_context=False)
    delivery = Delivery(body=b"{}", routing_key="svc.op", message_id="call-1", type="svc.op")
    request = Request("svc", "svc.op", operation, delivery, "call", None, None, 5.0)
    first = await inbox(request, handler)
    second = await inbox(request, handler)
    assert (first.reply, first.duplicate) == (b'{"run":1}', False)
    assert (second.reply, second.duplicate) == (b'{"run":1}', True)
    assert runs == [1]
    assert await _count(pg, tables, "call") == 1


async def test_an_inbox_without_its_database_is_unavailable(tables: Tables) -> None:
    """A database that refuses connections makes the delivery `Unavailable` (retried)."""
    inbox = Inbox("postgresql://postgres@127.0.0.1:1/test", schema=tables.schema)
    delivery = Delivery(body=b"{}", routing_key="a.b", message_id="m")
    operation = Operation("a", "b", Pair, Sum, lambda req: req, wants_context=False)
    request = Request("a", "a.b", operation, delivery, "cast", None, None, 5.0)

    async def never(request: Request) -> Result:  # pragma: no cover - must not run
        raise AssertionError("ran without its inbox")

    with pytest.raises(Unavailable, match="inbox database is unavailable"):
        await inbox(request, never)
    await inbox.close()
