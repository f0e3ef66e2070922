"""Hand-written RPC and events on aio-pika, as an experienced user optimising for speed writes them.

Two rows share this code (`confirmed` picks the variant; `raw_confirmed_tool` is the second):

- `aio-pika-raw`, the bar: requests and replies are published on channels **without** publisher
  confirms (`publisher_confirms=False`, `mandatory=False`: the publish returns once the frames
  are written); the server acks each request (`no_ack=False`) right after writing its reply.
- `aio-pika-raw-confirmed`, the same with Burrow's guarantees: confirmed, `mandatory` requests
  (`on_return_raises=True`: an unroutable one raises), confirmed replies, and the request is
  acked only after the reply's confirm. Replies are not `mandatory`, as Burrow's are not:
  RabbitMQ 3.10 returns a `mandatory` publish to a direct reply-to address (`NO_ROUTE`) even
  though it delivered it, so a `mandatory` reply would fail every time.

Both: one `connect_robust` connection and one channel per process; orjson bodies; the default
exchange and its bound `publish` looked up once, not per message; the client consumes direct
reply-to (`no_ack=True`, as RabbitMQ requires) on the channel it publishes on and matches
replies to a dict of futures keyed by a counter-based correlation id; one sweeper task enforces
the calls' deadline instead of a timer per call. Events (W3), identical in both: persistent,
confirmed and `mandatory` publishes (the bench keeps 64 in flight), a consumer with manual acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from bench.common import (
    AMQP_URL,
    EVENT_EXCHANGE,
    EVENT_KEY,
    EVENT_PATTERN,
    EVENT_QUEUE,
    event_payload,
)
from bench.tools import Caller, Closer, Publisher

__all__ = ["serve", "open_caller", "consume", "open_publisher", "serve_rpc", "open_rpc_caller"]

REPLY_TO = "amq.rabbitmq.reply-to"
JSON = "application/json"
CALL_TIMEOUT = 30.0  # seconds; checked by one sweeper task per client, once a second


def _queue(ns: str) -> str:
    return f"{ns}.calc.add"


async def _channel(connection: aio_pika.abc.AbstractConnection, confirmed: bool) -> AbstractChannel:
    # on_return_raises only exists with confirms: an unroutable mandatory publish then raises.
    return await connection.channel(publisher_confirms=confirmed, on_return_raises=confirmed)


async def serve_rpc(
    ns: str,
    queue_type: str,
    prefetch: int,
    stop: asyncio.Event,
    ready: Callable[[], None],
    *,
    confirmed: bool,
) -> None:
    """Serve add until `stop` is set; ack each request once its reply is written (or confirmed)."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await _channel(connection, confirmed)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(
        _queue(ns), durable=True, arguments={"x-queue-type": queue_type}
    )
    publish = channel.default_exchange.publish
    loads, dumps, message_cls = orjson.loads, orjson.dumps, aio_pika.Message

    async def on_request(message: AbstractIncomingMessage) -> None:
        request = loads(message.body)
        reply_to = message.reply_to
        if reply_to:
            # Returns once written (plain) or once the broker confirmed it (confirmed).
            # Never mandatory: RabbitMQ 3.10 returns direct reply-to publishes spuriously.
            await publish(
                message_cls(
                    dumps({"sum": request["a"] + request["b"]}),
                    content_type=JSON,
                    correlation_id=message.correlation_id,
                ),
                routing_key=reply_to,
                mandatory=False,
            )
        await message.ack()

    await queue.consume(on_request, no_ack=False)
    ready()
    await stop.wait()
    await connection.close()


async def open_rpc_caller(ns: str, queue_type: str, *, confirmed: bool) -> tuple[Caller, Closer]:
    """A client on direct reply-to: publish, then await the future its reply resolves."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await _channel(connection, confirmed)
    loop = asyncio.get_running_loop()
    # correlation id -> (future, deadline on the loop's clock)
    pending: dict[str, tuple[asyncio.Future[bytes], float]] = {}

    async def on_reply(message: AbstractIncomingMessage) -> None:
        entry = pending.pop(message.correlation_id or "", None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(message.body)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(1)
            now = loop.time()
            for cid in [c for c, (_, due) in pending.items() if due <= now]:
                future, _ = pending.pop(cid)
                if not future.done():
                    future.set_exception(TimeoutError(f"no reply within {CALL_TIMEOUT:g}s"))

    # Direct reply-to: consumed with no_ack on the same channel the requests are published on.
    reply_queue = await channel.get_queue(REPLY_TO, ensure=False)
    await reply_queue.consume(on_reply, no_ack=True)
    sweeper = asyncio.ensure_future(sweep())
    publish = channel.default_exchange.publish
    routing_key = _queue(ns)
    ids = itertools.count()
    loads, dumps, message_cls = orjson.loads, orjson.dumps, aio_pika.Message

    async def call(a: int, b: int) -> int:
        cid = f"{next(ids):x}"
        future: asyncio.Future[bytes] = loop.create_future()
        pending[cid] = (future, loop.time() + CALL_TIMEOUT)
        try:
            await publish(
                message_cls(
                    dumps({"a": a, "b": b}),
                    content_type=JSON,
                    correlation_id=cid,
                    message_id=cid,
                    reply_to=REPLY_TO,
                ),
                routing_key=routing_key,
                mandatory=confirmed,
            )
        except BaseException:
            pending.pop(cid, None)
            raise
        return int(loads(await future)["sum"])

    async def close() -> None:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await connection.close()

    return call, close


async def serve(
    ns: str, queue_type: str, prefetch: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Serve add, replies unconfirmed (`aio-pika-raw`)."""
    await serve_rpc(ns, queue_type, prefetch, stop, ready, confirmed=False)


async def open_caller(ns: str, queue_type: str) -> tuple[Caller, Closer]:
    """Requests unconfirmed (`aio-pika-raw`)."""
    return await open_rpc_caller(ns, queue_type, confirmed=False)


async def _exchange(channel: AbstractChannel, ns: str) -> AbstractExchange:
    return await channel.declare_exchange(
        f"{ns}.{EVENT_EXCHANGE}", aio_pika.ExchangeType.TOPIC, durable=True
    )


async def consume(
    ns: str,
    queue_type: str,
    *,
    prefetch: int,
    on_event: Callable[[], None],
    stop: asyncio.Event,
    ready: Callable[[], None],
) -> None:
    """Consume order events with manual acks until `stop` is set."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    exchange = await _exchange(channel, ns)
    queue = await channel.declare_queue(
        f"{ns}.{EVENT_QUEUE}", durable=True, arguments={"x-queue-type": queue_type}
    )
    await queue.bind(exchange, EVENT_PATTERN)
    loads = orjson.loads

    async def on_message(message: AbstractIncomingMessage) -> None:
        loads(message.body)
        await message.ack()
        on_event()

    await queue.consume(on_message, no_ack=False)
    ready()
    await stop.wait()
    await connection.close()


async def open_publisher(ns: str, queue_type: str) -> tuple[Publisher, Closer]:
    """Publish persistent, `mandatory` events; each publish returns at its confirm."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    publish = (await _exchange(channel, ns)).publish
    dumps, message_cls = orjson.dumps, aio_pika.Message
    persistent = aio_pika.DeliveryMode.PERSISTENT

    async def publish_event(seq: int) -> None:
        await publish(
            message_cls(dumps(event_payload(seq)), content_type=JSON, delivery_mode=persistent),
            routing_key=EVENT_KEY,
            mandatory=True,
        )

    return publish_event, connection.close
