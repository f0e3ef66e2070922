"""`Outbox`: `emit`, `cast` and `submit` as rows written in the caller's own transaction.

The message is built here, by the same builders `Client` uses (`_protocol.messages`), and
checked here (event name, callback, JSON payload, size, delay), so a bad message fails the
caller's transaction instead of being found by the relay. Its message id is fixed in the row:
the relay may publish a row twice after a crash, and the copy is a duplicate consumers (an
`Inbox`, an idempotent operation, a job id) recognise.

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO orders …")
        await outbox.emit(conn, "orders.created", order)

With SQLAlchemy's `AsyncSession` the connection is the session's own asyncpg connection:
`raw = await (await session.connection()).get_raw_connection()`, then `raw.driver_connection`.
SQLAlchemy begins its transaction on the first statement it sends, so write (or flush)
through the session first: the outbox refuses a connection that is not in a transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from service._amqp.link import check_body_size
from service._calling.client import Client, Headers, check_headers
from service._calling.jobs import Job
from service._outbox.db import Connection
from service._outbox.rows import Row, to_row
from service._outbox.schema import DEFAULT_SCHEMA, Tables
from service._protocol import codec, tracing
from service._protocol.config import Settings, settings_from
from service._protocol.errors import FailedPrecondition, InvalidArgument
from service._protocol.jobs import JobStatus, valid_callback
from service._protocol.messages import (
    command,
    due_time,
    event_message,
    schedule,
    submit_request,
    version_header,
)
from service._protocol.registry import Operation
from service._protocol.types import Outgoing
from service._protocol.vocabulary import Kind, Names, PublishKind


class Outbox:
    """Writes messages into the outbox table inside the caller's transaction; the relay
    publishes each once the transaction has committed (none if it rolled back).

    Example:
        outbox = Outbox(settings)
        async with conn.transaction():
            await conn.execute("UPDATE orders SET state = 'paid' WHERE id = $1", order_id)
            await outbox.emit(conn, "orders.paid", {"id": order_id})

    Args:
        settings: the namespace and body size limit of the messages (default: the
            environment's, with `overrides`).
        schema: the PostgreSQL schema of the outbox table (`burrow`, as `burrow outbox init`).
        client: what the `Job` handles `submit` returns read results through (without one,
            `Job.result` raises `FailedPrecondition`; `client.job(job.id, job.route)` later
            reads it as well).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        client: Client | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings_from(settings, overrides)
        self.names = Names(self.settings.namespace)
        self.tables = Tables(schema)
        self._client = client
        self._insert = (
            f"INSERT INTO {self.tables.outbox} (key, kind, exchange, routing_key, message_id, "
            "properties, headers, body, due_at) "
            "VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, $8, $9)"
        )

    async def emit(
        self,
        conn: Connection,
        event: str,
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
        key: str | None = None,
    ) -> bool:
        """Write a domain event; True (whether a subscriber matches is known when the relay
        publishes it: one that matches none is counted, not parked, as `Client.emit` says).

        Args:
            conn: an asyncpg connection inside the transaction the event belongs to.
            event: its routing key, dot-separated words: `orders.eu.created`.
            delay: publish this many seconds from now; `at`: at this (aware) time.
            headers: message headers of the caller's own (as for `Client.emit`).
            key: the ordering key (default: the event name): the relay publishes the rows of
                one key in the order they were written.

        Raises:
            InvalidArgument: not an event name; `MessageTooLarge`: the body is above the limit.
            ValueError: the payload is not JSON, or the delay is out of range.
            RuntimeError: `conn` is not inside a transaction.
        """
        message = event_message(
            self.names,
            event,
            codec.encode(payload),
            headers={**check_headers(headers), tracing.HEADER: tracing.child(tracing.current())},
        )
        await self._write(conn, message, PublishKind.EVENT, due_time(delay, at), key)
        return True

    async def cast(
        self,
        conn: Connection,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
        key: str | None = None,
    ) -> str:
        """Write a fire-and-forget command; its message id.

        A command whose operation has no queue when the relay publishes it is parked in the
        outbox (reason `unroutable`), not retried.

        Args: as for `emit` (`key` defaults to the operation).

        Raises: as for `emit`; `InvalidArgument` when `operation` is not `service.operation`.
        """
        message = command(
            self.names,
            _route(operation),
            codec.encode(payload),
            Kind.CAST,
            trace=tracing.current(),
            headers={**check_headers(headers), **version_header(operation)},
        )
        await self._write(conn, message, PublishKind.COMMAND, due_time(delay, at), key)
        return message.message_id

    async def submit(
        self,
        conn: Connection,
        operation: str | Operation[Any, Any],
        payload: Any,
        *,
        callback: str | None = None,
        callback_data: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        headers: Headers | None = None,
        key: str | None = None,
    ) -> Job:
        """Write a job; its `Job` handle (its id is the message id).

        Nobody waits on a reply address for it (the writer's transaction is long over when
        it runs): its completion is the `<service>.<op>.completed|failed` event, the
        `callback`, and the service's job store, which `Job.result` reads.

        Args: as for `Client.submit`, plus `conn` and `key` (as for `emit`).
        """
        route = _route(operation)
        message = submit_request(
            self.names,
            route,
            codec.encode(payload),
            trace=tracing.current(),
            callback=callback,
            callback_data=callback_data,
            headers={**check_headers(headers), **version_header(operation)},
        )
        message.reply_to = None  # the relay's connection has no reply consumer
        await self._write(conn, message, PublishKind.COMMAND, due_time(delay, at), key)
        if self._client is not None:
            return self._client.job(message.message_id, route)
        return Job(message.message_id, route, _no_reader)

    async def _write(
        self,
        conn: Connection,
        message: Outgoing,
        kind: PublishKind,
        due_at: float | None,
        key: str | None,
    ) -> None:
        if due_at is not None:
            schedule(self.names, message, due_at)  # ValueError beyond the delay ladder
        check_body_size(message, kind=kind, limit=self.settings.max_body_bytes)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"the ordering key is text, not {type(key).__name__}")
        if not conn.is_in_transaction():
            raise RuntimeError(
                "the outbox writes inside your transaction: `async with conn.transaction():` "
                "(with SQLAlchemy: after the session has sent a statement)"
            )
        row = to_row(
            message, key=message.routing_key if key is None else key, kind=kind, due_at=due_at
        )
        await conn.execute(self._insert, *_values(row))


def _values(row: Row) -> tuple[Any, ...]:
    return (
        row.key,
        row.kind,
        row.exchange,
        row.routing_key,
        row.message_id,
        row.properties,
        row.headers,
        row.body,
        row.due_at,
    )


async def _no_reader(job_id: str, route: str) -> JobStatus | None:
    raise FailedPrecondition(
        f"job {job_id!r} was written to the outbox without a client to read it: "
        "Outbox(client=…), or client.job(job.id, job.route)"
    )


def _route(operation: str | Operation[Any, Any]) -> str:
    """The operation's route, checked: `<service>.<operation>` (a routing key of plain words)."""
    route = operation.route if isinstance(operation, Operation) else operation
    if not isinstance(route, str) or "." not in route or valid_callback(route) is None:
        raise InvalidArgument(f"{str(route)[:80]!r} is not an operation (service.operation)")
    return route
