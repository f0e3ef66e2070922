"""The frame reader's own decoding (`shim.read_frame`) gives what pamqp gives with Burrow's
tolerant field decoders in its tables, for any bytes."""

from __future__ import annotations

import contextlib
import datetime
import struct
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import base, decode
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from service._amqp import shim

_SHORT = st.binary(max_size=255)  # any bytes: not UTF-8 must come out Undecodable, as pamqp's


def _short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _frame(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + end


def _same(ours: tuple[int, int, Any], theirs: tuple[int, int, Any]) -> None:
    assert ours[:2] == theirs[:2]
    mine, pamqps = ours[2], theirs[2]
    assert type(mine) is type(pamqps)
    if isinstance(pamqps, ContentBody):
        assert mine.value == pamqps.value
        return
    if isinstance(pamqps, ContentHeader):
        assert (mine.class_id, mine.weight, mine.body_size) == (
            pamqps.class_id,
            pamqps.weight,
            pamqps.body_size,
        )
        mine, pamqps = mine.properties, pamqps.properties
    for name in getattr(pamqps, "__slots__", ()):
        a, b = getattr(mine, name), getattr(pamqps, name)
        assert (type(a), a) == (type(b), b), name


@contextlib.contextmanager
def _pamqp_made_tolerant() -> Iterator[None]:
    """The oracle, for the length of one call: pamqp's own decoding with Burrow's field
    decoders in its tables, and properties that fail marked instead of raising. (Burrow's
    connections never change pamqp; only this test does, and puts it back.)"""
    stock = base.BasicProperties.unmarshal

    def unmarshal(self: base.BasicProperties, flags: int, data: bytes) -> None:
        try:
            stock(self, flags, data)
        except Exception as exc:
            shim._undecodable_properties(self, exc)

    with (
        mock.patch.dict(decode.METHODS, shim._FIELD_TYPES),
        mock.patch.dict(decode.TABLE_MAPPING, shim._TABLE_TYPES),
        mock.patch.object(base.BasicProperties, "unmarshal", unmarshal),
    ):
        yield


def _pamqps(data: bytes) -> tuple[int, int, Any]:
    with _pamqp_made_tolerant():
        return pamqp.frame.unmarshal(data)


def _check(data: bytes) -> None:
    head, rest = data[:7], data[7:]
    try:
        theirs = _pamqps(data)
    except Exception as exc:  # PAMQPException, or pamqp's own ValueError / struct.error
        with pytest.raises(type(exc)):
            shim.read_frame(head, rest)
        return
    _same(shim.read_frame(head, rest), theirs)


@given(
    channel=st.integers(0, 65535),
    consumer_tag=_SHORT,
    tag=st.integers(0, 2**64 - 1),
    bits=st.integers(0, 255),
    exchange=_SHORT,
    routing_key=_SHORT,
)
def test_deliver_frames_decode_as_pamqp_decodes_them(  # noqa: PLR0917 (Hypothesis draws)
    channel: int, consumer_tag: bytes, tag: int, bits: int, exchange: bytes, routing_key: bytes
) -> None:
    """A Basic.Deliver with any tag, flags and (even non-UTF-8) short strings."""
    payload = (
        struct.pack(">I", 0x003C003C)
        + _short(consumer_tag)
        + struct.pack(">QB", tag, bits)
        + _short(exchange)
        + _short(routing_key)
    )
    _check(_frame(1, channel, payload))


@given(channel=st.integers(0, 65535), tag=st.integers(0, 2**64 - 1), bits=st.integers(0, 255))
def test_ack_frames_decode_as_pamqp_decodes_them(channel: int, tag: int, bits: int) -> None:
    """A Basic.Ack (a publisher confirm) with any tag and flag octet."""
    _check(_frame(1, channel, struct.pack(">IQB", 0x003C0050, tag, bits)))


@given(channel=st.integers(0, 65535), body=st.binary(max_size=2048))
def test_body_frames_decode_as_pamqp_decodes_them(channel: int, body: bytes) -> None:
    """A body frame of any bytes."""
    _check(_frame(3, channel, body))


_TEXT = st.text(max_size=40)
_VALUES = st.one_of(st.integers(-(2**31), 2**31 - 1), st.text(max_size=20), st.booleans())


@given(
    channel=st.integers(0, 65535),
    body_size=st.integers(0, 2**63 - 1),
    texts=st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(
            (
                "content_type",
                "content_encoding",
                "correlation_id",
                "reply_to",
                "expiration",
                "message_id",
                "message_type",
                "user_id",
                "app_id",
            ),
            _TEXT,
        ),
    ),
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=10), _VALUES, max_size=5),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    timestamp=st.none()
    | st.datetimes(datetime.datetime(1971, 1, 1), datetime.datetime(2100, 1, 1)),
)
def test_content_header_frames_decode_as_pamqp_decodes_them(  # noqa: PLR0917 (Hypothesis draws)
    channel: int,
    body_size: int,
    texts: dict[str, str],
    headers: dict[str, Any] | None,
    delivery_mode: int | None,
    priority: int | None,
    timestamp: datetime.datetime | None,
) -> None:
    """A content header with any mix of properties, as a client would send it."""
    properties = spec.Basic.Properties(
        headers=headers,
        delivery_mode=delivery_mode,
        priority=priority,
        timestamp=None if timestamp is None else timestamp.replace(microsecond=0),
        **texts,
    )
    _check(pamqp.frame.marshal(ContentHeader(body_size=body_size, properties=properties), channel))


@given(
    flags=st.integers(0, 65535),
    payload=st.binary(max_size=120),
    channel=st.integers(0, 65535),
)
def test_any_content_header_bytes_decode_as_pamqp_decodes_them(
    flags: int, payload: bytes, channel: int
) -> None:
    """Any property flags over any bytes (truncated strings, broken tables, a second flag
    word): the same values, the same undecodable marker, or pamqp's frame."""
    _check(_frame(2, channel, struct.pack(">HHQH", 60, 0, len(payload), flags) + payload))


@given(data=st.binary(min_size=7, max_size=64), end=st.sampled_from([b"\xce", b"\x00"]))
def test_any_bytes_decode_or_fail_as_pamqp_does(data: bytes, end: bytes) -> None:
    """Truncated, overlong, foreign or badly ended frames: pamqp's frame or pamqp's error."""
    frame_type = data[0] % 4 or 1
    _check(_frame(frame_type, 1, data[7:]) if data[1] % 2 else _frame(frame_type, 1, data, end))


@given(payload=st.binary(max_size=40))
def test_truncated_deliver_and_ack_frames_fail_as_pamqp_fails(payload: bytes) -> None:
    """A Deliver or Ack method frame with a short or long payload is pamqp's to judge."""
    for index in (0x003C003C, 0x003C0050):
        _check(_frame(1, 1, struct.pack(">I", index) + payload))


def test_other_frames_are_pamqps() -> None:
    """Returns and closes decode as pamqp decodes them."""
    frames = [
        pamqp.frame.marshal(spec.Basic.Return(reply_code=312, exchange="x", routing_key="k"), 2),
        pamqp.frame.marshal(
            spec.Channel.Close(reply_code=406, reply_text="bad", class_id=60, method_id=40), 2
        ),
    ]
    for data in frames:
        _check(data)


class _DeliveringChannel(shim._AmqpChannel):
    """A Burrow channel with what `Channel._on_deliver_frame` reads of it stood in for."""

    def __init__(self, consumer: Any) -> None:  # no connection: aiormq's own is not called
        self.consumers = {"ctag": consumer}
        self.tasks: list[Any] = []

    async def _Channel__get_content_header(self) -> ContentHeader:
        return ContentHeader(body_size=0)

    async def _read_content(self, frame: Any, header: ContentHeader) -> Any:
        return frame, header

    def create_task(self, coro: Any) -> Any:
        self.tasks.append(coro)
        coro.close()
        return _Task()


class _Task:
    def add_done_callback(self, callback: Any) -> None:
        """What aiormq calls on the task it made."""


async def test_inline_consumers_run_in_the_reader_and_others_get_a_task() -> None:
    """A delivery for an inline consumer is handled before the frame's turn ends, with no
    task; any other consumer still gets aiormq's task; a failing inline one is logged."""
    handled: list[Any] = []

    async def as_task(message: Any) -> None:
        handled.append(("task", message))

    deliver = spec.Basic.Deliver(consumer_tag="ctag", delivery_tag=1)
    inline = _DeliveringChannel(shim.inline_consumer(as_task, handled.append))
    await inline._on_deliver_frame(deliver)
    assert len(handled) == 1
    assert handled[0][0] is deliver
    assert not inline.tasks

    plain = _DeliveringChannel(as_task)
    await plain._on_deliver_frame(deliver)
    assert len(plain.tasks) == 1
    assert len(handled) == 1

    def fails(_: Any) -> None:
        raise RuntimeError("boom")

    await _DeliveringChannel(shim.inline_consumer(as_task, fails))._on_deliver_frame(deliver)
