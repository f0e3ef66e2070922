"""The relay: publishes committed outbox rows with confirms, in order per key, and marks them.

**Which rows, in which order.** The relay reads the rows neither sent nor parked (a partial
index holds just those), oldest id first, and publishes a batch of them pipelined on one
channel in that order (AMQP keeps a channel's order), then marks them sent in one transaction.
A row's id is taken when it is inserted, so a transaction that starts writing after another
one committed always has the later ids: for the rows of one key, that is commit order
whenever the order is observable (writers of one key serialised by a lock, or one after the
other). Two overlapping transactions have no order between them: their rows go in id order,
or the first committed first when the relay read in between.

It does not filter on `xid < pg_snapshot_xmin(pg_current_snapshot())`. That filter is what a
reader following a high-water mark needs (it must never see id 11 before a still-running id
10 commits, or it would skip 10 for ever); this relay keeps no high-water mark: each row
carries its own `sent_at`, so a row committed late is read the next time round, never
skipped. The filter would also hold every row back behind any long write transaction in the
database. `xid` stays in the row for that kind of reader and for `pg_xact_status`.

**Several relays.** Every row has a partition, `hashtext(key) % 16` (a generated column), and
each partition is published by one relay at a time: the one holding its session advisory lock
(`pg_try_advisory_lock(<schema's lock space>, partition)`). Relays count one another by a
shared advisory lock each holds while its broker link is up, and take their share (16 /
relays, rounded up), releasing extras between batches, so a partition changes hands only when
no row of it is in flight. A relay that dies loses its locks with its connection, and one
whose broker is away lets go of its partitions: the others take them over (at the next
rebalance, every `poll_interval`); unconfirmed rows are published again (same message ids:
duplicates, in the same order).
`FOR UPDATE SKIP LOCKED` was not enough by itself: a second relay would skip the locked
oldest rows of a key and publish the next ones first.

**Failures.** A row that cannot be published as it is gets parked (`parked_at`,
`parked_reason`), counted and logged, never retried, and never blocks what follows, of its own
key included (a parked row is out of the order: retried by hand, `schema.retry_parked`, it
comes after its successors). Parked: `unroutable` (a command or submit whose operation has no
queue: the broker returned the mandatory publish; an event no subscriber matched is marked
sent and counted `unrouted`, as `Client.emit` returns False), `too_large` (above
`max_body_bytes` now), `invalid` (the row cannot be read or built), `refused` (nacked by the
broker `max_attempts` times: a full queue), `internal`. A publish whose outcome is unknown
(connection lost, no confirm) leaves its row pending: the next batch publishes it again, in
order, after a back-off. The database away: the relay reconnects with back-off, `problems()`
says why (readiness), and nothing is lost: rows wait in the table.

**Waking.** Each insert statement NOTIFYs `<schema>.outbox` (a trigger; delivered at commit);
the relay LISTENs on its own connection and polls every `poll_interval` as the fallback.

Sent rows and inbox ids older than `retention` are purged by one relay at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from service._amqp.link import Link, LinkFactory
from service._amqp.transport import AmqpLink
from service._observe import metrics
from service._observe.log import get_logger
from service._outbox import db, schema
from service._outbox.rows import Row, to_message
from service._outbox.schema import DEFAULT_SCHEMA, PARTITIONS, Tables
from service._protocol.config import Settings
from service._protocol.errors import (
    ConfigError,
    MessageTooLarge,
    QueueFull,
    ServiceError,
    Unavailable,
    Unroutable,
)
from service._protocol.messages import schedule
from service._protocol.topology import client_topology
from service._protocol.types import Outgoing
from service._protocol.vocabulary import Names, PublishKind

_log = get_logger("burrow.outbox")

_MEMBER = PARTITIONS  # second advisory-lock key: every relay able to publish holds it shared
_PURGER = PARTITIONS + 1  # second advisory-lock key: the relay purging right now
_MISSING = frozenset({"42P01", "3F000"})  # undefined table, undefined schema
_KINDS = frozenset({PublishKind.EVENT.value, PublishKind.COMMAND.value})
_STOP_GRACE = 5.0  # seconds beyond the publish timeout a stopping relay waits for its batch


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How a relay runs (the `BURROW_OUTBOX_*` settings).

    Args:
        dsn: the PostgreSQL database (`postgresql://user:password@host/db`).
        schema: where `burrow outbox init` created the tables.
        poll_interval: seconds between scans when no NOTIFY came (and between rebalances).
        batch_size: rows read and published per batch (pipelined).
        retention: seconds sent rows and inbox ids are kept.
        max_attempts: broker refusals (nacks) of one row before it is parked.
        purge_interval: seconds between purges.
    """

    dsn: str
    schema: str = DEFAULT_SCHEMA
    poll_interval: float = 1.0
    batch_size: int = 500
    retention: float = 7 * 86400.0
    max_attempts: int = 10
    purge_interval: float = 300.0

    def __post_init__(self) -> None:
        Tables(self.schema)  # checks the name
        if self.poll_interval <= 0 or self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("poll_interval > 0, batch_size >= 1 and max_attempts >= 1")
        if self.retention <= 0 or self.purge_interval <= 0:
            raise ValueError("retention and purge_interval must be positive")

    @classmethod
    def from_settings(cls, settings: Settings) -> RelayConfig | None:
        """The relay `settings` ask for; None when no outbox database is configured."""
        if settings.outbox_dsn is None or not settings.outbox_dsn.get_secret_value():
            return None
        return cls(
            dsn=settings.outbox_dsn.get_secret_value(),
            schema=settings.outbox_schema,
            poll_interval=settings.outbox_poll_interval,
            batch_size=settings.outbox_batch_size,
            retention=settings.outbox_retention,
            max_attempts=settings.outbox_max_attempts,
        )


class _Outcome(Enum):
    SENT = "sent"
    UNROUTED = "unrouted"  # an event no queue matched: done, as Client.emit's False
    PARKED = "parked"
    REFUSED = "refused"  # nacked: retried up to max_attempts, then parked
    UNKNOWN = "unknown"  # connection lost, no confirm, not connected: published again


@dataclass(frozen=True, slots=True)
class _Verdict:
    outcome: _Outcome
    reason: str = ""  # a park reason (metrics.OUTBOX_PARK_REASONS)
    detail: str = ""


_SENT = _Verdict(_Outcome.SENT)
_UNROUTED = _Verdict(_Outcome.UNROUTED)


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one batch did."""

    rows: int = 0
    sent: int = 0
    unrouted: int = 0
    parked: int = 0
    retried: int = 0  # refused or unknown: left pending


class Relay:
    """Publishes the outbox's committed rows; several may run against one table.

    Example (what `burrow outbox relay` does):
        relay = Relay.from_settings(settings)
        relay.start()
        ...
        await relay.stop()

    Args:
        link: the link it publishes on (`owns_link`: started and closed with the relay).
    """

    def __init__(
        self,
        config: RelayConfig,
        settings: Settings,
        link: Link,
        *,
        owns_link: bool = False,
    ) -> None:
        self.config = config
        self.settings = settings
        self.link = link
        self.tables = Tables(config.schema)
        self.names = Names(settings.namespace)
        self._owns_link = owns_link
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a NOTIFY, the connection lost, or stop
        self._stop = asyncio.Event()
        self._problem: str | None = "not started"
        self._held: list[int] = []
        self._member = False  # holding the shared lock other relays count
        self._pause = settings.reconnect_min_delay
        self._next_rebalance = 0.0
        self._next_gauges = 0.0
        self._next_purge = 0.0
        self._claim = (
            "SELECT id, key, kind, exchange, routing_key, message_id, properties::text, "
            f"headers::text, body, due_at, attempts FROM {self.tables.outbox} "
            "WHERE sent_at IS NULL AND parked_at IS NULL AND part = ANY($1::smallint[]) "
            "ORDER BY id LIMIT $2"
        )
        self._published = {o: metrics.OUTBOX_PUBLISHED.labels(o) for o in metrics.OUTBOX_OUTCOMES}
        self._parked = {r: metrics.OUTBOX_PARKED.labels(r) for r in metrics.OUTBOX_PARK_REASONS}

    @classmethod
    def from_settings(
        cls, settings: Settings, link_factory: LinkFactory = AmqpLink
    ) -> Relay | None:
        """The relay `settings` configure (on a link of its own, named `outbox`), not started;
        None when no outbox database is configured (`outbox_dsn`)."""
        config = RelayConfig.from_settings(settings)
        if config is None:
            return None
        link = link_factory("outbox", settings, topology=client_topology(settings))
        return cls(config, settings, link, owns_link=True)

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions this relay publishes right now."""
        return tuple(sorted(self._held))

    def start(self) -> None:
        """Begin relaying in the background (and connecting its link, if it owns it)."""
        if self._task is not None:
            return
        if self._owns_link:
            self.link.start()
        self._problem = "connecting to the database"
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-relay")

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in flight (at most `timeout` seconds: by default the publish
        timeout and a little more), release the partitions, close."""
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            limit = self.settings.publish_timeout + _STOP_GRACE if timeout is None else timeout
            done, _ = await asyncio.wait({task}, timeout=limit)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._owns_link:
            await self.link.close()

    async def run(self, stop: asyncio.Event) -> int:
        """`burrow outbox relay`: relay until `stop` is set; 1 if the broker refused the link
        for good (login, permissions), else 0."""
        self.start()
        waiting = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self.link.failed.wait()),
        ]
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiting:
                waiter.cancel()
            await self.stop()
        return 1 if self.link.fatal is not None else 0

    def problems(self) -> list[str]:
        """Why the relay cannot publish right now (for readiness); empty when it can."""
        found: list[str] = []
        if self._problem is not None:
            found.append(f"outbox relay: {self._problem}")
        if self.link.fatal is not None:
            found.append(f"outbox relay: {self.link.fatal}")
        elif not self.link.ready.is_set():
            why = f" ({self.link.last_error})" if self.link.last_error else ""
            found.append(f"outbox relay: broker not connected{why}")
        return found

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database, or a bug: say why, retry
                if self._stop.is_set():
                    break
                if db.unavailable(exc):
                    self._problem = f"database unavailable: {db.describe(exc)}"
                elif getattr(exc, "sqlstate", None) in _MISSING:
                    self._problem = (
                        f"no outbox tables in schema {self.tables.schema!r} "
                        f"(burrow outbox init): {db.describe(exc)}"
                    )
                else:
                    self._problem = f"failed: {db.describe(exc)}"
                _log.warning(
                    "outbox relay stopped; retrying",
                    error=self._problem,
                    retry_in=round(self._pause, 3),
                    database=db.redact(self.config.dsn),
                )
                await self._sleep(self._pause)
                self._pause = min(self._pause * 2, self.settings.reconnect_max_delay)
        self._problem = "stopped"

    async def _session(self) -> None:
        """One database connection: LISTEN, join the relays, relay until stopped or lost."""
        conn = await db.connect(self.config.dsn, timeout=self.settings.connect_timeout)
        try:
            conn.add_termination_listener(self._on_terminated)
            await conn.add_listener(self.tables.channel, self._on_notify)
            self._member = False
            self._problem = None
            self._next_rebalance = self._next_gauges = 0.0
            self._next_purge = time.monotonic() + min(self.config.purge_interval, 5.0)
            backoff = self.settings.reconnect_min_delay
            while not self._stop.is_set():
                if conn.is_closed():
                    raise ConnectionResetError("the database closed the relay's connection")
                await self._housekeeping(conn)
                self._pause = self.settings.reconnect_min_delay  # the database answers
                self._wake.clear()  # a NOTIFY from now on means: run again
                if not self.link.ready.is_set():
                    await self._wait(self.link.ready, self.config.poll_interval)
                    if self.link.ready.is_set():
                        self._next_rebalance = 0.0  # connected again: take a share now
                    continue
                report = await self.run_once(conn)
                if report.retried:
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self.settings.reconnect_max_delay)
                    continue
                backoff = self.settings.reconnect_min_delay
                if report.rows < self.config.batch_size:
                    await self._wait(self._wake, self.config.poll_interval)
        finally:
            self._held = []
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 2.0)
                except Exception:  # already broken: drop it
                    conn.terminate()

    async def _housekeeping(self, conn: Any) -> None:
        now = time.monotonic()
        if now >= self._next_rebalance:
            await self._rebalance(conn)
            self._next_rebalance = now + min(self.config.poll_interval, 5.0)
        if now >= self._next_gauges:
            count, lag = await conn.fetchrow(
                f"SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - "
                f"min(created_at)), 0)::float8 FROM {self.tables.outbox} "
                "WHERE sent_at IS NULL AND parked_at IS NULL"
            )
            metrics.OUTBOX_PENDING.set(count)
            metrics.OUTBOX_LAG.set(max(0.0, lag))
            self._next_gauges = now + max(1.0, min(self.config.poll_interval, 15.0))
        if now >= self._next_purge:
            self._next_purge = now + self.config.purge_interval
            await self.purge(conn)

    async def purge(self, conn: Any) -> tuple[int, int] | None:
        """Purge sent rows and inbox ids past the retention, unless another relay is at it;
        (rows, ids) deleted, or None when another relay was purging."""
        space = self.tables.lock_space
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", space, _PURGER):
            return None
        try:
            deleted = await schema.purge(conn, self.tables, older_than=self.config.retention)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", space, _PURGER)
        if any(deleted):
            _log.debug("outbox purged", sent_rows=deleted[0], inbox_ids=deleted[1])
        return deleted

    async def _rebalance(self, conn: Any) -> None:
        """Hold this relay's share of the partitions: release extras, take free ones. A relay
        whose broker is away counts for nothing and holds nothing: the others take over."""
        space = self.tables.lock_space
        ready = self.link.ready.is_set()
        if ready != self._member:
            verb = "pg_advisory_lock_shared" if ready else "pg_advisory_unlock_shared"
            await conn.execute(f"SELECT {verb}($1, $2)", space, _MEMBER)
            self._member = ready
        share = 0
        if ready:
            members = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2",
                space,
                _MEMBER,
            )
            share = -(-PARTITIONS // max(1, members))
        while len(self._held) > share:
            partition = self._held.pop()
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", space, partition)
        if len(self._held) < share:
            start = random.randrange(PARTITIONS)  # relays starting together try apart
            for step in range(PARTITIONS):
                partition = (start + step) % PARTITIONS
                if len(self._held) >= share:
                    break
                if partition in self._held:
                    continue
                if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", space, partition):
                    self._held.append(partition)

    async def run_once(self, conn: Any) -> BatchReport:
        """One batch: read up to `batch_size` pending rows of this relay's partitions, publish
        them (pipelined, in id order), mark each sent, parked or left for a retry."""
        if not self._held:
            return BatchReport()
        started = time.perf_counter()
        rows = await conn.fetch(self._claim, self._held, self.config.batch_size)
        if not rows:
            return BatchReport()
        # Each publish is queued on the channel before the next starts (tasks run in order).
        verdicts = await asyncio.gather(*(self._publish(row) for row in rows))
        report = await self._record(conn, rows, verdicts)
        _log.debug(
            "outbox relay batch",
            rows=report.rows,
            sent=report.sent,
            unrouted=report.unrouted,
            parked=report.parked,
            retried=report.retried,
            partitions=len(self._held),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return report

    async def _publish(self, row: Any) -> _Verdict:
        try:
            message, kind = self._message(row)
        except Exception as exc:  # written by hand, or damaged: it will not get better
            return _Verdict(_Outcome.PARKED, "invalid", str(exc)[:300])
        try:
            await self.link.publish(message, kind=kind, mandatory=True)
        except Unroutable as exc:
            if kind == PublishKind.EVENT:
                return _UNROUTED
            return _Verdict(_Outcome.PARKED, "unroutable", exc.message)
        except MessageTooLarge as exc:
            return _Verdict(_Outcome.PARKED, "too_large", exc.message)
        except QueueFull as exc:
            return _Verdict(_Outcome.REFUSED, "refused", exc.message)
        except Unavailable as exc:  # lost, no confirm, not connected: delivery unknown
            return _Verdict(_Outcome.UNKNOWN, detail=exc.message)
        except ServiceError as exc:
            return _Verdict(_Outcome.PARKED, "invalid", f"{exc.code.value}: {exc.message}")
        except Exception as exc:  # a bug, or a value the encoder refuses: never loop on it
            _log.exception("outbox row could not be published", id=row["id"])
            return _Verdict(_Outcome.PARKED, "internal", f"{type(exc).__name__}: {exc}"[:300])
        return _SENT

    def _message(self, row: Any) -> tuple[Outgoing, PublishKind]:
        kind = row["kind"]
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {str(kind)[:40]!r}")
        message = to_message(
            Row(
                key=row["key"],
                kind=kind,
                exchange=row["exchange"],
                routing_key=row["routing_key"],
                message_id=row["message_id"],
                properties=row["properties"],
                headers=row["headers"],
                body=row["body"],
            )
        )
        due_at = row["due_at"]
        if due_at is None:
            return message, PublishKind(kind)
        # Routed from the due time now, not when written: a row the relay reaches late is
        # delivered as soon as it can be, never later than it has to.
        return schedule(self.names, message, due_at.timestamp()), PublishKind.SCHEDULED

    async def _record(self, conn: Any, rows: list[Any], verdicts: list[_Verdict]) -> BatchReport:
        sent: list[int] = []
        parked_ids: list[int] = []
        reasons: list[str] = []
        refused: list[int] = []
        unrouted = retried = 0
        unknown: str | None = None
        for row, verdict in zip(rows, verdicts, strict=True):
            outcome = verdict.outcome
            if outcome is _Outcome.REFUSED and row["attempts"] + 1 >= self.config.max_attempts:
                outcome = _Outcome.PARKED
            if outcome in (_Outcome.SENT, _Outcome.UNROUTED):
                sent.append(row["id"])
                unrouted += outcome is _Outcome.UNROUTED
            elif outcome is _Outcome.PARKED:
                parked_ids.append(row["id"])
                reasons.append(f"{verdict.reason}: {verdict.detail}"[:1000])
                self._parked[verdict.reason].inc()
                _log.warning(
                    "outbox row parked",
                    id=row["id"],
                    message_id=row["message_id"],
                    routing_key=row["routing_key"][:128],
                    reason=verdict.reason,
                    error=verdict.detail[:300],
                )
            elif outcome is _Outcome.REFUSED:
                refused.append(row["id"])
                retried += 1
            else:
                retried += 1
                unknown = unknown or verdict.detail
        async with conn.transaction():
            if sent:
                await conn.execute(
                    f"UPDATE {self.tables.outbox} SET sent_at = clock_timestamp(), "
                    "attempts = attempts + 1 WHERE id = ANY($1::bigint[])",
                    sent,
                )
            if parked_ids:
                await conn.execute(
                    f"UPDATE {self.tables.outbox} AS o SET parked_at = clock_timestamp(), "
                    "parked_reason = p.reason, attempts = o.attempts + 1 "
                    "FROM unnest($1::bigint[], $2::text[]) AS p(id, reason) WHERE o.id = p.id",
                    parked_ids,
                    reasons,
                )
            if refused:
                await conn.execute(
                    f"UPDATE {self.tables.outbox} SET attempts = attempts + 1 "
                    "WHERE id = ANY($1::bigint[])",
                    refused,
                )
        self._published["confirmed"].inc(len(sent) - unrouted)
        self._published["unrouted"].inc(unrouted)
        if retried:
            _log.warning(
                "outbox publish failed; retrying",
                rows=retried,
                refused=len(refused),
                error=(unknown or "the broker refused the message (nack)")[:300],
            )
        return BatchReport(len(rows), len(sent) - unrouted, unrouted, len(parked_ids), retried)

    # -- waking ---------------------------------------------------------------------------------

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    def _on_terminated(self, connection: Any) -> None:
        self._wake.set()

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until `event` is set, the relay is stopped, or `timeout` seconds passed."""
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _sleep(self, seconds: float) -> None:
        """`seconds` of back-off, cut short only by stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


async def run_relay(
    settings: Settings, link_factory: LinkFactory = AmqpLink, *, stop: asyncio.Event
) -> int:
    """`burrow outbox relay`: run the relay `settings` configure until `stop` is set.

    Raises:
        ConfigError: no outbox database configured (`BURROW_OUTBOX_DSN`), or asyncpg missing.
    """
    return await configured_relay(settings, link_factory).run(stop)


def configured_relay(settings: Settings, link_factory: LinkFactory = AmqpLink) -> Relay:
    """The relay `settings` configure, not started, for running on its own.

    Raises:
        ConfigError: no outbox database configured (`BURROW_OUTBOX_DSN`), or asyncpg missing.
    """
    relay = Relay.from_settings(settings, link_factory)
    if relay is None:
        raise ConfigError("no outbox database: set BURROW_OUTBOX_DSN")
    db.driver()  # fail now, not in the background, when asyncpg is missing
    return relay
