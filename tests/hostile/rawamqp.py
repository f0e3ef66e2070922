"""A minimal raw AMQP 0-9-1 client that can put ANY bytes into message properties and headers.

Foreign clients send what no well-behaved library would: non-UTF-8 bytes in short strings
(`message_id`, `correlation_id`, `reply_to`, `type`, a header *name*…), every field-table type
with an explicit width (`b B s u I i l f d D T V x S A F`), long strings holding non-UTF-8 bytes,
tables nested thousands of levels deep. pamqp refuses to *encode* most of these (it encodes
`str` only, picks integer widths itself, sends every float as `f`), and aio-pika/aiormq go
through pamqp, so this module speaks the protocol over asyncio streams itself:

- Method frames (Connection.Start/StartOk with a PLAIN login, by default the test broker's,
  Tune/TuneOk, Open, Channel.Open, Confirm.Select, Basic.Publish, Basic.Consume…) are
  marshalled and every frame from the broker is unmarshalled with `pamqp.frame`: those are
  well-formed on both sides.
- The content header (the message properties) is encoded by hand, byte by byte, by
  `encode_properties`. This is the same result as marshalling with placeholder ASCII of the
  same length and byte-replacing it in the frame, without the risk of a placeholder matching
  elsewhere: a short string is any `bytes` of at most 255 bytes, and header values are
  `Field`s (a type tag plus its encoded payload) built with the helpers below (`S`, `x`, `b`,
  `B`, `s`, `u`, `I`, `i`, `l`, `f`, `d`, `D`, `T`, `V`, `t`, `F`, `A`) or plain Python values
  (`field` maps them: `bytes` → a long string `S` with those exact bytes, `bytearray` → `x`,
  `float` → `d`, …). `nested_table` / `nested_array` build values nested any depth iteratively
  (no recursion limit involved).
- Publishing is in confirm mode; `publish` waits for the broker's Basic.Ack/Nack, and reports a
  Basic.Return (mandatory, unroutable) or the broker closing the channel (it refuses e.g. an
  `expiration` that is not a number, or a `user_id` that is not the login) as a `Published`.
  After a channel close, `publish` reopens a channel and re-attaches the consumers first.
- `consume` attaches a consumer (e.g. on `amq.rabbitmq.reply-to`, no-ack) whose deliveries,
  decoded by pamqp, are handed to a callback.

What the broker does with hostile bytes is the broker's business: RabbitMQ decodes the
properties of every publish and closes the channel for what it cannot accept. The AMQP spec's
`s` (short string) field type is a signed 16-bit integer for RabbitMQ and pamqp (errata), so a
*header value* can only be a long string; short strings exist in the properties and header names.

Usage::

    amqp = await RawAmqp.connect()
    await amqp.consume("amq.rabbitmq.reply-to", on_reply)
    sent = await amqp.publish(
        "ns.rpc", "calc.add", b"{}",
        Props(message_id=b"\\xff\\xfe", headers={"x-deadline": l(1), b"\\xc3(": S(b"\\xff")}),
    )
    assert sent.acked
    await amqp.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, TypeAlias

from pamqp import body as pamqp_body
from pamqp import commands, frame, header, heartbeat

from tests.brokers import TEST_BROKER

__all__ = [
    "Field",
    "ShortStr",
    "Table",
    "S",
    "x",
    "t",
    "b",
    "B",
    "s",
    "u",
    "I",
    "i",
    "l",
    "f",
    "d",
    "D",
    "T",
    "V",
    "F",
    "A",
    "field",
    "encode_table",
    "nested_table",
    "nested_array",
    "Props",
    "encode_properties",
    "RawMessage",
    "Published",
    "ChannelClosed",
    "RawAmqp",
]

_FRAME_END = b"\xce"
_BASIC = 60  # class id of Basic


@dataclass(frozen=True, slots=True)
class Field:
    """One field-table value as it goes on the wire: its type tag and its encoded payload."""

    tag: bytes
    payload: bytes = b""

    def encode(self) -> bytes:
        """Tag and payload, as inside a table or an array."""
        return self.tag + self.payload

    def __repr__(self) -> str:  # short, for test ids and failure messages
        shown = self.payload if len(self.payload) <= 24 else self.payload[:24] + b"..."
        return f"{self.tag.decode('latin-1')}:{shown!r}"


ShortStr: TypeAlias = str | bytes  # bytes go on the wire exactly as given (any bytes)
# Names are `ShortStr`s (Mapping is invariant in its keys: typed Any so dict[str, …] fits).
Table: TypeAlias = Mapping[Any, Any] | Iterable[tuple[ShortStr, Any]]


def _short(value: ShortStr) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > 255:
        raise ValueError(f"a short string holds at most 255 bytes, not {len(raw)}")
    return bytes([len(raw)]) + raw


def _long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def S(value: str | bytes) -> Field:
    """A long string; `bytes` are sent as they are (non-UTF-8 allowed)."""
    return Field(b"S", _long(value.encode("utf-8") if isinstance(value, str) else value))


def x(value: bytes | bytearray) -> Field:
    """A byte array (what pika and the Java client send for `bytes`)."""
    return Field(b"x", _long(bytes(value)))


def t(value: bool) -> Field:
    """A boolean."""
    return Field(b"t", b"\x01" if value else b"\x00")


def b(value: int) -> Field:
    """A signed 8-bit integer."""
    return Field(b"b", struct.pack(">b", value))


def B(value: int) -> Field:
    """An unsigned 8-bit integer."""
    return Field(b"B", struct.pack(">B", value))


def s(value: int) -> Field:
    """A signed 16-bit integer."""
    return Field(b"s", struct.pack(">h", value))


def u(value: int) -> Field:
    """An unsigned 16-bit integer."""
    return Field(b"u", struct.pack(">H", value))


def I(value: int) -> Field:  # noqa: E743
    """A signed 32-bit integer."""
    return Field(b"I", struct.pack(">i", value))


def i(value: int) -> Field:
    """An unsigned 32-bit integer."""
    return Field(b"i", struct.pack(">I", value))


def l(value: int) -> Field:  # noqa: E743
    """A signed 64-bit integer."""
    return Field(b"l", struct.pack(">q", value))


def f(value: float) -> Field:
    """A single-precision float."""
    return Field(b"f", struct.pack(">f", value))


def d(value: float) -> Field:
    """A double-precision float."""
    return Field(b"d", struct.pack(">d", value))


def D(scale: int, unscaled: int) -> Field:
    """A decimal: `unscaled` · 10^-`scale` (an octet and a 32-bit integer on the wire)."""
    return Field(b"D", struct.pack(">BI", scale, unscaled & 0xFFFFFFFF))


def T(seconds: int) -> Field:
    """A timestamp: unsigned 64-bit seconds since the epoch (any value, even absurd ones)."""
    return Field(b"T", struct.pack(">Q", seconds & 0xFFFFFFFFFFFFFFFF))


def V() -> Field:
    """Void (no value)."""
    return Field(b"V")


def F(table: Table) -> Field:
    """A nested field table."""
    return Field(b"F", _long(encode_table(table)))


def A(items: Iterable[Any]) -> Field:
    """A field array."""
    return Field(b"A", _long(b"".join(field(item).encode() for item in items)))


def field(value: Any) -> Field:
    """A `Field` as is, or a Python value mapped to its usual field type (`bytes` → a long
    string with exactly those bytes, `bytearray` → `x`, `int` → `l`, `float` → `d`)."""
    if isinstance(value, Field):
        return value
    if value is None:
        return V()
    if isinstance(value, bool):
        return t(value)
    if isinstance(value, int):
        return l(value)
    if isinstance(value, float):
        return d(value)
    if isinstance(value, str | bytes):
        return S(value)
    if isinstance(value, bytearray):
        return x(value)
    if isinstance(value, decimal.Decimal):
        sign, digits, exponent = value.as_tuple()
        if not isinstance(exponent, int):
            raise ValueError(f"{value} has no decimal encoding")
        unscaled = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
        return D(-exponent, unscaled) if exponent <= 0 else D(0, int(value))
    if isinstance(value, datetime.datetime):
        return T(int(value.timestamp()))
    if isinstance(value, Mapping):
        return F(value)
    if isinstance(value, list | tuple):
        return A(value)
    raise TypeError(f"no field type for {type(value).__name__}")


def encode_table(table: Table) -> bytes:
    """The content of a field table (without its length prefix); names are short strings, so
    `bytes` names go on the wire as given (non-UTF-8 allowed), in the order given."""
    items = table.items() if isinstance(table, Mapping) else table
    return b"".join(_short(name) + field(value).encode() for name, value in items)


def nested_table(depth: int, leaf: Any = 1, name: ShortStr = "n") -> Field:
    """A table holding a table … `depth` levels deep around `leaf` (built without recursion)."""
    inner = field(leaf).encode()
    key = _short(name)
    for _ in range(depth):
        inner = b"F" + _long(key + inner)
    return Field(inner[:1], inner[1:])


def nested_array(depth: int, leaf: Any = 1) -> Field:
    """An array holding an array … `depth` levels deep around `leaf`."""
    inner = field(leaf).encode()
    for _ in range(depth):
        inner = b"A" + _long(inner)
    return Field(inner[:1], inner[1:])


@dataclass(slots=True)
class Props:
    """Basic properties; every short string may be any bytes; None leaves a property out.

    `headers` is a table (mapping or pairs), or `bytes` to send as the table content as is.
    `timestamp` is the raw unsigned 64-bit value (seconds since the epoch, or anything).
    """

    content_type: ShortStr | None = None
    content_encoding: ShortStr | None = None
    headers: Table | bytes | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: ShortStr | None = None
    reply_to: ShortStr | None = None
    expiration: ShortStr | None = None
    message_id: ShortStr | None = None
    timestamp: int | None = None
    type: ShortStr | None = None
    user_id: ShortStr | None = None
    app_id: ShortStr | None = None
    cluster_id: ShortStr | None = None


def encode_properties(props: Props) -> tuple[int, bytes]:
    """The property flags and the encoded property list of a content header."""
    flags = 0
    parts: list[bytes] = []

    def add(bit: int, data: bytes) -> None:
        nonlocal flags
        flags |= 1 << bit
        parts.append(data)

    shorts = {
        15: props.content_type,
        14: props.content_encoding,
        10: props.correlation_id,
        9: props.reply_to,
        8: props.expiration,
        7: props.message_id,
        5: props.type,
        4: props.user_id,
        3: props.app_id,
        2: props.cluster_id,
    }
    for bit in range(15, 1, -1):  # properties go in flag order, most significant first
        value = shorts.get(bit)
        if value is not None:
            add(bit, _short(value))
        elif bit == 13 and props.headers is not None:
            content = (
                props.headers if isinstance(props.headers, bytes) else encode_table(props.headers)
            )
            add(bit, _long(content))
        elif bit == 12 and props.delivery_mode is not None:
            add(bit, struct.pack(">B", props.delivery_mode))
        elif bit == 11 and props.priority is not None:
            add(bit, struct.pack(">B", props.priority))
        elif bit == 6 and props.timestamp is not None:
            add(bit, struct.pack(">Q", props.timestamp & 0xFFFFFFFFFFFFFFFF))
    return flags, b"".join(parts)


@dataclass(slots=True)
class RawMessage:
    """One delivery to a raw consumer (properties decoded by pamqp, as Burrow would see them)."""

    routing_key: str
    exchange: str
    properties: commands.Basic.Properties
    body: bytes


@dataclass(frozen=True, slots=True)
class Published:
    """What the broker said to one publish."""

    acked: bool  # Basic.Ack (False: Basic.Nack, or the channel was closed)
    returned: commands.Basic.Return | None = None  # mandatory and unroutable
    closed: ChannelClosed | None = None  # the broker refused it and closed the channel


class ChannelClosed(Exception):
    """The broker closed the channel (or the connection), with its code and text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


Callback: TypeAlias = Callable[[RawMessage], Awaitable[None] | None]


@dataclass(slots=True)
class _Consumer:
    queue: str
    callback: Callback
    no_ack: bool


@dataclass(slots=True)
class _Incoming:
    deliver: commands.Basic.Deliver | commands.Basic.Return
    properties: commands.Basic.Properties | None = None
    size: int = 0
    chunks: list[bytes] = dataclass_field(default_factory=list)


_CLOSES = {(10, 50): commands.Connection.Close, (20, 40): commands.Channel.Close}


def _close_frame(payload: bytes) -> Any:
    """A Connection.Close or Channel.Close method frame's payload read by hand, its reply text
    decoded with replacement characters; None for any other frame."""
    if len(payload) < 7:
        return None
    class_id, method_id, reply_code, length = struct.unpack_from(">HHHB", payload, 0)
    close = _CLOSES.get((class_id, method_id))
    if close is None:
        return None
    text = payload[7 : 7 + length].decode("utf-8", "replace")
    return close(reply_code=reply_code, reply_text=text)


class RawAmqp:
    """One connection with one confirm-mode channel, written frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.frame_max = 131072
        self.channel = 0
        self._tag = 0
        self._confirms: dict[int, asyncio.Future[bool]] = {}
        self._returned: commands.Basic.Return | None = None
        self._rpc: asyncio.Future[Any] | None = None
        self._consumers: dict[str, _Consumer] = {}
        self._incoming: _Incoming | None = None
        self._closed: ChannelClosed | None = None
        self._connection_closed: ChannelClosed | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Future[None]] = set()
        self.errors: list[BaseException] = []  # raised by consumer callbacks

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str | None = None,
        port: int | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        vhost: str | None = None,
        timeout: float = 10.0,
    ) -> RawAmqp:
        """Open a connection and a confirm-mode channel; what is not given is the test
        broker's (`BURROW_TEST_AMQP_URL`)."""
        host = host or TEST_BROKER.host
        port = port or TEST_BROKER.port
        user = TEST_BROKER.user if user is None else user
        password = TEST_BROKER.password if password is None else password
        vhost = vhost or TEST_BROKER.vhost
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            amqp = cls(reader, writer)
            try:
                await amqp._handshake(user, password, vhost)
            except BaseException:
                writer.close()
                raise
            amqp._task = asyncio.get_running_loop().create_task(amqp._read_loop())
            await amqp._open_channel()
        return amqp

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self._writer.write(frame.marshal(header.ProtocolHeader(), 0))
        start = await self._read_method()
        if not isinstance(start, commands.Connection.Start):
            raise ChannelClosed(0, f"expected Connection.Start, got {start!r}")
        self._send(
            commands.Connection.StartOk(
                client_properties={"product": "burrow-tests-rawamqp"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
            0,
        )
        tune = await self._read_method()
        if not isinstance(tune, commands.Connection.Tune):
            raise ChannelClosed(0, f"login refused: {tune!r}")
        self.frame_max = tune.frame_max or self.frame_max
        self._send(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=self.frame_max, heartbeat=0
            ),
            0,
        )
        self._send(commands.Connection.Open(virtual_host=vhost), 0)
        opened = await self._read_method()
        if not isinstance(opened, commands.Connection.OpenOk):
            raise ChannelClosed(0, f"open refused: {opened!r}")

    async def _read_frame(self) -> tuple[int, Any]:
        head = await self._reader.readexactly(7)
        _kind, channel, size = struct.unpack(">BHI", head)
        rest = await self._reader.readexactly(size + 1)
        if rest[-1:] != _FRAME_END:
            raise ChannelClosed(501, "frame end missing")
        try:
            _consumed, channel, value = frame.unmarshal(head + rest)
        except Exception:
            # A close whose reply text quotes what the broker refused (a non-UTF-8
            # `expiration`, say) is not UTF-8 itself: pamqp cannot decode it; read it here.
            value = _close_frame(rest)
            if value is None:
                raise
        return channel, value

    async def _read_method(self) -> Any:
        while True:
            _channel, value = await self._read_frame()
            if not isinstance(value, heartbeat.Heartbeat):
                return value

    def _send(self, method: Any, channel: int) -> None:
        self._writer.write(frame.marshal(method, channel))

    async def _call(self, method: Any, timeout: float = 10.0) -> Any:
        """Send a synchronous method on the channel and wait for its answer."""
        self._rpc = asyncio.get_running_loop().create_future()
        self._send(method, self.channel)
        try:
            async with asyncio.timeout(timeout):
                return await self._rpc
        finally:
            self._rpc = None

    async def _open_channel(self) -> None:
        self.channel += 1
        self._closed = None
        self._incoming = None
        await self._call(commands.Channel.Open())
        await self._call(commands.Confirm.Select())
        self._tag = 0
        consumers, self._consumers = list(self._consumers.values()), {}
        for consumer in consumers:
            await self.consume(consumer.queue, consumer.callback, no_ack=consumer.no_ack)

    # -- the reader --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                channel, value = await self._read_frame()
                if channel == 0:
                    self._on_connection_frame(value)
                elif channel == self.channel:
                    self._on_channel_frame(value)
        except Exception as exc:  # whatever ends the reader fails what waits on it
            closed = exc if isinstance(exc, ChannelClosed) else ChannelClosed(0, repr(exc))
            self._fail(closed)

    def _on_connection_frame(self, value: Any) -> None:
        if isinstance(value, commands.Connection.Close):
            self._send(commands.Connection.CloseOk(), 0)
            raise ChannelClosed(value.reply_code or 0, f"connection closed: {value.reply_text}")
        if isinstance(value, commands.Connection.CloseOk):
            raise ChannelClosed(200, "connection closed")

    def _on_channel_frame(self, value: Any) -> None:
        if isinstance(value, commands.Basic.Ack | commands.Basic.Nack):
            acked = isinstance(value, commands.Basic.Ack)
            tags = (
                [tag for tag in self._confirms if tag <= value.delivery_tag]
                if value.multiple
                else [value.delivery_tag]
            )
            for tag in tags:
                future = self._confirms.pop(tag, None)
                if future is not None and not future.done():
                    future.set_result(acked)
        elif isinstance(value, commands.Basic.Return | commands.Basic.Deliver):
            self._incoming = _Incoming(value)  # its content header and body frames follow
        elif isinstance(value, header.ContentHeader):
            if self._incoming is not None:
                self._incoming.properties = value.properties
                self._incoming.size = value.body_size
                self._deliver_if_complete()
        elif isinstance(value, pamqp_body.ContentBody):
            if self._incoming is not None:
                self._incoming.chunks.append(value.value)
                self._deliver_if_complete()
        elif isinstance(value, commands.Channel.Close):
            self._send(commands.Channel.CloseOk(), self.channel)
            self._fail_channel(ChannelClosed(value.reply_code or 0, str(value.reply_text)))
        elif self._rpc is not None and not self._rpc.done():
            self._rpc.set_result(value)

    def _deliver_if_complete(self) -> None:
        incoming = self._incoming
        if incoming is None or incoming.properties is None:
            return
        data = b"".join(incoming.chunks)
        if len(data) < incoming.size:
            return
        self._incoming = None
        deliver = incoming.deliver
        if isinstance(deliver, commands.Basic.Return):
            self._returned = deliver  # its confirm follows; the body is not kept
            return
        consumer = self._consumers.get(str(deliver.consumer_tag))
        if consumer is None:
            return
        message = RawMessage(
            routing_key=str(deliver.routing_key),
            exchange=str(deliver.exchange),
            properties=incoming.properties,
            body=data,
        )
        if not consumer.no_ack:
            self._send(commands.Basic.Ack(delivery_tag=deliver.delivery_tag or 0), self.channel)
        try:
            result = consumer.callback(message)
        except Exception as exc:  # recorded for the test, never kills the reader
            self.errors.append(exc)
            return
        if result is not None:
            task = asyncio.ensure_future(result)
            self._callbacks.add(task)
            task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[None]) -> None:
        self._callbacks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self.errors.append(error)

    def _fail_channel(self, closed: ChannelClosed) -> None:
        self._closed = closed
        for future in self._confirms.values():
            if not future.done():
                future.set_exception(closed)
        self._confirms.clear()
        if self._rpc is not None and not self._rpc.done():
            self._rpc.set_exception(closed)

    def _fail(self, closed: ChannelClosed) -> None:
        self._fail_channel(closed)
        self._connection_closed = closed

    # -- what tests use ----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether the connection's reader is still running."""
        return self._task is not None and not self._task.done()

    async def consume(self, queue: str, callback: Callback, *, no_ack: bool = True) -> str:
        """Attach a consumer to `queue`; each delivery is passed to `callback` (which may be a
        coroutine function). Re-attached when `publish` reopens the channel."""
        ok = await self._call(commands.Basic.Consume(queue=queue, no_ack=no_ack))
        if not isinstance(ok, commands.Basic.ConsumeOk):
            raise ChannelClosed(0, f"consume refused: {ok!r}")
        tag = str(ok.consumer_tag)
        self._consumers[tag] = _Consumer(queue, callback, no_ack)
        return tag

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Props | None = None,
        *,
        mandatory: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Publish one message and wait for the broker's confirm (or its refusal)."""
        flags, properties = encode_properties(props or Props())
        async with self._lock:
            if self._closed is not None:
                if not self.is_open:
                    raise self._closed
                await self._open_channel()
            self._tag += 1
            confirm = asyncio.get_running_loop().create_future()
            self._confirms[self._tag] = confirm
            self._returned = None
            method = commands.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
            frames = [frame.marshal(method, self.channel)]
            content = struct.pack(">HHQH", _BASIC, 0, len(body), flags) + properties
            frames.append(struct.pack(">BHI", 2, self.channel, len(content)) + content + _FRAME_END)
            step = self.frame_max - 8
            for start in range(0, len(body), step):
                chunk = body[start : start + step]
                frames.append(struct.pack(">BHI", 3, self.channel, len(chunk)) + chunk + _FRAME_END)
            self._writer.write(b"".join(frames))
            try:
                async with asyncio.timeout(timeout):
                    acked = await confirm
            except ChannelClosed as closed:
                return Published(acked=False, closed=closed)
            return Published(acked=acked, returned=self._returned)

    async def close(self) -> None:
        """Close the connection (politely when it is still open)."""
        if self.is_open:
            with contextlib.suppress(Exception):
                self._send(
                    commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0),
                    0,
                )
                async with asyncio.timeout(5):
                    assert self._task is not None
                    await asyncio.shield(self._task)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._callbacks):
            task.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
