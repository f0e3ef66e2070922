"""W8 outbox: events written through the transactional outbox, against direct `Client.emit`.

Rows (both to the same subscriber, with the same payload: W3's ~100-byte order event plus a
`ts` field, the wall-clock time the producer stamped it):

- `burrow-outbox`: `window` transactions in flight on a pool of as many asyncpg connections;
  each inserts one row into a business table `orders` and writes one
  `Outbox.emit(conn, "orders.created", …, key=<order id>)`, then commits. The relay runs in the
  same process, as `burrow run` runs it beside a service (its own database connection and AMQP
  link, `RelayConfig` defaults: batch 500, poll 1 s, woken by NOTIFY). `ts` is taken at the
  emit, inside the transaction, so the latency includes the commit.
- `burrow-emit`: `Client.emit("orders.created", …)` with `window` publishes in flight (W3's
  producer); `ts` is taken right before the emit.

The subscriber is an `App` serving `Service("audit")` whose `@subscribe("orders.*")` handler
takes a pydantic model (W3's consumer, prefetch 256) and records `time.time() - ts` per event.
The producers print RESULT once every transaction committed (every publish confirmed) and stay
up until SIGTERM, so the relay keeps publishing until the consumer has had every event.

- `burrow-dual-write` (a diagnostic row, full runs only): the outbox row's transaction
  without the outbox row, then `Client.emit` after the commit (the unsafe dual write): the
  database work the business needs anyway, so `burrow-outbox` over it is what the outbox
  itself costs.

Each producer also runs paced (`rate` events/s): the latency of a pipeline that keeps up,
where the saturated run's p50 is mostly the backlog in front of the slowest stage.

`python -m bench.tools.outbox_tool ROLE JSON_ARGS`, ROLE = consume | emit | outbox | dual |
relay (`relay`: the relay alone, for experiments with a relay process of its own); the same
READY / RESULT lines as `bench.worker`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.common import EVENT_KEY, EVENT_PATTERN, event_payload, median, percentile
from bench.tools.burrow_tool import settings_for
from service import App, Client, Model, Service
from service._amqp.transport import AmqpLink
from service._observe.log import configure_logging
from service._outbox import db, schema
from service._outbox.relay import Relay, RelayConfig
from service._outbox.schema import Tables
from service._outbox.writer import Outbox
from service._protocol.topology import client_topology

__all__ = ["PG_URL", "StampedOrder", "schema_name", "prepare", "drop", "main"]

# W8's database: a schema of its own per round (`schema_name`), dropped at the end of it.
PG_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class StampedOrder(Model):
    """W3's order event with the producer's timestamp, validated on receipt."""

    seq: int
    kind: str
    order: str
    note: str
    ts: float


def schema_name(ns: str) -> str:
    """The PostgreSQL schema of a namespace (`bench1a2b3c-bo` → `bench1a2b3c_bo`)."""
    return re.sub(r"[^a-z0-9_]", "_", ns.lower())[:48]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _result(data: dict[str, Any]) -> None:
    _say("RESULT " + orjson.dumps(data).decode())


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _stamped(seq: int) -> dict[str, Any]:
    return {**event_payload(seq), "ts": time.time()}


# -- the subscriber --------------------------------------------------------------------------


async def consume(args: dict[str, Any]) -> None:
    """The audit App until `events` arrived; RESULT: first/last arrival, latency p50/p99."""
    settings = settings_for(args["ns"], "classic", int(args["prefetch"]))
    configure_logging(settings.log_format, settings.log_level)
    expected = int(args["events"])
    stop = _stop_event()
    latencies: list[float] = []
    marks: dict[str, float] = {}
    done = asyncio.Event()
    audit = Service("audit", description="Audits every order event (the W8 subscriber).")

    @audit.subscribe(EVENT_PATTERN)
    async def orders(event: StampedOrder) -> None:
        """Note the event's latency (acked by Burrow once this returns)."""
        now = time.time()
        latencies.append(now - event.ts)
        if len(latencies) == 1:
            marks["first"] = now
        if len(latencies) >= expected:
            marks["last"] = now
            done.set()

    app = App(audit, settings=settings)
    await app.start()
    try:
        await app.wait_ready(30)
        _say("READY")
        waiting = asyncio.ensure_future(stop.wait())
        finished = asyncio.ensure_future(done.wait())
        await asyncio.wait({waiting, finished}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        finished.cancel()
        if done.is_set():
            us = [s * 1e6 for s in latencies]
            _result(
                {
                    "count": len(latencies),
                    **marks,
                    "p50_us": median(us),
                    "p99_us": percentile(us, 99),
                }
            )
            await stop.wait()
    finally:
        await app.stop()


# -- the producers ---------------------------------------------------------------------------


async def _lanes(
    total: int, window: int, one: Callable[[int], Any], rate: float = 0.0
) -> tuple[float, float]:
    """`one(i)` for every i < total, `window` at a time; with `rate`, event i no earlier than
    i / rate seconds after the start (paced: the latency of a system that keeps up)."""
    counter = itertools.count()

    async def lane() -> None:
        while (i := next(counter)) < total:
            if rate:
                await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            await one(i)

    first = time.time()
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(window)))
    return first, time.perf_counter() - started


async def emit(args: dict[str, Any]) -> None:
    """`burrow-emit`: `Client.emit` with `window` in flight; stays up until SIGTERM."""
    settings = settings_for(args["ns"], "classic")
    configure_logging(settings.log_format, settings.log_level)
    stop = _stop_event()
    total, window = int(args["events"]), int(args["window"])
    async with Client(settings) as client:

        async def one(seq: int) -> None:
            if not await client.emit(EVENT_KEY, _stamped(seq)):
                raise AssertionError(f"{EVENT_KEY} reached no subscriber queue")

        _say("READY")
        first, elapsed = await _lanes(total, window, one, float(args.get("rate", 0)))
        _result({"first": first, "elapsed": elapsed, "publish_per_s": total / elapsed})
        await stop.wait()


def _relay(args: dict[str, Any], tables: Tables) -> Relay:
    settings = settings_for(args["ns"], "classic")
    config = RelayConfig(dsn=args.get("dsn", PG_URL), schema=tables.schema)
    link = AmqpLink("outbox", settings, topology=client_topology(settings))
    return Relay(config, settings, link, owns_link=True)


async def _relay_ready(relay: Relay) -> None:
    deadline = time.monotonic() + 30
    while relay.problems() or not relay.partitions:
        if time.monotonic() > deadline:
            raise RuntimeError(f"relay not ready: {relay.problems()}")
        await asyncio.sleep(0.02)


async def prepare(ns: str, dsn: str = PG_URL) -> None:
    """The round's schema: the outbox tables and the business table `orders` (afresh)."""
    tables = Tables(schema_name(ns))
    conn = await db.connect(dsn, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{tables.schema}" CASCADE')
        await schema.apply(conn, tables)
        await conn.execute(
            f'CREATE TABLE "{tables.schema}".orders '
            "(id text PRIMARY KEY, created timestamptz NOT NULL DEFAULT now(), note text)"
        )
    finally:
        await conn.close()


async def drop(prefix: str, dsn: str = PG_URL) -> int:
    """Drop every schema whose name starts with `schema_name(prefix)`; how many."""
    conn = await db.connect(dsn, timeout=10)
    try:
        names = [
            r[0]
            for r in await conn.fetch("SELECT nspname FROM pg_namespace")
            if r[0].startswith(schema_name(prefix))
        ]
        for name in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        return len(names)
    finally:
        await conn.close()


async def outbox(args: dict[str, Any]) -> None:
    """`burrow-outbox` on the schema `prepare` made: `window` transactions in flight, the relay
    in this process (with `relay` = `process`, none here: `python -m bench.tools.outbox_tool
    relay` runs it)."""
    settings = settings_for(args["ns"], "classic")
    configure_logging(settings.log_format, settings.log_level)
    stop = _stop_event()
    dsn = args.get("dsn", PG_URL)
    total, window = int(args["events"]), int(args["window"])
    tables = Tables(schema_name(args["ns"]))
    relay = _relay(args, tables) if args.get("relay", "inline") == "inline" else None
    pool = await db.create_pool(dsn, min_size=window, max_size=window)
    writer = Outbox(settings, schema=tables.schema)
    insert = f'INSERT INTO "{tables.schema}".orders (id, note) VALUES ($1, $2)'
    try:
        if relay is not None:
            relay.start()
            await _relay_ready(relay)

        async def one(seq: int) -> None:
            order = f"ord-{seq:08d}"
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(insert, order, "x" * 40)
                await writer.emit(conn, EVENT_KEY, _stamped(seq), key=order)

        _say("READY")
        first, elapsed = await _lanes(total, window, one, float(args.get("rate", 0)))
        _result({"first": first, "elapsed": elapsed, "commit_per_s": total / elapsed})
        await stop.wait()
    finally:
        if relay is not None:
            await relay.stop()
        await pool.close()


async def relay_only(args: dict[str, Any]) -> None:
    """A relay process of its own on the round's schema (made by the `outbox` producer)."""
    settings = settings_for(args["ns"], "classic")
    configure_logging(settings.log_format, settings.log_level)
    stop = _stop_event()
    relay = _relay(args, Tables(schema_name(args["ns"])))
    relay.start()
    try:
        await _relay_ready(relay)
        _say("READY")
        await stop.wait()
    finally:
        await relay.stop()


async def dual_write(args: dict[str, Any]) -> None:
    """`burrow-dual-write` (diagnostic, not a peer): the outbox row's transaction without its
    outbox row, then `Client.emit` after the commit: the same database work as the business
    needs, with the dual-write problem the outbox solves (a crash between the two loses the
    event). What the outbox itself costs is the gap between this row and `burrow-outbox`."""
    settings = settings_for(args["ns"], "classic")
    configure_logging(settings.log_format, settings.log_level)
    stop = _stop_event()
    dsn = args.get("dsn", PG_URL)
    total, window = int(args["events"]), int(args["window"])
    tables = Tables(schema_name(args["ns"]))
    pool = await db.create_pool(dsn, min_size=window, max_size=window)
    insert = f'INSERT INTO "{tables.schema}".orders (id, note) VALUES ($1, $2)'
    try:
        async with Client(settings) as client:

            async def one(seq: int) -> None:
                order = f"ord-{seq:08d}"
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(insert, order, "x" * 40)
                if not await client.emit(EVENT_KEY, _stamped(seq)):
                    raise AssertionError(f"{EVENT_KEY} reached no subscriber queue")

            _say("READY")
            first, elapsed = await _lanes(total, window, one, float(args.get("rate", 0)))
            _result({"first": first, "elapsed": elapsed, "commit_per_s": total / elapsed})
            await stop.wait()
    finally:
        await pool.close()


ROLES = {
    "consume": consume,
    "emit": emit,
    "outbox": outbox,
    "dual": dual_write,
    "relay": relay_only,
}


def main() -> int:
    """`python -m bench.tools.outbox_tool ROLE JSON_ARGS`."""
    role, args = sys.argv[1], orjson.loads(sys.argv[2])
    coro = ROLES[role](args)
    if args.get("loop", "uvloop") == "uvloop":
        import uvloop  # noqa: PLC0415

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
