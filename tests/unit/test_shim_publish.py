"""The shim's publish path writes exactly the bytes aiormq's `basic_publish` (through pamqp)
would, header floats as doubles, for every property and header type, and keeps aiormq's
confirmation bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
from collections.abc import AsyncIterator, Callable
from typing import Any
from unittest import mock

import pamqp.frame
import pytest
from aiormq import spec
from aiormq.exceptions import ChannelInvalidStateError
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import encode
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from service._amqp import shim

SHORT = st.text(max_size=40)
VALUES: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.text(max_size=30),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.binary(max_size=20),
        st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10**6),
        st.datetimes(
            min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1)
        ).map(lambda moment: moment.replace(microsecond=0, tzinfo=datetime.UTC)),
        st.none(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "content_type": SHORT,
        "content_encoding": SHORT,
        "headers": st.dictionaries(st.text(max_size=20), VALUES, max_size=6),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 9),
        "correlation_id": SHORT,
        "reply_to": SHORT,
        "expiration": st.integers(1, 10**9).map(str),
        "message_id": SHORT,
        "timestamp": st.datetimes(
            min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1)
        ).map(lambda moment: moment.replace(microsecond=0, tzinfo=datetime.UTC)),
        "message_type": SHORT,
        "app_id": SHORT,
    },
)


def _pamqp(
    channel: int, *, exchange: str, key: str, mandatory: bool, props: dict[str, Any], body: bytes
) -> bytes:
    """What aiormq sends for this publish: pamqp's marshal of each frame, with header floats
    as doubles (for the length of this call only: the oracle, not what Burrow does)."""
    stock = encode.encode_table_value

    def doubles(value: Any) -> bytes:
        return b"d" + encode.double(value) if isinstance(value, float) else stock(value)

    with mock.patch.object(encode, "encode_table_value", doubles):
        return _marshalled(
            channel, exchange=exchange, key=key, mandatory=mandatory, props=props, body=body
        )


def _marshalled(
    channel: int, *, exchange: str, key: str, mandatory: bool, props: dict[str, Any], body: bytes
) -> bytes:
    if len(key) > 255:
        raise ValueError("Routing key too long (max 255 bytes)")  # aiormq's check
    frames: list[Any] = [
        spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory),
        ContentHeader(properties=spec.Basic.Properties(**props), body_size=len(body)),
    ]
    frames += [ContentBody(body[i : i + 100]) for i in range(0, len(body), 100)]
    return b"".join(pamqp.frame.marshal(frame, channel) for frame in frames)


@settings(max_examples=400, deadline=None)
@given(
    channel=st.integers(1, 65535),
    # Burrow's exchange names (pamqp refuses others when it builds the frame; ours never are).
    exchange=st.from_regex(r"\A[a-zA-Z0-9_.:-]{0,40}\Z"),
    key=st.text(max_size=300),
    mandatory=st.booleans(),
    props=PROPERTIES,
    body=st.binary(max_size=350),
)
def test_publish_frames_are_pamqps_bytes(
    *, channel: int, exchange: str, key: str, mandatory: bool, props: dict[str, Any], body: bytes
) -> None:
    """For any properties, headers of every type, body size and split, the frames are the
    bytes pamqp marshals (or both refuse the value with the same error)."""

    def ours() -> bytes:
        return shim.publish_frames(
            channel,
            exchange=exchange,
            routing_key=key,
            mandatory=mandatory,
            properties=shim.content_properties(**props),
            body=body,
            max_content=100,
        )

    assert _outcome(ours) == _outcome(
        lambda: _pamqp(
            channel, exchange=exchange, key=key, mandatory=mandatory, props=props, body=body
        )
    )


def _outcome(make: Callable[[], bytes]) -> bytes | str:
    """The bytes made, or the type of the error raised instead (pamqp's text also names the
    header key it was encoding)."""
    try:
        return make()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__


def test_what_burrow_sends_is_pamqps_bytes() -> None:
    """A reply as the dispatcher builds it (text headers, a decimal, nested values)."""
    props: dict[str, Any] = {
        "content_type": "application/json",
        "headers": {
            "x-status": "ok",
            "x-job-id": "a" * 32,
            "x-contract-version": "1",
            "big": 2**40,
            "d": decimal.Decimal("1.50"),
            "nested": {"a": [1, "b"]},
            "k" * 200: "a header name pamqp truncates to 128 bytes",
        },
        "delivery_mode": 2,
        "correlation_id": "c1",
        "message_id": "m1",
        "message_type": "calc.add",
    }
    body = b'{"sum": 3}'
    ours = shim.publish_frames(
        7,
        exchange="",
        routing_key="amq.rabbitmq.reply-to.abc",
        mandatory=False,
        properties=shim.content_properties(**props),
        body=body,
        max_content=100,
    )
    assert ours == _pamqp(
        7, exchange="", key="amq.rabbitmq.reply-to.abc", mandatory=False, props=props, body=body
    )


def test_a_short_string_over_255_bytes_is_refused_as_pamqp_does() -> None:
    """A property or route over 255 bytes raises TypeError, as pamqp's encoder does."""
    with pytest.raises(TypeError):
        shim.content_properties(message_id="é" * 128)
    with pytest.raises(TypeError):
        shim.content_properties(reply_to="x" * 256)


class _Channel:
    """The attributes of an aiormq channel that `publish` reads and writes."""

    def __init__(self, confirms: bool, queue_size: int = 0) -> None:
        self._Channel__lock = asyncio.Lock()
        self._Channel__close_event = asyncio.Event()
        self.is_closed = False
        self.publisher_confirms = confirms
        self.delivery_tag = 0
        self.confirmations: dict[int, asyncio.Future[Any]] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue(queue_size)
        self.number = 1
        self.max_content_size = 100

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    @property
    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        async with self._Channel__lock:
            yield


async def test_publish_keeps_aiormqs_confirmation_bookkeeping() -> None:
    """Each publish takes the next delivery tag, a confirmation future and a message-id entry
    (dropped once settled), and queues its frames in call order."""
    channel = _Channel(confirms=True)
    first = await shim.publish(channel, b"one", "m1")
    second = await shim.publish(channel, b"two", "m2")
    assert first is not None
    assert second is not None
    assert channel.confirmations == {1: first, 2: second}
    assert channel.message_id_delivery_tag == {"m1": 1, "m2": 2}
    assert [channel.write_queue.get_nowait().payload for _ in range(2)] == [b"one", b"two"]
    first.set_result(spec.Basic.Ack(delivery_tag=1))
    await asyncio.sleep(0)
    assert channel.message_id_delivery_tag == {"m2": 2}
    shim.check_publishing(channel)


async def test_publish_without_confirms_has_no_confirmation() -> None:
    """On a channel without publisher confirms the frames are queued and nothing is kept."""
    channel = _Channel(confirms=False)
    assert await shim.publish(channel, b"x", "m") is None
    assert channel.delivery_tag == 0
    assert channel.write_queue.qsize() == 1


async def test_a_full_write_queue_keeps_tags_in_frame_order() -> None:
    """When the write queue is full, publishes wait in turn under the channel's lock: the
    order of their frames is the order of their delivery tags, and a publish cancelled while
    waiting gives its tag back."""
    channel = _Channel(confirms=True, queue_size=1)
    await shim.publish(channel, b"0", "m0")  # the queue is full now
    waiting = [asyncio.ensure_future(shim.publish(channel, b"%d" % i, f"m{i}")) for i in (1, 2)]
    cancelled = asyncio.ensure_future(shim.publish(channel, b"x", "mx"))
    await asyncio.sleep(0)
    cancelled.cancel()
    sent: list[Any] = []
    while len(sent) < 3:
        sent.append(await channel.write_queue.get())
        await asyncio.sleep(0)
    await asyncio.gather(*waiting)
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    assert [frame.payload for frame in sent] == [b"0", b"1", b"2"]
    assert sorted(channel.confirmations) == [1, 2, 3]
    assert channel.message_id_delivery_tag == {"m0": 1, "m1": 2, "m2": 3}
    assert channel.delivery_tag == 3


async def test_publishing_on_a_closed_channel_is_refused() -> None:
    """A closed channel refuses the publish as aiormq does (ChannelInvalidStateError)."""
    channel = _Channel(confirms=True)
    channel.is_closed = True
    with pytest.raises(ChannelInvalidStateError):
        await shim.publish(channel, b"x", "m")
    assert channel.delivery_tag == 0


@given(channel=st.integers(1, 65535), tag=st.integers(1, 2**63 - 1))  # pamqp's signed range
def test_ack_frames_are_pamqps_bytes(channel: int, tag: int) -> None:
    """A Basic.Ack frame for any channel and delivery tag is the bytes pamqp marshals."""
    expected = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=tag), channel)
    assert shim.ack_frame(channel, tag) == expected


def test_multiple_ack_frames_are_pamqps_bytes() -> None:
    """A Basic.Ack with `multiple` is the bytes pamqp marshals."""
    expected = pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=9, multiple=True), 4)
    assert shim.ack_frame(4, 9, multiple=True) == expected


async def test_send_queues_frames_and_refuses_a_closed_channel() -> None:
    """Frames join the write queue; on a closed channel they are refused as aiormq refuses an
    ack; a full queue hands back the wait for room."""
    channel = _Channel(confirms=True)
    assert shim.send(channel, shim.ack_frame(1, 5)) is None
    assert channel.write_queue.get_nowait().payload == shim.ack_frame(1, 5)
    full = _Channel(confirms=True, queue_size=1)
    full.write_queue.put_nowait(None)
    waiting = shim.send(full, b"x")
    assert waiting is not None
    waiting.close()
    channel.is_closed = True
    with pytest.raises(ChannelInvalidStateError):
        shim.send(channel, shim.ack_frame(1, 6))
