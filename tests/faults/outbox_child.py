"""The processes of the outbox fault tests (`test_outbox.py`, O1 to O4): a service writing orders
through the outbox with its own relay, a relay alone, and a consumer whose handler runs under
an `Inbox`.

Run as `python -m tests.faults.outbox_child <role>`; the settings come from `BURROW_*` (the
test's private node and namespace), the database and schema from `FAULT_PG_DSN` and
`FAULT_SCHEMA`. A process says what the test waits for on stdout, in lines starting with `@ `
(its logs go to stderr); SIGTERM stops it gracefully. Its crash is a real SIGKILL of itself
(no handler, no flush, no close): the kernel closes its sockets, PostgreSQL rolls back its open
transaction and frees its advisory locks, the broker requeues what it held unacked.

Roles:
- `service`: `FAULT_PER_KEY` orders for each of the keys `FAULT_KEYS` (comma-separated), one
  transaction each (an `orders` row and one `Outbox.emit` of `orders.created`, key = the
  order's key); every order whose `seq % 5 == 4` is rolled back on purpose after its emit.
  Its relay runs beside the writers, as `burrow run` would run it. With `FAULT_CRASH_ORDER`,
  the process dies when its relay reaches that order's committed row, in the window
  `FAULT_CRASH_AT`: `publish` (about to publish it) or `mark` (its batch confirmed by the
  broker, nothing of it marked sent). Prints `@ ready` (relay holding partitions) and
  `@ written` (writers done).
- `relay`: the relay alone. Prints `@ ready <partitions>` once it holds partitions and, on
  SIGTERM, `@ published <n>`: the rows it had confirmed by the broker.
- `consumer`: an App whose subscription `bump.*` runs under an `Inbox`; the handler adds one
  to the event's counter row and appends `<id> <pid>` to `FAULT_RUNS_FILE`. With
  `FAULT_CRASH_KEY`, the process dies right after the inbox committed that event and before
  its ack. Prints `@ ready`, `@ duplicate <id>` for every delivery the inbox recognised and,
  on SIGTERM, `@ duplicates <n>` (the `burrow_inbox_duplicates_total` counter).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from prometheus_client import REGISTRY

from service import App, Model, Service, Settings, load_settings
from service._amqp.transport import AmqpLink
from service._observe.log import configure_logging
from service._outbox import db
from service._outbox.inbox import Inbox, connection
from service._outbox.relay import Relay, RelayConfig
from service._outbox.writer import Outbox
from service._protocol.registry import Layer
from service._protocol.topology import client_topology
from service._serving.middleware import Next, Request, Result

__all__ = ["ROLLED_BACK_EVERY", "Bump", "counter_service", "rolled_back", "write_order", "main"]

ROLLED_BACK_EVERY = 5  # seq % 5 == 4: rolled back on purpose


def rolled_back(seq: int) -> bool:
    """Whether the service rolls back the transaction of order `seq` on purpose."""
    return seq % ROLLED_BACK_EVERY == ROLLED_BACK_EVERY - 1


def _say(line: str) -> None:
    sys.stdout.write(f"@ {line}\n")
    sys.stdout.flush()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


def _relay(settings: Settings) -> Relay:
    """A relay on this test's schema, built as `Relay.from_settings` builds one."""
    config = RelayConfig(
        dsn=os.environ["FAULT_PG_DSN"], schema=os.environ["FAULT_SCHEMA"], poll_interval=0.2
    )
    link = AmqpLink("outbox", settings, topology=client_topology(settings))
    return Relay(config, settings, link, owns_link=True)


async def _holding(relay: Relay) -> None:
    """Until the relay can publish and holds partitions."""
    while relay.problems() or not relay.partitions:  # noqa: ASYNC110 - no event says so
        await asyncio.sleep(0.02)


def _order_of(row: Any) -> Any:
    return orjson.loads(row["body"]).get("order")


def _install_crash(window: str, order: str) -> None:
    """Make this process die when its relay reaches the row of `order`:

    - `publish`: about to publish it (its batch under way: the rows before it have been
      handed to the link, not written to the socket yet);
    - `mark`: its batch published and confirmed by the broker, before any row of it is
      marked sent (so all of them are published again after a restart: copies).
    """
    if window == "publish":
        publish = Relay._publish

        async def publish_or_die(self: Relay, row: Any) -> Any:
            if _order_of(row) == order:
                _die()
            return await publish(self, row)

        Relay._publish = publish_or_die  # type: ignore[method-assign]
    elif window == "mark":
        record = Relay._record

        async def record_or_die(self: Relay, conn: Any, rows: list[Any], verdicts: Any) -> Any:
            if any(_order_of(row) == order for row in rows):
                _die()
            return await record(self, conn, rows, verdicts)

        Relay._record = record_or_die  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown crash window {window!r}")


class _Rollback(Exception):
    """Raised inside a transaction to roll it back on purpose."""


async def write_order(pool: Any, outbox: Outbox, schema: str, key: str, seq: int) -> bool:
    """One transaction: the `orders` row of `<key>-<seq>` and its `orders.created` event
    (ordering key `key`); rolled back on purpose when `rolled_back(seq)`. Whether it
    committed."""
    order = f"{key}-{seq}"
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f'INSERT INTO "{schema}".orders (id, key, seq) VALUES ($1, $2, $3)',
                order,
                key,
                seq,
            )
            payload = {"order": order, "key": key, "seq": seq}
            await outbox.emit(conn, "orders.created", payload, key=key)
            if rolled_back(seq):
                raise _Rollback
    except _Rollback:
        return False
    return True


async def _write(settings: Settings, keys: list[str], per_key: int) -> None:
    if not keys or per_key < 1:
        return
    schema = os.environ["FAULT_SCHEMA"]
    outbox = Outbox(settings, schema=schema)
    pool = await db.create_pool(os.environ["FAULT_PG_DSN"], min_size=1, max_size=len(keys))

    async def writer(key: str) -> None:
        for seq in range(per_key):
            await write_order(pool, outbox, schema, key, seq)
            await asyncio.sleep(0.005)  # a stream of transactions, not a burst

    try:
        await asyncio.gather(*(writer(key) for key in keys))
    finally:
        await pool.close()


async def _service() -> None:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    crash = os.environ.get("FAULT_CRASH_ORDER")
    if crash:
        _install_crash(os.environ["FAULT_CRASH_AT"], crash)
    stop = _stop_event()
    relay = _relay(settings)
    relay.start()
    try:
        await _holding(relay)
        _say("ready")
        keys = [k for k in os.environ.get("FAULT_KEYS", "").split(",") if k]
        await _write(settings, keys, int(os.environ.get("FAULT_PER_KEY", "0")))
        _say("written")
        await stop.wait()
    finally:
        await relay.stop()


async def _relay_only() -> None:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    stop = _stop_event()
    before = _sample("burrow_outbox_published_total", outcome="confirmed")
    relay = _relay(settings)
    relay.start()
    try:
        await _holding(relay)
        _say("ready " + ",".join(map(str, relay.partitions)))
        await stop.wait()
    finally:
        await relay.stop()
    published = _sample("burrow_outbox_published_total", outcome="confirmed") - before
    _say(f"published {int(published)}")


class Bump(Model):
    """Event: count one for `id`."""

    id: str


def counter_service(
    schema: str, record: Callable[[str], None], middleware: Sequence[Layer] = ()
) -> Service:
    """The consumer's service: `counter.on_bump` adds one to the event's row of
    `<schema>.counter` through the inbox's connection, and `record`s the run."""
    svc = Service("counter")

    @svc.subscribe("bump.*", middleware=middleware)
    async def on_bump(event: Bump) -> None:
        """Count one for the event, in the inbox's transaction."""
        await connection().execute(
            f'INSERT INTO "{schema}".counter VALUES ($1, 1) '
            f'ON CONFLICT (id) DO UPDATE SET n = "{schema}".counter.n + 1',
            event.id,
        )
        record(event.id)

    return svc


async def _consumer() -> None:
    settings = load_settings()
    schema = os.environ["FAULT_SCHEMA"]
    runs = os.open(os.environ["FAULT_RUNS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    crash = os.environ.get("FAULT_CRASH_KEY")
    inbox = Inbox(os.environ["FAULT_PG_DSN"], schema=schema, pool_size=8)

    def record(key: str) -> None:
        os.write(runs, f"{key} {os.getpid()}\n".encode())  # one write: survives a SIGKILL

    async def after_commit(request: Request, call_next: Next) -> Result:
        """Outside the inbox: its transaction has committed when this has the result; the
        ack comes after this returns."""
        result = await call_next(request)
        key = orjson.loads(request.delivery.body).get("id")
        if result.duplicate:
            _say(f"duplicate {key}")
        elif crash and key == crash:
            _die()
        return result

    stop = _stop_event()
    app = App(counter_service(schema, record, [after_commit, inbox]), settings=settings, http=False)
    await app.start()
    try:
        await app.wait_ready(30)
        _say("ready")
        await stop.wait()
    finally:
        await app.stop()
        await inbox.close()
        os.close(runs)
    _say(f"duplicates {int(_sample('burrow_inbox_duplicates_total'))}")


ROLES = {"service": _service, "relay": _relay_only, "consumer": _consumer}


def main() -> None:
    """`python -m tests.faults.outbox_child <role>`."""
    asyncio.run(ROLES[sys.argv[1]]())


if __name__ == "__main__":
    main()
