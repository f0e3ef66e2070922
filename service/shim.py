"""What Burrow changes in the AMQP libraries under it: pamqp's decoders made tolerant,
aiormq's frame writer made to coalesce, and publishes framed in one pass.

pamqp raises on a non-UTF-8 short string, recurses without bound into nested tables and
overflows on far-away timestamps; any of these in one delivery kills aiormq's connection, and
the broker redelivers the message for ever. `install()` swaps those decoders for ones that
return an `Undecodable` marker instead, so the envelope reader can refuse the message. It also
makes pamqp write header floats as doubles (`d`): it writes single precision (`f`), which loses
a Java client's double and cannot hold one beyond 3.4e38 at all.

aiormq writes each queued frame with its own socket write (a system call each). `install()`
makes its writer take every frame already queued for the connection, up to `MAX_BATCH_BYTES`,
and write them in one call, in order: under load one write carries many publishes and acks.
Frames that asked to be drained are drained together after that write; a connection-close
frame ends a batch.

`publish_frames` and `publish` replace aiormq's `basic_publish` for Burrow's publishes: the
same bytes (see their section below), a fraction of its CPU. On the way in, `install()` makes
aiormq's frame reader take each frame in two reads and decode the frames of every delivery and
confirm (Basic.Deliver, Basic.Ack, content header, body) directly; every other frame still
goes through pamqp, and the objects are pamqp's, with the same values (`read_frame`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, cast

from aiormq import channel as aiormq_channel
from aiormq import connection as aiormq_connection
from aiormq.abc import ChannelFrame, TaskType, TaskWrapper
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    InvalidFrameError,
    ProtocolSyntaxError,
)
from pamqp import base, commands, decode, encode
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

from service.vocabulary import H_UNDECODABLE

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_DEPTH",
    "UNDECODABLE_HEADER",
    "Undecodable",
    "install",
    "connection_blocked",
    "expire_heartbeat_grace",
    "installed",
    "reader_task",
    "silent_for",
    "ack_frame",
    "closed",
    "send",
    "check_publishing",
    "content_properties",
    "publish",
    "publish_frames",
]

MAX_DEPTH = 32  # tables and arrays nested deeper than this are not decoded
MAX_BATCH_BYTES = 256 * 1024  # a coalesced write stops growing past this
UNDECODABLE_HEADER = H_UNDECODABLE  # set when the properties as a whole failed

_Decoder = Callable[[bytes], tuple[int, Any]]
_UINT = struct.Struct(">I")


class Undecodable(str):
    """A value the AMQP library could not decode. As a str it is a printable escape of the
    bytes (safe to log length-capped, to compare, to re-encode); `raw` keeps the bytes."""

    raw: bytes
    problem: str
    made: ClassVar[int] = 0  # markers made in this process: 0 means no delivery can hold one

    @classmethod
    def of(cls, raw: bytes, problem: str) -> Undecodable:
        """The marker for `raw`, which could not be decoded because of `problem`."""
        cls.made += 1
        value = cls(raw.decode("utf-8", "backslashreplace"))
        value.raw = raw
        value.problem = problem
        return value


class _Depth(threading.local):
    level = 0


_depth = _Depth()
_original: dict[str, Any] = {}
_aiormq_log = logging.getLogger("aiormq.channel")  # where aiormq says what we now do


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
    decoder = decode.TABLE_MAPPING.get(data[offset : offset + 1])
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


def _timestamp(value: bytes) -> tuple[int, Any]:
    try:
        return _original["timestamp"](value)  # type: ignore[no-any-return]
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from None
        return 8, Undecodable.of(bytes(value[:8]), "timestamp out of range")


def _properties_unmarshal(self: base.BasicProperties, flags: int, data: bytes) -> None:
    try:
        _original["properties"](self, flags, data)
    except Exception as exc:  # any failure here would kill the connection
        _undecodable_properties(self, exc)


def _undecodable_properties(properties: object, exc: Exception) -> None:
    # What was decoded before the failure stays; the rest is lost. The marker tells the
    # envelope reader to refuse the message as undecodable.
    problem = f"properties could not be decoded: {type(exc).__name__}"
    cast(Any, properties).headers = {UNDECODABLE_HEADER: Undecodable.of(b"", problem)}


def _table_value(value: Any) -> bytes:
    if type(value) is float:
        return b"d" + encode.double(value)
    return _original["table_value"](value)  # type: ignore[no-any-return]


def silent_for(connection: object) -> float | None:
    """Seconds since aiormq last read a frame on `connection` (its private record, the one its
    own heartbeat check reads); None when the connection or the record is not there."""
    last = getattr(connection, "_Connection__last_frame_time", None)
    loop = getattr(connection, "loop", None)
    if not isinstance(last, float) or loop is None:
        return None
    return float(loop.time() - last)


class _Batch:
    """Frames taken from a connection's write queue together: what aiormq's writer reads of
    a `ChannelFrame` (payload, should_close, should_drain, drain), for all of them."""

    __slots__ = ("_frames", "payload", "should_close")

    def __init__(self, frames: list[ChannelFrame]) -> None:
        self._frames = frames
        self.payload = b"".join([frame.payload for frame in frames])
        self.should_close = frames[-1].should_close  # a close frame ends its batch

    @property
    def should_drain(self) -> bool:
        return any(frame.should_drain for frame in self._frames)

    def drain(self) -> None:
        for frame in self._frames:
            frame.drain()


async def _next_frames(self: Any) -> ChannelFrame | _Batch:
    """`FrameGenerator.__anext__`, taking every frame queued by now (see the module doc)."""
    if self.close_event.is_set():
        raise StopAsyncIteration
    queue: asyncio.Queue[ChannelFrame] = self.queue
    frame = await queue.get()
    queue.task_done()
    if frame.should_close or queue.empty():
        return frame  # (yielding once first to gather more was measured: no more per write)
    frames, size = [frame], len(frame.payload)
    while size < MAX_BATCH_BYTES and not queue.empty():
        frame = queue.get_nowait()
        queue.task_done()
        frames.append(frame)
        size += len(frame.payload)
        if frame.should_close:
            break
    return _Batch(frames)


_DELIVER_INDEX, _ACK_INDEX = 0x003C003C, 0x003C0050
_TAG = struct.Struct(">qB")  # delivery tag (signed, as pamqp reads a longlong), then a bit octet


def read_frame(head: bytes, rest: bytes) -> tuple[int, int, Any]:
    """`pamqp.frame.unmarshal(head + rest)`: (bytes used, channel, frame), with Basic.Deliver,
    Basic.Ack, content header and body frames decoded here and everything else (or anything
    malformed, or a second property-flag word) by pamqp.

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
            try:
                frame = _method(_UINT.unpack_from(rest)[0], rest, size)
            except (ValueError, struct.error, IndexError):
                frame = None  # pamqp says what is wrong with it
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
        return None  # pamqp decides what a frame of another length means
    deliver = _new(commands.Basic.Deliver)
    deliver.consumer_tag, deliver.delivery_tag = consumer_tag, tag
    deliver.redelivered = bool(bits & 1)
    deliver.exchange, deliver.routing_key = exchange, routing_key
    return deliver


_HEADER_FIXED = struct.Struct(">HHQH")  # class, weight, body size, first property-flag word
_PROPERTIES = tuple(
    (flag, name, getattr(commands.Basic.Properties, "_" + name))
    for name, flag in commands.Basic.Properties.flags.items()
)  # in wire order, as pamqp decodes them
_BLANK = {name: None for _, name, _ in _PROPERTIES} | {"cluster_id": ""}  # Properties()'s


def _content_header(rest: bytes, size: int) -> ContentHeader | None:
    """A content header frame as pamqp's `ContentHeader.unmarshal` (with Burrow's tolerant
    property decoding) leaves it; None for a second flag word (pamqp's to decode)."""
    class_id, weight, body_size, flags = _HEADER_FIXED.unpack_from(rest)
    if flags & 1:
        return None
    properties = _new(commands.Basic.Properties)
    for name, blank in _BLANK.items():
        setattr(properties, name, blank)
    try:
        _decode_properties(properties, flags, rest, _HEADER_FIXED.size, size)
    except Exception as exc:  # as _properties_unmarshal: never kill the connection
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
        else:  # table, timestamp: the tolerant decoders `install()` put in pamqp
            used, value = decode.by_type(data[offset:end], kind)
            offset += used
        setattr(properties, name, value)


def _new(cls: type[Any]) -> Any:
    # pamqp's unmarshal also sets decoded values without validating them; __init__ would.
    return object.__new__(cls)


class _Inline:
    """A consumer callback aiormq can run as a task, and the shim's reader calls directly."""

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
    """A consumer callback for `basic_consume` whose deliveries `install()`'s reader hands to
    `inline` in the channel's reader instead of a task running `call` (the same work)."""
    return _Inline(call, inline)


async def _on_deliver_frame(self: Any, frame: Any) -> None:
    """`Channel._on_deliver_frame`, calling an `inline_consumer` in place (no task)."""
    header = await self._Channel__get_content_header()
    message = await self._read_content(frame, header)
    if frame.consumer_tag is None:
        _aiormq_log.warning("Frame %r has no consumer tag", frame)
        return
    consumer = self.consumers.get(frame.consumer_tag)
    if consumer is None:
        return
    inline = getattr(consumer, "burrow_inline", None)
    if inline is not None:
        try:
            inline(message)
        except Exception:
            _aiormq_log.exception("Consumer callback failed")  # as aiormq logs a task's failure
        return
    task = self.create_task(consumer(message))
    task.add_done_callback(self._on_consumer_done)


async def _get_frame(self: Any) -> tuple[int, int, Any]:
    """`FrameReceiver.get_frame`: the same frames and errors, two reads per frame."""
    reader = self.reader
    if reader.at_eof():
        del self.reader
        raise StopAsyncIteration
    async with self.lock:
        try:
            head = await reader.readexactly(_FRAME.size)
            if not self.started:
                if head.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
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


def install() -> None:
    """Make pamqp's decoding tolerant and aiormq's writer coalesce (idempotent; process-wide,
    as pamqp's tables and aiormq's classes are)."""
    if _original:
        return
    generator = getattr(aiormq_connection, "FrameGenerator", None)
    if generator is None or "__anext__" not in vars(generator):
        raise RuntimeError("aiormq.connection.FrameGenerator.__anext__ is gone: aiormq changed")
    for name in ("queue", "close_event"):
        if name not in generator.__init__.__code__.co_names:
            raise RuntimeError(f"aiormq's FrameGenerator has no {name!r}: aiormq changed")
    _original["frames"] = generator.__anext__
    generator.__anext__ = _next_frames
    receiver = getattr(aiormq_connection, "FrameReceiver", None)
    if receiver is None or "get_frame" not in vars(receiver):
        raise RuntimeError("aiormq.connection.FrameReceiver.get_frame is gone: aiormq changed")
    for name in ("reader", "lock", "started"):
        if name not in receiver.__init__.__code__.co_names:
            raise RuntimeError(f"aiormq's FrameReceiver has no {name!r}: aiormq changed")
    _original["get_frame"] = receiver.get_frame
    receiver.get_frame = _get_frame
    deliver = vars(aiormq_channel.Channel).get("_on_deliver_frame")
    used = {"_Channel__get_content_header", "_read_content", "consumers", "create_task"}
    if deliver is None or not used <= set(deliver.__code__.co_names):
        raise RuntimeError("aiormq's Channel._on_deliver_frame changed: review shim.py")
    _original["deliver"] = deliver
    aiormq_channel.Channel._on_deliver_frame = _on_deliver_frame  # type: ignore[method-assign]
    _original["timestamp"] = decode.timestamp
    _original["properties"] = base.BasicProperties.unmarshal
    _original["table_value"] = encode.encode_table_value
    replacements: dict[str, _Decoder] = {
        "shortstr": _short_str,
        "table": _field_table,
        "array": _field_array,
        "timestamp": _timestamp,
    }
    for name, decoder in replacements.items():
        if name not in decode.METHODS:
            raise RuntimeError(f"pamqp.decode.METHODS has no {name!r}: pamqp changed")
        decode.METHODS[name] = decoder
    for tag, decoder in ((b"F", _field_table), (b"A", _field_array), (b"T", _timestamp)):
        if tag not in decode.TABLE_MAPPING:
            raise RuntimeError(f"pamqp.decode.TABLE_MAPPING has no {tag!r}: pamqp changed")
        decode.TABLE_MAPPING[tag] = decoder
    decode.short_str = _short_str
    decode.field_table = _field_table  # type: ignore[assignment]
    decode.field_array = _field_array  # type: ignore[assignment]
    decode.timestamp = _timestamp
    base.BasicProperties.unmarshal = _properties_unmarshal  # type: ignore[method-assign]
    encode.encode_table_value = _table_value


def installed() -> bool:
    """Whether `install()` is in effect (and pamqp still dispatches through its tables)."""
    return (
        bool(_original)
        and decode.METHODS.get("shortstr") is _short_str
        and decode.TABLE_MAPPING.get(b"F") is _field_table
        and base.BasicProperties.unmarshal is _properties_unmarshal
        and encode.encode_table_value is _table_value
        and vars(aiormq_connection.FrameGenerator).get("__anext__") is _next_frames
        and vars(aiormq_connection.FrameReceiver).get("get_frame") is _get_frame
        and vars(aiormq_channel.Channel).get("_on_deliver_frame") is _on_deliver_frame
    )


# -- aiormq's private connection state: each accessor fails loudly when aiormq renames it ------


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
_MAX_KEY = 128  # pamqp truncates longer header names: its path keeps that rule


def _put_short(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")  # as pamqp says
    return bytes((len(raw),)) + raw


def _table(headers: dict[str, Any]) -> bytes:
    """pamqp's `field_table`, with text values (nearly all of Burrow's) encoded inline."""
    parts = []
    for key, value in sorted(headers.items()):
        name = key.encode("utf-8")
        if len(name) > _MAX_KEY:
            return encode.field_table(headers)
        if type(value) is str:
            raw = value.encode("utf-8")
            parts.append(b"%c%sS%s%s" % (len(name), name, _UINT.pack(len(raw)), raw))
        else:
            parts.append(bytes((len(name),)) + name + encode.encode_table_value(value))
    data = b"".join(parts)
    return _UINT.pack(len(data)) + data


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
    """The property flags and values of a content header, as pamqp marshals them."""
    if timestamp is not None:  # rare (a copy of a received message): pamqp's own encoder
        return commands.Basic.Properties(
            content_type=content_type,
            content_encoding=content_encoding,
            headers=headers,
            delivery_mode=delivery_mode,
            priority=priority,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=expiration,
            message_id=message_id,
            timestamp=timestamp,
            message_type=message_type,
            app_id=app_id,
        ).marshal()
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
