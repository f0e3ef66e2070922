"""`Inbox`: a handler's database writes happen once per message, however often it is delivered.

An inbound middleware (`@svc.operation(middleware=[inbox])`, `subscribe(middleware=[…])`,
`Service(middleware=[…])`). For each delivery it opens a transaction, inserts the message id
into the inbox table (the consumer — the operation or subscription — and the id are the key),
runs the handler inside that transaction, and commits before it returns: the ack (or the
reply) follows the commit. The handler writes through the same connection
(`service._outbox.inbox.connection()`), and may write outbox rows with it too.

- A delivery whose id is already there (a redelivery after a crash between commit and ack, a
  duplicate publish of an outbox relay) commits nothing more and is acked without running the
  handler (`Result(duplicate=True)`); a call gets the reply stored with the first run.
- A handler that fails (raises, times out, returns an error) rolls everything back, the inbox
  id included: the retry runs it again.
- The database away: `Unavailable`, which the retry policy retries. A serialization failure or
  deadlock in the handler's own statements is `Unavailable` too (the transaction is retried).

The insert waits while another consumer's transaction holds the same id (a copy handled in
parallel): when that one commits, this one is the duplicate. A message without a message id
runs in a transaction with no inbox row (nothing to recognise it by).

Each delivery holds a pool connection for the length of its handler: a pool smaller than the
prefetch makes deliveries wait for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from service._observe import metrics
from service._outbox import db
from service._outbox.schema import DEFAULT_SCHEMA, Tables
from service._protocol.errors import Unavailable
from service._protocol.registry import TRANSACTION
from service._protocol.types import Outcome
from service._serving.middleware import Next, Request, Result

# The connection of the inbox transaction a handler runs in (None outside one).
_MAX_ID = 255  # an AMQP message id is a short string


def connection() -> Any:
    """The connection of the inbox transaction the current handler runs in (asyncpg's): write
    through it, and the writes commit with the inbox id, before the ack.

    Raises:
        RuntimeError: not inside a handler that runs under an `Inbox` middleware.
    """
    conn = TRANSACTION.get()
    if conn is None:
        raise RuntimeError(
            "no inbox transaction here: the handler's operation or subscription needs "
            "middleware=[Inbox(...)]"
        )
    return conn


class Inbox:
    """Runs each handler in a transaction with the insert of its message id (see the module).

    Args:
        pool: an asyncpg pool; or a DSN (`postgresql://…`) for a pool the inbox opens itself
            on first use (`pool_size` connections, closed by `close()`); or a function
            returning the pool at delivery time (one a lifespan opened: `lambda: state.db`).
        schema: where `burrow outbox init` created the inbox table.
    """

    def __init__(
        self,
        pool: str | Any | Callable[[], Any],
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_size: int = 10,
    ) -> None:
        self.tables = Tables(schema)
        self._source = pool
        self._pool_size = pool_size
        self._owned: Any = None  # the pool opened from a DSN
        self._opening = asyncio.Lock()
        self._insert = (
            f"INSERT INTO {self.tables.inbox} (consumer, message_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING true"
        )
        self._stored = (
            f"SELECT reply FROM {self.tables.inbox} WHERE consumer = $1 AND message_id = $2"
        )
        self._store = (
            f"UPDATE {self.tables.inbox} SET reply = $3 WHERE consumer = $1 AND message_id = $2"
        )
        self._duplicates = metrics.INBOX_DUPLICATES

    async def __call__(self, request: Request, call_next: Next) -> Result:
        if request.operation is None or request.refusal is not None:
            return await call_next(request)  # refused before any handler: nothing to record
        pool = await self._pool()
        try:
            conn = await pool.acquire(timeout=request.handler_timeout)
        except Exception as exc:
            raise _unavailable(exc) from None
        try:
            return await self._handle(conn, request, call_next)
        finally:
            await asyncio.shield(pool.release(conn))

    async def close(self) -> None:
        """Close the pool this inbox opened from a DSN (none otherwise)."""
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.close()

    async def _handle(self, conn: Any, request: Request, call_next: Next) -> Result:
        consumer = request.route
        message_id = (request.delivery.message_id or "")[:_MAX_ID] or None
        transaction = conn.transaction()
        try:
            await transaction.start()
        except Exception as exc:
            raise _unavailable(exc) from None
        open_ = True
        try:
            if message_id is not None:
                try:
                    inserted = await conn.fetchval(self._insert, consumer, message_id)
                    reply = (
                        None
                        if inserted
                        else await conn.fetchval(self._stored, consumer, message_id)
                    )
                except Exception as exc:
                    raise _unavailable(exc) from None
                if not inserted:
                    open_ = False
                    await _rollback(transaction)
                    self._duplicates.inc()
                    return Result(Outcome.OK, reply=reply, duplicate=True)
            token = TRANSACTION.set(conn)
            try:
                result = await call_next(request)
            except Exception as exc:
                if db.unavailable(exc):  # deadlock, serialization failure, connection lost
                    raise _unavailable(exc) from None
                raise
            finally:
                TRANSACTION.reset(token)
            if result.outcome is not Outcome.OK or result.error is not None:
                open_ = False
                await _rollback(transaction)  # not handled: no inbox id, no writes
                return result
            try:
                if message_id is not None and result.reply is not None:
                    await conn.execute(self._store, consumer, message_id, result.reply)
                open_ = False
                await transaction.commit()
            except Exception as exc:
                # Committed or not, unknown when the connection dropped: the retry finds out
                # (a committed id makes it a duplicate).
                raise _unavailable(exc) from None
            return result
        finally:
            if open_:
                await asyncio.shield(_rollback(transaction))

    async def _pool(self) -> Any:
        source = self._source
        if isinstance(source, str):
            if self._owned is None:
                async with self._opening:
                    if self._owned is None:
                        try:
                            self._owned = await db.create_pool(
                                source, min_size=1, max_size=self._pool_size
                            )
                        except Exception as exc:
                            raise _unavailable(exc) from None
            return self._owned
        pool = source() if callable(source) and not hasattr(source, "acquire") else source
        if pool is None:
            raise Unavailable("the inbox's database pool is not open (yet)")
        return pool


async def _rollback(transaction: Any) -> None:
    with contextlib.suppress(Exception):  # the connection is gone: so is the transaction
        await transaction.rollback()


def _unavailable(exc: BaseException) -> BaseException:
    """`Unavailable` for a database that is away (retried); anything else as it is."""
    if isinstance(exc, Unavailable) or not db.unavailable(exc):
        return exc
    return Unavailable(f"the inbox database is unavailable ({db.describe(exc)})")
