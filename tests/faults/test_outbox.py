"""Faults O1 to O4 of docs/reliability.md: the transactional outbox and inbox on the real
PostgreSQL and a private RabbitMQ node.

The oracle is the ledger's: the committed transactions (the `orders` table, written in the
same transaction as each outbox row) are the messages "confirmed" by the writer; what reached
the subscriber's queue, de-duplicated by message id, is what was processed. Lost = committed -
delivered must be empty, phantoms = delivered - committed (a rolled-back transaction's
message) must be empty, and an order delivered under two message ids (a duplicate nobody could
recognise) is a failure. A copy with the same message id (a re-publish after a crash) is
allowed and counted: consumers recognise it (O4 shows one that does). Per-key order is the
order of each message id's first arrival.

Each test has a PostgreSQL schema of its own (`<run prefix>_fo<n>`, dropped afterwards) on
`BURROW_TEST_POSTGRES_URL` (default: the machine's server, database `test`); PostgreSQL itself
is never stopped. The processes killed with SIGKILL are `tests/faults/outbox_child.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from service import Client, Settings
from service._amqp.transport import AmqpLink
from service._outbox import db, schema
from service._outbox.relay import Relay, RelayConfig
from service._outbox.schema import Tables
from service._outbox.writer import Outbox
from service._protocol.topology import client_topology, service_topology
from service._protocol.vocabulary import Names
from tests.conftest import RUN_PREFIX, delete_topology
from tests.faults.conftest import MakeClient, MakeLink, make_settings
from tests.faults.harness import Ledger, PrivateBroker, PublishOutcome, eventually
from tests.faults.outbox_child import counter_service, rolled_back, write_order

__all__: list[str] = []

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("BURROW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_schemas = itertools.count()
_WAIT = 60.0  # upper bound on one wait for a process or the relay; never reached when sound


# -- the database ---------------------------------------------------------------------------


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    """The test's own connection, for setting up and reading the tables."""
    conn = await db.connect(PG_URL, timeout=10)
    yield conn
    await conn.close()


@pytest.fixture
async def tables(pg: Any) -> AsyncIterator[Tables]:
    """A fresh outbox schema with the business tables (`orders`, `counter`); dropped after."""
    made = Tables(f"{RUN_PREFIX}_fo{next(_schemas)}")
    await schema.apply(pg, made)
    await pg.execute(
        f'CREATE TABLE "{made.schema}".orders (id text PRIMARY KEY, key text NOT NULL, '
        "seq integer NOT NULL)"
    )
    await pg.execute(f'CREATE TABLE "{made.schema}".counter (id text PRIMARY KEY, n integer)')
    yield made
    await pg.execute(f'DROP SCHEMA IF EXISTS "{made.schema}" CASCADE')


async def pending(pg: Any, tables: Tables) -> int:
    """Outbox rows neither sent nor parked."""
    return int(
        await pg.fetchval(
            f"SELECT count(*) FROM {tables.outbox} WHERE sent_at IS NULL AND parked_at IS NULL"
        )
    )


async def sent(pg: Any, tables: Tables) -> int:
    """Outbox rows marked sent."""
    return int(await pg.fetchval(f"SELECT count(*) FROM {tables.outbox} WHERE sent_at IS NOT NULL"))


async def drained(pg: Any, tables: Tables) -> bool:
    """Whether every outbox row is sent (none pending, none parked)."""
    return await pending(pg, tables) == 0 and not await schema.parked(pg, tables, limit=1)


# -- the subscriber's queue ------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One message found in the subscriber's queue, in queue order."""

    message_id: str
    order: str
    key: str
    seq: int


@pytest.fixture
async def orders_queue(
    broker: PrivateBroker, make_link: MakeLink, settings: Settings, namespace: str
) -> AsyncIterator[str]:
    """A durable quorum queue bound to `<ns>.events` for `orders.*` (the subscriber of
    `orders.created`), on the private node; deleted after the test."""
    # The exchanges as Burrow declares them (a link of the client's topology; deleted after).
    await make_link(topology=client_topology(settings))
    name = f"{namespace}.orders-audit"
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(Names(namespace).events_exchange, routing_key="orders.*")
    finally:
        await connection.close()
    yield name
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(broker.url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(name)
        finally:
            await connection.close()


async def take_all(url: str, queue: str) -> list[Arrival]:
    """Every message in `queue`, in order (taken: acked on the way)."""
    arrivals: list[Arrival] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=True)
        while (message := await source.get(fail=False, no_ack=True)) is not None:
            body = orjson.loads(message.body)
            arrivals.append(
                Arrival(message.message_id or "?", body["order"], body["key"], body["seq"])
            )
    finally:
        await connection.close()
    return arrivals


@dataclass
class Outcome:
    """What the oracle found: the counts the test log reports."""

    committed: int
    arrivals: int
    copies: int  # arrivals of a message id already seen (re-publishes)
    summary: str


async def assert_sound(pg: Any, tables: Tables, arrivals: list[Arrival]) -> Outcome:
    """The oracle: every committed order delivered under its row's message id, nothing of a
    rolled-back transaction, no order under two ids, each key's orders in commit order."""
    committed = {
        r["id"]: (r["key"], r["seq"])
        for r in await pg.fetch(f'SELECT id, key, seq FROM "{tables.schema}".orders')
    }
    rows = await pg.fetch(f"SELECT message_id, body, sent_at FROM {tables.outbox} ORDER BY id")
    row_ids = {orjson.loads(r["body"])["order"]: r["message_id"] for r in rows}
    # The outbox row and the business row commit together or not at all.
    assert set(row_ids) == set(committed), sorted(set(row_ids) ^ set(committed))[:10]
    assert not [o for o, (_, seq) in committed.items() if rolled_back(seq)], "rollback kept"

    ledger = Ledger()
    for order in committed:
        ledger.record_publish(order, PublishOutcome.CONFIRMED)
    first: dict[str, Arrival] = {}
    copies = 0
    for arrival in arrivals:
        if arrival.message_id in first:
            copies += 1
            assert first[arrival.message_id].order == arrival.order, arrival
            continue
        first[arrival.message_id] = arrival
        ledger.effect(arrival.order)
        assert not rolled_back(arrival.seq), f"a rolled-back transaction's message: {arrival}"
        assert row_ids.get(arrival.order) == arrival.message_id, (
            f"{arrival.order} arrived as {arrival.message_id}, its row says "
            f"{row_ids.get(arrival.order)}"
        )
    summary = ledger.assert_sound()
    assert not ledger.duplicates(), f"orders published under two message ids: {summary}"
    by_key: dict[str, list[int]] = defaultdict(list)
    for arrival in first.values():  # dicts keep insertion order: first arrivals, in order
        by_key[arrival.key].append(arrival.seq)
    for key, seqs in by_key.items():
        expected = sorted(seq for k, seq in committed.values() if k == key)
        assert seqs == expected, f"key {key}: arrived {seqs[:20]}…, committed {expected[:20]}…"
    return Outcome(len(committed), len(arrivals), copies, f"{summary} copies={copies}")


# -- processes of our own --------------------------------------------------------------------


@dataclass
class Child:
    """A process of `outbox_child`: its `@ ` lines on stdout, its stderr in a file."""

    process: asyncio.subprocess.Process
    log: Path

    def tail(self) -> str:
        """The end of its stderr, for failure messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return "(no log)"

    async def line(self, timeout: float = _WAIT) -> str:
        """Its next `@ ` line, without the marker; fail with its log when it ends or is
        silent for `timeout` seconds."""
        assert self.process.stdout is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await self.process.stdout.readline()
            except TimeoutError:
                raise AssertionError(f"no line within {timeout}s; log:\n{self.tail()}") from None
            if not raw:
                await self.process.wait()
                raise AssertionError(f"exited {self.process.returncode}; log:\n{self.tail()}")
            if raw.startswith(b"@ "):
                return raw[2:].decode().strip()

    async def killed(self, timeout: float = _WAIT) -> None:
        """Wait until it died by its own SIGKILL."""
        try:
            async with asyncio.timeout(timeout):
                await self.process.wait()
        except TimeoutError:
            raise AssertionError(f"not dead within {timeout}s; log:\n{self.tail()}") from None
        assert self.process.returncode == -signal.SIGKILL, self.tail()

    async def stop(self) -> list[str]:
        """SIGTERM; its remaining `@ ` lines once it exited 0."""
        assert self.process.stdout is not None
        self.process.terminate()
        async with asyncio.timeout(_WAIT):
            rest = await self.process.stdout.read()
            code = await self.process.wait()
        assert code == 0, f"exited {code}; log:\n{self.tail()}"
        return [ln[2:].strip() for ln in rest.decode().splitlines() if ln.startswith("@ ")]


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
def child_env(broker: PrivateBroker, namespace: str, tables: Tables) -> dict[str, str]:
    """The environment of a child: this test's node, namespace, database and schema."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BURROW_", "FAULT_"))}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    settings = make_settings(broker.url, namespace)
    return env | {
        "BURROW_AMQP_URL": broker.url,
        "BURROW_NAMESPACE": namespace,
        "BURROW_HEARTBEAT": str(settings.heartbeat),
        "BURROW_PUBLISH_TIMEOUT": str(settings.publish_timeout),
        "BURROW_CONNECT_TIMEOUT": str(settings.connect_timeout),
        "BURROW_RECONNECT_MIN_DELAY": str(settings.reconnect_min_delay),
        "BURROW_RECONNECT_MAX_DELAY": str(settings.reconnect_max_delay),
        "BURROW_LOG_LEVEL": "warning",
        "FAULT_PG_DSN": PG_URL,
        "FAULT_SCHEMA": tables.schema,
    }


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start `python -m tests.faults.outbox_child <role>` with an environment; each child still
    running after the test is stopped (SIGTERM, then SIGKILL after 30 s): only ours."""
    children: list[Child] = []

    async def start(role: str, env: dict[str, str]) -> Child:
        log = tmp_path / f"{role}-{len(children)}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.faults.outbox_child",
                role,
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        child = Child(process, log)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.process.returncode is None:
            child.process.terminate()
            try:
                await asyncio.wait_for(child.process.wait(), 30)
            except TimeoutError:
                child.process.kill()
                await child.process.wait()


# -- O1: the service killed between its commit and the publish --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("window", ["publish", "mark"])
async def test_o1_service_killed_between_commit_and_publish(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    pg: Any,
    tables: Tables,
    orders_queue: str,
    spawn: Spawn,
    child_env: dict[str, str],
    window: str,
) -> None:
    """O1: a service writing orders through the outbox is SIGKILLed when its relay reaches a
    committed row, before publishing it (`publish`) or after its batch was confirmed and
    before any of it was marked sent (`mark`); after a restart every committed order is
    delivered under its row's message id, none of a rolled-back transaction, per key in
    commit order (`mark`: the batch arrives twice, as copies of the same ids)."""
    marked = "k2-25"  # committed (25 % 5 != 4)
    writes = {"FAULT_KEYS": "k0,k1,k2,k3", "FAULT_PER_KEY": "40"}
    crash = {"FAULT_CRASH_ORDER": marked, "FAULT_CRASH_AT": window}
    first = await spawn("service", child_env | writes | crash)
    assert await first.line() == "ready"
    await first.killed()

    # In the window: the marked order is committed and its row pending (never marked sent).
    row = await pg.fetchrow(
        f'SELECT o.id, b.message_id, b.sent_at FROM "{tables.schema}".orders o '
        f"JOIN {tables.outbox} b "
        "ON convert_from(b.body, 'UTF8')::jsonb ->> 'order' = o.id WHERE o.id = $1",
        marked,
    )
    assert row is not None, "the marked order was not committed"
    assert row["sent_at"] is None, row
    committed = int(await pg.fetchval(f'SELECT count(*) FROM "{tables.schema}".orders'))
    assert await pending(pg, tables) >= 1
    if window == "publish":  # the marked row's message never left the process
        assert await broker.ready_count(orders_queue) < committed, "nothing left to publish"

    second = await spawn("service", child_env)  # restarted: no writes, its relay only
    assert await second.line() == "ready"
    await eventually(lambda: drained(pg, tables), _WAIT, "every committed row sent")
    await second.stop()
    arrivals = await take_all(broker.url, orders_queue)
    outcome = await assert_sound(pg, tables, arrivals)
    assert outcome.committed == committed, outcome.summary
    if window == "mark":  # confirmed before the kill, published again after it: same id
        twice = [a for a in arrivals if a.order == marked]
        assert [a.message_id for a in twice] == 2 * [row["message_id"]], twice
    print(f"O1[{window}] oracle: {outcome.summary}")


# -- O2: the broker down for 30 s while transactions commit ----------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_o2_broker_down_while_transactions_commit(
    broker: PrivateBroker,
    pg: Any,
    tables: Tables,
    orders_queue: str,
    settings: Settings,
) -> None:
    """O2: the node stopped for 30 s while writers keep committing: no commit waits on the
    broker, the relay says why it cannot publish, and afterwards every committed order is
    delivered, each key's in commit order."""
    outbox_link = AmqpLink("outbox", settings, topology=client_topology(settings))
    config = RelayConfig(dsn=PG_URL, schema=tables.schema, poll_interval=0.2)
    relay = Relay(config, settings, outbox_link, owns_link=True)
    pool = await db.create_pool(PG_URL, min_size=1, max_size=4)
    stop = asyncio.Event()
    commits = 0
    outbox = Outbox(settings, schema=tables.schema)

    async def writer(key: str) -> None:
        nonlocal commits
        for seq in itertools.count():
            if stop.is_set():
                return
            committed = await write_order(pool, outbox, tables.schema, key, seq)
            commits += committed  # not `+= await`: that reads `commits` before the await
            await asyncio.sleep(0.05)  # a stream: about 20 commits a second per key

    relay.start()
    writing = asyncio.gather(*(writer(f"k{i}") for i in range(4)))
    try:
        await eventually(lambda: _at_least(sent(pg, tables), 40), _WAIT, "40 rows sent")
        await broker.stop_app()
        await eventually(_true(lambda: bool(relay.problems())), _WAIT, "the relay noticing")
        at_stop = commits
        await asyncio.sleep(30)  # the outage: writers go on committing
        during = commits - at_stop
        assert during > 0, "a commit waited for the broker"
        waiting = await pending(pg, tables)
        assert waiting >= during, f"{waiting} rows pending after {during} commits in the outage"
        assert any("broker" in p for p in relay.problems()), relay.problems()
        await broker.start_app()
        mark = await sent(pg, tables)
        await eventually(lambda: _at_least(sent(pg, tables), mark + 40), _WAIT, "sending again")
    finally:
        stop.set()
        await writing
        await pool.close()
    try:
        await eventually(lambda: drained(pg, tables), _WAIT, "every committed row sent")
    finally:
        await relay.stop()
    outcome = await assert_sound(pg, tables, await take_all(broker.url, orders_queue))
    assert outcome.committed == commits, outcome.summary
    print(f"O2 oracle: {outcome.summary} committed_in_outage={during}")


async def _at_least(count: Awaitable[int], wanted: int) -> bool:
    return await count >= wanted


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check_async() -> bool:
        return check()

    return check_async


# -- O3: two relays racing ------------------------------------------------------------------


@pytest.mark.slow
async def test_o3_two_relay_processes_race_without_crashes(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    pg: Any,
    tables: Tables,
    orders_queue: str,
    settings: Settings,
    spawn: Spawn,
    child_env: dict[str, str],
) -> None:
    """O3: two relay processes over one table, the second joining while writers commit (half
    the partitions change hands mid-stream): each row is published exactly once (the relays'
    confirmed counts add up to the rows, each row marked once, each message id arrives once),
    none lost, each key's in commit order."""
    keys, per_key, half = 32, 30, 15
    outbox = Outbox(settings, schema=tables.schema)
    pool = await db.create_pool(PG_URL, min_size=1, max_size=8)
    second_ready = asyncio.Event()

    async def writer(key: str) -> None:
        for seq in range(per_key):
            if seq == half:
                await second_ready.wait()  # the rest is written with both relays holding
            await write_order(pool, outbox, tables.schema, key, seq)
            await asyncio.sleep(0.005)

    first = await spawn("relay", child_env)
    assert (await first.line()).startswith("ready")
    writing = asyncio.gather(*(writer(f"key-{i}") for i in range(keys)))
    try:
        await eventually(lambda: _at_least(sent(pg, tables), keys * half // 4), _WAIT, "a start")
        second = await spawn("relay", child_env)
        ready = await second.line()
        assert ready.startswith("ready"), ready
        second_ready.set()
        await writing
    finally:
        second_ready.set()
        with contextlib.suppress(Exception):
            await writing
        await pool.close()
    await eventually(lambda: drained(pg, tables), _WAIT, "every committed row sent")
    counts = [await _published(child) for child in (first, second)]
    rows = await pg.fetch(f"SELECT attempts FROM {tables.outbox}")
    committed = keys * sum(not rolled_back(seq) for seq in range(per_key))
    assert len(rows) == committed
    assert {r["attempts"] for r in rows} == {1}, "a row marked more than once"
    assert all(counts), f"a relay published nothing: {counts} (no race)"
    assert sum(counts) == committed, f"published {counts}: a row published twice"
    arrivals = await take_all(broker.url, orders_queue)
    outcome = await assert_sound(pg, tables, arrivals)
    assert outcome.copies == 0, f"a message published twice: {outcome.summary}"
    assert outcome.arrivals == committed, outcome.summary
    print(f"O3 oracle: {outcome.summary} published_by_relay={counts}")


async def _published(child: Child) -> int:
    lines = await child.stop()
    [count] = [int(ln.split()[1]) for ln in lines if ln.startswith("published ")]
    return count


# -- O4: a consumer with an inbox killed between its commit and its ack -----------------------


@pytest.mark.slow
async def test_o4_inbox_consumer_killed_after_commit_before_ack(  # noqa: PLR0917 (fixtures)
    broker: PrivateBroker,
    pg: Any,
    tables: Tables,
    make_client: MakeClient,
    spawn: Spawn,
    child_env: dict[str, str],
    namespace: str,
    tmp_path: Path,
) -> None:
    """O4: a consumer running its handler under an `Inbox` is SIGKILLed after the inbox
    committed an event and before the ack; the broker redelivers it to the restarted
    consumer, which recognises it (a duplicate, logged and counted) and runs nothing again:
    the counter table holds exactly one increment per event."""
    runs_file = tmp_path / "runs.txt"
    env = child_env | {"FAULT_RUNS_FILE": str(runs_file)}
    marked, count = "e-7", 20
    settings = make_settings(broker.url, namespace)
    try:
        first = await spawn("consumer", env | {"FAULT_CRASH_KEY": marked})
        assert await first.line() == "ready"
        client: Client = await make_client()
        ledger = Ledger()
        for i in range(count):
            assert await client.emit("bump.one", {"id": f"e-{i}"}), "no subscriber queue"
            ledger.record_publish(f"e-{i}", PublishOutcome.CONFIRMED)
        await first.killed()

        # In the window: the marked event's increment and inbox id are committed; the
        # broker has it back in the queue (its delivery was never acked).
        assert await _count(pg, tables, marked) == 1
        assert _runs(runs_file)[marked] == [first.process.pid]
        queue = Names(namespace).subscription_queue("counter", "on_bump")
        await eventually(_ready_in(broker, queue), _WAIT, "the unacked event back in its queue")

        second = await spawn("consumer", env)
        assert await second.line() == "ready"
        recognised: set[str] = set()
        while marked not in recognised:
            line = await second.line()
            if line.startswith("duplicate "):
                recognised.add(line.split()[1])
        await eventually(lambda: _all_counted(pg, tables, count), _WAIT, "every event counted")
        lines = await second.stop()
        recognised |= {ln.split()[1] for ln in lines if ln.startswith("duplicate ")}
        [duplicates] = [int(ln.split()[1]) for ln in lines if ln.startswith("duplicates ")]
        assert duplicates == len(recognised) >= 1, (duplicates, recognised)
        for key, n in (await _counts(pg, tables)).items():
            ledger.effects[key] = n
        await ledger.drain(broker.url, [queue], [Names(namespace).dead_letter_queue("counter")])
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                topology = service_topology(counter_service(tables.schema, print), settings)
                await delete_topology(topology, url=broker.url)
    summary = ledger.assert_sound()
    assert not ledger.duplicates(), f"a second increment: {summary}"
    assert not ledger.queued, summary
    assert not ledger.dead, summary
    assert _runs(runs_file)[marked] == [first.process.pid], "the redelivery ran the handler"
    inbox_ids = await pg.fetchval(f"SELECT count(*) FROM {tables.inbox}")
    assert inbox_ids == count, inbox_ids
    print(f"O4 oracle: {summary} recognised={sorted(recognised)} inbox_ids={inbox_ids}")


async def _counts(pg: Any, tables: Tables) -> dict[str, int]:
    rows = await pg.fetch(f'SELECT id, n FROM "{tables.schema}".counter')
    return {r["id"]: int(r["n"]) for r in rows}


async def _count(pg: Any, tables: Tables, key: str) -> int | None:
    return (await _counts(pg, tables)).get(key)


async def _all_counted(pg: Any, tables: Tables, count: int) -> bool:
    return len(await _counts(pg, tables)) == count


def _ready_in(broker: PrivateBroker, queue: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await broker.ready_count(queue) >= 1

    return check


def _runs(path: Path) -> dict[str, list[int]]:
    """Each event's handler runs (the pid of each), from the consumers' runs file."""
    runs: dict[str, list[int]] = defaultdict(list)
    for line in path.read_text().splitlines():
        key, pid = line.split()
        runs[key].append(int(pid))
    return runs
