"""Burrow's own AMQP connections: aio-pika's and aiormq's classes, subclassed so that Burrow's
connections decode tolerantly, write coalesced and publish in one pass; nothing else changes.

pamqp raises on a non-UTF-8 short string, recurses without bound into nested tables and
overflows on far-away timestamps; any of these in one delivery kills aiormq's connection, and
the broker redelivers the message for ever. A Burrow connection (`Connection`, which aio-pika
opens over `_AmqpConnection`) reads every frame after the handshake with `read_frame`: the
frames of every delivery and confirm (Basic.Deliver, Basic.Ack, content header, body) are
decoded directly, other method frames by the same loop as pamqp's with Burrow's field decoders,
which return an `Undecodable` marker instead of raising, so the envelope reader can refuse the
message. The objects are pamqp's, with the values pamqp gives wherever pamqp can decode.

aiormq writes each queued frame with its own socket write (a system call each). A Burrow
connection's write queue (`_WriteQueue`) hands aiormq's writer every frame already queued, up
to `MAX_BATCH_BYTES`, as one frame: under load one write carries many publishes and acks.
Frames that asked to be drained are drained together after that write; a connection-close
frame ends a batch. Deliveries for an `inline_consumer` are handled in the channel's reader
(`_AmqpChannel`), without aiormq's task per delivery. A Connection.Close answering a handshake
step (a refused virtual host) is raised as `HandshakeRefused`, which keeps the frame whose code
and reason aiormq's error text leaves out.

`publish_frames` and `publish` replace aiormq's `basic_publish` for Burrow's publishes: the
same bytes pamqp would write (see their section below), header floats as doubles (`d`; pamqp
writes single precision, `f`, which loses a Java client's double and cannot hold one beyond
3.4e38 at all), at a fraction of its CPU.

pamqp's and aiormq's modules, classes and tables are never changed: a plain aio-pika connection
in the same process behaves as stock. What Burrow re-implements or builds on is fenced by
`check_libraries`: the fingerprint of each such function must be one Burrow was checked
against (`_KNOWN`), or a link refuses to start, once, naming the library and what changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import inspect
import logging
import struct
import textwrap
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from importlib import metadata
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import TimeoutType, UnderlayConnection
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import ChannelFrame, TaskType, TaskWrapper
from aiormq.connection import FrameReceiver
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    InvalidFrameError,
)
from pamqp import commands, decode, encode
from pamqp import frame as pamqp_frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException, UnmarshalingException
from pamqp.frame import FrameTypes
from pamqp.header import ContentHeader
from yarl import URL

from service._protocol.errors import ConfigError
from service._protocol.types import Undecodable
from service._protocol.vocabulary import H_UNDECODABLE

MAX_DEPTH = 32  # tables and arrays nested deeper than this are not decoded
MAX_BATCH_BYTES = 256 * 1024  # a coalesced write stops growing past this
UNDECODABLE_HEADER = H_UNDECODABLE  # set when the properties as a whole failed

_Decoder = Callable[[bytes], tuple[int, Any]]
_UINT = struct.Struct(">I")
_aiormq_log = logging.getLogger("aiormq.channel")  # where aiormq says what we now do


# -- Burrow's field decoders: pamqp's, made tolerant, for Burrow's connections only ----------


class _Depth(threading.local):
    level = 0


_depth = _Depth()


def _short_str(value: bytes) -> tuple[int, str]:
    return _short_str_at(bytes(value), 0, len(value))


def _short_str_at(data: bytes, offset: int, end: int) -> tuple[int, str]:
    """The short string at `offset` of `data` (read no further than `end`), and the offset
    after it: UTF-8 text, or `Undecodable` (pamqp would raise and kill the connection)."""
    if offset >= end:
        raise ValueError("Could not unpack short string value")
    length = data[offset]
    raw = data[offset + 1 : min(offset + 1 + length, end)]
    try:
        return offset + 1 + length, raw.decode("utf-8")
    except UnicodeDecodeError:
        return offset + 1 + length, Undecodable.of(raw, "short string is not UTF-8")


def _nested(decode_items: Callable[[bytes], Any], kind: str) -> _Decoder:
    """A table/array decoder that skips (by its length prefix) what is nested too deep."""

    def decoder(value: bytes) -> tuple[int, Any]:
        try:
            (length,) = _UINT.unpack_from(value, 0)
        except struct.error as err:
            raise ValueError(f"Could not unpack {kind}") from err
        end = 4 + length
        if end > len(value):
            raise ValueError(f"{kind} length exceeds available data")
        if _depth.level >= MAX_DEPTH:
            return end, Undecodable.of(b"", f"{kind} nested deeper than {MAX_DEPTH} levels")
        _depth.level += 1
        try:
            return end, decode_items(value[4:end])
        finally:
            _depth.level -= 1

    return decoder


def _value(data: bytes, offset: int) -> tuple[int, Any]:
    decoder = _TABLE_TYPES.get(data[offset : offset + 1])
    if decoder is None:
        raise ValueError(f"Unknown type: {data[offset : offset + 1]!r}")
    consumed, value = decoder(data[offset + 1 :])
    return offset + 1 + consumed, value


def _table_items(data: bytes) -> dict[str, Any]:
    table: dict[str, Any] = {}
    offset = 0
    while offset < len(data):
        consumed, key = _short_str(data[offset:])
        offset, table[key] = _value(data, offset + consumed)
    return table


def _array_items(data: bytes) -> list[Any]:
    items: list[Any] = []
    offset = 0
    while offset < len(data):
        offset, item = _value(data, offset)
        items.append(item)
    return items


_field_table = _nested(_table_items, "field table")
_field_array = _nested(_array_items, "field array")
_stock_timestamp = decode.timestamp


def _timestamp(value: bytes) -> tuple[int, Any]:
    try:
        return _stock_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from None
        return 8, Undecodable.of(bytes(value[:8]), "timestamp out of range")


# Copies of pamqp's dispatch tables with the tolerant decoders in; pamqp's own stay as they are.
_TABLE_TYPES: dict[bytes, _Decoder] = dict(decode.TABLE_MAPPING) | {
    b"F": _field_table,
    b"A": _field_array,
    b"T": _timestamp,
}
_FIELD_TYPES: dict[str, _Decoder] = dict(decode.METHODS) | {
    "shortstr": _short_str,
    "table": _field_table,
    "array": _field_array,
    "timestamp": _timestamp,
}


def field_value(data: bytes) -> tuple[int, Any]:
    """A table field value (type octet, then the value) as a Burrow connection decodes it:
    pamqp's `decode.embedded_value`, with markers where pamqp would fail; (bytes used, value)."""
    if not data:
        return 0, None
    return _value(data, 0)


def _undecodable_properties(properties: object, exc: Exception) -> None:
    # What was decoded before the failure stays; the rest is lost. The marker tells the
    # envelope reader to refuse the message as undecodable.
    problem = f"properties could not be decoded: {type(exc).__name__}"
    cast(Any, properties).headers = {UNDECODABLE_HEADER: Undecodable.of(b"", problem)}


# -- reading frames -----------------------------------------------------------------------------

_DELIVER_INDEX, _ACK_INDEX = 0x003C003C, 0x003C0050
_TAG = struct.Struct(">qB")  # delivery tag (signed, as pamqp reads a longlong), then a bit octet
_FLAGS = struct.Struct(">H")


def read_frame(head: bytes, rest: bytes) -> tuple[int, int, Any]:
    """`pamqp.frame.unmarshal(head + rest)` with Burrow's tolerant field decoders: (bytes used,
    channel, frame). Basic.Deliver, Basic.Ack, content header and body frames are decoded
    here directly, other method frames by pamqp's loop over their fields, and anything else
    (a heartbeat, or anything malformed: pamqp says what is wrong with it) by pamqp.

    Args:
        head: the frame's first 7 bytes (type, channel, size).
        rest: its payload and frame-end octet.
    """
    frame_type, channel, size = _FRAME.unpack(head)
    return _decode(frame_type, channel, size, head, rest)


def _decode(
    frame_type: int, channel: int, size: int, head: bytes, rest: bytes
) -> tuple[int, int, Any]:
    if size and len(rest) == size + 1 and rest[-1] == 0xCE:
        if frame_type == _FRAME_BODY:
            return size + 8, channel, ContentBody(rest[:-1])
        if frame_type == _FRAME_HEADER and size >= _HEADER_FIXED.size:
            header = _content_header(rest, size)
            if header is not None:
                return size + 8, channel, header
        if frame_type == _FRAME_METHOD and size >= 4:
            index = _UINT.unpack_from(rest)[0]
            try:
                frame = _method(index, rest, size)
            except (ValueError, struct.error, IndexError):
                frame = None  # the general loop below decodes it, or says what is wrong
            if frame is None:
                frame = _method_fields(index, rest[4:size])
            if frame is not None:
                return size + 8, channel, frame
    return cast(tuple[int, int, Any], pamqp_frame.unmarshal(head + rest))


def _method(index: int, rest: bytes, size: int) -> Any:
    if index == _ACK_INDEX and size == 13:
        tag, bits = _TAG.unpack_from(rest, 4)
        ack = _new(commands.Basic.Ack)
        ack.delivery_tag, ack.multiple = tag, bool(bits & 1)
        return ack
    if index != _DELIVER_INDEX:
        return None
    offset, consumer_tag = _short_str_at(rest, 4, size)
    tag, bits = _TAG.unpack_from(rest, offset)
    offset, exchange = _short_str_at(rest, offset + 9, size)
    offset, routing_key = _short_str_at(rest, offset, size)
    if offset != size:
        return None  # the general loop decides what a frame of another length means
    deliver = _new(commands.Basic.Deliver)
    deliver.consumer_tag, deliver.delivery_tag = consumer_tag, tag
    deliver.redelivered = bool(bits & 1)
    deliver.exchange, deliver.routing_key = exchange, routing_key
    return deliver


def _method_fields(index: int, data: bytes) -> Any:
    """pamqp's `_unmarshal_method_frame` and `Frame.unmarshal` with Burrow's field decoders;
    None for an index pamqp does not know (pamqp then says so)."""
    cls = commands.INDEX_MAPPING.get(index)
    if cls is None:
        return None
    method = cls()
    offset, bits = 0, False
    try:
        for argument in method.__slots__:
            kind = getattr(cls, "_" + argument)
            if bits and (kind != "bit" or offset == 8):
                data, offset, bits = data[1:], 0, False
            if kind == "bit":
                value = decode.bit(data, offset)[1]
                offset, bits, consumed = offset + 1, True, 0
            else:
                decoder = _FIELD_TYPES.get(kind)
                if decoder is None:
                    raise ValueError(f"Unknown type: {kind}")
                consumed, value = decoder(data)
            setattr(method, argument, value)
            if consumed:
                data = data[consumed:]
    except (struct.error, ValueError) as error:
        raise UnmarshalingException(method, error) from error
    return method


_HEADER_FIXED = struct.Struct(">HHQH")  # class, weight, body size, first property-flag word
_PROPERTIES = tuple(
    (flag, name, getattr(commands.Basic.Properties, "_" + name))
    for name, flag in commands.Basic.Properties.flags.items()
)  # in wire order, as pamqp decodes them
_BLANK = {name: None for _, name, _ in _PROPERTIES} | {"cluster_id": ""}  # Properties()'s


def _content_header(rest: bytes, size: int) -> ContentHeader | None:
    """A content header frame as pamqp's `ContentHeader.unmarshal` (with Burrow's tolerant
    property decoding) leaves it; None when its flag words are cut short (pamqp says so)."""
    class_id, weight, body_size, flags = _HEADER_FIXED.unpack_from(rest)
    offset, word = _HEADER_FIXED.size, flags
    while word & 1:  # more flag words follow; no Basic property is flagged in them
        if offset + 2 > size:
            return None
        (word,) = _FLAGS.unpack_from(rest, offset)
        offset += 2
    properties = _new(commands.Basic.Properties)
    for name, blank in _BLANK.items():
        setattr(properties, name, blank)
    try:
        _decode_properties(properties, flags, rest, offset, size)
    except Exception as exc:  # any failure here would kill the connection
        _undecodable_properties(properties, exc)
    header: ContentHeader = _new(ContentHeader)
    header.class_id, header.weight, header.body_size = class_id, weight, body_size
    header.properties = properties
    return header


def _decode_properties(properties: Any, flags: int, data: bytes, offset: int, end: int) -> None:
    # pamqp's BasicProperties.unmarshal, by offsets instead of a slice per property: each
    # decoder sees what pamqp's would (the rest of the payload) and fails where it fails.
    for flag, name, kind in _PROPERTIES:
        if not flags & flag:
            continue
        value: Any
        if kind == "shortstr":
            offset, value = _short_str_at(data, offset, end)
        elif kind == "octet":
            if offset >= end:
                raise ValueError("Could not unpack octet value")
            value = data[offset]
            offset += 1
        else:  # table, timestamp: Burrow's tolerant decoders
            used, value = _FIELD_TYPES[kind](data[offset:end])
            offset += used
        setattr(properties, name, value)


def _new(cls: type[Any]) -> Any:
    # pamqp's unmarshal also sets decoded values without validating them; __init__ would.
    return object.__new__(cls)


# -- Burrow's connections: aio-pika's and aiormq's classes, subclassed ------------------------


class Connection(aio_pika.Connection):
    """aio-pika's connection over a Burrow `_AmqpConnection` (pass it to `aio_pika.connect`
    as `connection_class`); everything else is aio-pika's."""

    async def connect(self, timeout: TimeoutType = None) -> None:
        """aio-pika's `Connection.connect`, opening Burrow's aiormq connection."""
        check_libraries()
        self.transport = await _Underlay.connect(
            self.url, self._on_connection_close, timeout=timeout, **self.kwargs
        )
        await self._on_connected()


@dataclasses.dataclass(frozen=True)
class _Underlay(UnderlayConnection):
    @classmethod
    async def make_connection(
        cls, url: URL, timeout: TimeoutType = None, **kwargs: Any
    ) -> aiormq.abc.AbstractConnection:
        """aio-pika's, with `aiormq.connect` (a `Connection` it opens) made Burrow's."""
        connection = _AmqpConnection(url, **kwargs)
        await asyncio.wait_for(connection.connect(), timeout=timeout)
        await connection.ready()
        return connection


class _AmqpConnection(aiormq.Connection):
    """aiormq's connection with Burrow's write queue, frame reader and channels; aiormq's own
    code does the handshake, reads the broker's Connection.* frames and runs both loops."""

    def __init__(self, url: URL | str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.write_queue = _WriteQueue(maxsize=self.write_queue.maxsize)

    async def _Connection__reader(self, frame_receiver: FrameReceiver) -> None:
        """aiormq's frame loop, given Burrow's receiver once the handshake is read."""
        reader = cast(Any, super())._Connection__reader
        await reader(_Receiver(frame_receiver.reader))

    async def channel(self, *args: Any, **kwargs: Any) -> RawChannel:
        """aiormq's channel, opened by aiormq, then made a Burrow `_AmqpChannel` (which only
        adds behaviour, so the object is the same): aiormq names its class in `channel()`."""
        channel = await super().channel(*args, **kwargs)
        if type(channel) is aiormq.Channel:
            channel.__class__ = _AmqpChannel
        return channel

    @staticmethod
    async def _rpc(
        request: Frame,
        writer: asyncio.StreamWriter,
        frame_receiver: FrameReceiver,
        wait_response: bool = True,
    ) -> FrameTypes | None:
        """aiormq's handshake step, run by aiormq on a receiver that remembers the broker's
        answer: when aiormq refuses it as unexpected and it was a Connection.Close (a refused
        virtual host at Connection.Open), the error is a `HandshakeRefused` that keeps it.
        (aiormq 7.1 raises AMQPInternalError with the frame among its arguments: left as it is,
        `transport` reads the frame from there.) Fenced by `check_libraries`."""
        heard = _Heard(frame_receiver)
        try:
            return await aiormq.Connection._rpc(
                request, writer, cast(FrameReceiver, heard), wait_response
            )
        except InvalidFrameError as exc:
            if isinstance(heard.frame, commands.Connection.Close):
                raise HandshakeRefused(str(exc), heard.frame) from exc
            raise


class HandshakeRefused(InvalidFrameError):
    """The InvalidFrameError aiormq raises for a handshake step the broker answered with
    Connection.Close, with that frame kept (`close`): aiormq's text names neither its reply
    code nor its reason."""

    def __init__(self, message: str, close: commands.Connection.Close) -> None:
        super().__init__(message)
        self.close = close


class _Heard:
    """A handshake's frame receiver (aiormq's) that remembers the last frame it gave."""

    def __init__(self, receiver: FrameReceiver) -> None:
        self.receiver = receiver
        self.frame: object = None

    async def get_frame(self) -> tuple[int, int, Any]:
        """The receiver's next frame, remembered."""
        received = await self.receiver.get_frame()
        self.frame = received[2]
        return received


class _Receiver(FrameReceiver):
    """aiormq's `FrameReceiver` after the handshake: the same frames and errors, two reads per
    frame, and no lock (the connection's reader is its only reader now)."""

    async def get_frame(self) -> tuple[int, int, Any]:
        """The next frame: (bytes used, channel, frame), decoded by `read_frame`."""
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            head = await reader.readexactly(_FRAME.size)
            frame_type, channel, size = _FRAME.unpack(head)
            rest = await reader.readexactly(size + 1)
        except asyncio.IncompleteReadError as e:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(e.partial)} bytes but {e.expected} bytes expected"
            ) from e
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        try:
            return _decode(frame_type, channel, size, head, rest)
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e

    __anext__ = get_frame  # one coroutine per frame, not two


class _Batch(ChannelFrame):
    """Frames taken from a connection's write queue together, as one `ChannelFrame` (what
    aiormq's writer reads: payload, should_close, should_drain, drain)."""

    def __init__(self, frames: list[ChannelFrame]) -> None:
        payload = b"".join([frame.payload for frame in frames])
        # A close frame ends its batch (`_WriteQueue.get`): the last frame says.
        super().__init__(payload=payload, should_close=frames[-1].should_close)
        self.frames = frames

    @property
    def should_drain(self) -> bool:
        return any(frame.should_drain for frame in self.frames)

    def drain(self) -> None:
        for frame in self.frames:
            frame.drain()


class _WriteQueue(asyncio.Queue[ChannelFrame]):
    """A Burrow connection's write queue: aiormq's writer takes one frame per `get`, and
    this `get` gives every frame queued by now (see the module doc)."""

    async def get(self) -> ChannelFrame:
        frame = await super().get()
        if frame.should_close or self.empty():
            return frame  # (yielding once first to gather more was measured: no more per write)
        frames, size = [frame], len(frame.payload)
        while size < MAX_BATCH_BYTES and not self.empty():
            frame = self.get_nowait()
            self.task_done()  # aiormq marks the one it took
            frames.append(frame)
            size += len(frame.payload)
            if frame.should_close:
                break
        return _Batch(frames)


class _Inline:
    """A consumer callback aiormq can run as a task, and Burrow's channel calls directly."""

    __slots__ = ("_call", "burrow_inline")

    def __init__(
        self, call: Callable[[Any], Awaitable[None]], inline: Callable[[Any], None]
    ) -> None:
        self._call = call
        self.burrow_inline = inline

    def __call__(self, message: Any) -> Awaitable[None]:
        return self._call(message)


def inline_consumer(
    call: Callable[[Any], Awaitable[None]], inline: Callable[[Any], None]
) -> Callable[[Any], Awaitable[None]]:
    """A consumer callback for `basic_consume` whose deliveries a Burrow channel hands to
    `inline` in its reader instead of a task running `call` (the same work)."""
    return _Inline(call, inline)


class _AmqpChannel(aiormq.Channel):
    """aiormq's channel, delivering to an `inline_consumer` in its reader (no task)."""

    __slots__ = ()

    async def _on_deliver_frame(self, frame: commands.Basic.Deliver) -> None:
        consumer = self.consumers.get(frame.consumer_tag or "")
        if not isinstance(consumer, _Inline):
            await super()._on_deliver_frame(frame)
            return
        # aiormq's own first steps (content header, body), then the call in place of a task
        header = await cast(Any, self)._Channel__get_content_header()
        message = await self._read_content(frame, header)
        try:
            consumer.burrow_inline(message)
        except Exception:
            _aiormq_log.exception("Consumer callback failed")  # as aiormq logs a task's failure


# -- the guard: what Burrow re-implements or builds on, by content ----------------------------
#
# Each function (or class) of aiormq, pamqp and aio-pika whose code Burrow re-implements above,
# or whose behaviour it relies on, by the SHA-256 of its source (`fingerprint`). The values
# name the releases each fingerprint was read from and reviewed against. A new release whose
# code is unchanged passes; one that changed any of these stops every link at its start, with
# one error that says what changed. To admit it: read the change, adapt this module, add the
# fingerprint (`installed_fingerprints()` gives the installed ones).

_KNOWN: Mapping[str, Mapping[str, str]] = {
    "aiormq.connection:FrameReceiver.__init__": {"84926cf0729b53e3": "7.1.0-7.2.4"},
    "aiormq.connection:FrameReceiver.get_frame": {
        "77b0fc18f7cf93e0": "7.1.0-7.1.6",
        "28739fce9b3907b9": "7.2.0-7.2.4",
    },
    "aiormq.abc:ChannelFrame.drain": {"5e93626c10c96b7d": "7.1.0-7.2.4"},
    "aiormq.abc:ChannelFrame.should_drain": {"c55b9c89c9ac72a7": "7.1.0-7.2.4"},
    "aiormq.connection:FrameGenerator.__anext__": {"c9d61eb1774a3a62": "7.1.0-7.2.4"},
    "aiormq.connection:Connection.__init__": {
        "18fca43faa39ef31": "7.1.0-7.2.0",
        "558e8226684ef1d3": "7.2.1-7.2.4",
    },
    "aiormq.connection:Connection.__reader": {
        "ea1f42e54f943b49": "7.1.0-7.2.0",
        "a08cbcffa5cc6dea": "7.2.1-7.2.3",
        "69280cdec090ad91": "7.2.4",
    },
    "aiormq.connection:Connection.__writer": {
        "a76d9b70202b97e2": "7.1.0-7.1.3",
        "580fb38ffda8c34c": "7.1.4-7.2.3",
        "90448c1ee65ad912": "7.2.4",
    },
    "aiormq.connection:Connection.channel": {
        "43c2f5b75507b19c": "7.1.0-7.2.0",
        "71c410ffcb901696": "7.2.1",
        "411d0975f5161dd2": "7.2.2-7.2.4",
    },
    "aiormq.connection:Connection._rpc": {
        "35213f0556f8d768": "7.1.0-7.1.6",
        "2b0d1d310ace275c": "7.2.0",
        "6ce9070521a28d72": "7.2.1-7.2.4",
    },
    "aiormq.connection:Connection.is_connection_was_stuck": {"fe62bbcaea9d5105": "7.1.0-7.2.4"},
    "aiormq.connection:Connection.__handle_connection_blocked": {"d4840f59786b8fd0": "7.1.0-7.2.4"},
    "aiormq.connection:connect": {
        "1d29b3f3554ccb4d": "7.1.0-7.2.0",
        "9dbd7fdaa8a08ea8": "7.2.1-7.2.4",
    },
    "aiormq.channel:Channel._on_deliver_frame": {
        "c38155bbf700982d": "7.1.0-7.1.4",
        "ec7b7783c5ef18f3": "7.1.5-7.2.4",
    },
    "aiormq.channel:Channel.basic_publish": {
        "b50f62b2235c3f60": "7.1.0-7.1.2",
        "cb698f9b38f24502": "7.1.3-7.2.4",
    },
    "aiormq.channel:Channel.basic_ack": {
        "799bc4e11455354b": "7.1.0-7.1.3",
        "4fde720fffd5cfec": "7.1.4-7.2.3",
        "ec78767cff5e708a": "7.2.4",
    },
    "aio_pika.connection:Connection.connect": {"5b2def72bcfc8109": "10.0.0-10.2.1"},
    "aio_pika.abc:UnderlayConnection.make_connection": {"60110e879dabc8c2": "10.0.0-10.2.1"},
    "aio_pika.abc:UnderlayConnection.connect": {"f441030f0ce47f94": "10.0.0-10.2.1"},
    "pamqp.decode:short_str": {"6f535b7aaa125aec": "4.0.1"},
    "pamqp.decode:field_table": {"cd20672a04f9eaa4": "4.0.1"},
    "pamqp.decode:field_array": {"88d50527b8e73281": "4.0.1"},
    "pamqp.decode:embedded_value": {"705653404683d7d1": "4.0.1"},
    "pamqp.decode:by_type": {"86cc65369330cf0a": "4.0.1"},
    "pamqp.decode:timestamp": {"64d63c732623d534": "4.0.1"},
    "pamqp.base:Frame.unmarshal": {"13e438ea09ba7d98": "4.0.1"},
    "pamqp.base:BasicProperties.unmarshal": {"6dc3fcb6eff561fc": "4.0.1"},
    "pamqp.base:BasicProperties.marshal": {"ac3a2c9a42c9a686": "4.0.1"},
    "pamqp.base:Frame.marshal": {"f527ca718f26ce61": "4.0.1"},
    "pamqp.header:ContentHeader.unmarshal": {"8d3869ec09de19f9": "4.0.1"},
    "pamqp.header:ContentHeader._get_flags": {"879b9e44adce289a": "4.0.1"},
    "pamqp.frame:unmarshal": {"400fbda67c8aa154": "4.0.1"},
    "pamqp.frame:_unmarshal_method_frame": {"c269ea9cd028f40c": "4.0.1"},
    "pamqp.frame:_marshal": {"6718c2ed10b74066": "4.0.1"},
    "pamqp.encode:encode_table_value": {"bbfe42da2327c30d": "4.0.1"},
    "pamqp.encode:field_table": {"7c44b8aace14bc3c": "4.0.1"},
    "pamqp.encode:field_array": {"26f16b0aaa0022c0": "4.0.1"},
    "pamqp.commands:Basic.Deliver": {"74c6a3786c67c475": "4.0.1"},
    "pamqp.commands:Basic.Ack": {"686232fb47a36644": "4.0.1"},
    "pamqp.commands:Basic.Publish": {"68832473a4aa64cd": "4.0.1"},
    "pamqp.commands:Basic.Properties": {"96f981d67d71f343": "4.0.1"},
}


_DISTRIBUTIONS = {"aiormq": "aiormq", "pamqp": "pamqp", "aio_pika": "aio-pika"}
_checked: list[ConfigError | None] = []  # the one verdict of this process, once made


def fingerprint(obj: object) -> str:
    """The fingerprint of a function or class: SHA-256 of its source, as Python keeps it."""
    source = textwrap.dedent(inspect.getsource(cast(Callable[..., Any], obj)))
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def installed_fingerprints() -> dict[str, str]:
    """The fingerprints of what `_KNOWN` lists, as installed: to review and add there."""
    return {name: fingerprint(_resolve(name)) for name in _KNOWN}


def _resolve(name: str) -> object:
    """`module:Class.attribute` (private `__names` as written in the class) to the object."""
    module, _, path = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        if isinstance(obj, type):
            mangled = part.startswith("__") and not part.endswith("__")
            obj = vars(obj)[f"_{obj.__name__.lstrip('_')}{part}" if mangled else part]
        else:
            obj = getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    return obj


def _changes() -> dict[str, list[str]]:
    """What differs from `_KNOWN`, by distribution: one line per function."""
    changes: dict[str, list[str]] = {}
    for name, known in _KNOWN.items():
        try:
            found = fingerprint(_resolve(name))
        except (ImportError, AttributeError, KeyError, OSError, TypeError) as exc:
            problem = f"{name} cannot be read ({type(exc).__name__}: {exc})"
        else:
            if found in known:
                continue
            versions = ", ".join(sorted(set(known.values())))
            problem = f"{name} changed (fingerprint {found}; Burrow knows it from {versions})"
        changes.setdefault(_DISTRIBUTIONS[name.partition(".")[0].partition(":")[0]], []).append(
            problem
        )
    return changes


def check_libraries() -> None:
    """Make sure the installed aiormq, pamqp and aio-pika are ones Burrow was checked against
    (the code it re-implements or builds on is unchanged); computed once per process.

    Raises:
        ConfigError: something changed; says which library, which version, and what.
    """
    if not _checked:
        changes = _changes()
        if not changes:
            _checked.append(None)
        else:
            lines = [
                f"{dist} {_version(dist)}: " + "; ".join(problems)
                for dist, problems in sorted(changes.items())
            ]
            _checked.append(
                ConfigError(
                    "the AMQP libraries changed under Burrow's connections (service/shim.py): "
                    + " | ".join(lines)
                    + ". Install the versions deploy/constraints.txt pins, or review "
                    "service/shim.py against the new code and add its fingerprints."
                )
            )
    if _checked[0] is not None:
        raise _checked[0]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


# -- aiormq's private connection state: each accessor fails loudly when aiormq renames it ------
#
# `_KNOWN` holds the aiormq code that keeps this state (the reader's clock and its stuck check,
# Connection.Blocked); these checks only turn a rename into a clear error at the call.


def silent_for(connection: object) -> float | None:
    """Seconds since aiormq last read a frame on `connection` (its private record, the one its
    own heartbeat check reads); None when the connection or the record is not there."""
    last = getattr(connection, "_Connection__last_frame_time", None)
    loop = getattr(connection, "loop", None)
    if not isinstance(last, float) or loop is None:
        return None
    return float(loop.time() - last)


def connection_blocked(connection: object) -> bool:
    """Whether the broker blocks `connection` (Connection.Blocked: a resource alarm). aiormq
    records it only in a private event, cleared on Blocked and set again on Unblocked."""
    unblocked = _private(connection, "_Connection__connection_unblocked")
    if not isinstance(unblocked, asyncio.Event):
        raise _changed(connection, "_Connection__connection_unblocked is no asyncio.Event")
    return not unblocked.is_set()


def reader_task(connection: object) -> TaskType | None:
    """The task that reads `connection`'s frames (aiormq wraps it); None before it connected."""
    declared = (vars(cls).get("__annotations__", {}) for cls in type(connection).__mro__)
    if not any("_reader_task" in names for names in declared):
        raise _changed(connection, "no _reader_task")
    task = getattr(connection, "_reader_task", None)
    if task is not None and not isinstance(task, asyncio.Task | TaskWrapper):
        raise _changed(connection, f"_reader_task is a {type(task).__name__}, not a task")
    return task


def expire_heartbeat_grace(connection: object) -> None:
    """Leave `connection` no grace for a silent broker, as aiormq's own heartbeat timeout does:
    once its reader stops, the socket is then aborted rather than closed politely."""
    _private(connection, "_Connection__heartbeat_grace_timeout")
    setattr(connection, "_Connection__heartbeat_grace_timeout", 0)  # noqa: B010 - name-mangled


def _private(obj: object, name: str) -> object:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _changed(obj, f"no {name}") from None


def _changed(obj: object, problem: str) -> RuntimeError:
    cls = type(obj)
    return RuntimeError(
        f"{cls.__module__}.{cls.__qualname__}: {problem}; the library changed under "
        "service/shim.py (update it to the installed version)"
    )


# -- publishing: a Basic.Publish's frames built in one pass ------------------------------------
#
# aiormq's `basic_publish` builds pamqp objects, marshals each property through pamqp's type
# tables and passes two context managers and a lock per message; under load that was a fifth
# of a service's time. `publish_frames` writes the same bytes directly (the unit tests compare
# them with pamqp's for every property and header type), and `publish` queues them on the
# channel with the confirmation bookkeeping `basic_publish` keeps, so aiormq's reader settles
# acks, nacks, returns and a closing channel exactly as before.

_FRAME_END = b"\xce"
_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_PUBLISH_METHOD = struct.Struct(">IH")  # class 60 / method 40, reserved short (ticket)
_HEADER = struct.Struct(">HHQ")  # class 60, weight 0, body size (then flags and properties)
_BASIC_PUBLISH = 0x003C0028
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_MAX_KEY = 128  # pamqp truncates longer header names (in bytes), and so does `_table`
_pamqp_log = logging.getLogger("pamqp.encode")  # where pamqp warns of a truncated name


def _put_short(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")  # as pamqp says
    return bytes((len(raw),)) + raw


def _table(headers: Any) -> bytes:
    """pamqp's `encode.field_table`, with text values (nearly all of Burrow's) encoded inline
    and floats, at any depth, as doubles."""
    if not headers:
        return b"\0\0\0\0"
    if not isinstance(headers, dict):
        raise TypeError(f"dict required, received {type(headers)}")
    parts = []
    for given, value in sorted(headers.items()):
        key, name = given, given.encode("utf-8")
        if len(name) > _MAX_KEY:
            _pamqp_log.warning("Truncating key %s to 128 bytes", given)
            key = name[:_MAX_KEY].decode("utf-8", "ignore")
            name = key.encode("utf-8")
        if type(value) is str:
            raw = value.encode("utf-8")
            parts.append(b"%c%sS%s%s" % (len(name), name, _UINT.pack(len(raw)), raw))
            continue
        try:
            parts.append(bytes((len(name),)) + name + _table_value(value))
        except TypeError as err:
            raise TypeError(f"{key} error: {err}") from err
    data = b"".join(parts)
    return _UINT.pack(len(data)) + data


def _array(items: Any) -> bytes:
    """pamqp's `encode.field_array`, floats as doubles."""
    if not isinstance(items, list):
        raise TypeError(f"list of values required, received {type(items)}")
    data = b"".join([_table_value(item) for item in items])
    return _UINT.pack(len(data)) + data


def _table_value(value: Any) -> bytes:
    """pamqp's `encode.encode_table_value`, but a float is a double and tables and arrays
    are Burrow's (so their floats are too)."""
    if isinstance(value, float):
        return b"d" + encode.double(value)
    if isinstance(value, dict):
        return b"F" + _table(value)
    if isinstance(value, list):
        return b"A" + _array(value)
    return encode.encode_table_value(value)


def _texts(parts: list[bytes], fields: tuple[tuple[int, str | None], ...]) -> int:
    """Append the short strings that are set (pamqp skips None and ""); their flags."""
    flags = 0
    for flag, text in fields:
        if text:
            flags |= flag
            parts.append(_put_short(text))
    return flags


def content_properties(
    *,
    content_type: str | None = None,
    content_encoding: str | None = None,
    headers: dict[str, Any] | None = None,
    delivery_mode: int | None = None,
    priority: int | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    expiration: str | None = None,
    message_id: str | None = None,
    timestamp: Any = None,
    message_type: str | None = None,
    app_id: str | None = None,
) -> bytes:
    """The property flags and values of a content header, as pamqp marshals them (header
    floats as doubles)."""
    parts: list[bytes] = []
    flags = _texts(parts, ((0x8000, content_type), (0x4000, content_encoding)))
    if headers is not None:
        flags |= 0x2000
        parts.append(_table(headers) if headers else b"\0\0\0\0")
    for flag, octet in ((0x1000, delivery_mode), (0x0800, priority)):
        if octet is not None:
            flags |= flag
            parts.append(bytes((octet,)))
    flags |= _texts(
        parts,
        ((0x0400, correlation_id), (0x0200, reply_to), (0x0100, expiration), (0x0080, message_id)),
    )
    if timestamp is not None:
        flags |= 0x0040
        parts.append(encode.timestamp(timestamp))
    flags |= _texts(parts, ((0x0020, message_type), (0x0008, app_id)))
    return struct.pack(">H", flags) + b"".join(parts)


def publish_frames(
    channel: int,
    *,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: bytes,
    body: bytes,
    max_content: int,
) -> bytes:
    """A Basic.Publish method frame, its content header and its body frames, as one buffer."""
    if len(routing_key) > 255:
        raise ValueError("Routing key too long (max 255 bytes)")  # as aiormq says
    method = (
        _PUBLISH_METHOD.pack(_BASIC_PUBLISH, 0)
        + _put_short(exchange)
        + _put_short(routing_key)
        + (b"\x01" if mandatory else b"\x00")
    )
    header = _HEADER.pack(60, 0, len(body)) + properties
    out = [
        _FRAME.pack(_FRAME_METHOD, channel, len(method)),
        method,
        _FRAME_END,
        _FRAME.pack(_FRAME_HEADER, channel, len(header)),
        header,
        _FRAME_END,
    ]
    for start in range(0, len(body), max_content):
        chunk = body[start : start + max_content]
        out += (_FRAME.pack(_FRAME_BODY, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(out)


async def publish(channel: Any, frames: bytes, message_id: str) -> asyncio.Future[Any] | None:
    """Queue one publish's `frames` on an aiormq channel; its confirmation, as `basic_publish`
    keeps it (None without publisher confirms).

    Each publish takes the next delivery tag and queues its frames in one step, so the broker
    numbers them as the tags say. Only when the connection's write queue is full (or another
    publish waits for it) does it wait, holding the channel's lock as `basic_publish` does,
    and a publish cancelled before its frames were queued gives its tag back.
    """
    queue: asyncio.Queue[ChannelFrame] = channel.write_queue
    frame = ChannelFrame(payload=frames, should_close=False)
    held: asyncio.Lock = channel._Channel__lock  # what `channel.lock` holds
    if not queue.full() and not held.locked():
        if channel.is_closed:
            raise ChannelInvalidStateError(f"{channel!r} closed")  # as `channel.lock` says
        confirmation = _expect_confirm(channel, message_id)
        queue.put_nowait(frame)
        return confirmation
    async with channel.lock:  # raises ChannelInvalidStateError once the channel is closed
        confirmation = _expect_confirm(channel, message_id)
        try:
            await queue.put(frame)
        except BaseException:
            if confirmation is not None:  # the broker never saw it: its tag is the next one's
                channel.confirmations.pop(channel.delivery_tag, None)
                channel.delivery_tag -= 1
                confirmation.cancel()
            raise
    return confirmation


def _expect_confirm(channel: Any, message_id: str) -> asyncio.Future[Any] | None:
    if not channel.publisher_confirms:
        return None
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    confirmation: asyncio.Future[Any] = channel.create_future()
    channel.confirmations[tag] = confirmation
    known: dict[str, int] = channel.message_id_delivery_tag
    known[message_id] = tag

    def forget(_: asyncio.Future[Any]) -> None:
        if known.get(message_id) == tag:
            del known[message_id]

    confirmation.add_done_callback(forget)
    return confirmation


def check_publishing(channel: object) -> None:
    """Fail loudly when aiormq's channel no longer keeps what `publish` and `ack` use."""
    for name in (
        "publisher_confirms",
        "delivery_tag",
        "confirmations",
        "message_id_delivery_tag",
        "write_queue",
        "lock",
        "_Channel__lock",
        "_Channel__close_event",
        "is_closed",
        "create_future",
        "max_content_size",
        "number",
    ):
        _private(channel, name)


_ACK = struct.Struct(">BHIIQB")  # method frame: type, channel, size, Basic.Ack, tag, multiple
_BASIC_ACK = 0x003C0050


def ack_frame(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """A Basic.Ack method frame (of one delivery, or of every one up to the tag with
    `multiple`), as pamqp marshals it."""
    return _ACK.pack(_FRAME_METHOD, channel, 13, _BASIC_ACK, delivery_tag, multiple) + _FRAME_END


def closed(channel: Any) -> bool:
    """True once the channel is closed or closing: a frame sent now would be refused."""
    return bool(channel.is_closed or channel._Channel__close_event.is_set())


def send(
    channel: Any, frames: bytes, written: asyncio.Future[None] | None = None
) -> Coroutine[Any, Any, None] | None:
    """Queue ready-made method frames (acks) on the channel's connection; when its write
    queue is full, the coroutine that waits for room (the caller runs it) instead.

    Args:
        written: resolved by aiormq's writer once the frames are handed to the socket.
    """
    if closed(channel):
        raise ChannelInvalidStateError(f"{channel!r} closed")  # as basic_ack says
    frame = ChannelFrame(payload=frames, should_close=False, drain_future=written)
    queue: asyncio.Queue[ChannelFrame] = channel.write_queue
    if queue.full():
        return queue.put(frame)
    queue.put_nowait(frame)
    return None
